"""`NSAConfig`: the sparse-attention budget, the one place its defaults live (the operator, the layers, the model
config and the command line read them). Free of torch, so that command-line parsing can read the defaults.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass


@dataclass(frozen=True)
class NSAConfig:
    """Sparse-attention budget. Defaults are VideoNSA's (the NSA paper uses init_blocks=1, local_blocks=2)."""

    block_size: int = 64
    block_count: int = 32
    window_size: int = 256
    init_blocks: int = 0
    local_blocks: int = 1

    def __post_init__(self) -> None:
        for name in ("block_size", "block_count", "window_size", "init_blocks", "local_blocks"):
            object.__setattr__(self, name, _integer_size(name, getattr(self, name)))
        for name in ("block_size", "block_count", "window_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"nsa_attention: {name} must be positive, got {getattr(self, name)}")
        for name in ("init_blocks", "local_blocks"):
            if getattr(self, name) < 0:
                raise ValueError(f"nsa_attention: {name} must be >= 0, got {getattr(self, name)}")
        forced = self.init_blocks + self.local_blocks
        if self.block_count < forced:
            raise ValueError(
                f"nsa_attention: block_count={self.block_count} is smaller than the forced blocks "
                f"(init_blocks={self.init_blocks} + local_blocks={self.local_blocks} = {forced})"
            )


def _integer_size(name: str, value: object) -> int:
    """`value` as a Python int if it is an integer of any kind (int, numpy integer); floats and bools are refused
    rather than rounded or read as 0/1, since a size given as 4.5 or True is a mistake."""
    if isinstance(value, bool):
        raise ValueError(f"nsa_attention: {name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"nsa_attention: {name} must be an integer, got {value!r}") from None


__all__ = ["NSAConfig"]
