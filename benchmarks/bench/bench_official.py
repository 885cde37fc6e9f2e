"""One attention layer of the 7B model in `official` mode (the original VideoNSA function) against `nsa` mode.

    python benchmarks/bench/bench_official.py --lengths 8192 32768 131072 [--compare-baseline]

Inputs: HQ 28, HKV 4, D 128, bf16, a video prompt of ~100 text tokens, T - 200 vision tokens, ~100 text tokens
(random q, k, v and gate logits). Times: median of CUDA-event timed runs with the L2 cache flushed before each
(`harness.bench(..., flush_l2=True)`, as triton.testing.do_bench does):

* nsa: what `nsa` mode computes per layer, `videonsa_attention` (NSA on the vision tokens + text on SDPA);
* official: `official_attention` on its CUDA path, and its parts one by one on the same inputs: glue before
  the branches (masking, head padding, gates, block means), compression (the kernel, storing the gated output),
  top-k, selection and window (each adding its gated output into the sum), the copy average, the dense part
  (causal mean of v added everywhere, text rows on SDPA); "glue_rest" is the whole call minus the parts.

`--selection-layout auto by-block tiles tiles-16 tiles-64` times the layer once per selection kernel layout (one
row each; tiles-N: query tiles of N rows, N / 16 tokens x 16 heads);
`--compression-sweep` also times the compression kernel over a grid of launch settings (`CompressionLaunch`).
`--check-length` (default the smallest length) also runs the PyTorch reference path once at that length and
reports how far the CUDA path is from it, and whether the Triton top-k and the PyTorch emulation pick the same
blocks in the same slots from the same inputs. Writes OUT/bench_official.{jsonl,json,md} (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
from harness import (  # noqa: E402
    BLOCK,
    COUNT,
    HKV,
    HQ,
    WINDOW,
    D,
    bench,
    describe,
    fmt,
    markdown_table,
    open_run,
    peak_gib,
)
from harness import baseline as baselines  # noqa: E402
from videonsa.layers import official, official_attention  # noqa: E402
from videonsa.layers.official import FastPathSettings  # noqa: E402
from videonsa.ops.official import anticausal_compression, original_topk_reference  # noqa: E402

# Kernel internals timed one by one (the only ones this script uses).
from videonsa.ops.triton.official_compression import (  # noqa: E402
    DEFAULT_LAUNCH,
    CompressionLaunch,
    anticausal_compression_triton,
)
from videonsa.ops.triton.selection import selected_attention_fwd  # noqa: E402
from videonsa.ops.triton.window import window_attention_fwd  # noqa: E402
from videonsa.options import DEFAULT_GATE_TEMPERATURE  # noqa: E402


def make_inputs(seq_len: int, text_before: int = 100, text_after: int = 100, seed: int = 0) -> dict:
    """q [1, T, HQ, D], k, v [1, T, HKV, D], gate logits [1, T, HQ, 3] (bf16) and is_vision [1, T]."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shape = lambda heads: (1, seq_len, heads, D)  # noqa: E731
    rand = lambda *s: torch.randn(*s, generator=gen, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    is_vision = torch.zeros(1, seq_len, dtype=torch.bool, device="cuda")
    is_vision[:, text_before : seq_len - text_after] = True
    return dict(q=rand(*shape(HQ)), k=rand(*shape(HKV)), v=rand(*shape(HKV)), gate_logits=rand(1, seq_len, HQ, 3),
                is_vision=is_vision)


def timer(quick: bool):
    """Median ms of a call, L2 flushed before each run; --quick: about 20 ms of runs instead of 200."""
    budget = 20.0 if quick else 200.0
    return lambda fn: bench(fn, warmup=2, min_reps=3, max_reps=1000, budget_ms=budget, flush_l2=True)


def nsa_mode_layer(x: dict):
    """A closure computing what `nsa` mode computes for the layer (token split built once, as the model does)."""
    from videonsa.layers import SparseSettings, build_token_split, sdpa_attend, videonsa_attention  # public API

    split = build_token_split(x["is_vision"])
    gates = tuple(split.gather_vision(g) for g in (x["gate_logits"] / DEFAULT_GATE_TEMPERATURE).sigmoid().unbind(-1))
    settings, attend = SparseSettings(), sdpa_attend()
    return lambda: videonsa_attention(x["q"], x["k"], x["v"], gates, split, settings, attend)


def official_parts(
    x: dict, settings, block_size: int = BLOCK, block_counts: int = COUNT, window_size: int = WINDOW
) -> dict:
    """Closures for each step of the official CUDA path on x (with FastPathSettings `settings`), run on the
    intermediate values of one call. The fold steps add into a scratch copy of the gated sum (its values drift
    over the repetitions; the work does not)."""
    q, k, v, is_vision = x["q"], x["k"], x["v"], x["is_vision"]
    scale = q.shape[-1] ** -0.5
    batch, seq_len, heads = q.shape[:3]
    launch = settings.compression or DEFAULT_LAUNCH

    def glue_before():
        return official.prepare_fast_inputs(q, k, v, is_vision, x["gate_logits"], DEFAULT_GATE_TEMPERATURE, block_size)

    q64, k_m, v_m, gates64, k_cmp, v_cmp = glue_before()
    g_cmp = gates64[0].view(q64.shape[:3])

    def compression():
        return anticausal_compression_triton(q64, k_cmp, v_cmp, block_size, scale, gate=g_cmp, launch=launch)

    o64, lse = compression()
    topk = official._topk_implementation()
    indices = topk(q64, k_cmp, lse, block_counts, block_size, scale)
    packed = lambda t: t.reshape(batch * seq_len, *t.shape[2:])  # noqa: E731
    cu = torch.arange(0, (batch + 1) * seq_len, seq_len, dtype=torch.int32, device=q.device)
    scratch = packed(o64.clone())

    def selection():
        ids = official.ascending_block_ids(packed(indices))
        return selected_attention_fwd(packed(q64) * scale, packed(k_m), packed(v_m), ids, cu, block_size, 1.0,
                                      fold_into=scratch, fold_scale=gates64[1], **settings.selection_switches())

    def window():
        return window_attention_fwd(packed(q64), packed(k_m), packed(v_m), cu, window_size, scale,
                                    fold_into=scratch, gate=gates64[2])

    nsa_sum = o64[:, :, :heads] + o64[:, :, heads : 2 * heads]
    return {
        "glue_before": glue_before,
        "compression": compression,
        "topk": lambda: topk(q64, k_cmp, lse, block_counts, block_size, scale),
        "selection": selection,
        "window": window,
        "copy_average": lambda: o64[:, :, :heads] + o64[:, :, heads : 2 * heads],
        "dense": lambda: official.add_dense_text_part(nsa_sum, q, k, v, is_vision, scale),
        "_state": (q64, k_cmp, v_cmp, lse, indices, scale, topk),
    }


def selection_settings(layout: str):
    """FastPathSettings for a --selection-layout value ("auto", "by-block", "tiles", "tiles-N")."""
    if layout.startswith("tiles-"):
        return FastPathSettings(selection_layout="tiles", selection_tile_rows=int(layout.split("-")[1]))
    return FastPathSettings(selection_layout=layout)


def compression_sweep(x: dict, bench, block_size: int = BLOCK) -> list[dict]:
    """Times the compression kernel for a grid of launch settings on x's padded queries (ms, sorted)."""
    q64, _, _, gates64, k_cmp, v_cmp = official.prepare_fast_inputs(
        x["q"], x["k"], x["v"], x["is_vision"], x["gate_logits"], DEFAULT_GATE_TEMPERATURE, block_size)
    gate = gates64[0].view(q64.shape[:3])
    scale = q64.shape[-1] ** -0.5
    results = []
    for rows, block_n, warps, stages in itertools.product((64, 128, 256), (32, 64, 128), (4, 8), (2, 3)):
        launch = CompressionLaunch(rows=rows, block_n=block_n, num_warps=warps, num_stages=stages)
        try:
            ms = bench(lambda launch=launch: anticausal_compression_triton(q64, k_cmp, v_cmp, block_size, scale,
                                                                         gate=gate, launch=launch))
        except Exception as error:  # noqa: BLE001 - a launch that does not fit (shared memory) is reported
            results.append({"launch": dataclasses.asdict(launch), "error": str(error).splitlines()[0][:200]})
            continue
        results.append({"launch": dataclasses.asdict(launch), "ms": ms})
    return sorted(results, key=lambda r: r.get("ms", float("inf")))


PART_NAMES = ("glue_before", "compression", "topk", "selection", "window", "copy_average", "dense")


def check_against_reference(x: dict, parts: dict) -> dict:
    """The CUDA path against the PyTorch reference path (bf16 both) and the two top-k on identical inputs."""
    args = (x["q"], x["k"], x["v"], x["is_vision"], x["gate_logits"])
    fast = official_attention(*args, backend="triton").float()
    reference = official_attention(*args, backend="reference").float()
    diff = (fast - reference).abs()
    q64, k_cmp, v_cmp, lse, indices, scale, topk = parts["_state"]
    emulated = original_topk_reference(q64, k_cmp, lse, COUNT, BLOCK, scale)
    same_rows = (emulated == indices).all(dim=-1).float().mean().item()
    o_ref, lse_ref = anticausal_compression(q64, k_cmp, v_cmp, BLOCK, scale)
    o_kernel, lse_kernel = anticausal_compression_triton(q64, k_cmp, v_cmp, BLOCK, scale)
    return {
        "compression_o_max_abs_diff": (o_kernel.float() - o_ref.float()).abs().max().item(),
        "compression_lse_max_abs_diff": (lse_kernel - lse_ref).abs().max().item(),
        "topk_implementation": f"{topk.__module__}.{topk.__name__}",
        "topk_rows_identical_to_emulation": same_rows,
        "output_max_abs_diff": diff.max().item(),
        "output_mean_abs_diff": diff.mean().item(),
        "output_mean_abs": reference.abs().mean().item(),
        "tokens_with_diff_above_1e-2": (diff.amax(dim=(2, 3)) > 1e-2).float().mean().item(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--check-length", type=int, default=None,
                        help="length at which the reference path is compared (default: the smallest; 0: none)")
    parser.add_argument("--selection-layout", nargs="+", default=["auto"],
                        choices=["auto", "by-block", "tiles", "tiles-16", "tiles-32", "tiles-64", "tiles-128"],
                        help="selection kernel layout(s) to time, one row each (default: auto); tiles-N: query "
                             "tiles of N rows (N / 16 tokens)")
    parser.add_argument("--compression-sweep", action="store_true",
                        help="also time the compression kernel over a grid of launch settings at each length")
    parser.add_argument("--quick", action="store_true", help="fewer timing repetitions")
    args, results = open_run(parser, argv, "bench_official", baseline=True, needs_cuda=True)
    env = results.env
    bench = timer(args.quick)
    check_length = min(args.lengths) if args.check_length is None else args.check_length
    sweeps = {}
    for seq_len in args.lengths:
        x = make_inputs(seq_len)
        with torch.no_grad():
            nsa = nsa_mode_layer(x)
            nsa_ms, nsa_peak = bench(nsa), peak_gib(nsa)
            for layout in args.selection_layout:
                settings = selection_settings(layout)
                call = lambda x=x, s=settings: official_attention(  # noqa: E731
                    x["q"], x["k"], x["v"], x["is_vision"], x["gate_logits"], fast_settings=s)
                row = {"T": seq_len, "vision_tokens": int(x["is_vision"].sum()), "selection_layout": layout}
                row["nsa_ms"], row["nsa_peak_gib"] = nsa_ms, nsa_peak
                row["official_ms"], row["official_peak_gib"] = bench(call), peak_gib(call)
                parts = official_parts(x, settings)
                for name, fn in parts.items():
                    if not name.startswith("_"):
                        row[f"{name}_ms"] = bench(fn)
                row["glue_rest_ms"] = row["official_ms"] - sum(row[f"{n}_ms"] for n in PART_NAMES)
                row["official_over_nsa"] = row["official_ms"] / row["nsa_ms"]
                if seq_len == check_length and layout == args.selection_layout[0]:
                    row["check"] = check_against_reference(x, parts)
                del parts
                results.row(row)
            if args.compression_sweep:
                sweeps[seq_len] = compression_sweep(x, bench)
                print(json.dumps({"T": seq_len, "compression_sweep_best": sweeps[seq_len][:5]}), flush=True)
        torch.cuda.empty_cache()

    results.write_json({"compression_sweeps": {str(k): v for k, v in sweeps.items()}})
    cols = ["nsa", "official", *PART_NAMES, "glue_rest"]
    lines = [[f"{row['T']:,}", row["selection_layout"], *(fmt(row[f"{c}_ms"]) for c in cols),
              f"{row['official_over_nsa']:.2f}x"] for row in results.rows]
    text = (f"One 7B attention layer (HQ {HQ}, HKV {HKV}, D {D}, bf16, ~200 text tokens), ms; {describe(env)}\n\n"
            + markdown_table(["T", "layout", *cols, "official / nsa"], lines))
    for seq_len, sweep in sweeps.items():
        text += f"\n\ncompression kernel launch sweep at T={seq_len} (ms, best first):\n"
        text += "\n".join(f"    {r.get('ms', float('nan')):8.3f}  {r['launch']}  {r.get('error', '')}"
                          for r in sweep[:10])
    results.write_markdown(text)
    baselines.finish(metrics(results.rows), env, args, "bench_official")


def metrics(rows: list[dict]) -> dict[str, float]:
    """Flat metric names for the baseline comparison: official/layer/T<T>/<layout>/<nsa|official>_ms."""
    return {f"official/layer/T{row['T']}/{row['selection_layout']}/{name}_ms": row[f"{name}_ms"]
            for row in rows for name in ("nsa", "official")}


if __name__ == "__main__":
    main()
