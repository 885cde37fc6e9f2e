"""NSA operator benchmark on one GPU: videonsa's Triton kernels (total and per part) against dense causal
attention (PyTorch SDPA, flash and cuDNN backends) and fla-core's `parallel_nsa`, in one run.

    python benchmarks/bench_ops.py [--out DIR] [--lengths 1024 2048 ... 131072] [--fla-lengths 32768 131072]
        [--dense-lengths ...] [--inputs randn|structured] [--sweep-length 131072]

Shapes (issue 5): B=1, HQ=28, HKV=4, D=128, bf16, block 64, 32 selected blocks, window 256, VideoNSA forcing
(init 0, local 1). For each T it reports forward and backward milliseconds (median of CUDA-event timed runs,
after warm-up) and peak memory beyond the inputs:

* videonsa total: `nsa_attention_triton` forward, and backward alone (`o.backward`);
  per part: compression (pooling + compressed attention), top-k, selection, window, gating; backward parts
  likewise (top-k has none). The parts run on the same intermediates the operator computes.
* dense causal SDPA with K/V expanded to 28 heads, flash backend and cuDNN backend.
* fla-core 0.6.0 `parallel_nsa` with query heads padded 28 -> 64 (16 per KV head, as its kernels require and
  as the original VideoNSA code does), window left out (fla needs flash-attn for it), compression and top-k
  timed on their own as well. Skipped, with the reason printed, when fla-core is not importable.

FLOP floors (forward and backward at the measured dense bf16 matmul rate) are printed beside the totals.
Prints the table last and writes OUT/bench_ops.json and OUT/bench_ops.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
import traceback

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from videonsa.ops.triton import compression as compression_module
from videonsa.ops.triton import topk as topk_module
from videonsa.ops.triton.compression import (
    compressed_attention_bwd,
    compressed_attention_fwd,
    mean_pool_bwd,
    mean_pool_fwd,
)
from videonsa.ops.triton.packing import pack
from videonsa.ops.triton.selection import plan_forward, selected_attention_bwd, selected_attention_fwd
from videonsa.ops.triton.topk import select_blocks_topk
from videonsa.ops.triton.window import window_attention_bwd, window_attention_fwd
from videonsa.ops.triton_nsa import gate_bwd, gate_fwd, nsa_attention_triton

HQ, HKV, D = 28, 4, 128
BLOCK, COUNT, WINDOW, INIT, LOCAL = 64, 32, 256, 0, 1
DTYPE = torch.bfloat16
GiB = 1024**3


def bench(fn, min_reps: int = 3, budget_ms: float = 400.0) -> float:
    """Median milliseconds of fn() over CUDA-event timed runs, after one warm-up run (compiles, caches)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    first = start.elapsed_time(end)
    reps = max(min_reps, min(50, int(budget_ms / max(first, 1e-3))))
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def peak_gib(fn) -> float:
    """Peak memory fn() allocates beyond what is allocated before it (GiB)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / GiB


def matmul_tflops() -> float:
    """Measured dense bf16 matmul rate (8192^3, random data), the ceiling for the FLOP floors."""
    a = torch.randn(8192, 8192, device="cuda", dtype=DTYPE)
    b = torch.randn(8192, 8192, device="cuda", dtype=DTYPE)
    ms = bench(lambda: a @ b, min_reps=10)
    return 2 * 8192**3 / ms / 1e9


def nsa_flops(seq_len: int) -> dict[str, float]:
    """Forward FLOPs per part (matrix products only): 2 per multiply-add, QK and PV products each."""
    t = torch.arange(seq_len, dtype=torch.float64)
    visible = ((t + 1) // BLOCK).sum().item()  # compressed keys summed over queries
    selected = torch.minimum(torch.full_like(t, COUNT * BLOCK), t + 1).sum().item()
    window = torch.minimum(torch.full_like(t, WINDOW), t + 1).sum().item()
    per_key = 2 * HQ * D
    return {
        "compression": 2 * per_key * visible,
        "topk": per_key * visible,
        "selection": 2 * per_key * selected,
        "window": 2 * per_key * window,
        "dense": 2 * per_key * (seq_len * (seq_len + 1) / 2),
    }


def selection_sharing(indices: torch.Tensor, tokens_per_tile: int = 8) -> dict[str, float]:
    """How much neighbouring tokens' selections overlap, which decides the selection kernels' speed.

    indices: int32 [T, HKV, S] (-1 = unused). Returns the mean number of distinct blocks chosen by the tokens of
    a tile of `tokens_per_tile` consecutive tokens (S when they all agree, tokens_per_tile * S when they share
    nothing), over full tiles in the second half of the sequence, and the mean fraction of a token's chosen
    blocks that the next token also chose.
    """
    seq_len, heads_kv, count = indices.shape
    half = (seq_len // 2) // tokens_per_tile * tokens_per_tile
    tail = indices[half: half + (seq_len - half) // tokens_per_tile * tokens_per_tile].long()
    tiles = tail.view(-1, tokens_per_tile, heads_kv, count).transpose(1, 2).reshape(-1, tokens_per_tile * count)
    ordered = tiles.sort(dim=1).values
    distinct = (ordered[:, 1:] != ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    union = distinct.sum(1) + (ordered[:, 0] >= 0).long()
    now, nxt = tail[:-1], tail[1:]
    same = (now[..., :, None] == nxt[..., None, :]).any(-1) & (now >= 0)
    shared = same.sum(-1).double() / (now >= 0).sum(-1).clamp(min=1).double()
    return {"union_per_tile": float(union.double().mean()), "tokens_per_tile": tokens_per_tile,
            "shared_with_next": float(shared.mean())}


def make_inputs(seq_len: int, seed: int = 0, structured: bool = False) -> dict[str, torch.Tensor]:
    """Random bf16 inputs. structured=True: queries drift slowly (a component shared by 256-token stretches)
    and keys carry a per-block offset, so that neighbouring tokens choose mostly the same blocks, as trained
    models do; plain randn makes every token's top-k an independent draw (the worst case for tiled selection).
    """
    gen = torch.Generator(device="cuda").manual_seed(seed)
    kw = dict(device="cuda", generator=gen)
    q = torch.randn(1, seq_len, HQ, D, **kw)
    k = torch.randn(1, seq_len, HKV, D, **kw)
    if structured:
        stretch = torch.randn(1, seq_len // 256 + 1, HQ, D, **kw).repeat_interleave(256, 1)[:, :seq_len]
        q = 0.5 * q + stretch
        k = k + 1.5 * torch.randn(1, seq_len // BLOCK + 1, HKV, D, **kw).repeat_interleave(BLOCK, 1)[:, :seq_len]
    return {
        "q": q.to(DTYPE),
        "k": k.to(DTYPE),
        "v": torch.randn(1, seq_len, HKV, D, **kw).to(DTYPE),
        "g_cmp": torch.rand(1, seq_len, HQ, **kw).to(DTYPE),
        "g_slc": torch.rand(1, seq_len, HQ, **kw).to(DTYPE),
        "g_swa": torch.rand(1, seq_len, HQ, **kw).to(DTYPE),
    }


# ----------------------------------------------------------------------------------------------------------
# videonsa


def bench_videonsa(x: dict[str, torch.Tensor]) -> dict[str, float]:
    res: dict[str, float] = {}
    seq_len = x["q"].shape[1]
    scale = D**-0.5
    settings = dict(block_size=BLOCK, block_count=COUNT, window_size=WINDOW, init_blocks=INIT, local_blocks=LOCAL)
    leaves = {n: v.detach().clone().requires_grad_() for n, v in x.items()}
    do = torch.randn_like(x["q"])

    def forward():
        return nsa_attention_triton(**leaves, **settings)

    res["fwd_ms"] = bench(forward)
    res["fwd_peak_gib"] = peak_gib(forward)  # output included (0.94 GiB at 128K)
    # Working memory = peak beyond the inputs minus the outputs: o in the forward; o and the gradients of q, k, v
    # and the gates after the backward.
    nbytes = lambda t: t.numel() * t.element_size()  # noqa: E731
    out_bytes = nbytes(x["q"])
    grad_bytes = sum(nbytes(t) for t in x.values())
    res["fwd_work_gib"] = res["fwd_peak_gib"] - out_bytes / GiB
    # Inference (no input needs a gradient): the lean path's fold of the selection into o (no o_slc).
    plain = {n: v.detach() for n, v in x.items()}

    def inference():
        with torch.no_grad():
            return nsa_attention_triton(**plain, **settings)

    res["fwd_inference_ms"] = bench(inference)
    res["fwd_inference_work_gib"] = peak_gib(inference) - out_bytes / GiB
    holder = {}

    def fwd_bwd():
        holder["o"] = forward()
        holder["o"].backward(do)

    res["fwd_bwd_peak_gib"] = peak_gib(fwd_bwd)
    res["fwd_bwd_work_gib"] = res["fwd_bwd_peak_gib"] - (out_bytes + grad_bytes) / GiB
    holder["o"] = forward()
    grads = list(leaves.values())

    def backward():
        for g in grads:
            g.grad = None
        holder["o"].backward(do, retain_graph=True)

    res["bwd_ms"] = bench(backward)
    holder.clear()
    for g in grads:
        g.grad = None

    # Parts, on packed tensors, with the same intermediates the operator computes.
    q, cu = pack(x["q"], None)
    k, _ = pack(x["k"], None)
    v, _ = pack(x["v"], None)
    gates = [pack(x[n], None)[0] for n in ("g_cmp", "g_slc", "g_swa")]
    k_cmp, v_cmp, cu_cmp = mean_pool_fwd(k, v, cu, BLOCK)

    def compression():
        kc, vc, cc = mean_pool_fwd(k, v, cu, BLOCK)
        return compressed_attention_fwd(q, kc, vc, cu, cc, BLOCK, scale)

    o_cmp, lse_cmp = compression()

    def topk():
        return select_blocks_topk(q, k_cmp, lse_cmp, cu, cu_cmp, block_size=BLOCK, block_count=COUNT,
                                  init_blocks=INIT, local_blocks=LOCAL, scale=scale)

    indices = topk()
    res["selection_sharing"] = selection_sharing(indices)
    layout = plan_forward(indices, cu, HQ // HKV, BLOCK)  # what selected_attention_fwd runs on these selections
    res["selection_layout"] = "by_block" if layout is None else f"tiles of {layout.block_m} rows"
    o_slc, lse_slc = selected_attention_fwd(q, k, v, indices, cu, BLOCK, scale)
    o_swa, lse_swa = window_attention_fwd(q, k, v, cu, WINDOW, scale)
    res["fwd_compression_ms"] = bench(compression)
    res["fwd_topk_ms"] = bench(topk)
    res["fwd_selection_ms"] = bench(lambda: selected_attention_fwd(q, k, v, indices, cu, BLOCK, scale))
    res["fwd_window_ms"] = bench(lambda: window_attention_fwd(q, k, v, cu, WINDOW, scale))
    res["fwd_gating_ms"] = bench(lambda: gate_fwd(o_cmp, o_slc, o_swa, *gates))

    do_p = do.view(seq_len, HQ, D)
    res["bwd_gating_ms"] = bench(lambda: gate_bwd(do_p, o_cmp, o_slc, o_swa, *gates))
    do_cmp, do_slc, do_swa, *_rest, delta = gate_bwd(do_p, o_cmp, o_slc, o_swa, *gates)
    res["bwd_selection_ms"] = bench(
        lambda: selected_attention_bwd(q, k, v, o_slc, lse_slc, do_slc, indices, cu, BLOCK, scale)
    )
    res["bwd_window_ms"] = bench(lambda: window_attention_bwd(q, k, v, o_swa, lse_swa, do_swa, cu, WINDOW, scale))
    dq = torch.zeros_like(q)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)

    def compression_bwd():
        _, dkc, dvc = compressed_attention_bwd(q, k_cmp, v_cmp, o_cmp, lse_cmp, do_cmp, cu, cu_cmp, BLOCK, scale,
                                               dq=dq, delta=delta)
        mean_pool_bwd(dkc, dvc, dk, dv, cu, cu_cmp, BLOCK)

    res["bwd_compression_ms"] = bench(compression_bwd)
    return res


# ----------------------------------------------------------------------------------------------------------
# Launch-setting sweep (one length): each variant timed on the same inputs; top-k variants must agree exactly.

SWEEP = {
    "topk": [dict(method="bisect", programs_per_sm=1, bisect_warps=16), dict(method="bisect", programs_per_sm=1,
             bisect_warps=8), dict(method="bisect", programs_per_sm=2, bisect_warps=8), dict(method="sort")],
    "fwd": [dict(rows=128, keys=64, warps=8, stages=2), dict(rows=128, keys=32, warps=8, stages=2),
            dict(rows=64, keys=64, warps=4, stages=2), dict(rows=128, keys=64, warps=8, stages=3)],
    "dq": [dict(rows=128, keys=32, warps=8, stages=2), dict(rows=128, keys=64, warps=8, stages=2),
           dict(rows=64, keys=64, warps=4, stages=2)],
    "dkv": [dict(rows=32, keys=64, warps=8, stages=2, min_segment=4096, max_segments=16),
            dict(rows=64, keys=32, warps=8, stages=2, min_segment=4096, max_segments=16),
            dict(rows=64, keys=64, warps=8, stages=2, min_segment=4096, max_segments=16),
            dict(rows=32, keys=64, warps=8, stages=2, min_segment=2048, max_segments=64)],
}


def sweep(seq_len: int, structured: bool = False) -> dict:
    """Time every SWEEP variant at one length; set each kernel's CONFIG to its fastest correct variant."""
    x = make_inputs(seq_len, seed=1, structured=structured)
    scale = D**-0.5
    q, cu = pack(x["q"], None)
    k, _ = pack(x["k"], None)
    v, _ = pack(x["v"], None)
    k_cmp, v_cmp, cu_cmp = mean_pool_fwd(k, v, cu, BLOCK)
    o_cmp, lse_cmp = compressed_attention_fwd(q, k_cmp, v_cmp, cu, cu_cmp, BLOCK, scale)
    do = torch.randn_like(q)
    out: dict = {}

    def topk():
        return topk_module.select_blocks_topk(q, k_cmp, lse_cmp, cu, cu_cmp, block_size=BLOCK, block_count=COUNT,
                                              init_blocks=INIT, local_blocks=LOCAL, scale=scale)

    def run_variants(name, config, fn, check):
        base = dict(config)
        results = []
        reference = None
        for variant in SWEEP[name]:
            config.clear()
            config.update(base)
            config.update(variant)
            try:
                got = fn()
                torch.cuda.synchronize()
                if reference is None:
                    reference = got
                ok = check(got, reference)
                ms = bench(fn)
            except Exception as exc:  # noqa: BLE001 - a variant that fails to compile or run is skipped
                traceback.print_exc()
                results.append({"variant": variant, "error": f"{type(exc).__name__}: {exc}"[:200]})
                continue
            results.append({"variant": variant, "ms": ms, "agrees": ok})
            print(json.dumps({"sweep": name, **results[-1]}), flush=True)
        good = [r for r in results if "ms" in r and r["agrees"]]
        config.clear()
        config.update(base)
        if good:
            config.update(min(good, key=lambda r: r["ms"])["variant"])
        out[name] = {"results": results, "chosen": dict(config)}

    run_variants("topk", topk_module.CONFIG, topk, lambda a, b: bool(torch.equal(a, b)))
    def close(a, b) -> bool:
        for x, y in zip(a, b):
            finite = torch.isfinite(y)  # lse is -inf where no block is visible
            if not torch.equal(finite, torch.isfinite(x)):
                return False
            x, y = x[finite].float(), y[finite].float()
            if float((x - y).norm() / y.norm().clamp_min(1e-30)) >= 2e-2:
                return False
        return True

    run_variants("fwd", compression_module.CONFIG["fwd"],
                 lambda: compressed_attention_fwd(q, k_cmp, v_cmp, cu, cu_cmp, BLOCK, scale), close)
    run_variants("dq", compression_module.CONFIG["dq"],
                 lambda: compressed_attention_bwd(q, k_cmp, v_cmp, o_cmp, lse_cmp, do, cu, cu_cmp, BLOCK, scale),
                 close)
    run_variants("dkv", compression_module.CONFIG["dkv"],
                 lambda: compressed_attention_bwd(q, k_cmp, v_cmp, o_cmp, lse_cmp, do, cu, cu_cmp, BLOCK, scale),
                 close)
    return out


# ----------------------------------------------------------------------------------------------------------
# Dense SDPA


def bench_dense(x: dict[str, torch.Tensor], backend: SDPBackend) -> dict[str, float]:
    group = HQ // HKV
    q = x["q"].transpose(1, 2).detach().clone().requires_grad_()
    k = x["k"].repeat_interleave(group, 2).transpose(1, 2).detach().clone().requires_grad_()
    v = x["v"].repeat_interleave(group, 2).transpose(1, 2).detach().clone().requires_grad_()
    do = torch.randn_like(q)

    def forward():
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    res = {"fwd_ms": bench(forward, min_reps=2), "fwd_peak_gib": peak_gib(forward)}
    holder = {"o": forward()}

    def backward():
        for t in (q, k, v):
            t.grad = None
        holder["o"].backward(do, retain_graph=True)

    res["bwd_ms"] = bench(backward, min_reps=2)
    return res


# ----------------------------------------------------------------------------------------------------------
# fla-core


def bench_fla(x: dict[str, torch.Tensor]) -> dict[str, float]:
    from fla.ops.nsa import parallel_nsa
    from fla.ops.nsa.compression import parallel_nsa_compression
    from fla.ops.nsa.parallel import parallel_nsa_topk
    from fla.ops.utils.pooling import mean_pooling

    group, padded = HQ // HKV, 16
    seq_len = x["q"].shape[1]
    scale = D**-0.5

    def pad(t: torch.Tensor) -> torch.Tensor:
        # [1, T, 28, ...] -> [1, T, 64, ...]: the 7 heads of each KV group first in its 16 slots, zeros after.
        shape = list(t.shape)
        out = t.new_zeros(shape[:2] + [HKV, padded] + shape[3:])
        out[:, :, :, :group] = t.view(shape[:2] + [HKV, group] + shape[3:])
        return out.view(shape[:2] + [HKV * padded] + shape[3:])

    q = pad(x["q"]).requires_grad_()
    k = x["k"].detach().clone().requires_grad_()
    v = x["v"].detach().clone().requires_grad_()
    g_cmp, g_slc = pad(x["g_cmp"]).requires_grad_(), pad(x["g_slc"]).requires_grad_()
    do = torch.randn_like(q)

    def forward():
        return parallel_nsa(q, k, v, g_cmp, g_slc, None, block_counts=COUNT, block_size=BLOCK, window_size=0,
                            scale=scale)

    res = {"fwd_ms": bench(forward, min_reps=2), "fwd_peak_gib": peak_gib(forward)}
    holder = {"o": forward()}

    def backward():
        for t in (q, k, v, g_cmp, g_slc):
            t.grad = None
        holder["o"].backward(do, retain_graph=True)

    res["bwd_ms"] = bench(backward, min_reps=2)
    holder.clear()
    with torch.no_grad():
        def compression():
            kc, vc = mean_pooling(k, BLOCK, None), mean_pooling(v, BLOCK, None)
            return parallel_nsa_compression(q=q, k=kc, v=vc, TK=seq_len, block_size=BLOCK, scale=scale,
                                            cu_seqlens=None)

        res["fwd_compression_ms"] = bench(compression, min_reps=2)
        _, lse = compression()
        kc = mean_pooling(k, BLOCK, None)
        res["fwd_topk_ms"] = bench(lambda: parallel_nsa_topk(q=q, k=kc, lse=lse, TK=seq_len, block_counts=COUNT,
                                                             block_size=BLOCK, scale=scale, cu_seqlens=None),
                                   min_reps=2)
    return res


# ----------------------------------------------------------------------------------------------------------


def fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024 << i for i in range(8)])
    parser.add_argument("--fla-lengths", type=int, nargs="*", default=None,
                        help="lengths at which to run fla-core (default: all)")
    parser.add_argument("--dense-lengths", type=int, nargs="*", default=None,
                        help="lengths at which to run dense SDPA (default: all)")
    parser.add_argument("--inputs", choices=["randn", "structured"], default="randn",
                        help="randn (every token's top-k independent: worst case) or structured (see make_inputs)")
    parser.add_argument("--sweep-length", type=int, default=0,
                        help="first sweep the kernels' launch settings at this length and keep the fastest (0: no)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)

    import triton
    info = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
    }
    try:
        import importlib.metadata as md
        info["fla-core"] = md.version("fla-core")
    except Exception:  # noqa: BLE001 - any failure means "not installed"
        info["fla-core"] = None
    info["matmul_tflops"] = matmul_tflops()
    print(json.dumps(info), flush=True)
    if args.sweep_length:
        info["sweep"] = sweep(args.sweep_length, structured=args.inputs == "structured")
        torch.cuda.empty_cache()
    info["configs"] = {"topk": dict(topk_module.CONFIG),
                       **{k: dict(v) for k, v in compression_module.CONFIG.items()}}
    print(json.dumps({"configs": info["configs"]}), flush=True)

    rows = []
    for seq_len in args.lengths:
        torch.cuda.empty_cache()
        x = make_inputs(seq_len, structured=args.inputs == "structured")
        row: dict = {"T": seq_len, "inputs": args.inputs, "flops": nsa_flops(seq_len)}
        t0 = time.time()
        runs = [("videonsa", lambda x=x: bench_videonsa(x))]
        if args.dense_lengths is None or seq_len in args.dense_lengths:
            runs += [("sdpa_flash", lambda x=x: bench_dense(x, SDPBackend.FLASH_ATTENTION)),
                     ("sdpa_cudnn", lambda x=x: bench_dense(x, SDPBackend.CUDNN_ATTENTION))]
        if info["fla-core"] and (args.fla_lengths is None or seq_len in args.fla_lengths):
            runs.append(("fla", lambda x=x: bench_fla(x)))
        for name, fn in runs:
            try:
                row[name] = fn()
            except Exception as exc:  # noqa: BLE001 - record and go on: one failing baseline must not stop the table
                row[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                traceback.print_exc()
            torch.cuda.empty_cache()
        row["wall_s"] = time.time() - t0
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(os.path.join(args.out, "bench_ops.json"), "w") as f:
            json.dump({"info": info, "rows": rows}, f, indent=1)

    rate = info["matmul_tflops"] * 1e12
    lines = [
        f"device {info['device']}, torch {info['torch']}, triton {info['triton']}, fla-core {info['fla-core']}, "
        f"matmul {info['matmul_tflops']:.0f} TFLOP/s",
        "",
        "| T | nsa fwd (inference) | nsa bwd | floor fwd/bwd | cmp | topk | slc | swa | gate | bwd cmp/slc/swa/gate "
        "| peak fwd / fwd+bwd GiB | work fwd (inference) / fwd+bwd GiB | blocks per 8-token tile "
        "| flash fwd/bwd | cudnn fwd/bwd | fla fwd/bwd (cmp, topk) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        n = row.get("videonsa", {})
        fl = row["flops"]
        fwd_floor = (fl["compression"] + fl["topk"] + fl["selection"] + fl["window"]) / rate * 1e3
        bwd_floor = 2.5 * (fl["compression"] + fl["selection"] + fl["window"]) / rate * 1e3
        g = lambda d, key: d.get(key) if isinstance(d, dict) else None  # noqa: E731
        fla = row.get("fla", {})
        lines.append(
            f"| {row['T']} | {fmt(g(n, 'fwd_ms'))} ({fmt(g(n, 'fwd_inference_ms'))}) | {fmt(g(n, 'bwd_ms'))} "
            f"| {fmt(fwd_floor)} / {fmt(bwd_floor)} "
            f"| {fmt(g(n, 'fwd_compression_ms'))} | {fmt(g(n, 'fwd_topk_ms'))} | {fmt(g(n, 'fwd_selection_ms'))} "
            f"| {fmt(g(n, 'fwd_window_ms'))} | {fmt(g(n, 'fwd_gating_ms'))} "
            f"| {fmt(g(n, 'bwd_compression_ms'))} / {fmt(g(n, 'bwd_selection_ms'))} / "
            f"{fmt(g(n, 'bwd_window_ms'))} / {fmt(g(n, 'bwd_gating_ms'))} "
            f"| {fmt(g(n, 'fwd_peak_gib'))} / {fmt(g(n, 'fwd_bwd_peak_gib'))} "
            f"| {fmt(g(n, 'fwd_work_gib'))} ({fmt(g(n, 'fwd_inference_work_gib'))}) / {fmt(g(n, 'fwd_bwd_work_gib'))} "
            f"| {fmt(g(g(n, 'selection_sharing') or {}, 'union_per_tile'), 1)} "
            f"| {fmt(g(row.get('sdpa_flash', {}), 'fwd_ms'))} / {fmt(g(row.get('sdpa_flash', {}), 'bwd_ms'))} "
            f"| {fmt(g(row.get('sdpa_cudnn', {}), 'fwd_ms'))} / {fmt(g(row.get('sdpa_cudnn', {}), 'bwd_ms'))} "
            f"| {fmt(g(fla, 'fwd_ms'))} / {fmt(g(fla, 'bwd_ms'))} "
            f"({fmt(g(fla, 'fwd_compression_ms'))}, {fmt(g(fla, 'fwd_topk_ms'))}) |"
        )
    table = "\n".join(lines)
    with open(os.path.join(args.out, "bench_ops.md"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
