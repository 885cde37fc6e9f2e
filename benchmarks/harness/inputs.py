"""Operator inputs ("randn" and "structured") and how much neighbouring tokens' selections overlap."""

from __future__ import annotations

import torch

from harness.shapes import BLOCK, DTYPE, HKV, HQ, D

INPUT_KINDS = ("randn", "structured")


def make_inputs(
    seq_len: int, seed: int = 0, structured: bool = False, device: str = "cuda"
) -> dict[str, torch.Tensor]:
    """q [1, T, HQ, D], k, v [1, T, HKV, D], gates g_cmp, g_slc, g_swa [1, T, HQ] in [0, 1], all bf16.

    randn (structured=False): every token's top-k is an independent draw among the visible blocks, so
    neighbouring tokens share almost nothing: the worst case for the selection kernels. structured=True:
    queries drift slowly (a component shared by 256-token stretches) and keys carry a per-block offset, so that
    neighbouring tokens choose mostly the same blocks, as trained models do.
    """
    gen = torch.Generator(device=device).manual_seed(seed)
    kw = dict(device=device, generator=gen)
    q = torch.randn(1, seq_len, HQ, D, **kw)
    k = torch.randn(1, seq_len, HKV, D, **kw)
    if structured:
        stretch = torch.randn(1, seq_len // 256 + 1, HQ, D, **kw).repeat_interleave(256, 1)[:, :seq_len]
        q = 0.5 * q + stretch
        k = k + 1.5 * torch.randn(1, seq_len // BLOCK + 1, HKV, D, **kw).repeat_interleave(BLOCK, 1)[:, :seq_len]
    return {
        "q": q.to(DTYPE),
        "k": k.to(DTYPE),
        "v": torch.randn(1, seq_len, HKV, D, **kw).to(DTYPE),
        "g_cmp": torch.rand(1, seq_len, HQ, **kw).to(DTYPE),
        "g_slc": torch.rand(1, seq_len, HQ, **kw).to(DTYPE),
        "g_swa": torch.rand(1, seq_len, HQ, **kw).to(DTYPE),
    }


def selection_sharing(indices: torch.Tensor, tokens_per_tile: int = 8) -> dict[str, float]:
    """How much neighbouring tokens' selections overlap, which decides the selection kernels' speed.

    indices: int32 [T, HKV, S] (-1 = unused). Returns the mean number of distinct blocks chosen by the tokens of
    a tile of `tokens_per_tile` consecutive tokens (S when they all agree, tokens_per_tile * S when they share
    nothing), over full tiles in the second half of the sequence, and the mean fraction of a token's chosen
    blocks that the next token also chose.
    """
    seq_len, heads_kv, count = indices.shape
    half = (seq_len // 2) // tokens_per_tile * tokens_per_tile
    tail = indices[half : half + (seq_len - half) // tokens_per_tile * tokens_per_tile].long()
    tiles = tail.view(-1, tokens_per_tile, heads_kv, count).transpose(1, 2).reshape(-1, tokens_per_tile * count)
    ordered = tiles.sort(dim=1).values
    distinct = (ordered[:, 1:] != ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    union = distinct.sum(1) + (ordered[:, 0] >= 0).long()
    now, nxt = tail[:-1], tail[1:]
    same = (now[..., :, None] == nxt[..., None, :]).any(-1) & (now >= 0)
    shared = same.sum(-1).double() / (now >= 0).sum(-1).clamp(min=1).double()
    return {
        "union_per_tile": float(union.double().mean()),
        "tokens_per_tile": tokens_per_tile,
        "shared_with_next": float(shared.mean()),
    }
