"""GPU correctness and timing of the selection and sliding-window attention kernels (one run, one GPU).

    python benchmarks/check/check_branches_gpu.py [--out DIR] [--lengths 32768 131072] [--sweep]

1. Correctness at real head shapes (HQ=28/HKV=4, D=128, bf16; HQ=HKV=4, D=64, fp16; packed varlen), forward
   and backward, against a dense masked float32 reference: relative error ||x - ref|| / ||ref|| per tensor,
   NaN checks, outputs written everywhere (memory poisoned with NaN first), bitwise-deterministic backward.
2. Timing (B=1, HQ=28, HKV=4, D=128, bf16, block 64, 32 blocks, window 256) at each length, for two kinds of
   selection: "random" (the current block + 31 uniformly random visible blocks per token: neighbouring tokens
   share almost nothing, the worst case for tiles) and "clustered" (scores that drift slowly along the
   sequence, as in trained models where neighbouring tokens pick mostly the same blocks). Variants: query tile
   heights, dk/dv chunk heights; the host-side index building is timed on its own; dense causal SDPA (flash)
   in the same run as the baseline.

Prints a table last and writes everything to OUT/check_branches_gpu.{json,md} (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import traceback
from functools import partial
from itertools import pairwise
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
from harness import BLOCK, COUNT, WINDOW, describe, open_run  # noqa: E402
from harness import bench as harness_bench  # noqa: E402
from harness import rel_error as rel  # noqa: E402

# Kernel internals: the selection and window modules' launchers, planners and list builders.
from videonsa.ops.triton import selection as slc  # noqa: E402
from videonsa.ops.triton import utils as U  # noqa: E402
from videonsa.ops.triton import window as swa  # noqa: E402

DEVICE = "cuda"
TIMING_SHAPE = (28, 4, 128)  # HQ, HKV, D
SWEEP = False  # --sweep: also time the launch-setting variants (how the defaults were chosen)
# (name, HQ, HKV, D, dtype, packed sequence lengths)
CASES = [
    ("7:1 bf16 D128 varlen", 28, 4, 128, torch.bfloat16, [1000, 2600, 77, 400]),
    ("1:1 fp16 D64", 4, 4, 64, torch.float16, [3000]),
    ("2:1 bf16 D64 varlen", 8, 4, 64, torch.bfloat16, [129, 2000, 1]),
]


# ----------------------------------------------------------------------------------------------------------
# Inputs


def _top_blocks(score: torch.Tensor, pos: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """score [n, HKV, n_blocks] (>= 0) -> int32 [n, HKV, COUNT]: current block forced, best visible others."""
    block = torch.arange(n_blocks, device=score.device)
    visible = block[None, :] < ((pos + 1) // BLOCK)[:, None]
    current = block[None, :] == (pos // BLOCK)[:, None]
    score = torch.where(visible[:, None], score, -1.0)
    score = torch.where(current[:, None], math.inf, score)
    top = score.topk(min(COUNT, n_blocks), dim=-1)
    idx = torch.where(top.values >= 0, top.indices, n_blocks).sort(dim=-1).values
    idx = torch.where(idx == n_blocks, -1, idx).to(torch.int32)
    return F.pad(idx, (0, COUNT - idx.shape[-1]), value=-1)


def random_selection(cu: list[int], heads_kv: int, device: str, gen: torch.Generator, **_) -> torch.Tensor:
    """The current block plus up to COUNT-1 uniformly random visible blocks per token and group."""
    out = torch.full((cu[-1], heads_kv, COUNT), -1, dtype=torch.int32, device=device)
    for a, b in pairwise(cu):
        n_blocks = -(-(b - a) // BLOCK)
        for s in range(a, b, 8192):
            e = min(b, s + 8192)
            pos = torch.arange(s - a, e - a, device=device)
            score = torch.rand((e - s, heads_kv, n_blocks), device=device, generator=gen)
            out[s:e] = _top_blocks(score, pos, n_blocks)
    return out


def clustered_selection(cu: list[int], heads_kv: int, device: str, gen: torch.Generator, **_) -> torch.Tensor:
    """Selections that change slowly along the sequence: a fixed block importance per group plus noise redrawn
    every 64 tokens, so the tokens of one 64-token stretch choose the same blocks (plus the current one)."""
    out = torch.full((cu[-1], heads_kv, COUNT), -1, dtype=torch.int32, device=device)
    for a, b in pairwise(cu):
        n_blocks = -(-(b - a) // BLOCK)
        base = torch.rand((heads_kv, n_blocks), device=device, generator=gen)
        for s in range(a, b, 8192):
            e = min(b, s + 8192)
            pos = torch.arange(s - a, e - a, device=device)
            stretch = torch.rand((-(-(e - s) // 64) + 1, heads_kv, n_blocks), device=device, generator=gen)
            score = base + 0.5 * stretch[(pos - (s - a)) // 64]
            out[s:e] = _top_blocks(score, pos, n_blocks)
    return out


def nsa_selection(cu: list[int], heads_kv: int, device: str, gen: torch.Generator, *, q, k) -> torch.Tensor:
    """NSA's own choice on the given q, k (random in the benchmark): compression softmax over block-mean keys,
    summed over each group's heads, top blocks plus the current one. What the full operator would select."""
    out = torch.full((cu[-1], heads_kv, COUNT), -1, dtype=torch.int32, device=device)
    heads_q, head_dim = q.shape[1], q.shape[2]
    group = heads_q // heads_kv
    for a, b in pairwise(cu):
        n_blocks = -(-(b - a) // BLOCK)
        complete = (b - a) // BLOCK
        k_cmp = k[a : a + complete * BLOCK].float().view(complete, BLOCK, heads_kv, head_dim).mean(1)
        for s in range(a, b, 1024):
            e = min(b, s + 1024)
            pos = torch.arange(s - a, e - a, device=device)
            qg = q[s:e].float().view(e - s, heads_kv, group, head_dim)
            logits = torch.einsum("ngsd,jgd->ngsj", qg, k_cmp) * head_dim**-0.5
            visible = torch.arange(complete, device=device)[None, :] < ((pos + 1) // BLOCK)[:, None]
            logits = logits.masked_fill(~visible[:, None, None, :], -math.inf)
            probs = torch.softmax(logits, dim=-1).nan_to_num(0.0).sum(2)  # [n, HKV, complete]
            score = F.pad(probs, (0, n_blocks - complete), value=0.0)
            out[s:e] = _top_blocks(score, pos, n_blocks)
    return out


def dense_mask_selection(idx: torch.Tensor, cu: list[int], group: int) -> torch.Tensor:
    """bool [T, HQ, T]: query row t of head h may see key s (same sequence, selected block, s <= t)."""
    total, heads_kv, _ = idx.shape
    allowed = torch.zeros((total, heads_kv, total), dtype=torch.bool, device=idx.device)
    for a, b in pairwise(cu):
        pos = torch.arange(b - a, device=idx.device)
        key_block = pos // BLOCK  # [L]
        sel = idx[a:b].long()  # [L, HKV, S]
        hit = (sel[:, :, :, None] == key_block[None, None, None, :]).any(dim=2)  # [L, HKV, L]
        hit &= pos[None, None, :] <= pos[:, None, None]
        allowed[a:b, :, a:b] = hit
    return allowed.repeat_interleave(group, dim=1)


def dense_mask_window(total: int, cu: list[int], heads_q: int, device: str) -> torch.Tensor:
    allowed = torch.zeros((total, total), dtype=torch.bool, device=device)
    for a, b in pairwise(cu):
        pos = torch.arange(b - a, device=device)
        diff = pos[:, None] - pos[None, :]
        allowed[a:b, a:b] = (diff >= 0) & (diff < WINDOW)
    return allowed[:, None, :].expand(total, heads_q, total)


def dense_reference(q, k, v, allowed, scale):
    """float32 masked attention over q [T,HQ,D], k/v [T,HKV,D]; returns (o, lse); differentiable."""
    group = q.shape[1] // k.shape[1]
    kk = k.float().repeat_interleave(group, dim=1)
    vv = v.float().repeat_interleave(group, dim=1)
    s = scale * torch.einsum("thd,shd->ths", q.float(), kk)
    s = s.masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.where(allowed, torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None]), 0.0)
    return torch.einsum("ths,shd->thd", p, vv), lse


def poison() -> None:
    """Leave NaN in the caching allocator's free blocks so unwritten outputs show up as NaN."""
    if DEVICE != "cuda":
        return
    junk = torch.full((1 << 28,), float("nan"), dtype=torch.float32, device="cuda")
    del junk


# ----------------------------------------------------------------------------------------------------------
# Correctness


def compare_to_reference(o, lse, grads, again, o_ref, lse_ref, leaves) -> dict:
    """Relative errors of a kernel's o, lse and (dq, dk, dv) against the dense reference (whose leaves hold its
    gradients), whether anything is NaN, and whether a second backward (`again`) gave the same bits."""
    return {
        "o": rel(o, o_ref), "lse": rel(lse, lse_ref),
        "dq": rel(grads[0], leaves[0].grad), "dk": rel(grads[1], leaves[1].grad),
        "dv": rel(grads[2], leaves[2].grad),
        "nan": any(bool(torch.isnan(x).any()) for x in (o, lse, *grads)),
        "deterministic": all(torch.equal(a, b) for a, b in zip(grads, again, strict=True)),
    }


def check_correctness(results: dict) -> None:
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    for name, hq, hkv, d, dtype, lens in CASES:
        cu = [0]
        for n in lens:
            cu.append(cu[-1] + n)
        total = cu[-1]
        cu_t = torch.tensor(cu, dtype=torch.int32, device=DEVICE)
        q = torch.randn((total, hq, d), device=DEVICE, dtype=dtype, generator=gen)
        k = torch.randn((total, hkv, d), device=DEVICE, dtype=dtype, generator=gen)
        v = torch.randn((total, hkv, d), device=DEVICE, dtype=dtype, generator=gen)
        do = torch.randn((total, hq, d), device=DEVICE, dtype=dtype, generator=gen)
        scale = d**-0.5
        for kind, make in (("random", random_selection), ("clustered", clustered_selection)):
            idx = make(cu, hkv, DEVICE, gen)
            allowed = dense_mask_selection(idx, cu, hq // hkv)
            leaves = [x.detach().float().requires_grad_() for x in (q, k, v)]
            o_ref, lse_ref = dense_reference(*leaves, allowed, scale)
            (o_ref * do.float()).sum().backward()
            for rows in (128, 16):
                poison()
                o, lse = slc.selected_attention_fwd(q, k, v, idx, cu_t, BLOCK, scale, tile_rows=rows)
                poison()
                # 16-row tiles also run dk/dv with token lists cut into pieces of 100 (partial sums path).
                bwd = partial(slc.selected_attention_bwd, q, k, v, o, lse, do, idx, cu_t, BLOCK, scale,
                              tile_rows=rows, dkdv_split=100 if rows == 16 else None)
                grads, again = bwd(), bwd()
                entry = compare_to_reference(o, lse, grads, again, o_ref, lse_ref, leaves)
                results[f"slc {name} {kind} rows{rows}"] = entry
                print(f"slc {name} {kind} rows{rows}", entry, flush=True)
            del allowed, o_ref, lse_ref, leaves
        allowed = dense_mask_window(total, cu, hq, DEVICE)
        leaves = [x.detach().float().requires_grad_() for x in (q, k, v)]
        o_ref, lse_ref = dense_reference(*leaves, allowed, scale)
        (o_ref * do.float()).sum().backward()
        for rows in (128, 64):
            poison()
            o, lse = swa.window_attention_fwd(q, k, v, cu_t, WINDOW, scale,
                                              settings=swa.WindowSettings(query_rows=rows))
            poison()
            grads = swa.window_attention_bwd(q, k, v, o, lse, do, cu_t, WINDOW, scale, tile_rows=rows)
            again = swa.window_attention_bwd(q, k, v, o, lse, do, cu_t, WINDOW, scale, tile_rows=rows)
            entry = compare_to_reference(o, lse, grads, again, o_ref, lse_ref, leaves)
            results[f"swa {name} rows{rows}"] = entry
            print(f"swa {name} rows{rows}", entry, flush=True)
        del allowed, o_ref, lse_ref, leaves
        if DEVICE == "cuda":
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------
# Timing


def bench(fn, rep: int = 200) -> float:
    """Median ms over about `rep` ms of runs, L2 flushed before each (as triton.testing.do_bench)."""
    return harness_bench(fn, warmup=2, max_reps=1000, budget_ms=rep, flush_l2=True)


def time_length(total: int, results: dict, table: list[str]) -> None:
    hq, hkv, d = TIMING_SHAPE
    gen = torch.Generator(device=DEVICE).manual_seed(total)
    cu = [0, total]
    cu_t = torch.tensor(cu, dtype=torch.int32, device=DEVICE)
    q = torch.randn((total, hq, d), device=DEVICE, dtype=torch.bfloat16, generator=gen)
    k = torch.randn((total, hkv, d), device=DEVICE, dtype=torch.bfloat16, generator=gen)
    v = torch.randn((total, hkv, d), device=DEVICE, dtype=torch.bfloat16, generator=gen)
    do = torch.randn((total, hq, d), device=DEVICE, dtype=torch.bfloat16, generator=gen)
    scale = d**-0.5
    row = {}

    def record(key: str, fn, rep: int = 100) -> None:
        try:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            ms = bench(fn, rep)
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            row[key] = {"ms": ms, "peak_extra_MiB": peak}
            line = f"T={total:>6} {key:<44} {ms:9.3f} ms  peak+{peak:8.1f} MiB"
        except Exception as exc:  # keep timing the other variants
            traceback.print_exc()
            row[key] = {"error": repr(exc)}
            line = f"T={total:>6} {key:<44} ERROR {exc!r}"[:160]
        print(line, flush=True)
        table.append(line)

    group = hq // hkv
    kinds = [("clustered", clustered_selection), ("random", random_selection)]
    if SWEEP:  # NSA's own choice on randn inputs: union statistics like "random" (measured at 32K and 128K)
        kinds.append(("nsa-of-randn", nsa_selection))
    for kind, make in kinds:
        idx = make(cu, hkv, DEVICE, gen, q=q, k=k)
        plans = {}
        for rows in (128, 64, 16):
            plans[rows] = slc.plan_tiles(idx, cu_t, group, rows)
            mean_union = float(plans[rows].count.float().mean())
            row[f"slc {kind} union rows{rows}"] = mean_union
            line = f"T={total:>6} slc {kind} mean union blocks/tile rows{rows}: {mean_union:.1f}"
            print(line, flush=True)
            table.append(line)
        # The Triton union against its PyTorch oracle on the chosen tiles.
        ref = slc.union_blocks_torch(idx, plans[128].tiles, plans[128].tokens)
        same = torch.equal(ref[1], plans[128].count)
        width = torch.arange(ref[0].shape[-1], device=DEVICE) < ref[1][..., None]
        same = same and torch.equal(torch.where(width, ref[0], -1), torch.where(width, plans[128].blocks, -1))
        same = same and torch.equal(torch.where(width[..., None], ref[2], 0), plans[128].bits)
        results[f"union kernel == torch ({kind}, T={total})"] = {"mismatch": not same}
        table.append(f"T={total:>6} slc {kind} union kernel matches torch: {same}")
        auto = slc.plan_tiles(idx, cu_t, group)
        table.append(f"T={total:>6} slc {kind} auto plan: rows{auto.block_m}")
        record(f"slc {kind} prep plan (auto)", partial(slc.plan_tiles, idx, cu_t, group), rep=50)
        record(f"slc {kind} prep union rows{auto.block_m}",
               partial(slc.union_blocks, idx, auto.tiles, auto.tokens), rep=50)
        key_blocks = U.tiles_of(cu_t, BLOCK)
        record(f"slc {kind} prep inverse", partial(slc.inverse_lists, idx, cu_t, BLOCK, key_blocks.shape[0]), rep=50)
        offsets, tokens = slc.inverse_lists(idx, cu_t, BLOCK, key_blocks.shape[0])
        if SWEEP:
            configs = {128: [(8, 2), (8, 3), (4, 2)], 64: [(4, 2), (4, 3), (8, 2)], 16: [(4, 3), (4, 2), (2, 3)]}
            for rows in (128, 64, 16):
                if total > 32768 and kind == "random" and rows == 128:
                    continue  # ~8x the work of 16-row tiles here
                for warps, stages in configs[rows] if total > 32768 else configs[rows][:1]:
                    record(f"slc {kind} fwd kernel rows{rows} w{warps}s{stages}",
                           partial(slc.launch_fwd, q, k, v, plans[rows], BLOCK, scale, warps, stages))
        record(f"slc {kind} fwd kernel rows{auto.block_m} (default launch)",
               partial(slc.launch_fwd, q, k, v, auto, BLOCK, scale))
        o, lse = slc.launch_fwd(q, k, v, auto, BLOCK, scale)
        delta = U.row_dot(o, do)
        record(f"slc {kind} dq kernel rows{auto.block_m} (default launch)",
               partial(slc.launch_dq, q, k, v, do, lse, delta, auto, BLOCK, scale))
        counts = offsets[1:] - offsets[:-1]
        table.append(f"T={total:>6} slc {kind} tokens per (block, group): mean {counts.float().mean():.0f}, "
                     f"max {int(counts.max())}")
        for split in (4096, 2048, 1 << 30):
            record(f"slc {kind} dkdv kernel rows32 split{split if split < 1 << 30 else '-none'}",
                   partial(slc.launch_dkdv, q, k, v, do, lse, delta, key_blocks, offsets, tokens, BLOCK, scale,
                           32, None, None, split))
        record(f"slc {kind} FWD total (auto)",
               partial(slc.selected_attention_fwd, q, k, v, idx, cu_t, BLOCK, scale))
        record(f"slc {kind} BWD total (auto)",
               partial(slc.selected_attention_bwd, q, k, v, o, lse, do, idx, cu_t, BLOCK, scale))
        del idx, plans, auto, offsets, tokens
        torch.cuda.empty_cache()

    o, lse = swa.window_attention_fwd(q, k, v, cu_t, WINDOW, scale)
    delta = U.row_dot(o, do)
    if SWEEP:
        for rows, warps, stages in ((64, 4, 2), (64, 4, 3), (128, 8, 2), (32, 4, 2)):
            record(f"swa fwd rows{rows} w{warps}s{stages}",
                   partial(swa.window_attention_fwd, q, k, v, cu_t, WINDOW, scale,
                           settings=swa.WindowSettings(query_rows=rows, num_warps=warps, num_stages=stages)))
        for rows, stages in ((64, 2), (64, 3), (128, 2)):
            record(f"swa dq kernel rows{rows} s{stages}",
                   partial(swa.launch_dq, q, k, v, do, lse, delta, cu_t, WINDOW, scale,
                           settings=swa.WindowSettings(query_rows=rows, key_step=64, num_stages=stages)))
        for rows, key_step, stages in ((64, 64, 2), (64, 64, 3), (32, 64, 2), (32, 64, 3), (64, 32, 2)):
            record(f"swa dkdv kernel rows{rows} keys{key_step} s{stages}",
                   partial(swa.launch_dkdv, q, k, v, do, lse, delta, cu_t, WINDOW, scale,
                           settings=swa.WindowSettings(dkdv_rows=rows, key_step=key_step, num_stages=stages)))
    record("swa dq kernel (default)", partial(swa.launch_dq, q, k, v, do, lse, delta, cu_t, WINDOW, scale))
    record("swa dkdv kernel (default)", partial(swa.launch_dkdv, q, k, v, do, lse, delta, cu_t, WINDOW, scale))
    record("swa FWD total", partial(swa.window_attention_fwd, q, k, v, cu_t, WINDOW, scale))
    record("swa BWD total", partial(swa.window_attention_bwd, q, k, v, o, lse, do, cu_t, WINDOW, scale))
    record("delta (row_dot)", partial(slc.row_dot, o, do))

    # Baseline in the same run: dense causal attention, flash backend (GQA expanded as SDPA needs).
    qt = q.transpose(0, 1)[None]
    kt = k.repeat_interleave(hq // hkv, dim=1).transpose(0, 1)[None]
    vt = v.repeat_interleave(hq // hkv, dim=1).transpose(0, 1)[None]
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        record("sdpa flash causal fwd", partial(F.scaled_dot_product_attention, qt, kt, vt, is_causal=True),
               rep=100 if total <= 32768 else 20)
    results[str(total)] = row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="*", default=[32768, 131072])
    parser.add_argument("--skip-correctness", action="store_true")
    parser.add_argument("--sweep", action="store_true", help="time launch-setting variants too")
    args, out = open_run(parser, argv, "check_branches_gpu")
    env = out.env
    global SWEEP
    SWEEP = args.sweep
    results: dict = {"sms": torch.cuda.get_device_properties(0).multi_processor_count}
    table: list[str] = []
    start = time.time()
    if not args.skip_correctness:
        try:
            check_correctness(results)
        except Exception:
            traceback.print_exc()
    print(f"correctness done in {time.time() - start:.0f} s", flush=True)
    for total in args.lengths:
        try:
            time_length(total, results, table)
        except Exception:
            traceback.print_exc()
        out.write_json(results)
    bad = [k for k, e in results.items() if isinstance(e, dict) and (e.get("nan") or e.get("mismatch") or
           any(e.get(n, 0) > 2e-2 for n in ("o", "lse", "dq", "dk", "dv")))]
    out.write_markdown("\n".join([f"Selection and window kernels; {describe(env)}", "", *table, "",
                                   f"correctness failures: {bad or 'none'}"]))


if __name__ == "__main__":
    main()
