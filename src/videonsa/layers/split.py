"""Which tokens of a batch are vision tokens, and how to move between the batch and the packed vision streams.

A batch holds B samples of T tokens. In each sample the vision tokens, in their order, form one vision stream;
the streams of all samples are packed end to end into one sequence of N tokens with `cu_seqlens` offsets (the
layout `videonsa.ops.nsa_attention` takes with B = 1). Every other token is a text token; text tokens are
gathered per sample into a [B, L] grid (L = the most text tokens of any sample), unused slots marked invalid.

The split is computed once per forward pass and shared by all layers. Which tokens are vision and what each
query attends to: docs/layer.md.

Chunked prefill: a chunk of T tokens may follow P tokens already in the KV cache. The split then describes the
chunk's tokens as queries (positions 0..T-1 of the chunk) and carries `keys`, the split of all P + T tokens so far
restricted to the samples with vision queries in the chunk, whose packed vision streams are the keys of the
chunk's vision queries (`cu_seqlens_k` of the operator); text queries see every real token of the P + T
(docs/layer.md, "KV cache, chunked prefill and decoding").

Fast path: when each sample's vision tokens form one contiguous run (the usual prompt: text, one video, text),
the split records the runs as Python ints and moves tokens with slices and one `torch.cat` instead of advanced
indexing (which copies every vision token of q, k, v and the layer input, per layer, and scatters the output
back into a zero-filled tensor). Both paths give the same values, forward and backward; any other layout
(several runs per sample) takes the index-based path.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
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
    text_valid: bool [B, L], False at slots beyond a sample's text token count. Slot l >= c_b of a sample with
        c_b text tokens holds the position of its (l - c_b)-th vision token (what the stable sort leaves there);
        those slots' values are computed but never used.
    spans: per sample (start, end), Python ints, when every sample's vision tokens are the positions
        start..end-1 ((0, 0) for a sample without any); None when some sample has several runs. Set by
        `build_token_split`; with it the gathers and the merge use slices (see the module docstring).
    unpadded: True when `build_token_split` found every token real (no padding), cached ones included: then each
        text query sees exactly the keys at or before its position, a plain causal pattern (see
        `grouped_text_sdpa`).
    past: P, the tokens already in the KV cache before these T (chunked prefill; 0 for a one-pass prefill).
    keys: when past > 0, the split of all P + T tokens with only the samples that have vision tokens among these T
        kept as vision (the others' tokens count as text there): its packed streams are the vision keys, in the
        same sample order as this split's streams. None when past == 0 (the keys are these tokens).
    key_token_mask: bool [B, P + T], True at real tokens of the whole sequence so far; None when past == 0.
    """

    vision_mask: Tensor
    token_mask: Tensor
    vision_batch: Tensor
    vision_pos: Tensor
    cu_seqlens: Tensor
    text_pos: Tensor
    text_valid: Tensor
    spans: tuple[tuple[int, int], ...] | None = None
    unpadded: bool = False
    past: int = 0
    keys: TokenSplit | None = None
    key_token_mask: Tensor | None = None
    # Per-forward derived tensors shared by all layers (see grouped_text_attention_mask). A dict field rather
    # than cached_property because the key (the query heads per KV head) is an argument.
    _cache: dict[tuple[str, int], Tensor] = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def has_vision(self) -> bool:
        return self.vision_pos.numel() > 0

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.vision_mask.shape)

    @property
    def key_split(self) -> TokenSplit:
        """The split whose packed vision streams are the keys of this split's vision queries (itself in one pass)."""
        return self if self.keys is None else self.keys

    @property
    def cu_seqlens_k(self) -> Tensor | None:
        """int32 [S + 1] offsets of the vision key streams; None when they are the query streams (no past)."""
        return None if self.keys is None else self.keys.cu_seqlens

    def gather_vision(self, x: Tensor) -> Tensor:
        """x [B, T, ...] -> the packed vision streams [1, N, ...].

        On the span fast path a single stream is a view of x (no copy); several are concatenated.
        """
        if self.spans is None:
            return x[self.vision_batch, self.vision_pos].unsqueeze(0)
        parts = [x[b, start:end] for b, (start, end) in enumerate(self.spans) if end > start]
        if not parts:
            return x[:1, :0]
        return parts[0].unsqueeze(0) if len(parts) == 1 else torch.cat(parts).unsqueeze(0)

    def gather_text(self, x: Tensor) -> Tensor:
        """x [B, T, ...] -> text tokens per sample [B, L, ...] (invalid slots hold some other token's values)."""
        if self.spans is None:
            rows = torch.arange(x.shape[0], device=x.device).unsqueeze(1)
            return x[rows, self.text_pos]
        width = self.text_pos.shape[1]
        if len(self.spans) == 1:
            # One sample: its text is everything but the span and fills the grid (no invalid slots).
            start, end = self.spans[0]
            if start == end:
                return x
            if start == 0 or end == x.shape[1]:
                return x[:, end:] if start == 0 else x[:, :start]
            return torch.cat((x[:, :start], x[:, end:]), dim=1)
        parts = []
        for b, (start, end) in enumerate(self.spans):
            # Text before and after the span, then the invalid slots: the span's first tokens, as text_pos has.
            invalid = width - (x.shape[1] - (end - start))
            parts += [x[b, :start], x[b, end:], x[b, start : start + invalid]]
        return torch.cat(parts).view(x.shape[0], width, *x.shape[2:])

    @cached_property
    def text_attention_mask(self) -> Tensor:
        """bool [B, 1, L, P + T]: text query slot l may attend to key j iff j <= its position (P + its position in
        the chunk) and j is a real token.

        A query always sees itself, so that padding queries and unused slots never get an all-masked row (NaN);
        their outputs are discarded anyway. Built once per forward pass, on first use, for all layers.
        """
        token_mask = self.token_mask if self.key_token_mask is None else self.key_token_mask
        keys = torch.arange(token_mask.shape[1], device=self.text_pos.device)
        queries = self.text_pos.unsqueeze(-1) + self.past  # [B, L, 1]
        allowed = (keys <= queries) & token_mask.unsqueeze(1)
        return (allowed | (keys == queries)).unsqueeze(1)

    def grouped_text_attention_mask(self, groups: int) -> Tensor:
        """bool [B, 1, G L, T]: `text_attention_mask` repeated for G query heads folded into the query rows.

        Row g L + l is slot l's row (the layout `sdpa_attend` folds a KV group's heads into). Built once per
        forward pass and number of groups, on first use, for all layers.
        """
        if groups == 1:
            return self.text_attention_mask
        key = ("grouped_text_attention_mask", groups)
        if key not in self._cache:
            mask = self.text_attention_mask
            batch, _, width, seq_len = mask.shape
            grouped = mask.unsqueeze(2).expand(batch, 1, groups, width, seq_len)
            self._cache[key] = grouped.reshape(batch, 1, groups * width, seq_len)
        return self._cache[key]

    def merge(self, vision_out: Tensor, text_out: Tensor) -> Tensor:
        """Scatter packed vision outputs [1, N, ...] and text outputs [B, L, ...] back to [B, T, ...].

        The output has text_out's dtype. Invalid text slots are dropped. On the span fast path each sample's
        row is [text before, its vision stream, text after], written by one `torch.cat`.
        """
        batch, seq_len = self.vision_mask.shape
        if self.spans is not None:
            if len(self.spans) == 1 and self.spans[0][0] == self.spans[0][1]:
                return text_out
            # CUDA's cat takes its vectorized kernel only when every input is contiguous; text_out is often
            # SDPA's transposed output (a strided view cost 2.2 ms against 0.67 ms at 128K, H100), and copying
            # its L rows first is cheap.
            vision_out = vision_out[0].to(text_out.dtype).contiguous()
            text_out = text_out.contiguous()
            parts, offset = [], 0
            for b, (start, end) in enumerate(self.spans):
                count = end - start
                text_count = seq_len - count
                parts += [text_out[b, :start], vision_out[offset : offset + count], text_out[b, start:text_count]]
                offset += count
            return torch.cat(parts).view(batch, seq_len, *text_out.shape[2:])
        out = text_out.new_zeros((batch, seq_len, *text_out.shape[2:]))
        rows = torch.arange(batch, device=text_out.device).unsqueeze(1).expand_as(self.text_pos)
        text_index = (rows[self.text_valid], self.text_pos[self.text_valid])
        out = out.index_put(text_index, text_out[self.text_valid])
        return out.index_put((self.vision_batch, self.vision_pos), vision_out[0].to(out.dtype))


def build_token_split(
    vision_mask: Tensor, attention_mask: Tensor | None = None, past: TokenHistory | None = None
) -> TokenSplit:
    """The split of a batch from its vision-token mask.

    Args:
        vision_mask: bool [B, T], True at image/video placeholder tokens.
        attention_mask: optional [B, T] padding mask (1 = real token, 0 = padding), or [B, P + T] whose last T
            columns belong to these tokens (generation passes the mask of the whole sequence).
        past: the P tokens already in the KV cache (chunked prefill), or None / empty for a first pass.
    """
    if vision_mask.dim() != 2:
        raise UserError(f"vision token mask must be [batch, seq_len], got shape {tuple(vision_mask.shape)}")
    batch, seq_len = vision_mask.shape
    token_mask = _token_mask(attention_mask, batch, seq_len, vision_mask.device)
    vision_mask = vision_mask.bool() & token_mask
    if past is not None and past.length:
        return _split_after_past(vision_mask, token_mask, past)

    vision_batch, vision_pos = vision_mask.nonzero(as_tuple=True)  # row-major: sample by sample, in order
    counts = vision_mask.sum(dim=1)
    stream_counts = counts[counts > 0]
    cu_seqlens = torch.zeros(stream_counts.numel() + 1, dtype=torch.int32, device=vision_mask.device)
    cu_seqlens[1:] = stream_counts.cumsum(0)

    # Per sample: vision token count, first vision position, number of vision runs, real tokens. One host
    # transfer gives the text grid's width and whether the fast paths apply.
    flags = vision_mask.to(torch.int8)
    run_starts = flags.diff(dim=1, prepend=flags.new_zeros(batch, 1)) > 0
    stats = torch.stack(
        (counts, flags.argmax(dim=1), run_starts.sum(dim=1), token_mask.sum(dim=1)), dim=1
    ).tolist()
    spans = None
    if batch and all(runs <= 1 for _, _, runs, _ in stats):
        spans = tuple((first, first + count) if count else (0, 0) for count, first, _, _ in stats)
    unpadded = all(real == seq_len for *_, real in stats)

    # A stable sort puts each sample's text positions first, in order; the first L columns are the text grid.
    order = torch.sort(flags, dim=1, stable=True).indices
    text_counts = seq_len - counts
    width = seq_len - min(count for count, *_ in stats) if batch else 0
    text_pos = order[:, :width]
    text_valid = torch.arange(width, device=vision_mask.device) < text_counts.unsqueeze(1)
    return TokenSplit(
        vision_mask, token_mask, vision_batch, vision_pos, cu_seqlens, text_pos, text_valid, spans, unpadded
    )


def _token_mask(attention_mask: Tensor | None, batch: int, seq_len: int, device: torch.device) -> Tensor:
    if attention_mask is None:
        return torch.ones(batch, seq_len, dtype=torch.bool, device=device)
    if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] < seq_len:
        raise UserError(
            f"VideoNSA needs a 2-D padding attention_mask [batch, >= {seq_len}] to split vision and text tokens, "
            f"got shape {tuple(attention_mask.shape)}"
        )
    return attention_mask[:, -seq_len:].to(device=device, dtype=torch.bool)


@dataclass(frozen=True)
class TokenHistory:
    """Which of the P tokens already in a KV cache were vision and which were real (chunked prefill).

    vision_mask, token_mask: bool [B, P]. The model keeps one per cache and appends each forward's tokens, so
    that a later chunk can rebuild every sample's vision stream over all of its keys. all_real: every one of the
    P tokens is real (no padding), kept as a Python bool so that no decoding step has to read the mask back.
    """

    vision_mask: Tensor
    token_mask: Tensor
    all_real: bool = True

    @property
    def length(self) -> int:
        return self.vision_mask.shape[1]

    def refuse_other_batch(self, batch: int) -> None:
        """UserError unless a forward of `batch` samples continues the cached ones (same batch size)."""
        if self.vision_mask.shape[0] != batch:
            raise UserError(
                f"the KV cache holds {self.vision_mask.shape[0]} samples but this forward has {batch}; VideoNSA "
                "cannot follow a cache whose batch changed"
            )

    def extended(self, split: TokenSplit) -> TokenHistory:
        """This history followed by the tokens of `split` (the forward that just ran)."""
        if not self.length:
            return TokenHistory(split.vision_mask, split.token_mask, split.unpadded)
        self.refuse_other_batch(split.vision_mask.shape[0])
        return TokenHistory(
            torch.cat((self.vision_mask, split.vision_mask), dim=1),
            torch.cat((self.token_mask, split.token_mask), dim=1),
            self.all_real and split.unpadded,
        )


def empty_history(batch: int, device: torch.device) -> TokenHistory:
    """The history of an empty cache: [B, 0] masks (the first forward's tokens replace it whatever B is)."""
    empty = torch.zeros(batch, 0, dtype=torch.bool, device=device)
    return TokenHistory(empty, empty)


def _split_after_past(vision_mask: Tensor, token_mask: Tensor, past: TokenHistory) -> TokenSplit:
    """The split of a chunk [B, T] that follows the P cached tokens of `past` (see the module docstring)."""
    past.refuse_other_batch(vision_mask.shape[0])
    chunk = build_token_split(vision_mask, token_mask)
    device = vision_mask.device
    key_token_mask = torch.cat((past.token_mask.to(device), token_mask), dim=1)
    if not chunk.has_vision:
        # Text only (in the model: decoding steps, which run the stock attention): no key streams to build.
        unpadded = chunk.unpadded and past.all_real
        return dataclasses.replace(chunk, past=past.length, key_token_mask=key_token_mask, unpadded=unpadded)
    key_vision = torch.cat((past.vision_mask.to(device), vision_mask), dim=1)
    # Only the samples with vision queries here keep their streams as keys, so that the i-th key stream and the
    # i-th query stream belong to the same sample (the operator pairs cu_seqlens with cu_seqlens_k).
    key_vision = key_vision & vision_mask.any(dim=1, keepdim=True)
    keys = build_token_split(key_vision, key_token_mask)
    return dataclasses.replace(
        chunk, past=past.length, keys=keys, key_token_mask=key_token_mask, unpadded=keys.unpadded
    )
