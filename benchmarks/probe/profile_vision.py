"""The vision tower's training step with the stock per-window attention against `PackedVisionAttention`.

Qwen2.5-VL-7B's vision tower (random weights, fp32, bf16 autocast, gradient checkpointing as the training recipe
runs it) over `--frames` frames of `--size` x `--size` pixels fed as images (grid 1 x 16 x 16 each at 224), forward
and backward of a mean-square loss on the merged output. Both towers hold the same weights: transformers' stock
tower (one SDPA call per window and per frame) and the package's `ChunkedVisionTower` (one SDPA call per distinct
chunk length; docs/vision-tower.md). Reports the median seconds of each, the speed-up, the max abs difference of
the merged outputs and the relative error of the input gradient (bf16, so both differ from fp32 by ~1e-2).

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

import torch
from transformers import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
from harness import (  # noqa: E402
    Results,
    add_output_arguments,
    bench,
    describe,
    environment,
    fmt,
    markdown_table,
    rel_error,
)
from harness.shapes import QWEN2_5_VL_7B_VISION  # noqa: E402
from videonsa.models.chunked_prefill import ChunkedVisionTower, merged_output  # noqa: E402
from videonsa.testing import tiny_vision_config_kwargs  # noqa: E402


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
        settings = {"use_reentrant": False}  # the training recipe's setting (training/trainer.py)
        if hasattr(tower, "activation_checkpointing_enable"):
            tower.activation_checkpointing_enable(activation_checkpointing_kwargs=settings)
        else:
            tower.gradient_checkpointing_enable(gradient_checkpointing_kwargs=settings)
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


def seconds(fn: Callable[[], object], device: str, reps: int) -> float:
    """Median seconds of `fn()` (already called once: the outputs' comparison is the warm-up): CUDA events on a
    GPU, the wall clock on a CPU."""
    if device.startswith("cuda"):
        return bench(fn, warmup=0, reps=reps) / 1e3
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=556, help="frames, each fed as one image (default 556)")
    parser.add_argument("--size", type=int, default=224, help="frame side in pixels, a multiple of 28")
    parser.add_argument("--reps", type=int, default=3, help="timed steps per tower (median kept)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny tower instead of the 7B one")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    if args.size % 28:
        parser.error("--size must be a multiple of 28 (patch 14, merge 2)")
    env = environment()
    config = vision_config(args.tiny)
    stock, packed = build_towers(config, args.device)
    pixels, grid = frame_inputs(config, args.frames, args.size, args.device)
    reference, reference_grad = train_step(stock, pixels, grid)
    output, grad = train_step(packed, pixels, grid)
    times = {name: seconds(lambda tower=tower: train_step(tower, pixels, grid), args.device, args.reps)
             for name, tower in (("stock", stock), ("packed", packed))}
    results = Results("profile_vision", args.out, env)
    row = results.row({
        "tower": "tiny" if args.tiny else "7b", "frames": args.frames, "size": args.size,
        "patches": pixels.shape[0], "stock_s": times["stock"], "packed_s": times["packed"],
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
               f"frames as images; {describe(env)}")
    results.write_markdown(f"{caption}\n\n{table}")
    results.write_json()


if __name__ == "__main__":
    main()
