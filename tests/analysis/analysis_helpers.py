"""Helpers of the analysis tests: tiny checkpoints with trained-looking gates, the released layout, small frames."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from videonsa import testing

# Planner flags that keep the tiny runs small: few frames at 112x112 (16 vision tokens per temporal patch).
SMALL_FRAMES = ["--device", "cpu", "--pixels", "12544", "--fps", "4"]


def gated_tiny_model(seed: int = 3):
    """A tiny VideoNSA model whose gates are far from the fresh 0.5 (larger random weights and biases), so that
    gate statistics differ between layers, heads and branches."""
    model = testing.tiny_model(seed=seed)
    generator = torch.Generator().manual_seed(seed)
    for layer in model.model.language_model.layers:
        attention = layer.self_attn
        for weight in (attention.g_proj_1.weight, attention.g_proj_2.weight):
            weight.data = torch.randn(weight.shape, generator=generator) * 0.3
        attention.g_proj_2.bias.data = torch.randn(attention.g_proj_2.bias.shape, generator=generator)
    return model


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
