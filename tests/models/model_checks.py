"""Helpers of the model tests: capture of a layer's attention inputs and outputs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class AttentionCapture:
    """What one attention module received and returned in the last forward pass."""

    hidden_states: torch.Tensor | None = None
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
    output: torch.Tensor | None = None
    handles: list = field(default_factory=list)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def capture_attention(module: torch.nn.Module) -> AttentionCapture:
    """Record the hidden states, rotary embeddings and output of `module` (a text attention layer)."""
    capture = AttentionCapture()

    def before(_module, args, kwargs):
        capture.hidden_states = kwargs.get("hidden_states", args[0] if args else None)
        capture.position_embeddings = kwargs.get("position_embeddings")

    def after(_module, _args, output):
        capture.output = output[0]

    capture.handles = [
        module.register_forward_pre_hook(before, with_kwargs=True),
        module.register_forward_hook(after),
    ]
    return capture


def use_package_positions(stock: torch.nn.Module) -> torch.nn.Module:
    """Give a stock Qwen2.5-VL model the rotary position ids this package computes (models/rope_positions.py),
    so that comparisons with it test the attention, not transformers' placement of text after a video."""
    from videonsa.models.rope_positions import multimodal_position_ids

    vision = stock.config.vision_config

    def get_rope_index(input_ids, mm_token_type_ids, image_grid_thw=None, video_grid_thw=None,
                       second_per_grid_ts=None, attention_mask=None, **kwargs):
        return multimodal_position_ids(mm_token_type_ids, image_grid_thw, video_grid_thw, second_per_grid_ts,
                                       attention_mask, tokens_per_second=vision.tokens_per_second,
                                       spatial_merge_size=vision.spatial_merge_size)

    stock.model.get_rope_index = get_rope_index
    return stock
