"""GPU correctness of the Triton NSA operator against the PyTorch reference at real shapes (one run, one GPU).

    python benchmarks/check/check_ops_gpu.py [--out DIR] [--lengths 1024 4096 16384 32768] [--budget-s 240]
                                            [--selection-layout auto|block-major|tiles]

For each case (7:1 = HQ 28 / HKV 4, D=128, bf16 at each length; a packed varlen batch; 1:1 with D=64 in fp16)
it runs `nsa_parts_triton` forward and backward and the reference in float32 on the same values, given the
kernel's own block choice, and reports ||x - ref|| / ||ref|| for o, o_cmp, o_slc, o_swa and the gradients of
q, k, v and the three gates, the largest lse_cmp difference, NaN/inf counts, and whether the backward is
bitwise deterministic (run twice). The block choice is checked on sampled tokens: ascending, -1 padded, forced
blocks present, right count, and optimal up to a near-tie tolerance under the float32 importance.
Cases run in order of size and stop once --budget-s seconds have passed (the skipped ones are listed).
--selection-layout fixes the selection branch's forward and dq layouts for the whole run (by pricing the other
out of the planners' cost models): "block-major" wherever blocks have at most 64 keys, "tiles" for the query
tiles; "auto" (default) leaves the choice to the planners, as the operator runs.

Prints a table last; writes OUT/check_ops_gpu.{jsonl,json,md} (benchmarks/README.md); exits 1 if a case fails.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
from harness import (  # noqa: E402
    BLOCK,
    BUDGET,
    COUNT,
    INIT,
    LOCAL,
    describe,
    markdown_table,
    open_run,
)
from harness import rel_error as rel  # noqa: E402
from videonsa.ops import nsa_parts_reference  # noqa: E402

# Internals: the reference's block pooling, the selection planners' costs (--selection-layout) and the Triton
# path's parts entry point.
from videonsa.ops.reference import compress_blocks  # noqa: E402
from videonsa.ops.triton.selection import SelectionSettings  # noqa: E402
from videonsa.ops.triton_nsa import KERNEL_SETTINGS, KernelSettings, nsa_parts_triton  # noqa: E402

LIMITS = {torch.bfloat16: (1e-2, 2e-2, 2e-2), torch.float16: (3e-3, 5e-3, 5e-3)}  # fwd, grad, near-tie


def make_inputs(seq_lens, heads_q, heads_kv, head_dim, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    total = sum(seq_lens)
    kw = dict(device="cuda", generator=gen)
    k = torch.randn(1, total, heads_kv, head_dim, **kw)
    # Per-block key offsets make block importances differ (as trained keys do), so the top-k is meaningful.
    k = k + torch.randn(1, total // 64 + 1, heads_kv, head_dim, **kw).repeat_interleave(64, 1)[:, :total]
    x = {
        "q": torch.randn(1, total, heads_q, head_dim, **kw),
        "k": k,
        "v": torch.randn(1, total, heads_kv, head_dim, **kw),
        "g_cmp": torch.rand(1, total, heads_q, **kw),
        "g_slc": torch.rand(1, total, heads_q, **kw),
        "g_swa": torch.rand(1, total, heads_q, **kw),
    }
    x = {n: t.to(dtype) for n, t in x.items()}
    cu = torch.tensor([0, *torch.tensor(seq_lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    return x, torch.randn(1, total, heads_q, head_dim, **kw), cu


def check_selection(indices, lse, x, cu, tol, samples=256, seed=0) -> dict:
    """Validate block_indices [1, T, HKV, S] on sampled tokens against float32 importances from lse [1, T, HQ]."""
    q, k = x["q"][0].float(), x["k"][0].float()
    heads_q, head_dim = q.shape[1:]
    heads_kv = k.shape[1]
    group = heads_q // heads_kv
    offsets = cu.tolist()
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, offsets[-1], (samples,), generator=gen).tolist()
    tokens += [offsets[-1] - 1]
    bad, inexact, checked = [], 0, 0
    cache: dict = {}
    for t in tokens:
        seq = max(i for i in range(len(offsets) - 1) if offsets[i] <= t)
        a, e = offsets[seq], offsets[seq + 1]
        if seq not in cache:
            cache[seq] = compress_blocks(k[a:e], BLOCK)
        k_cmp = cache[seq]
        pos = t - a
        current, visible = pos // BLOCK, (pos + 1) // BLOCK
        forced = {j for j in range(current + 1) if j < INIT or j > current - LOCAL}
        s = torch.einsum("gsd,jgd->gsj", q[t].view(heads_kv, group, head_dim), k_cmp[:visible]) * head_dim**-0.5
        imp = torch.exp(s - lse[0, t].float().view(heads_kv, group, 1)).sum(1).cpu()
        for g in range(heads_kv):
            row = indices[0, t, g].tolist()
            chosen = [j for j in row if j >= 0]
            picked = [j for j in chosen if j not in forced]
            free = [j for j in range(visible) if j not in forced]
            ok = (row == chosen + [-1] * (len(row) - len(chosen)) and chosen == sorted(set(chosen))
                  and forced <= set(chosen) and all(j < visible for j in picked)
                  and len(picked) == min(COUNT - len(forced), len(free)))
            rest = sorted(set(free) - set(picked))
            checked += 1
            if ok and picked and rest:
                worst_in, best_out = float(imp[g, picked].min()), float(imp[g, rest].max())
                ok = worst_in >= best_out - tol
                inexact += worst_in < best_out
            if not ok:
                bad.append((t, g, row[:8]))
    return {"checked": checked, "bad": len(bad), "first_bad": bad[:3], "inexact": inexact}


def run_case(name, seq_lens, heads_q, heads_kv, head_dim, dtype, seed=0, kernels=KERNEL_SETTINGS) -> dict:
    x, do, cu = make_inputs(seq_lens, heads_q, heads_kv, head_dim, dtype, seed)
    settings = dict(BUDGET, cu_seqlens=cu)
    res: dict = {"case": name, "T": sum(seq_lens)}

    def ours_once():
        leaves = {n: t.clone().requires_grad_() for n, t in x.items()}
        parts = nsa_parts_triton(**leaves, **settings, settings=kernels)
        parts.o.backward(do.to(dtype))
        torch.cuda.synchronize()
        return parts, {n: t.grad for n, t in leaves.items()}

    t0 = time.time()
    parts, grads = ours_once()
    _, grads2 = ours_once()
    res["deterministic_bwd"] = all(torch.equal(grads[n], grads2[n]) for n in grads)
    del grads2
    res["ours_s"] = time.time() - t0

    t0 = time.time()
    leaves = {n: t.float().requires_grad_() for n, t in x.items()}
    ref = nsa_parts_reference(**leaves, **settings, block_indices=parts.block_indices)
    ref.o.backward(do)
    torch.cuda.synchronize()
    res["reference_s"] = time.time() - t0

    nonfinite = 0
    for n in ("o", "o_cmp", "o_slc", "o_swa"):
        got = getattr(parts, n)
        nonfinite += int((~torch.isfinite(got)).sum())
        res[n] = rel(got, getattr(ref, n))
    for n, g in grads.items():
        nonfinite += int((~torch.isfinite(g)).sum())
        res["d" + n] = rel(g, leaves[n].grad)
    res["nonfinite"] = nonfinite
    finite = torch.isfinite(ref.lse_cmp)
    res["lse_inf_match"] = bool(torch.equal(torch.isinf(parts.lse_cmp), torch.isinf(ref.lse_cmp)))
    res["lse_max_diff"] = float((parts.lse_cmp[finite] - ref.lse_cmp[finite]).abs().max())
    fwd_tol, grad_tol, tie_tol = LIMITS[dtype]
    res["selection"] = check_selection(parts.block_indices, ref.lse_cmp, x, cu, tie_tol)
    fwd_ok = all(res[n] < fwd_tol for n in ("o", "o_cmp", "o_slc", "o_swa")) and res["lse_max_diff"] < 5e-2
    grad_ok = all(res["d" + n] < grad_tol for n in x)
    res["pass"] = bool(fwd_ok and grad_ok and nonfinite == 0 and res["lse_inf_match"]
                       and res["selection"]["bad"] == 0 and res["deterministic_bwd"])
    return res


def table(results: list[dict], skipped: list[str], layout: str, env: dict) -> str:
    """The cases as a markdown table, under a caption naming the card, versions and selection layout."""
    lines = []
    for r in results:
        if "error" in r:
            lines.append([r["case"], f"FAIL: {r['error']}", *[""] * 13])
            continue
        f = lambda n, r=r: f"{r[n]:.1e}"  # noqa: E731
        sel = r["selection"]
        lines.append([r["case"], "ok" if r["pass"] else "FAIL", f("o"), f("o_cmp"), f("o_slc"), f("o_swa"), f("dq"),
                      f("dk"), f("dv"), f"{f('dg_cmp')}/{f('dg_slc')}/{f('dg_swa')}", f"{r['lse_max_diff']:.1e}",
                      f"{sel['bad']}/{sel['inexact']} of {sel['checked']}", r["deterministic_bwd"],
                      f"{r['ours_s']:.1f}", f"{r['reference_s']:.1f}"])
    headers = ["case", "pass", "o", "o_cmp", "o_slc", "o_swa", "dq", "dk", "dv", "dg (cmp/slc/swa)", "lse",
               "sel bad/inexact", "determ.", "ours s", "ref s"]
    text = f"NSA operator against the reference, selection layout {layout}; {describe(env)}\n\n"
    text += markdown_table(headers, lines)
    if skipped:
        text += "\n\nskipped (time budget): " + ", ".join(skipped)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    parser.add_argument("--budget-s", type=float, default=240.0)
    parser.add_argument("--selection-layout", choices=["auto", "block-major", "tiles"], default="auto")
    args, out = open_run(parser, argv, "check_ops_gpu")
    env = out.env
    kernels = KERNEL_SETTINGS
    if args.selection_layout != "auto":
        price = 0.0 if args.selection_layout == "block-major" else 1e9
        costs = dict.fromkeys(("by_block_step_cost", "by_block_token_cost", "by_block_call_cost",
                               "dq_by_block_step_cost", "dq_by_block_token_cost", "dq_by_block_call_cost"), price)
        kernels = KernelSettings(selection=SelectionSettings(**costs))

    cases = [(f"7:1 bf16 T={n}", [n], 28, 4, 128, torch.bfloat16) for n in args.lengths]
    cases.insert(1, ("7:1 bf16 varlen", [3000, 77, 1200, 4000, 63], 28, 4, 128, torch.bfloat16))
    cases.insert(2, ("1:1 fp16 D64 T=4096", [4096], 4, 4, 64, torch.float16))
    skipped = []
    start = time.time()
    for case in cases:
        if time.time() - start > args.budget_s:
            skipped.append(case[0])
            continue
        try:
            res = run_case(*case, kernels=kernels)
        except Exception as exc:  # noqa: BLE001 - report the case as failed and go on
            traceback.print_exc()
            res = {"case": case[0], "pass": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
        out.row(res)
        torch.cuda.empty_cache()
    out.write_json({"selection_layout": args.selection_layout, "skipped": skipped})
    out.write_markdown(table(out.rows, skipped, args.selection_layout, env))
    sys.exit(0 if all(r["pass"] for r in out.rows) else 1)


if __name__ == "__main__":
    main()
