"""GPU check of chunked queries (chunked prefill): the operator over a chunk of queries with the keys before it
against the rows of the one-pass operator, and the time per chunk (one run, one GPU).

    python benchmarks/check/check_chunked_gpu.py [--out DIR] [--lengths 32768 131072] [--chunks 8192 16384 32768]

Shape: one attention layer of Qwen2.5-VL-7B (HQ=28, HKV=4, D=128, bf16, the default NSA budget). For each
length T, input kind (randn: unrelated neighbouring selections; structured: neighbours choose mostly the same
blocks, as trained models do) and chunk size C, the queries are cut into chunks [s, e) and each runs as
`nsa_attention(q[:, s:e], k[:, :e], v[:, :e], gates[:, s:e])` (docs/operator.md, "Queries that end a longer
key sequence"); its output is compared with rows s..e-1 of the one-pass `nsa_attention` over all T: largest and
mean absolute difference, and the fraction of (token, KV group) rows whose selected blocks are the same
(`nsa_attention_parts`). A packed case does the same for several sequences of different lengths in one call
(cu_seqlens for the chunk's queries, cu_seqlens_k for the keys up to the chunk's end), and a one-query chunk
checks the last token. Times: median ms of each chunk's call, their sum, and the one-pass call.

A chunk row passes when its largest absolute difference is at most --max-abs (default 0.05, a few bf16 units
of the outputs' size) and its mean at most --mean-abs (1e-3); the exit status is 1 when any fails. Prints a
table last and writes OUT/check_chunked_gpu.{jsonl,json,md} (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
from harness import (  # noqa: E402
    BLOCK,
    BUDGET,
    COUNT,
    INPUT_KINDS,
    WINDOW,
    Results,
    add_output_arguments,
    bench,
    describe,
    environment,
    fmt,
    make_inputs,
    markdown_table,
)
from videonsa.ops import nsa_attention, nsa_attention_parts  # noqa: E402

QUERY_SIDE = ("q", "g_cmp", "g_slc", "g_swa")
PACKED_LENGTHS = [40_000, 7_001, 65_536, 18_003]  # ends inside and on block boundaries; one shorter than a chunk


def _chunk_inputs(x: dict[str, torch.Tensor], start: int, end: int) -> dict[str, torch.Tensor]:
    """Queries and gates of rows start..end-1, keys and values up to end (dense batch of one)."""
    return {n: (t[:, start:end] if n in QUERY_SIDE else t[:, :end]) for n, t in x.items()}


def _differences(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    diff = (got.float() - want.float()).abs()
    return float(diff.max()) if diff.numel() else 0.0, float(diff.mean()) if diff.numel() else 0.0


def _same_blocks(got: torch.Tensor, want: torch.Tensor) -> float:
    """Fraction of (token, group) rows with the same selected blocks."""
    return float((got == want).all(-1).float().mean())


def check_dense(results: Results, seq_len: int, kind: str, chunk: int, limits: tuple[float, float]) -> list[dict]:
    """Chunks of one sequence of seq_len tokens against its one-pass rows; one result row per chunk."""
    x = make_inputs(seq_len, seed=0, structured=kind == "structured")
    with torch.no_grad():
        full = nsa_attention(**x, **BUDGET)
        full_blocks = nsa_attention_parts(**x, **BUDGET).block_indices
        full_ms = bench(lambda: nsa_attention(**x, **BUDGET), budget_ms=300)
        rows = []
        bounds = [(s, min(s + chunk, seq_len)) for s in range(0, seq_len, chunk)] + [(seq_len - 1, seq_len)]
        for index, (start, end) in enumerate(bounds):
            inputs = _chunk_inputs(x, start, end)
            o = nsa_attention(**inputs, **BUDGET)
            blocks = nsa_attention_parts(**inputs, **BUDGET).block_indices
            max_abs, mean_abs = _differences(o, full[:, start:end])
            ms = bench(lambda inputs=inputs: nsa_attention(**inputs, **BUDGET), budget_ms=200)
            rows.append(results.row(dict(
                case="dense", kind=kind, length=seq_len, chunk=chunk, index=index, start=start, end=end,
                max_abs=max_abs, mean_abs=mean_abs, same_blocks=_same_blocks(blocks, full_blocks[:, start:end]),
                ms=ms, one_pass_ms=full_ms, last_token=end - start == 1,
                ok=max_abs <= limits[0] and mean_abs <= limits[1],
            )))
    return rows


def check_packed(results: Results, kind: str, chunk: int, limits: tuple[float, float]) -> list[dict]:
    """Several sequences packed in one call, chunk by chunk: chunk c holds each sequence's queries c*chunk ..
    (c+1)*chunk-1 (sequences already done are left out, as a caller must: every sequence needs a query) and
    its keys up to there."""
    total = sum(PACKED_LENGTHS)
    x = make_inputs(total, seed=1, structured=kind == "structured")
    starts = [0]
    for length in PACKED_LENGTHS:
        starts.append(starts[-1] + length)
    cu_full = torch.tensor(starts, dtype=torch.int32, device="cuda")
    rows = []
    with torch.no_grad():
        full = nsa_attention(**x, **BUDGET, cu_seqlens=cu_full)
        full_blocks = nsa_attention_parts(**x, **BUDGET, cu_seqlens=cu_full).block_indices
        full_ms = bench(lambda: nsa_attention(**x, **BUDGET, cu_seqlens=cu_full), budget_ms=300)
        for index, c0 in enumerate(range(0, max(PACKED_LENGTHS), chunk)):
            q_rows, k_rows, q_counts, k_counts = [], [], [], []
            for seq_start, length in zip(starts, PACKED_LENGTHS):
                if c0 >= length:
                    continue
                end = min(c0 + chunk, length)
                q_rows.append(torch.arange(seq_start + c0, seq_start + end, device="cuda"))
                k_rows.append(torch.arange(seq_start, seq_start + end, device="cuda"))
                q_counts.append(end - c0)
                k_counts.append(end)
            q_index, k_index = torch.cat(q_rows), torch.cat(k_rows)
            inputs = {n: (t[:, q_index] if n in QUERY_SIDE else t[:, k_index]) for n, t in x.items()}
            offsets = dict(
                cu_seqlens=torch.tensor([0, *torch.tensor(q_counts).cumsum(0).tolist()], dtype=torch.int32,
                                        device="cuda"),
                cu_seqlens_k=torch.tensor([0, *torch.tensor(k_counts).cumsum(0).tolist()], dtype=torch.int32,
                                          device="cuda"),
            )
            o = nsa_attention(**inputs, **BUDGET, **offsets)
            blocks = nsa_attention_parts(**inputs, **BUDGET, **offsets).block_indices
            max_abs, mean_abs = _differences(o, full[:, q_index])
            ms = bench(lambda inputs=inputs, offsets=offsets: nsa_attention(**inputs, **BUDGET, **offsets),
                       budget_ms=200)
            rows.append(results.row(dict(
                case="packed", kind=kind, length=total, chunk=chunk, index=index, start=c0,
                end=c0 + chunk, sequences=len(q_counts), max_abs=max_abs, mean_abs=mean_abs,
                same_blocks=_same_blocks(blocks, full_blocks[:, q_index]), ms=ms, one_pass_ms=full_ms,
                last_token=False, ok=max_abs <= limits[0] and mean_abs <= limits[1],
            )))
    return rows


def summary_table(rows: list[dict]) -> str:
    """One line per (case, kind, length, chunk size): chunks, worst differences, blocks, times."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["case"], row["kind"], row["length"], row["chunk"]), []).append(row)
    lines = []
    for (case, kind, length, chunk), group in groups.items():
        chunks = [r for r in group if not r["last_token"]]
        last = [r for r in group if r["last_token"]]
        lines.append([
            case, kind, length, chunk, len(chunks),
            f"{max(r['max_abs'] for r in group):.3g}", f"{max(r['mean_abs'] for r in group):.2e}",
            fmt(min(r["same_blocks"] for r in group), 4),
            fmt(sum(r["ms"] for r in chunks) / len(chunks)), fmt(max(r["ms"] for r in chunks)),
            fmt(sum(r["ms"] for r in chunks)), fmt(group[0]["one_pass_ms"]),
            fmt(last[0]["ms"]) if last else "-", "yes" if all(r["ok"] for r in group) else "NO",
        ])
    headers = ["case", "inputs", "T", "chunk", "chunks", "max abs diff", "worst mean abs diff",
               "same blocks (min)", "ms/chunk (mean)", "ms/chunk (max)", "ms all chunks", "ms one pass",
               "ms last token", "ok"]
    return markdown_table(headers, lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072], help="sequence lengths T")
    parser.add_argument("--chunks", type=int, nargs="+", default=[8192, 16384, 32768], help="chunk sizes")
    parser.add_argument("--kinds", nargs="+", default=list(INPUT_KINDS), choices=INPUT_KINDS)
    parser.add_argument("--no-packed", action="store_true", help="skip the packed (several sequences) case")
    parser.add_argument("--max-abs", type=float, default=0.05, help="largest absolute difference allowed")
    parser.add_argument("--mean-abs", type=float, default=1e-3, help="largest mean absolute difference allowed")
    add_output_arguments(parser)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("check_chunked_gpu: needs a CUDA GPU", file=sys.stderr)
        return 2
    env = environment()
    print(describe(env), flush=True)
    results = Results("check_chunked_gpu", args.out, env)
    limits = (args.max_abs, args.mean_abs)
    rows = []
    for kind in args.kinds:
        for seq_len in args.lengths:
            for chunk in args.chunks:
                if chunk < seq_len:
                    rows += check_dense(results, seq_len, kind, chunk, limits)
                    torch.cuda.empty_cache()  # the inputs of the next case may be longer
        if not args.no_packed:
            for chunk in args.chunks:
                rows += check_packed(results, kind, chunk, limits)
                torch.cuda.empty_cache()
    caption = (f"Chunked queries vs the one-pass operator ({describe(env)}; HQ=28, HKV=4, D=128, bf16, block "
               f"{BLOCK}, {COUNT} blocks, window {WINDOW}). ms: median per call.\n\n")
    failed = [r for r in rows if not r["ok"]]
    results.write_json({"failed": len(failed)})
    results.write_markdown(caption + summary_table(rows))
    if failed:
        print(f"check_chunked_gpu: {len(failed)} chunk(s) over the limits (max abs {args.max_abs}, mean abs "
              f"{args.mean_abs})", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
