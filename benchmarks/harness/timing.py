"""CUDA-event timing shared by every benchmark script: median of synchronised runs after a warm-up.

The method follows `triton.testing.do_bench`: warm-up calls first (compilation, autotuning, caches), then runs
timed one by one with CUDA events, each followed by a synchronisation, and the median kept. The number of runs
adapts to the first run's time so that a slow call is timed a few times and a fast one up to `max_reps` times.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

GiB = 1024**3

# Bytes zeroed before each timed run when `flush_l2` is set: larger than any current card's L2 (H100 50 MB,
# H200 60 MB), so that a run does not find its inputs cached by the previous one (do_bench does the same).
_L2_FLUSH_BYTES = 256 * 1024**2


def bench(
    fn: Callable[[], object],
    *,
    warmup: int = 1,
    min_reps: int = 3,
    max_reps: int = 50,
    budget_ms: float = 400.0,
    reps: int | None = None,
    flush_l2: bool = False,
) -> float:
    """Median milliseconds of `fn()` on the current CUDA device.

    `warmup` untimed calls, then one timed call whose time sets the number of timed runs:
    `budget_ms / first`, clamped to [min_reps, max_reps]. Every run is bracketed by CUDA events and followed by
    `torch.cuda.synchronize()`, so the time is the GPU's from the first to the last kernel `fn` queues (host
    gaps between its kernels included, host time before its first launch not). `reps` fixes the number of
    timed runs instead (for calls of seconds). `flush_l2` zeroes a 256 MiB buffer before each run.
    """
    for _ in range(max(warmup, 0)):
        fn()
    torch.cuda.synchronize()
    flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device="cuda") if flush_l2 else None
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def timed() -> float:
        if flush is not None:
            flush.zero_()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    if reps is None:
        first = timed()
        reps = max(min_reps, min(max_reps, int(budget_ms / max(first, 1e-3))))
    times = sorted(timed() for _ in range(max(reps, 1)))
    return times[len(times) // 2]


def peak_gib(fn: Callable[[], object], *, empty_cache: bool = True) -> float:
    """Peak GiB that `fn()` allocates beyond what is allocated when it starts (its outputs included)."""
    torch.cuda.synchronize()
    if empty_cache:
        torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / GiB


def matmul_tflops(size: int = 8192, dtype: torch.dtype = torch.bfloat16) -> float:
    """Measured dense matmul rate (size^3, random data) in TFLOP/s: the ceiling the FLOP floors are taken at.

    Cards of one model differ by ~10% (clocks, power), so floors are computed at the rate of the card that ran.
    """
    a = torch.randn(size, size, device="cuda", dtype=dtype)
    b = torch.randn(size, size, device="cuda", dtype=dtype)
    ms = bench(lambda: a @ b, min_reps=10)
    return 2 * size**3 / ms / 1e9


def kernel_split(fn: Callable[[], object], *, min_ms: float = 0.005, name_width: int = 60) -> dict[str, float]:
    """Self CUDA milliseconds per kernel name of one call of `fn` (torch profiler), largest first."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    split: dict[str, float] = {}
    for event in prof.key_averages():
        ms = getattr(event, "self_device_time_total", 0) / 1e3
        if ms > min_ms:
            split[event.key[:name_width]] = round(ms, 3)
    return dict(sorted(split.items(), key=lambda kv: -kv[1]))
