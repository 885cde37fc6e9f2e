"""Where the time of a decoding step goes after a long prefill: greedy tokens through `model.generate` on the
Qwen2.5-VL-7B language model (random weights, bf16; the first --layers layers), prefilled in one pass or in
chunks, profiled from the first new token to the last.

    python benchmarks/probe/profile_decode.py --length 131072                       # 28 layers, one pass
    python benchmarks/probe/profile_decode.py --length 262144 --layers 4 --chunk 65536
    python benchmarks/probe/profile_decode.py --length 524288 --chunk 72704 --cache dynamic   # transformers' cache

Per run: milliseconds per decoding step (wall clock), the GPU's busy time per step (the sum of its kernels), the
torch operators with the most CPU time, the GPU kernels with the most time, and the Python functions with the most
time of their own (cProfile). A step whose wall time is far above its GPU time is bound by host work.
Prompt: `harness.models.video_inputs`. Writes OUT/profile_decode_<T>[_<chunk>]_<cache>.md (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
from harness import describe, open_run  # noqa: E402
from harness.models import qwen7b_config, random_model, video_inputs  # noqa: E402
from videonsa.models import VideoNSAForConditionalGeneration  # noqa: E402
from videonsa.models.chunked_prefill import CACHE_KWARG, prefill_in_chunks  # noqa: E402
from videonsa.models.kv_cache import preallocated_cache  # noqa: E402


class DecodeProfiler:
    """A generate() streamer that starts both profilers when the first new token arrives (the prefill is over)
    and stops them at the end; `step_times` holds the arrival time of every new token."""

    def __init__(self) -> None:
        self.puts = 0
        self.step_times: list[float] = []
        self.torch_profile = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
        self.python_profile = cProfile.Profile()

    def put(self, value: torch.Tensor) -> None:
        torch.cuda.synchronize()
        self.puts += 1
        if self.puts == 1:
            return  # the prompt
        self.step_times.append(time.perf_counter())
        if self.puts == 2:
            self.torch_profile.start()
            self.python_profile.enable()

    def end(self) -> None:
        torch.cuda.synchronize()
        if self.puts >= 2:
            self.python_profile.disable()
            self.torch_profile.stop()


def gpu_busy_ms(events) -> float:
    """Milliseconds of device time summed over the kernels (operators' self device time)."""
    return sum(event.self_device_time_total for event in events) / 1e3


def python_table(stats: cProfile.Profile, rows: int) -> str:
    buffer = io.StringIO()
    pstats.Stats(stats, stream=buffer).sort_stats("tottime").print_stats(rows)
    return buffer.getvalue()


def run_name(args: argparse.Namespace) -> str:
    """profile_decode_<T>[_<chunk>]_<cache>: the result files' name."""
    return f"profile_decode_{args.length}" + (f"_{args.chunk}" if args.chunk else "") + f"_{args.cache}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=131072)
    parser.add_argument("--chunk", type=int, default=None, help="prefill chunk (default: one pass)")
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--tokens", type=int, default=9, help="new tokens (the first ends the prefill)")
    parser.add_argument("--rows", type=int, default=20)
    parser.add_argument("--cache", choices=["preallocated", "dynamic"], default="preallocated",
                        help="KV cache: videonsa's preallocated one (as `ask` uses) or transformers' DynamicCache")
    args, results = open_run(parser, argv, run_name, needs_cuda=True)
    model = random_model(qwen7b_config(num_layers=args.layers), cls=VideoNSAForConditionalGeneration)
    inputs = video_inputs(args.length)
    tokens = inputs["input_ids"].shape[1]
    streamer = DecodeProfiler()
    cache = (preallocated_cache(model.config, tokens + args.tokens) if args.cache == "preallocated"
             else DynamicCache(config=model.config.text_config))
    with torch.inference_mode(), prefill_in_chunks(model, args.chunk):
        model.generate(**inputs, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                       streamer=streamer, pad_token_id=0, **{CACHE_KWARG: cache})
    steps = len(streamer.step_times) - 1
    wall = (streamer.step_times[-1] - streamer.step_times[0]) * 1e3 / max(steps, 1)
    events = streamer.torch_profile.key_averages()
    busy = gpu_busy_ms(events) / max(steps, 1)
    prefill = "one pass" if args.chunk is None else f"chunks of {args.chunk:,}"
    report = [
        f"Decoding after a {tokens:,}-token prefill ({prefill}), {args.layers} 7B layers, {args.cache} KV cache, "
        f"{steps} steps: "
        f"{wall:.1f} ms a step wall clock, GPU busy {busy:.1f} ms a step; {describe(results.env)}",
        "Operators by CPU time:",
        events.table(sort_by="cpu_time_total", row_limit=args.rows),
        "GPU kernels by device time:",
        events.table(sort_by="self_device_time_total", row_limit=args.rows),
        "Python functions by own time (cProfile):",
        python_table(streamer.python_profile, args.rows),
    ]
    results.row({"kind": "decode", "T": tokens, "chunk": args.chunk, "layers": args.layers, "cache": args.cache,
                 "steps": steps,
                    "wall_ms_per_step": round(wall, 2), "gpu_busy_ms_per_step": round(busy, 2)})
    results.write_markdown("\n\n".join(report))


if __name__ == "__main__":
    main()
