"""Helpers of the analysis tests: tiny checkpoints in the released layout, small frames."""

from __future__ import annotations

import json
from pathlib import Path

from videonsa import testing

# Planner flags that keep the tiny runs small: few frames at 112x112 (16 vision tokens per temporal patch).
SMALL_FRAMES = ["--device", "cpu", "--pixels", "12544", "--fps", "4"]


def released_like(path: Path, model) -> Path:
    """Save `model` as Enxin/VideoNSA is published: legacy flat keys, the sparse settings at the config's top
    level and no attention_mode."""
    testing.save_tiny_checkpoint(path, model=model, legacy_layout=True)
    config = json.loads((path / "config.json").read_text())
    text = config["text_config"]
    text.pop("attention_mode")
    for key in ("block_counts", "window_size"):
        config[key] = text.pop(key)
    (path / "config.json").write_text(json.dumps(config))
    return path
