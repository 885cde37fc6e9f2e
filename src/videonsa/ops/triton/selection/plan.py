"""How the selection kernels lay out their work: the query tiles and their block unions, and the planner that
picks, per call, between query tiles of some height and the block-major layout from a sample of the selection
and a cost model (`SelectionSettings`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from videonsa.ops.triton.host import HostCopy
from videonsa.ops.triton.selection.settings import SELECTION_SETTINGS, SelectionSettings
from videonsa.ops.triton.utils import next_pow2, tile_shape, tiles_of


def block_n(block_size: int) -> int:
    """Keys per inner step of every selection kernel: the whole block up to 64 keys, else 64-key slices of it."""
    if block_size & (block_size - 1) != 0:
        raise ValueError(f"selected attention: block_size must be a power of two, got {block_size}")
    if block_size < 16:
        raise ValueError(f"selected attention: block_size must be >= 16 (tensor-core tile), got {block_size}")
    return min(block_size, 64)


# ----------------------------------------------------------------------------------------------------------
# Block unions of query tiles


def union_blocks_torch(
    block_indices: Tensor, tiles: Tensor, tokens_per_tile: int
) -> tuple[Tensor, Tensor, Tensor]:
    """The blocks selected by any token of each tile, with a per-token bitmask (plain PyTorch version of
    `union_blocks`, kept as its test oracle).

    block_indices: int32 [T, HKV, S]; tiles: int32 [n_tiles, 4] from `tiles_of`.
    Returns (blocks int32 [n_tiles, HKV, L], count int32 [n_tiles, HKV], bits int32 [n_tiles, HKV, L, W]) with
    L = tokens_per_tile * S and W = ceil(tokens_per_tile / 32): for tile i and group g, blocks[i, g, :count]
    are the distinct selected block ids ascending, and bit (tau % 32) of bits[i, g, u, tau // 32] says whether
    the tile's token tau selected blocks[i, g, u].
    """
    total, heads_kv, slots = block_indices.shape
    n_tiles = tiles.shape[0]
    bt = tokens_per_tile
    width = bt * slots
    words = (bt + 31) // 32
    device = block_indices.device
    tau = torch.arange(bt, device=device)
    token = tiles[:, :1].long() + tau  # [n_tiles, bt]
    in_tile = tau < tiles[:, 1:2]
    chosen = block_indices[token.clamp(max=total - 1)].long()  # [n_tiles, bt, HKV, S]
    chosen = torch.where(in_tile[:, :, None, None] & (chosen >= 0), chosen, -1)
    # Sort key block * bt + tau groups a tile's entries by block; unused entries (-1) go last.
    sentinel = torch.iinfo(torch.int64).max
    code = torch.where(chosen >= 0, chosen * bt + tau[None, :, None, None], sentinel)
    code = code.permute(0, 2, 1, 3).reshape(n_tiles, heads_kv, width).sort(dim=-1).values
    valid = code != sentinel
    block = torch.where(valid, code // bt, -1)
    token_in_tile = torch.where(valid, code % bt, 0)
    previous = torch.nn.functional.pad(block[..., :-1], (1, 0), value=-1)
    first = valid & (block != previous)
    slot = torch.cumsum(first, dim=-1) - 1
    slot = torch.where(valid, slot, width)  # unused entries land in a spare column, dropped below
    blocks = torch.full((n_tiles, heads_kv, width + 1), -1, dtype=torch.int64, device=device)
    blocks.scatter_(-1, slot, block)  # every entry of one slot writes the same block id
    flat_word = slot * words + token_in_tile // 32
    bits = torch.zeros((n_tiles, heads_kv, (width + 1) * words), dtype=torch.int64, device=device)
    bits.scatter_add_(-1, flat_word, torch.where(valid, 1 << (token_in_tile % 32), 0))
    bits = bits.view(n_tiles, heads_kv, width + 1, words)[:, :, :width]
    count = first.sum(dim=-1).to(torch.int32)
    # int64 -> int32 keeps the low 32 bits (two's complement), which is what the kernel shifts through.
    blocks = blocks[..., :width].to(torch.int32).contiguous()
    return blocks, count.contiguous(), bits.to(torch.int32).contiguous()


def union_blocks(block_indices: Tensor, tiles: Tensor, tokens_per_tile: int) -> tuple[Tensor, Tensor, Tensor]:
    """Same result as `union_blocks_torch` (blocks past count are unspecified), one program per (tile, group).

    Each program sorts its tile's tokens_per_tile * S entries (block * BT + token) in registers, keeps the first
    entry of each block and ORs the token bits together.
    """
    total, heads_kv, slots = block_indices.shape
    # The kernel reads tile rows at tile * 4: a strided view (plan_tiles samples tiles[::8]) must be copied, or
    # it would read the first rows of the full table instead (and bias the tile-height choice to the start of
    # the sequence).
    tiles = tiles.contiguous()
    n_tiles = tiles.shape[0]
    width = tokens_per_tile * slots
    words = (tokens_per_tile + 31) // 32
    device = block_indices.device
    blocks = torch.empty((n_tiles, heads_kv, width), dtype=torch.int32, device=device)
    count = torch.empty((n_tiles, heads_kv), dtype=torch.int32, device=device)
    bits = torch.zeros((n_tiles, heads_kv, width, words), dtype=torch.int32, device=device)
    if n_tiles:
        block_e = next_pow2(width)
        _union_kernel[(n_tiles, heads_kv)](
            block_indices, tiles, blocks, count, bits, width,
            HKV=heads_kv, S=slots, BT=tokens_per_tile, WORDS=words, BLOCK_E=block_e,
            num_warps=4 if block_e <= 1024 else 8,
        )
    return blocks, count, bits


@triton.jit
def _union_kernel(
    idx_ptr, tiles_ptr, blocks_ptr, count_ptr, bits_ptr, n_slots,
    HKV: tl.constexpr, S: tl.constexpr, BT: tl.constexpr, WORDS: tl.constexpr, BLOCK_E: tl.constexpr,
):
    tile = tl.program_id(0)
    g = tl.program_id(1)
    row0 = tl.load(tiles_ptr + tile * 4)
    n_tok = tl.load(tiles_ptr + tile * 4 + 1)
    e = tl.arange(0, BLOCK_E)
    tau = e // S
    ok = tau < n_tok
    blk = tl.load(idx_ptr + (row0 + tau).to(tl.int64) * (HKV * S) + g * S + e % S, mask=ok, other=-1)
    ok = ok & (blk >= 0)
    code = tl.sort(tl.where(ok, blk * BT + tau, 2147483647))  # block-major, unused entries last
    valid = code != 2147483647
    blk = code // BT
    tok = code - blk * BT
    previous = tl.gather(blk, tl.maximum(e - 1, 0), 0)
    first = valid & ((blk != previous) | (e == 0))
    slot = tl.cumsum(first.to(tl.int32), 0) - 1
    base = (tile * HKV + g).to(tl.int64) * n_slots
    tl.store(blocks_ptr + base + slot, blk, mask=first)
    # OR is order-independent, so the atomics give the same bits every run.
    tl.atomic_or(bits_ptr + (base + slot) * WORDS + tok // 32, 1 << (tok % 32), mask=valid)
    tl.store(count_ptr + tile * HKV + g, tl.sum(first.to(tl.int32), 0))


# ----------------------------------------------------------------------------------------------------------
# The layout planner


@dataclass
class TilePlan:
    """Query tiles of one selection call and the union of blocks each tile walks (see `union_blocks`)."""

    block_m: int  # matrix rows per program
    tokens: int  # tokens per tile (block_m // G)
    tiles: Tensor  # int32 [n_tiles, 4], `tiles_of`
    blocks: Tensor  # int32 [n_tiles, HKV, tokens * S]
    count: Tensor  # int32 [n_tiles, HKV]
    bits: Tensor  # int32 [n_tiles, HKV, tokens * S, ceil(tokens / 32)]


@dataclass
class SelectionSample:
    """What the layout planner knows of a selection, from every `plan_sample_every`-th token window."""

    steps_per_token: dict[int, float]  # BLOCK_M -> (tile, group) union entries per token on tiles that tall
    used_per_token: float  # used slots per token, all groups
    tokens: int  # tokens of the call


def sample_selection(
    block_indices: Tensor, group: int, heights: list[int], settings: SelectionSettings = SELECTION_SETTINGS
) -> SelectionSample:
    """Union sizes of the tiles of each height in `heights` (query rows), measured on sampled windows of
    consecutive packed tokens: one program per (window, group) sorts the window's ids (`_sample_kernel`), and
    the counts come back in one small copy (one host read; a few launches instead of building tile tables).
    Windows ignore sequence boundaries: one straddling two sequences may merge equal block ids of both,
    which only matters for an estimate when sequences are a few tiles long. A window every
    `settings.plan_sample_every` tiles' worth of tokens is sampled."""
    return PendingSample.start(block_indices, group, heights, settings.plan_sample_every).result()


@dataclass
class PendingSample:
    """A `sample_selection` whose counts are still on their way to the host (`start` launches the sampling
    and the copy; `result` waits for that copy alone)."""

    counts: HostCopy  # per height: distinct ids, tokens; then the used slots of the first height's windows
    block_ms: list[int]  # BLOCK_M of each height
    tokens: int

    @classmethod
    def start(cls, block_indices: Tensor, group: int, heights: list[int], sample_every: int) -> PendingSample:
        total, heads_kv, slots = block_indices.shape
        bts = dict(tile_shape(group, rows) for rows in heights)  # BLOCK_M -> tokens per tile
        counts = torch.zeros(2 * len(bts) + 1, dtype=torch.int64, device=block_indices.device)
        for h, bt in enumerate(bts.values() if total else ()):
            stride = sample_every * bt
            _sample_kernel[(-(-total // stride), heads_kv)](
                block_indices, counts[2 * h :], counts[-1:], total, stride,
                HKV=heads_kv, S=slots, BT=bt, BLOCK_E=next_pow2(bt * slots), COUNT_USED=h == 0,
            )
        return cls(HostCopy(counts), list(bts), total)

    def result(self) -> SelectionSample:
        host = self.counts.tolist()
        first_tokens = max(host[1], 1)
        return SelectionSample(
            {block_m: host[2 * h] / max(host[2 * h + 1], 1) for h, block_m in enumerate(self.block_ms)},
            host[-1] / first_tokens, self.tokens,
        )


@triton.jit
def _sample_kernel(
    idx_ptr, counts_ptr, used_ptr, total, stride, HKV: tl.constexpr, S: tl.constexpr, BT: tl.constexpr,
    BLOCK_E: tl.constexpr, COUNT_USED: tl.constexpr,
):
    """Window i = tokens [i * stride, i * stride + BT), group g: adds the number of distinct used ids to
    counts[0], the window's tokens (once, from group 0) to counts[1], and with COUNT_USED its used slots to
    used[0]. Integer atomics, so the sums are the same every run."""
    t0 = tl.program_id(0).to(tl.int64) * stride
    g = tl.program_id(1)
    e = tl.arange(0, BLOCK_E)
    tau = e // S
    ok = (tau < BT) & (t0 + tau < total)
    blk = tl.load(idx_ptr + (t0 + tau) * (HKV * S) + g * S + e % S, mask=ok, other=-1)
    used = ok & (blk >= 0)
    code = tl.sort(tl.where(used, blk, 2147483647))
    previous = tl.gather(code, tl.maximum(e - 1, 0), 0)
    first = (code != 2147483647) & ((code != previous) | (e == 0))
    tl.atomic_add(counts_ptr, tl.sum(first.to(tl.int64), 0))
    tl.atomic_add(counts_ptr + 1, tl.where(g == 0, tl.minimum(total - t0, BT), 0))
    if COUNT_USED:
        tl.atomic_add(used_ptr, tl.sum(used.to(tl.int64), 0))


def tile_estimate(sample: SelectionSample, block_m: int, step_cost: dict[int, float]) -> float:
    """Estimated ns per token of the query-tile kernels on tiles of block_m rows: union steps per token times
    the cost of one step at that height."""
    return sample.steps_per_token[block_m] * step_cost.get(block_m, max(step_cost.values()))


def by_block_estimate(
    sample: SelectionSample, group: int, settings: SelectionSettings = SELECTION_SETTINGS, *, dq: bool = False
) -> float:
    """Estimated ns per token of the block-major forward (`launch_fwd_by_block`), or with dq of the block-major
    dq (`launch_dq_by_block`): the used slots per token (all groups) in steps of BT tokens, plus the per-token
    costs of sorting and merging and the fixed cost of a call spread over the tokens (`settings`' costs)."""
    s = settings
    bt = tile_shape(group, s.by_block_rows)[1]
    step, token, call = ((s.dq_by_block_step_cost, s.dq_by_block_token_cost, s.dq_by_block_call_cost) if dq
                         else (s.by_block_step_cost, s.by_block_token_cost, s.by_block_call_cost))
    return sample.used_per_token / bt * step + token + call / max(sample.tokens, 1)


def plan_tiles(
    block_indices: Tensor, cu_seqlens: Tensor, group: int, tile_rows: int | None = None, *, dq: bool = False,
    settings: SelectionSettings = SELECTION_SETTINGS,
) -> TilePlan:
    """Tiles for the forward (or with dq the dq) kernel: `tile_rows` rows per program, or (None) the height among
    `settings.tile_candidates` with the least estimated time (`tile_estimate` on a `sample_selection`, priced by
    `settings.tile_step_cost` or `dq_tile_step_cost`). One host sync for the choice, one for the tile table."""
    step_cost = settings.dq_tile_step_cost if dq else settings.tile_step_cost
    heights = [tile_rows] if tile_rows else list(settings.tile_candidates)
    block_m = tile_shape(group, heights[0])[0]
    if len({tile_shape(group, rows)[0] for rows in heights}) > 1:
        sample = sample_selection(block_indices, group, heights, settings)
        block_m = min(sample.steps_per_token, key=lambda bm: tile_estimate(sample, bm, step_cost))
    return _tile_plan(block_indices, cu_seqlens, block_m, group)


def _tile_plan(block_indices: Tensor, cu_seqlens: Tensor, block_m: int, group: int) -> TilePlan:
    """The `TilePlan` of tiles of block_m rows (one host sync, the tile count)."""
    bt = block_m // group
    tiles = tiles_of(cu_seqlens, bt)
    return TilePlan(block_m, bt, tiles, *union_blocks(block_indices, tiles, bt))


def plan_forward(
    block_indices: Tensor, cu_seqlens: Tensor, group: int, block_size: int,
    settings: SelectionSettings = SELECTION_SETTINGS,
) -> TilePlan | None:
    """The forward's layout with the least estimated time: a `TilePlan` (query tiles of each height in
    `settings.tile_candidates`), or None for the block-major forward (only for blocks of at most 64 keys, which
    one program holds). One host read for the choice, and one sync more for the tile table when tiles win."""
    return choose_layout(block_indices, cu_seqlens, group, block_size, settings=settings).resolve()


def plan_dq(
    block_indices: Tensor, cu_seqlens: Tensor, group: int, block_size: int,
    settings: SelectionSettings = SELECTION_SETTINGS,
) -> TilePlan | None:
    """dq's layout, as `plan_forward` chooses the forward's: query tiles priced by `dq_tile_step_cost`, or None
    for the block-major dq (`launch_dq_by_block`). Independent of the forward's choice."""
    return choose_layout(block_indices, cu_seqlens, group, block_size, dq=True, settings=settings).resolve()


@dataclass
class LayoutChoice:
    """A layout decision in flight (`choose_layout`): the sample's counts travel to the host while the GPU
    runs whatever the caller queues next; `resolve` waits for them alone and returns what `plan_forward` (or
    with dq `plan_dq`) would."""

    block_indices: Tensor
    cu_seqlens: Tensor
    group: int
    block_size: int
    dq: bool
    sample: PendingSample
    settings: SelectionSettings

    def resolve(self) -> TilePlan | None:
        sample = self.sample.result()
        step_cost = self.settings.dq_tile_step_cost if self.dq else self.settings.tile_step_cost
        estimates = {block_m: tile_estimate(sample, block_m, step_cost) for block_m in sample.steps_per_token}
        by_block = by_block_estimate(sample, self.group, self.settings, dq=self.dq)
        if self.block_size <= 64 and by_block < min(estimates.values()):
            return None
        return _tile_plan(self.block_indices, self.cu_seqlens, min(estimates, key=estimates.get), self.group)


def choose_layout(
    block_indices: Tensor, cu_seqlens: Tensor, group: int, block_size: int, dq: bool = False,
    settings: SelectionSettings = SELECTION_SETTINGS,
) -> LayoutChoice:
    """Start choosing the forward's (or dq's) layout: launches the planner's sampling and the copy of its
    counts, and returns at once. Queue independent GPU work, then pass the result to `selected_attention_fwd`
    (`layout=`) or `selected_attention_bwd` (`dq_layout=`): the host then waits for the counts, not for the
    whole queue, and the GPU does not idle while it decides and launches. block_indices: int32 [T, HKV, S]
    contiguous, as the kernels take it."""
    sample = PendingSample.start(block_indices, group, list(settings.tile_candidates), settings.plan_sample_every)
    return LayoutChoice(block_indices, cu_seqlens, group, block_size, dq, sample, settings)


__all__ = [
    "LayoutChoice", "PendingSample", "SelectionSample", "TilePlan", "block_n", "by_block_estimate", "choose_layout",
    "plan_dq", "plan_forward", "plan_tiles", "sample_selection", "tile_estimate", "union_blocks", "union_blocks_torch",
]
