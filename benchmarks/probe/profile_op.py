"""Where the NSA operator's GPU time goes: torch.profiler self-CUDA time per kernel of one `nsa_attention`
forward + backward (the Triton path), on the benchmarks' inputs (`harness.make_inputs`, randn and structured),
per length.

    python benchmarks/probe/profile_op.py [--lengths 32768 131072] [--inputs randn structured] [--rows 30]
        [--gaps 12]

Prints one profiler table per (length, inputs) after two warm-up steps. With --gaps N it prints instead, for the
forward and the backward separately, the GPU span, busy and idle time and the N longest idle gaps with the
kernels on either side (where the GPU waits on the host: syncs and launch-bound stretches). B=1, HQ=28, HKV=4,
D=128, bf16 and the VideoNSA defaults, as in bench_ops.py. Writes the report to OUT/profile_op.md
(OUT/profile_op_gaps.md with --gaps; benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
from harness import INPUT_KINDS, PROBE_LENGTHS, describe, make_inputs, open_run  # noqa: E402
from videonsa.ops import nsa_attention  # noqa: E402


def nsa_attention_triton(**inputs):
    """The operator on its Triton path with the default budget."""
    return nsa_attention(**inputs, backend="triton")


def profile_step(seq_len: int, structured: bool, rows: int) -> str:
    x = make_inputs(seq_len, structured=structured)
    leaves = {name: t.detach().clone().requires_grad_() for name, t in x.items()}
    do = torch.randn_like(x["q"])
    for _ in range(2):  # compile and warm the caches
        nsa_attention_triton(**leaves).backward(do)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        o = nsa_attention_triton(**leaves)
        torch.cuda.synchronize()
        o.backward(do)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60)


def gap_report(seq_len: int, structured: bool, n_gaps: int) -> str:
    """Span, busy and idle GPU time of one forward and one backward, with the longest gaps between kernels."""
    x = make_inputs(seq_len, structured=structured)
    leaves = {name: t.detach().clone().requires_grad_() for name, t in x.items()}
    do = torch.randn_like(x["q"])
    for _ in range(2):
        nsa_attention_triton(**leaves).backward(do)
    torch.cuda.synchronize()
    lines = []
    holder = {}

    def forward():
        holder["o"] = nsa_attention_triton(**leaves)

    def backward():
        holder["o"].backward(do)

    for name, fn in (("forward", forward), ("backward", backward)):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        kernels = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
        if not kernels:
            continue
        gaps, busy = [], 0.0
        end, last = kernels[0].time_range.start, kernels[0].name
        for e in kernels:
            if e.time_range.start > end:
                gaps.append((e.time_range.start - end, last, e.name))
            busy += e.time_range.end - e.time_range.start
            if e.time_range.end >= end:
                end, last = e.time_range.end, e.name
        span = end - kernels[0].time_range.start
        idle = sum(g[0] for g in gaps)
        lines.append(f"{name}: span {span / 1e3:.2f} ms, kernels {len(kernels)} busy {busy / 1e3:.2f} ms, "
                     f"idle {idle / 1e3:.2f} ms in {len(gaps)} gaps")
        for us, before, after in sorted(gaps, reverse=True)[:n_gaps]:
            lines.append(f"  {us:8.1f} us  {before[:50]} -> {after[:50]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=PROBE_LENGTHS)
    parser.add_argument("--inputs", nargs="+", choices=INPUT_KINDS, default=list(INPUT_KINDS))
    parser.add_argument("--rows", type=int, default=30)
    parser.add_argument("--gaps", type=int, default=0, help="print the N longest idle gaps instead of the table")
    args, results = open_run(parser, argv, lambda args: "profile_op_gaps" if args.gaps else "profile_op")
    report = [f"NSA operator profile; {describe(results.env)}"]
    for seq_len in args.lengths:
        for kind in args.inputs:
            print(f"=== T={seq_len} {kind}", flush=True)
            if args.gaps:
                text = gap_report(seq_len, kind == "structured", args.gaps)
            else:
                text = profile_step(seq_len, kind == "structured", args.rows)
            report.append(f"## T={seq_len}, {kind} inputs\n\n```\n{text}\n```")
    results.write_markdown("\n\n".join(report))


if __name__ == "__main__":
    main()
