"""What SDPA costs at a shape it has not seen: cuDNN's backend builds an execution plan per new input shape, the
other backends need none. Times calls at fresh shapes against repeated calls at one shape, with SDPA's default
backends and with cuDNN left out (`videonsa.layers.attention.decoding_sdpa`), for the shapes that change from call
to call in VideoNSA:

* decode: one query of the 7B's 28 heads against a 4-head KV cache whose length grows by one per call (a decoding
  step; --cache tokens to start);
* vision windows / vision frames: the 7B vision tower's attention (16 heads of 80), a batch of 64-token windows or
  of 256-token frames (224 x 224) whose count changes with every video (+1 per call).

    python benchmarks/probe/probe_sdpa_plans.py --cache 131072 --calls 8

Prints and writes OUT/probe_sdpa_plans.md: milliseconds per call at fresh shapes and at one repeated shape, per
case and backend set. A fresh-shape time far above the repeated one is the plan build.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
from harness import describe, fmt, open_run  # noqa: E402
from harness.output import markdown_table  # noqa: E402
from harness.shapes import HKV, HQ, D  # noqa: E402
from videonsa.layers.attention import decoding_sdpa  # noqa: E402

VISION_HEADS, VISION_HEAD_DIM = 16, 80  # Qwen2.5-VL-7B's vision tower


def decode_inputs(step: int, cache: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [1, HQ, 1, D], k/v [1, HKV, cache + step, D] (bf16, CUDA)."""
    q = torch.randn(1, HQ, 1, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, HKV, cache + step, D, device="cuda", dtype=torch.bfloat16)
    return q, k, torch.randn_like(k)


def vision_inputs(step: int, count: int, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [count + step, 16, length, 80] (bf16, CUDA)."""
    shape = (count + step, VISION_HEADS, length, VISION_HEAD_DIM)
    return tuple(torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))


def sdpa_ms(inputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> float:
    """Milliseconds of one SDPA call on (q, k, v), from an idle GPU to its end."""
    torch.cuda.synchronize()
    started = time.perf_counter()
    F.scaled_dot_product_attention(*inputs, enable_gqa=True)
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - started)


def fresh_and_repeated_ms(make: Callable[[int], tuple], calls: int,
                          backends: Callable[[], contextlib.AbstractContextManager]) -> tuple[float, float]:
    """(median ms of one call at each of `calls` shapes not seen before, median ms of `calls` calls at one shape).
    Shapes start past `calls` so that the repeated shape is not among the fresh ones."""
    with backends():
        fresh = [sdpa_ms(make(step)) for step in range(calls, 2 * calls)]
        inputs = make(0)
        sdpa_ms(inputs)  # its plan, if any
        repeated = [sdpa_ms(inputs) for _ in range(calls)]
    return sorted(fresh)[len(fresh) // 2], sorted(repeated)[len(repeated) // 2]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=int, default=131072, help="KV cache tokens of the decode case")
    parser.add_argument("--windows", type=int, default=4096, help="64-token windows of the vision case")
    parser.add_argument("--frames", type=int, default=1024, help="256-token frames of the vision case")
    parser.add_argument("--calls", type=int, default=8, help="fresh shapes (and repeated calls) per case")
    args, results = open_run(parser, argv, "probe_sdpa_plans", needs_cuda=True)
    cases = {
        "decode": lambda step: decode_inputs(step, args.cache),
        "vision windows": lambda step: vision_inputs(step, args.windows, 64),
        "vision frames": lambda step: vision_inputs(step, args.frames, 256),
    }
    backend_sets = {"default": contextlib.nullcontext, "without cuDNN": decoding_sdpa}
    rows = []
    for case, make in cases.items():
        for name, backends in backend_sets.items():
            fresh, repeated = fresh_and_repeated_ms(make, args.calls, backends)
            rows.append(results.row({"case": case, "backends": name, "fresh_shape_ms": round(fresh, 3),
                                     "repeated_shape_ms": round(repeated, 3)}))
    table = markdown_table(["case", "SDPA backends", "ms at a fresh shape", "ms at a repeated shape"],
                           [[r["case"], r["backends"], fmt(r["fresh_shape_ms"], 3), fmt(r["repeated_shape_ms"], 3)]
                            for r in rows])
    results.write_markdown(f"SDPA at fresh and repeated shapes (median of {args.calls}; decode cache {args.cache:,}, "
                           f"{args.windows} windows, {args.frames} frames, bf16); {describe(results.env)}\n\n{table}")


if __name__ == "__main__":
    main()
