"""The vision tower's training step with the stock per-window attention against `PackedVisionAttention`.

Qwen2.5-VL-7B's vision tower (random weights, fp32, bf16 autocast, gradient checkpointing as the training recipe
runs it) over `--frames` frames of `--size` x `--size` pixels fed as images (grid 1 x 16 x 16 each at 224), forward
and backward of a mean-square loss on the merged output. Both towers hold the same weights: transformers' stock
tower (one SDPA call per window and per frame) and the package's `ChunkedVisionTower` (one SDPA call per distinct
chunk length; docs/vision-tower.md). Reports the median seconds of each, the speed-up, the max abs difference of
the merged outputs and the relative error of the input gradient (bf16, so both differ from fp32 by ~1e-2).

Every step prints its seconds (flushed) as it finishes, so a run cut short by a time limit still shows them: first
one untimed step per tower (the warm-up, whose outputs are compared), then `--reps` timed steps of each, the two
towers alternating. The stock tower's step takes tens of seconds at 556 frames, hence one timed step by default.

    python benchmarks/probe/profile_vision.py --frames 556                          # GPU: the 36K-token sample
    python benchmarks/probe/profile_vision.py --device cpu --tiny --frames 8        # smoke test

Writes OUT/profile_vision.json and .md (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from transformers import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
from harness import bench, describe, fmt, markdown_table, open_run, rel_error  # noqa: E402
from harness.shapes import QWEN2_5_VL_7B_VISION  # noqa: E402
from videonsa.models.chunked_prefill import ChunkedVisionTower, merged_output  # noqa: E402
from videonsa.testing import enable_checkpointing, tiny_vision_config_kwargs  # noqa: E402

T = TypeVar("T")


def vision_config(tiny: bool) -> Qwen2_5_VLVisionConfig:
    """The 7B tower's config (or the tests' tiny tower with window and full blocks), SDPA attention."""
    if tiny:
        kwargs = {**tiny_vision_config_kwargs(depth=4), "fullatt_block_indexes": [1, 3]}
    else:
        kwargs = dict(QWEN2_5_VL_7B_VISION)
    config = Qwen2_5_VLVisionConfig(**kwargs)
    config._attn_implementation = "sdpa"
    return config


def build_towers(config: Qwen2_5_VLVisionConfig, device: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(stock tower, packed tower) in fp32 with the same random weights, training mode, checkpointing on."""
    torch.manual_seed(0)
    with torch.device(device):
        stock = qwen.Qwen2_5_VisionTransformerPretrainedModel(config)
        packed = ChunkedVisionTower(config)
    packed.load_state_dict(stock.state_dict())
    for tower in (stock, packed):
        tower.train()
        # The training recipe's setting (training/trainer.py).
        enable_checkpointing(tower, {"use_reentrant": False})
    return stock, packed


def frame_inputs(config: Qwen2_5_VLVisionConfig, frames: int, size: int, device: str):
    """Random patches of `frames` frames as images ([frames * h * w, patch_dim] fp32) and their grids."""
    side = size // config.patch_size
    patch_dim = config.in_channels * config.temporal_patch_size * config.patch_size**2
    grid = torch.tensor([[1, side, side]] * frames, device=device)
    pixels = torch.randn(frames * side * side, patch_dim, device=device)
    return pixels, grid


def train_step(tower: torch.nn.Module, pixels: torch.Tensor, grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward under bf16 autocast and backward; returns (merged output, input gradient)."""
    tower.zero_grad(set_to_none=True)
    pixels = pixels.detach().requires_grad_()
    with torch.autocast(pixels.device.type, dtype=torch.bfloat16):
        output = merged_output(tower(pixels, grid_thw=grid))
    output.float().square().mean().backward()
    return output.detach(), pixels.grad


def timed(label: str, step: Callable[[], T], device: str) -> tuple[T, float]:
    """Run `step()` once and print its seconds (flushed): CUDA events around it on a GPU (synchronised before
    and after), the wall clock on a CPU. Returns (its result, seconds)."""
    result = []
    if device.startswith("cuda"):
        elapsed = bench(lambda: result.append(step()), warmup=0, reps=1) / 1e3
    else:
        start = time.perf_counter()
        result.append(step())
        elapsed = time.perf_counter() - start
    print(f"{label}: {elapsed:.3f} s", flush=True)
    return result[0], elapsed


def multiple_of_28(text: str) -> int:
    """--size: frame side in pixels, a positive multiple of 28 (patch 14, merge 2)."""
    value = int(text)
    if value <= 0 or value % 28:
        raise argparse.ArgumentTypeError(f"{text} is not a positive multiple of 28 (patch 14, merge 2)")
    return value


def checked_run_name(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The result files' name, "profile_vision", once the arguments are known to be usable; else exit with one
    line (argparse's usage error, status 2). `open_run` asks for the name before it writes any file, so a bad
    argument leaves no result files behind."""
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA GPU: run on the GPU machine, or pass --device cpu --tiny for a smoke run")
    if args.frames < 1:
        parser.error("--frames must be at least 1")
    if args.reps < 1:
        parser.error("--reps must be at least 1")
    return "profile_vision"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=556, help="frames, each fed as one image (default 556)")
    parser.add_argument("--size", type=multiple_of_28, default=224, help="frame side in pixels, a multiple of 28")
    parser.add_argument("--reps", type=int, default=1, help="timed steps per tower after the warm-up (median kept; "
                        "default 1)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny tower instead of the 7B one")
    args, results = open_run(parser, argv, lambda parsed: checked_run_name(parser, parsed))
    config = vision_config(args.tiny)
    stock, packed = build_towers(config, args.device)
    pixels, grid = frame_inputs(config, args.frames, args.size, args.device)
    towers = {"stock": stock, "packed": packed}
    # The warm-up steps, whose outputs are compared, then the timed ones, alternating so that a run cut short has
    # numbers of both towers.
    (reference, reference_grad), _ = timed("stock warm-up step", lambda: train_step(stock, pixels, grid), args.device)
    (output, grad), _ = timed("packed warm-up step", lambda: train_step(packed, pixels, grid), args.device)
    steps: dict[str, list[float]] = {name: [] for name in towers}
    for rep in range(args.reps):
        for name, tower in towers.items():
            label = f"{name} step {rep + 1}/{args.reps}"
            steps[name].append(timed(label, lambda tower=tower: train_step(tower, pixels, grid), args.device)[1])
    times = {name: statistics.median(values) for name, values in steps.items()}
    row = results.row({
        "tower": "tiny" if args.tiny else "7b", "frames": args.frames, "size": args.size,
        "patches": pixels.shape[0], "reps": args.reps, "stock_s": times["stock"], "packed_s": times["packed"],
        "speedup": times["stock"] / times["packed"],
        "max_abs_diff": float((output.float() - reference.float()).abs().max()),
        "input_grad_rel_error": rel_error(grad, reference_grad),
    })
    table = markdown_table(
        ["tower", "frames", "patches", "stock s", "packed s", "speed-up", "max abs diff", "grad rel err"],
        [[row["tower"], row["frames"], row["patches"], fmt(row["stock_s"], 3), fmt(row["packed_s"], 3),
          fmt(row["speedup"]), f"{row['max_abs_diff']:.2e}", f"{row['input_grad_rel_error']:.2e}"]],
    )
    caption = (f"Vision tower training step (fp32 weights, bf16 autocast, checkpointing), {args.size}x{args.size} "
               f"frames as images, median of {args.reps} timed step(s) after a warm-up; {describe(results.env)}")
    results.write_markdown(f"{caption}\n\n{table}")
    results.write_json()


if __name__ == "__main__":
    main()
