"""Helpers shared by the training tests: synthetic colour-clip datasets and fast CPU training settings.

The learnable task: each clip is a few frames of one flat colour (with noise); the question asks for the colour
and the answer names it. Answers all have three letters, so every sample has the same number of label tokens
and losses averaged per sample or per token agree (which the multi-process comparison relies on).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": (220, 30, 30), "tan": (200, 170, 120), "sky": (40, 120, 230)}


def write_colour_clips(root: Path, count: int, frames: int = 4, size: int = 56, seed: int = 0) -> Path:
    """`count` frames-as-images samples (colours in turn) under `root`; returns the annotation JSONL path."""
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    lines = []
    for index in range(count):
        name = names[index % len(names)]
        folder = root / "clips" / f"clip{index}"
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for frame in range(frames):
            noise = rng.integers(-20, 21, (size, size, 3))
            pixels = np.clip(np.array(COLOURS[name])[None, None] + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{frame}.png")
            paths.append(f"clips/clip{index}/{frame}.png")
        record = {
            "id": f"clip{index}",
            "messages": [
                {"role": "user", "content": "<video>Which colour?"},
                {"role": "assistant", "content": name},
            ],
            "images": paths,
        }
        lines.append(json.dumps(record))
    annotations = root / "colours.jsonl"
    annotations.write_text("\n".join(lines) + "\n")
    return annotations


def train_overrides(checkpoint: Path, annotations: Path, output_dir: Path, **trainer: object) -> dict:
    """Config overrides for a fast CPU run on the tiny model (fp32, no workers); `trainer` adds/overrides."""
    settings = {
        "model.path": str(checkpoint),
        "data.annotations": [str(annotations)],
        "data.max_tokens": 4096,
        "trainer.output_dir": str(output_dir),
        "trainer.learning_rate": 3e-3,
        "trainer.bf16": False,
        "trainer.gradient_accumulation_steps": 1,
        "trainer.logging_steps": 1,
        "trainer.dataloader_num_workers": 0,
        "trainer.save_steps": 1000,
        "trainer.disable_tqdm": True,
    }
    settings.update({f"trainer.{key}": value for key, value in trainer.items()})
    return settings
