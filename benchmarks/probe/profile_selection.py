"""Where one call of the selection branch spends its time: forward and backward, the host-side list building
and the GPU's idle time inside a call, with checksums of the outputs so that two versions of the code can be
compared bit for bit.

Run it once per version, each in its own process (PYTHONPATH picks the code), on the same card:

    PYTHONPATH=src python benchmarks/probe/profile_selection.py --tag new
    PYTHONPATH=old/src python benchmarks/probe/profile_selection.py --tag old

Prints one JSON line per (length, inputs) and writes them to OUT/profile_selection_<tag>.jsonl
(benchmarks/README.md):
forward_ms / backward_ms (CUDA events, median), forward_wall_ms (host wall clock of a synchronised call),
the list-building pieces of the block-major forward, idle_ms (gaps between the kernels of one forward call,
torch profiler), and o / lse / dq / dk / dv checksums.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
from harness import BLOCK, HKV, HQ, INPUT_KINDS, PROBE_LENGTHS, D, bench, open_run  # noqa: E402
from harness.operator import operator_selection as operator_inputs  # noqa: E402
from videonsa.ops.triton import selection as slc  # noqa: E402
from videonsa.ops.triton import utils as U  # noqa: E402


def checksum(x: torch.Tensor) -> int:
    """Position-weighted sum of the raw bits: equal for bit-identical tensors, different for almost any change."""
    x = x.contiguous().view(-1)
    bits = x.view(torch.int16 if x.element_size() == 2 else torch.int32).to(torch.int64)
    return int((bits * (torch.arange(bits.numel(), device=x.device) % 65521 + 1)).sum())


def idle_ms(fn) -> tuple[float, float, int]:
    """(span, idle, kernels) of one fn() call on the GPU: from its first kernel's start to its last one's end,
    the time no kernel ran, and how many kernels it launched."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    if not events:
        return 0.0, 0.0, 0
    start = end = events[0].time_range.start
    idle = 0.0
    for e in events:
        idle += max(0, e.time_range.start - end)
        end = max(end, e.time_range.end)
    return (end - start) / 1e3, idle / 1e3, len(events)


def wall_ms(fn, reps: int = 5) -> float:
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e3


def run(seq_len: int, structured: bool, tag: str) -> dict:
    q, k, v, cu, idx = operator_inputs(seq_len, structured)
    scale = D**-0.5
    group = HQ // HKV
    forward = lambda: slc.selected_attention_fwd(q, k, v, idx, cu, BLOCK, scale)  # noqa: E731
    o, lse = forward()
    do = torch.randn(q.shape, device=q.device, dtype=q.dtype, generator=torch.Generator(q.device).manual_seed(1))
    backward = lambda: slc.selected_attention_bwd(q, k, v, o, lse, do, idx, cu, BLOCK, scale)  # noqa: E731
    dq, dk, dv = backward()
    chunk = slc.by_block_chunk_tokens(HQ, HKV, idx.shape[-1], D, q.element_size())
    key_blocks = lambda: U.tiles_of(cu, BLOCK, U.max_tiles_of(seq_len, 1, BLOCK))  # noqa: E731
    lists = lambda: slc.block_lists(idx, cu, BLOCK, min(chunk, seq_len), n_blocks=key_blocks().shape[0])  # noqa: E731
    built = lists()
    span, idle, kernels = idle_ms(forward)
    row = dict(
        tag=tag, T=seq_len, inputs="structured" if structured else "randn", card=torch.cuda.get_device_name(),
        layout="tiles" if slc.plan_forward(idx, cu, group, BLOCK) else "by_block",
        forward_ms=bench(forward), forward_wall_ms=wall_ms(forward), backward_ms=bench(backward),
        plan_ms=bench(lambda: slc.plan_forward(idx, cu, group, BLOCK)),
        key_blocks_ms=bench(key_blocks), block_lists_ms=bench(lists),
        items_ms=bench(lambda: slc.by_block_items(built, HKV, slc.SELECTION_SETTINGS.by_block_split)),
        span_ms=span, idle_ms=idle, kernels=kernels,
        o=checksum(o), lse=checksum(lse), dq=checksum(dq), dk=checksum(dk), dv=checksum(dv),
    )
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tag", default="run")
    parser.add_argument("--lengths", type=int, nargs="+", default=PROBE_LENGTHS)
    parser.add_argument("--inputs", nargs="+", default=list(INPUT_KINDS), choices=INPUT_KINDS)
    args, results = open_run(parser, argv, lambda args: f"profile_selection_{args.tag}")
    for kind in args.inputs:
        for n in args.lengths:
            results.row(run(n, kind == "structured", args.tag))


if __name__ == "__main__":
    main()
