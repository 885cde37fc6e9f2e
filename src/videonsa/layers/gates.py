"""The per-head branch gates of VideoNSA: a two-layer MLP on the attention layer's input.

    gates = sigmoid(g_proj_2(gelu(g_proj_1(x))) / temperature), viewed [..., HQ, 3] as (cmp, slc, swa)

g_proj_1: Linear(hidden, hidden, bias), g_proj_2: Linear(hidden, 3 * HQ, bias). The projections live directly
on the attention module (as `g_proj_1` / `g_proj_2`) because that is where the released checkpoint keeps them
(docs/layer.md, the gates; docs/checkpoints.md, their tensors).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

# New gates start near 0.5 for every branch: small random weights, zero bias.
GATE_INIT_STD = 0.02


def make_gate_projections(hidden_size: int, num_heads: int) -> tuple[nn.Linear, nn.Linear]:
    """g_proj_1 [hidden -> hidden] and g_proj_2 [hidden -> 3 * num_heads], initialised as new gates."""
    proj_1 = nn.Linear(hidden_size, hidden_size, bias=True)
    proj_2 = nn.Linear(hidden_size, 3 * num_heads, bias=True)
    init_gate_projections_(proj_1, proj_2)
    return proj_1, proj_2


def init_gate_projections_(proj_1: nn.Linear, proj_2: nn.Linear, std: float = GATE_INIT_STD) -> None:
    """Initialise gate projections in place: weights N(0, std), biases 0."""
    for proj in (proj_1, proj_2):
        nn.init.normal_(proj.weight, mean=0.0, std=std)
        nn.init.zeros_(proj.bias)


def branch_gates(
    x: Tensor,
    proj_1: nn.Linear,
    proj_2: nn.Linear,
    num_heads: int,
    temperature: float,
    *,
    recompute: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gate values of the three NSA branches.

    Args:
        x: [..., hidden], the attention layer's input (after its input norm).
        proj_1, proj_2: the gate MLP's projections.
        num_heads: HQ, the number of query heads.
        temperature: divides the logits before the sigmoid (VideoNSA: 0.3).
        recompute: keep only x for the backward, which recomputes the MLP's two [..., hidden] activations
            (g_proj_1's output and its gelu) instead of holding them: 0.5 GB a layer at 36K vision tokens of the
            7B in bf16, for one more g_proj_1 product. The gradients are the same.

    Returns:
        g_cmp, g_slc, g_swa: each [..., HQ] in [0, 1], in x's dtype.
    """
    if recompute and torch.is_grad_enabled():
        logits = checkpoint(_gate_logits, x, proj_1, proj_2, use_reentrant=False)
    else:
        logits = _gate_logits(x, proj_1, proj_2)
    gates = (logits / temperature).sigmoid().unflatten(-1, (num_heads, 3))
    return gates[..., 0], gates[..., 1], gates[..., 2]


def _gate_logits(x: Tensor, proj_1: nn.Linear, proj_2: nn.Linear) -> Tensor:
    return proj_2(F.gelu(proj_1(x)))
