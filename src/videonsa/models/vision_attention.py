"""Qwen2.5-VL's vision attention with one batched attention call per distinct chunk length.

Without flash-attention, transformers' `Qwen2_5_VLVisionAttention` attends within each chunk of `cu_seqlens` (a
window of a frame, or a whole frame) with one SDPA call per chunk, in a Python loop: for a 556-frame training
sample of the 7B tower that is ~64K small calls per forward, and again in the recompute and the backward. The
chunks of a video are almost all of one length, so `PackedVisionAttention` stacks the chunks of each length into
one batch [chunks, heads, length, head_dim] and calls the same attention function once per distinct length. What
it computes and how the chunks are grouped: docs/vision-tower.md.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen

# Attention implementations whose function takes a batch of independent sequences without a mask, as the batched
# path hands them (None: transformers' default, eager). Every other implementation runs the stock forward: flash
# attention (any name transformers reads as flash) makes one varlen call already, and the others (flex, paged, a
# registered custom one) may not take such a batch, so they keep the stock per-chunk loop.
BATCHABLE_IMPLEMENTATIONS = (None, "sdpa", "eager")


@dataclass(frozen=True)
class ChunkGroup:
    """The `count` chunks of one `length`: rows [start, start + count * length) of the packed sequence when they
    are one contiguous run of chunks (`start` set), else rows `rows` ([count * length] long, chunk after chunk)."""

    length: int
    count: int
    start: int | None = None
    rows: Tensor | None = None

    def take(self, states: Tensor) -> Tensor:
        """states [S, heads, D] -> this group's chunks as a batch [count, heads, length, D] (a view for a run)."""
        if self.start is not None:
            picked = states[self.start : self.start + self.count * self.length]
        else:
            picked = states.index_select(0, self.rows)
        return picked.view(self.count, self.length, *states.shape[1:]).transpose(1, 2)


@dataclass(frozen=True)
class ChunkLayout:
    """How the chunks of one `cu_seqlens` over S rows become batches.

    The groups' outputs, concatenated in group order, are the packed sequence's rows in that order; `inverse`
    ([S] long) gathers them back into sequence order, None when group order already is sequence order.
    """

    groups: tuple[ChunkGroup, ...]
    inverse: Tensor | None = None


def chunk_layout(cu_seqlens: Tensor, total: int, device: torch.device | None = None) -> ChunkLayout:
    """Group the chunks of `cu_seqlens` ([chunks + 1] cumulative lengths over `total` rows) by length; the row
    indices it needs live on `device` (the hidden states'; default: cu_seqlens').

    One host read (`.tolist()`, as the stock attention does); the row indices of the groups that are not one
    contiguous run are built on the device from `cu_seqlens`, so building a layout queues no other host sync.
    """
    bounds = cu_seqlens.tolist()
    lengths = [end - begin for begin, end in zip(bounds[:-1], bounds[1:], strict=True)]
    if any(length < 0 for length in lengths):  # chunks would overlap: batches of rows counted twice
        raise ValueError(f"cu_seqlens decreases after chunk {next(n for n, x in enumerate(lengths) if x < 0)}")
    if sum(lengths) != total:
        raise ValueError(f"cu_seqlens covers {sum(lengths)} rows but the hidden states hold {total}")
    chunks_of: dict[int, list[int]] = {}  # length -> chunk numbers, in sequence order
    for number, length in enumerate(lengths):
        if length > 0:  # an empty chunk has no rows to attend over
            chunks_of.setdefault(length, []).append(number)
    firsts = {length: bounds[numbers[0]] - bounds[0] for length, numbers in chunks_of.items()}
    is_run = {length: numbers[-1] - numbers[0] + 1 == len(numbers) for length, numbers in chunks_of.items()}
    if all(is_run.values()):
        # Every length is one run of chunks (the usual case: all chunks of one length): views, in sequence order.
        order = sorted(chunks_of, key=firsts.__getitem__)
        groups = tuple(ChunkGroup(length, len(chunks_of[length]), start=firsts[length]) for length in order)
        return ChunkLayout(groups)
    # Mixed lengths interleaved (frames whose side is not a multiple of the window, items of different sizes):
    # a stable sort of the rows by descending chunk length puts each length's chunks together, in sequence order.
    sizes = (cu_seqlens[1:] - cu_seqlens[:-1]).long().to(device if device is not None else cu_seqlens.device)
    row_lengths = torch.repeat_interleave(sizes, sizes, output_size=total)
    order_rows = torch.sort(-row_lengths, stable=True).indices
    inverse = torch.empty_like(order_rows)
    inverse[order_rows] = torch.arange(total, device=order_rows.device)
    groups, offset = [], 0
    for length in sorted(chunks_of, reverse=True):
        count = len(chunks_of[length])
        if is_run[length]:
            groups.append(ChunkGroup(length, count, start=firsts[length]))
        else:
            groups.append(ChunkGroup(length, count, rows=order_rows[offset : offset + count * length]))
        offset += count * length
    return ChunkLayout(tuple(groups), inverse)


class ChunkLayoutCache:
    """The layouts of the last few `cu_seqlens` tensors, so that the blocks of one tower forward (and its
    recompute under gradient checkpointing) group the chunks once per `cu_seqlens` instead of once per block.

    A `cu_seqlens` is recognised by its memory (address, shape, strides, dtype, device) and version counter, not
    its values (reading them is the host sync being avoided). The cache holds the tensors it has seen, so their
    memory cannot be reused by another tensor while an entry names it; a detached alias (reentrant checkpointing)
    shares memory and version counter, so it finds its layout too. `builds` counts the layouts built.

    Threads may share it (`nn.DataParallel`'s replicas share their modules' attributes): a lock guards the entries.
    A copy (deepcopy, pickle) starts empty, as its tensors live at other addresses than the ones its keys name.
    """

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self.builds = 0
        self._entries: list[tuple[Tensor, tuple[Any, ...], ChunkLayout]] = []
        self._lock = threading.Lock()

    def layout(self, cu_seqlens: Tensor, total: int, device: torch.device | None = None) -> ChunkLayout:
        """The layout of `cu_seqlens` over `total` rows with its indices on `device`, built on first sight."""
        device = torch.device(device) if device is not None else cu_seqlens.device
        key = (*_identity(cu_seqlens, total), device)
        with self._lock:
            for index, (_, seen, layout) in enumerate(self._entries):
                if seen == key:
                    self._entries.insert(0, self._entries.pop(index))
                    return layout
        # Built outside the lock: its host read waits for the device, and other threads need not wait with it.
        layout = chunk_layout(cu_seqlens, total, device)
        with self._lock:
            self.builds += 1
            self._entries.insert(0, (cu_seqlens, key, layout))
            del self._entries[self.size :]
        return layout

    def clear(self) -> None:
        """Forget every layout (and release the tensors held)."""
        with self._lock:
            self._entries.clear()

    def __getstate__(self) -> dict[str, Any]:
        return {"size": self.size, "builds": self.builds}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["size"])
        self.builds = state["builds"]


def _identity(tensor: Tensor, total: int) -> tuple[Any, ...]:
    """What tells one cu_seqlens tensor from another without reading its values. An inference tensor has no
    version counter (the tower never changes its cu_seqlens in place). Whether inference mode is on is part of the
    key: a layout built under it holds inference tensors, which autograd may not save for a backward."""
    version = None if tensor.is_inference() else tensor._version
    return (
        tensor.data_ptr(),
        tuple(tensor.shape),
        tensor.stride(),
        tensor.dtype,
        tensor.device,
        version,
        total,
        torch.is_inference_mode_enabled(),
    )


class PackedVisionAttention(qwen.Qwen2_5_VLVisionAttention):
    """`Qwen2_5_VLVisionAttention` (same parameters and state-dict keys) computing the same function with one
    attention call per distinct chunk length instead of one per chunk, for the "sdpa" and "eager" implementations.

    Flash attention (already one varlen call) and other implementations run the stock forward. `layouts` is
    shared by the blocks of a tower (`install_packed_attention`).

    A batch holds at most `max_chunks_per_call` chunks (CUDA kernels put the batch on a grid axis of at most
    65,535 blocks) and `max_scores_per_call` attention scores (chunks x heads x length^2): implementations that
    materialise the scores (eager, SDPA's math backend) then hold at most 1 GiB of fp32 scores at once where the
    stock loop held one chunk's (a chunk whose scores alone exceed the bound gets a call to itself, as in the stock
    loop). A 556-frame sample of the 7B tower takes one call per window block and three per full block.
    """

    max_chunks_per_call: int = 32768
    max_scores_per_call: int = 1 << 28

    def __init__(self, config: Any, layouts: ChunkLayoutCache | None = None) -> None:
        super().__init__(config)
        self.layouts = layouts if layouts is not None else ChunkLayoutCache()

    @classmethod
    def adopt(cls, module: qwen.Qwen2_5_VLVisionAttention, layouts: ChunkLayoutCache) -> PackedVisionAttention:
        """Turn a stock vision attention into a packed one in place and return it.

        Only the class changes (this subclass adds no parameter or buffer): the parameters stay the objects the
        tower built, with whatever its construction did to them (meta device, ZeRO-3 partitioning, init flags).
        """
        if not isinstance(module, qwen.Qwen2_5_VLVisionAttention):
            raise TypeError(f"expected a Qwen2_5_VLVisionAttention, got {type(module).__name__}")
        module.__class__ = cls
        module.layouts = layouts
        return module

    def forward(
        self,
        hidden_states: Tensor,
        cu_seqlens: Tensor,
        position_embeddings: tuple[Tensor, Tensor] | None = None,
        max_seqlen: int | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """hidden_states [S, dim], cu_seqlens [chunks + 1] int, position_embeddings (cos, sin) [S, head_dim] each
        -> [S, dim]: each row attends (non-causally) over the rows of its chunk, as the stock forward computes."""
        implementation = self.config._attn_implementation
        if implementation not in BATCHABLE_IMPLEMENTATIONS:
            return super().forward(hidden_states, cu_seqlens, position_embeddings, max_seqlen, **kwargs)
        seq_length = hidden_states.shape[0]
        # head_dim, not -1: a reshape cannot infer a size from zero rows.
        query, key, value = self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, self.head_dim).unbind(1)
        cos, sin = position_embeddings
        query, key = qwen.apply_rotary_pos_emb_vision(query, key, cos, sin)
        layout = self.layouts.layout(cu_seqlens, seq_length, hidden_states.device)
        attend = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, qwen.eager_attention_forward)
        outputs = []
        for group in layout.groups:
            batch = [group.take(states) for states in (query, key, value)]  # [n, heads, L, D] each
            for part in zip(*(states.split(self._chunks_per_call(group.length)) for states in batch), strict=True):
                output = attend(
                    self,
                    *part,
                    attention_mask=None,
                    scaling=self.scaling,
                    dropout=0.0 if not self.training else self.attention_dropout,
                    is_causal=False,
                    **kwargs,
                )[0]  # [chunks, L, heads, D]
                outputs.append(output.reshape(-1, self.dim))
        if not outputs:  # no rows at all: an empty [0, dim] still computed from qkv, so every parameter gets a grad
            outputs.append(value.reshape(0, self.dim))
        output = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        if layout.inverse is not None:
            output = output.index_select(0, layout.inverse)
        return self.proj(output)

    def _chunks_per_call(self, length: int) -> int:
        """How many chunks of `length` rows one attention call takes (see the class docstring)."""
        by_scores = self.max_scores_per_call // (self.num_heads * length * length)
        return max(1, min(self.max_chunks_per_call, by_scores))


def install_packed_attention(tower: qwen.Qwen2_5_VisionTransformerPretrainedModel) -> ChunkLayoutCache:
    """Make every block of `tower` use `PackedVisionAttention`, all sharing one layout cache (returned)."""
    layouts = ChunkLayoutCache()
    for block in tower.blocks:
        PackedVisionAttention.adopt(block.attn, layouts)
    return layouts
