"""Varlen bookkeeping shared by the NSA kernels: every kernel works on packed [total_T, H, D] tensors.

A batch [B, T, ...] becomes one packed sequence set with cu_seqlens = [0, T, 2T, ...], so batched and
`cu_seqlens` inputs take the same code path.
"""

from __future__ import annotations

import torch
from torch import Tensor


def pack(x: Tensor, cu_seqlens: Tensor | None) -> tuple[Tensor, Tensor]:
    """x [B, T, ...] -> (x [B*T, ...], int32 cu_seqlens [N+1] on x's device)."""
    batch, seq_len = x.shape[:2]
    if cu_seqlens is None:
        cu_seqlens = torch.arange(0, (batch + 1) * seq_len, seq_len, dtype=torch.int32, device=x.device)
    return x.reshape(batch * seq_len, *x.shape[2:]), cu_seqlens.to(device=x.device, dtype=torch.int32)


def tile_map(cu_seqlens: Tensor, tile: int) -> Tensor:
    """Work items for kernels that give each program `tile` consecutive queries of one sequence.

    Returns int32 [n_tiles, 2]: (sequence index, position of the tile's first query within its sequence).
    Built on the host once per call; a tile never straddles two sequences.
    """
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    rows = [(seq, start) for seq, length in enumerate(lengths) for start in range(0, length, tile)]
    return torch.tensor(rows, dtype=torch.int32, device=cu_seqlens.device).reshape(-1, 2)
