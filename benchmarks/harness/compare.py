"""How far a kernel's output is from a reference: the one relative-error measure every check reports."""

from __future__ import annotations

import math

import torch


def rel_error(x: torch.Tensor, ref: torch.Tensor, rows: torch.Tensor | None = None) -> float:
    """||x - ref|| / ||ref|| in float32 over the entries where `ref` is finite (lse is -inf where no key is
    visible); inf when `x` is finite elsewhere or not finite there. `rows` selects along the first dim first."""
    x, ref = x.detach(), ref.detach()
    if rows is not None:
        x, ref = x[rows], ref[rows]
    x, ref = x.float(), ref.float()
    finite = torch.isfinite(ref)
    if not torch.equal(finite, torch.isfinite(x)):
        return math.inf
    return float((x[finite] - ref[finite]).norm() / ref[finite].norm().clamp_min(1e-30))
