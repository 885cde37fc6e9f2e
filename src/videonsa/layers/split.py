"""Which tokens of a batch are vision tokens, and how to move between the batch and the packed vision streams.

A batch holds B samples of T tokens. In each sample the vision tokens, in their order, form one vision stream;
the streams of all samples are packed end to end into one sequence of N tokens with `cu_seqlens` offsets (the
layout `videonsa.ops.nsa_attention` takes with B = 1). Every other token is a text token; text tokens are
gathered per sample into a [B, L] grid (L = the most text tokens of any sample), unused slots marked invalid.

The split is computed once per forward pass and shared by all layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from videonsa.errors import UserError


@dataclass(frozen=True)
class TokenSplit:
    """Positions of the vision and text tokens of a batch.

    vision_mask: bool [B, T], True at vision tokens (never at padding).
    token_mask: bool [B, T], True at real tokens, False at padding.
    vision_batch, vision_pos: long [N], sample and position of each packed vision token, sample-major.
    cu_seqlens: int32 [S + 1], offsets of the S non-empty vision streams in the packed sequence.
    text_pos: long [B, L], positions of each sample's text tokens in order (padding included: it is text).
    text_valid: bool [B, L], False at slots beyond a sample's text token count.
    """

    vision_mask: Tensor
    token_mask: Tensor
    vision_batch: Tensor
    vision_pos: Tensor
    cu_seqlens: Tensor
    text_pos: Tensor
    text_valid: Tensor

    @property
    def has_vision(self) -> bool:
        return self.vision_pos.numel() > 0

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.vision_mask.shape)

    def gather_vision(self, x: Tensor) -> Tensor:
        """x [B, T, ...] -> the packed vision streams [1, N, ...]."""
        return x[self.vision_batch, self.vision_pos].unsqueeze(0)

    def gather_text(self, x: Tensor) -> Tensor:
        """x [B, T, ...] -> text tokens per sample [B, L, ...] (invalid slots hold some other token's values)."""
        rows = torch.arange(x.shape[0], device=x.device).unsqueeze(1)
        return x[rows, self.text_pos]

    @cached_property
    def text_attention_mask(self) -> Tensor:
        """bool [B, 1, L, T]: text query slot l may attend to key j iff j <= its position and j is a real token.

        A query always sees itself, so that padding queries and unused slots never get an all-masked row (NaN);
        their outputs are discarded anyway. Built once per forward pass, on first use, for all layers.
        """
        seq_len = self.vision_mask.shape[1]
        keys = torch.arange(seq_len, device=self.text_pos.device)
        queries = self.text_pos.unsqueeze(-1)  # [B, L, 1]
        allowed = (keys <= queries) & self.token_mask.unsqueeze(1)
        return (allowed | (keys == queries)).unsqueeze(1)

    def merge(self, vision_out: Tensor, text_out: Tensor) -> Tensor:
        """Scatter packed vision outputs [1, N, ...] and text outputs [B, L, ...] back to [B, T, ...]."""
        batch, seq_len = self.vision_mask.shape
        out = text_out.new_zeros((batch, seq_len, *text_out.shape[2:]))
        rows = torch.arange(batch, device=text_out.device).unsqueeze(1).expand_as(self.text_pos)
        text_index = (rows[self.text_valid], self.text_pos[self.text_valid])
        out = out.index_put(text_index, text_out[self.text_valid])
        return out.index_put((self.vision_batch, self.vision_pos), vision_out[0].to(out.dtype))


def build_token_split(vision_mask: Tensor, attention_mask: Tensor | None = None) -> TokenSplit:
    """The split of a batch from its vision-token mask.

    Args:
        vision_mask: bool [B, T], True at image/video placeholder tokens.
        attention_mask: optional [B, T] padding mask (1 = real token, 0 = padding), or [B, P + T] whose last T
            columns belong to these tokens (generation passes the mask of the whole sequence).
    """
    if vision_mask.dim() != 2:
        raise UserError(f"vision token mask must be [batch, seq_len], got shape {tuple(vision_mask.shape)}")
    batch, seq_len = vision_mask.shape
    token_mask = _token_mask(attention_mask, batch, seq_len, vision_mask.device)
    vision_mask = vision_mask.bool() & token_mask

    vision_batch, vision_pos = vision_mask.nonzero(as_tuple=True)  # row-major: sample by sample, in order
    counts = vision_mask.sum(dim=1)
    counts = counts[counts > 0]
    cu_seqlens = torch.zeros(counts.numel() + 1, dtype=torch.int32, device=vision_mask.device)
    cu_seqlens[1:] = counts.cumsum(0)

    # A stable sort puts each sample's text positions first, in order; the first L columns are the text grid.
    order = torch.sort(vision_mask.to(torch.int8), dim=1, stable=True).indices
    text_counts = seq_len - vision_mask.sum(dim=1)
    width = int(text_counts.max()) if batch else 0
    text_pos = order[:, :width]
    text_valid = torch.arange(width, device=vision_mask.device) < text_counts.unsqueeze(1)
    return TokenSplit(vision_mask, token_mask, vision_batch, vision_pos, cu_seqlens, text_pos, text_valid)


def _token_mask(attention_mask: Tensor | None, batch: int, seq_len: int, device: torch.device) -> Tensor:
    if attention_mask is None:
        return torch.ones(batch, seq_len, dtype=torch.bool, device=device)
    if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] < seq_len:
        raise UserError(
            f"VideoNSA needs a 2-D padding attention_mask [batch, >= {seq_len}] to split vision and text tokens, "
            f"got shape {tuple(attention_mask.shape)}"
        )
    return attention_mask[:, -seq_len:].to(device=device, dtype=torch.bool)
