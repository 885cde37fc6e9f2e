"""NSA operator on one GPU: videonsa's kernels (total and per part) against dense causal attention (PyTorch
SDPA, flash and cuDNN backends) and fla-core's `parallel_nsa`, in one run.

    python benchmarks/bench/bench_ops.py [--lengths 1024 ... 131072] [--fla-lengths 32768 131072]
        [--dense-lengths ...] [--inputs randn|structured] [--out DIR] [--compare-baseline [FILE]]

Shape (`harness.shapes`): B=1, HQ=28, HKV=4, D=128, bf16, the operator's default budget (block 64, 32 blocks,
window 256, init 0, local 1). For each T: forward and backward milliseconds (median of CUDA-event timed runs
after a warm-up) and memory beyond the inputs:

* videonsa total: `videonsa.ops.nsa_attention` on its Triton backend: training forward (inputs need
  gradients), inference forward (no gradient: the selection is folded into o), backward alone; per part
  (compression = pooling + compressed attention, top-k, selection, window, gating; backward parts likewise,
  top-k has none), run on the intermediates the operator computes;
* dense causal SDPA with K/V expanded to 28 heads, flash and cuDNN backends;
* fla-core `parallel_nsa` with query heads padded 28 -> 64 (16 per KV head, as its kernels require), no window
  (fla needs flash-attn for it), its compression and top-k timed alone too. Skipped when fla-core is absent.

FLOP floors (forward, backward) at the card's measured bf16 matmul rate are printed beside the totals.
Writes OUT/bench_ops_<inputs>.{jsonl,json,md} (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
from harness import (  # noqa: E402
    BLOCK,
    BUDGET,
    COUNT,
    HKV,
    HQ,
    INPUT_KINDS,
    OPERATOR_LENGTHS,
    WINDOW,
    D,
    GiB,
    Results,
    add_output_arguments,
    bench,
    describe,
    environment,
    flop_floors_ms,
    fmt,
    make_inputs,
    markdown_table,
    matmul_tflops,
    nsa_flops,
    peak_gib,
    selection_sharing,
)
from harness import baseline as baselines  # noqa: E402
from harness.operator import compress, pack_inputs, select_blocks  # noqa: E402
from videonsa.ops import nsa_attention  # noqa: E402

# Kernel internals for the per-part columns (the only ones this script uses).
from videonsa.ops.triton.compression import compressed_attention_bwd, mean_pool_bwd  # noqa: E402
from videonsa.ops.triton.selection import plan_forward, selected_attention_bwd, selected_attention_fwd  # noqa: E402
from videonsa.ops.triton.window import window_attention_bwd, window_attention_fwd  # noqa: E402
from videonsa.ops.triton_nsa import gate_bwd, gate_fwd  # noqa: E402


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def bench_totals(x: dict[str, torch.Tensor]) -> dict[str, float]:
    """The whole operator: forward (training and inference), backward, peak and working memory."""
    res: dict[str, float] = {}
    leaves = {n: v.detach().clone().requires_grad_() for n, v in x.items()}
    plain = {n: v.detach() for n, v in x.items()}
    do = torch.randn_like(x["q"])

    def forward():
        return nsa_attention(**leaves, **BUDGET, backend="triton")

    def inference():
        with torch.no_grad():
            return nsa_attention(**plain, **BUDGET, backend="triton")

    # Working memory = peak beyond the inputs minus the outputs: o in the forward; o and the gradients of every
    # input after the backward.
    out_gib = _nbytes(x["q"]) / GiB
    grads_gib = sum(_nbytes(t) for t in x.values()) / GiB
    res["fwd_ms"] = bench(forward)
    res["fwd_peak_gib"] = peak_gib(forward)
    res["fwd_work_gib"] = res["fwd_peak_gib"] - out_gib
    res["fwd_inference_ms"] = bench(inference)
    res["fwd_inference_work_gib"] = peak_gib(inference) - out_gib
    holder = {}

    def fwd_bwd():
        holder["o"] = forward()
        holder["o"].backward(do)

    res["fwd_bwd_peak_gib"] = peak_gib(fwd_bwd)
    res["fwd_bwd_work_gib"] = res["fwd_bwd_peak_gib"] - out_gib - grads_gib
    holder["o"] = forward()

    def backward():
        for leaf in leaves.values():
            leaf.grad = None
        holder["o"].backward(do, retain_graph=True)

    res["bwd_ms"] = bench(backward)
    return res


def bench_parts(inputs: dict[str, torch.Tensor]) -> dict:
    """Each branch's kernels alone, on the intermediates the operator computes from the same inputs."""
    res: dict = {}
    scale = D**-0.5
    x = pack_inputs(inputs)
    q, k, v, cu = x
    gates = [inputs[name].flatten(0, 1) for name in ("g_cmp", "g_slc", "g_swa")]  # [T, HQ]
    c = compress(x)
    indices = select_blocks(x, c)
    res["selection_sharing"] = selection_sharing(indices)
    layout = plan_forward(indices, cu, HQ // HKV, BLOCK)  # what selected_attention_fwd runs on these selections
    res["selection_layout"] = "by_block" if layout is None else f"tiles of {layout.block_m} rows"
    o_slc, lse_slc = selected_attention_fwd(q, k, v, indices, cu, BLOCK, scale)
    o_swa, lse_swa = window_attention_fwd(q, k, v, cu, WINDOW, scale)
    res["fwd_compression_ms"] = bench(lambda: compress(x))
    res["fwd_topk_ms"] = bench(lambda: select_blocks(x, c))
    res["fwd_selection_ms"] = bench(lambda: selected_attention_fwd(q, k, v, indices, cu, BLOCK, scale))
    res["fwd_window_ms"] = bench(lambda: window_attention_fwd(q, k, v, cu, WINDOW, scale))
    res["fwd_gating_ms"] = bench(lambda: gate_fwd(c.o_cmp, o_slc, o_swa, *gates))

    do = torch.randn_like(q)
    res["bwd_gating_ms"] = bench(lambda: gate_bwd(do, c.o_cmp, o_slc, o_swa, *gates))
    do_cmp, do_slc, do_swa, *_rest, delta = gate_bwd(do, c.o_cmp, o_slc, o_swa, *gates)
    res["bwd_selection_ms"] = bench(
        lambda: selected_attention_bwd(q, k, v, o_slc, lse_slc, do_slc, indices, cu, BLOCK, scale))
    res["bwd_window_ms"] = bench(lambda: window_attention_bwd(q, k, v, o_swa, lse_swa, do_swa, cu, WINDOW, scale))
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)

    def compression_bwd():
        _, dkc, dvc = compressed_attention_bwd(q, c.k_cmp, c.v_cmp, c.o_cmp, c.lse_cmp, do_cmp, cu, c.cu_cmp, BLOCK,
                                               scale, dq=dq, delta=delta)
        mean_pool_bwd(dkc, dvc, dk, dv, cu, c.cu_cmp, BLOCK)

    res["bwd_compression_ms"] = bench(compression_bwd)
    return res


def bench_dense(x: dict[str, torch.Tensor], backend: SDPBackend) -> dict[str, float]:
    """Causal SDPA on one backend with K/V expanded to HQ heads: forward, backward, forward peak."""
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


def bench_fla(x: dict[str, torch.Tensor]) -> dict[str, float]:
    """fla-core's `parallel_nsa` (heads padded to 16 per KV head, no window) and its compression and top-k."""
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


def metrics(rows: list[dict]) -> dict[str, float]:
    """Flat metric names for the baseline comparison: ops/<inputs>/T<T>/<implementation>/<field>."""
    out = {}
    for row in rows:
        for impl in ("videonsa", "sdpa_flash", "sdpa_cudnn", "fla"):
            for field, value in (row.get(impl) or {}).items():
                if isinstance(value, (int, float)) and field.endswith(("_ms", "_gib")):
                    out[f"ops/{row['inputs']}/T{row['T']}/{impl}/{field}"] = value
    return out


def table(rows: list[dict], env: dict, tflops: float) -> str:
    headers = ["T", "nsa fwd (inference)", "nsa bwd", "floor fwd/bwd", "cmp", "topk", "slc", "swa", "gate",
               "bwd cmp/slc/swa/gate", "peak fwd / fwd+bwd GiB", "work fwd (inference) / fwd+bwd GiB",
               "blocks per 8-token tile", "flash fwd/bwd", "cudnn fwd/bwd", "fla fwd/bwd (cmp, topk)"]
    lines = []
    for row in rows:
        n = row.get("videonsa") or {}
        fla, flash, cudnn = (row.get(name) or {} for name in ("fla", "sdpa_flash", "sdpa_cudnn"))
        floor_fwd, floor_bwd = flop_floors_ms(row["T"], tflops)
        lines.append([
            row["T"], f"{fmt(n.get('fwd_ms'))} ({fmt(n.get('fwd_inference_ms'))})", fmt(n.get("bwd_ms")),
            f"{fmt(floor_fwd)} / {fmt(floor_bwd)}",
            *(fmt(n.get(f"fwd_{p}_ms")) for p in ("compression", "topk", "selection", "window", "gating")),
            " / ".join(fmt(n.get(f"bwd_{p}_ms")) for p in ("compression", "selection", "window", "gating")),
            f"{fmt(n.get('fwd_peak_gib'))} / {fmt(n.get('fwd_bwd_peak_gib'))}",
            f"{fmt(n.get('fwd_work_gib'))} ({fmt(n.get('fwd_inference_work_gib'))}) / {fmt(n.get('fwd_bwd_work_gib'))}",
            fmt((n.get("selection_sharing") or {}).get("union_per_tile"), 1),
            f"{fmt(flash.get('fwd_ms'))} / {fmt(flash.get('bwd_ms'))}",
            f"{fmt(cudnn.get('fwd_ms'))} / {fmt(cudnn.get('bwd_ms'))}",
            f"{fmt(fla.get('fwd_ms'))} / {fmt(fla.get('bwd_ms'))} "
            f"({fmt(fla.get('fwd_compression_ms'))}, {fmt(fla.get('fwd_topk_ms'))})",
        ])
    caption = (f"NSA operator, {rows[0]['inputs'] if rows else ''} inputs, B=1 HQ={HQ} HKV={HKV} D={D} bf16, ms; "
               f"{describe(env)}; matmul {tflops:.0f} TFLOP/s")
    return caption + "\n\n" + markdown_table(headers, lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=OPERATOR_LENGTHS)
    parser.add_argument("--fla-lengths", type=int, nargs="*", default=None,
                        help="lengths at which to run fla-core (default: all)")
    parser.add_argument("--dense-lengths", type=int, nargs="*", default=None,
                        help="lengths at which to run dense SDPA (default: all)")
    parser.add_argument("--inputs", choices=INPUT_KINDS, default="randn",
                        help="randn (every token's top-k independent: worst case) or structured (trained-like)")
    add_output_arguments(parser, baseline=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_ops.py needs a CUDA GPU")
    env = environment()
    env["matmul_tflops"] = matmul_tflops()
    results = Results(f"bench_ops_{args.inputs}", args.out, env)
    structured = args.inputs == "structured"
    for seq_len in args.lengths:
        torch.cuda.empty_cache()
        x = make_inputs(seq_len, structured=structured)
        row: dict = {"T": seq_len, "inputs": args.inputs, "flops": nsa_flops(seq_len)}
        t0 = time.time()
        runs = [("videonsa", lambda x=x: {**bench_totals(x), **bench_parts(x)})]
        if args.dense_lengths is None or seq_len in args.dense_lengths:
            runs += [("sdpa_flash", lambda x=x: bench_dense(x, SDPBackend.FLASH_ATTENTION)),
                     ("sdpa_cudnn", lambda x=x: bench_dense(x, SDPBackend.CUDNN_ATTENTION))]
        if env["fla-core"] and (args.fla_lengths is None or seq_len in args.fla_lengths):
            runs.append(("fla", lambda x=x: bench_fla(x)))
        for name, fn in runs:
            try:
                row[name] = fn()
            except Exception as exc:  # noqa: BLE001 - one failing baseline must not stop the table
                row[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                traceback.print_exc()
            torch.cuda.empty_cache()
        row["wall_s"] = time.time() - t0
        results.row(row)
        del x
    results.write_json()
    results.write_markdown(table(results.rows, env, env["matmul_tflops"]))
    baselines.finish(metrics(results.rows), env, args, "bench_ops")


if __name__ == "__main__":
    main()
