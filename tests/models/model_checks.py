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
