"""Attention over the selected key blocks (NSA's selection branch): Triton forward and backward.

All tensors are packed varlen: q [total_T, HQ, D], k/v [total_T, HKV, D], cu_seqlens int32 [N+1]. The
G = HQ // HKV query heads of a KV group share one selection: block_indices int32 [total_T, HKV, S] lists, per
token and group, the chosen block ids of the token's own sequence (ascending, -1 = unused). Query t attends to
the keys of its selected blocks with key position <= t.

Work layout (why it looks like this):

* Forward and dq in the query-tile layout run one program per (query tile, KV group). A tile is BT consecutive
  tokens of one sequence times the G heads of the group, flattened into BLOCK_M = BT * G (+ padding) rows, so a 7:1
  ratio fills the tensor-core tile without padding query heads. The program walks the *union* of the blocks its BT
  tokens selected (built once per call by `union_blocks`), loads each key block once and masks, per row, whether
  that row's token chose the block (a bitmask per union entry) and causality. Neighbouring tokens mostly pick the
  same blocks in real models, so big tiles load far fewer key blocks than per-token programs. When selections barely
  overlap (random inputs), big tiles waste rows on masked blocks; `plan_tiles` then falls back to small tiles
  (BLOCK_M = 16: two tokens of a 7:1 group), which behave like per-token programs.
* When they share almost nothing, the forward can instead run block-major (`launch_fwd_by_block`): one
  program per (key block, KV group) walks the tokens that chose the block and writes one partial output per
  (token, group, slot), merged afterwards by log-sum-exp. That moves the query rows and the partials (2 x G
  rows per triple) instead of 32 KiB of keys and values per triple: 45 ms instead of 81 at 128K on random
  selections (H100). `plan_forward` picks the layout from the measured union sizes and a fitted cost model.
* dq has the same two layouts: the query tiles (`launch_dq`) or block-major (`launch_dq_by_block`: the
  forward's lists, one partial dq per triple, summed per token), chosen by `plan_dq` independently of the
  forward (73 against 47 ms at 128K on random selections, H100).
* dk/dv run one program per (key block, KV group) over the inverse index (`inverse_lists`): the sorted list
  of tokens that selected the block. Each program owns its keys, so dk/dv need no atomics and are
  deterministic; the tokens' query rows are gathered in chunks of BT tokens x G heads.

Softmax statistics: lse is the natural-log log-sum-exp of scale * q.k over the allowed keys (float32), -inf
for rows with nothing allowed (their output is 0). Kernels work in base 2 internally (exp2, scale * log2(e)).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from videonsa.ops.triton.host import HostCopy
from videonsa.ops.triton.utils import (
    KERNEL_DTYPES,
    LOG2E,
    bounded_tiles_of,
    dot_precision,
    kernel_input,
    max_tiles_of,
    next_pow2,
    offsets32,
    row_dot,
    searchsorted_right,
    sequence_units,
    tile_shape,
    tiles_of,
)

# Candidate tile heights (matrix rows per forward / dq program) and the measured time of one program step
# (one union block of one tile) at each height, with the launch settings of `_launch_config`: H100, torch 2.11,
# Triton 3.6, bf16, D=128, 7:1, T=128K, NSA-of-randn selections (benchmarks/tune_selection.py, kernel-only
# CUDA events / union steps). `plan_tiles` multiplies them by the union sizes to pick the height; small tiles
# win when the tokens of a tile share few blocks (random selections), tall ones when they share most.
# 128 rows is not measured with these settings: its entry is above twice the 64-row cost, so it never beats
# 64 (a 128-row tile has at least half the union steps per token of the 64-row tiles it covers).
TILE_STEP_COST = {128: 15.0, 64: 7.09, 16: 4.64}
# The dq kernel (three products per step instead of two, no row max/sum), measured the same way.
DQ_TILE_STEP_COST = {128: 16.0, 64: 7.68, 16: 4.65}
# Heights tried when the caller does not fix one (128 never beat 64 in the measurements).
TILE_CANDIDATES = (64, 16)
# Query rows per dk/dv step, and the longest token list one dk/dv program takes (longer ones are split, see
# `launch_dkdv`). H100, 128K, 4 warps 2 stages: 16 rows 40.9 ms, 32 rows 42.1 (32 rows 1.3x faster than 64, 3x
# than 128). The sm_90 compile (Triton 3.6, bf16, D=128, 7:1) at 16 rows needs 248-255 registers and no spill,
# with or without do_scale; at 32 rows it spills 184 bytes (204 with do_scale).
DKDV_ROWS = 16
DKDV_SPLIT = 4096

# Ceiling on the partial-output buffer of one chunk (the chunk is as many tokens as fit). 512 MiB keeps the
# operator's forward within its 2 GB working-memory budget at 128K; 1 GiB would be 7% faster (42.1 vs 45.4 ms).
BY_BLOCK_PARTIAL_BYTES = 512 << 20
# Longest piece of a token list one block-major program walks (triples). Without a cap, the first chunks of a
# causal sequence have few key blocks with very long lists (every early token chose them): few programs, long
# tails. Pieces are independent (each triple has its own partial), so a cut costs one more load of the block.
BY_BLOCK_SPLIT = 512
# The same ceiling when the output is folded into a gated sum (`fold_into`, inference): no [T, HQ, D] selection
# output is made or kept for a backward, which frees 0.94 GiB at 128K (HQ=28, D=128, bf16) for bigger chunks.
BY_BLOCK_PARTIAL_BYTES_FOLDED = 1 << 30
# Launch of the block-major kernels, H100, Triton 3.6, bf16, D=128, 7:1, randn selections
# (benchmarks/tune_selection.py --by-block, results/tune_selection_by_block_h100_s5.jsonl, 128K / 32K):
# 64 query rows per step (9 tokens), 4 warps, 2 pipeline stages of the token loop (`tl.range`; the main
# kernel's launch itself has one), registers capped at 168: 39.2 / 9.66 ms (3 stages 39.8 / 10.1, 1 stage
# 42.0 / 10.6; 32 rows 50.8, 16 rows 63.4, 128 rows 50.9-51.8 at 128K); merge kernel 4 warps (2 and 8 within
# 0.2 ms). BY_BLOCK_LAUNCH = (warps, loop stages). The cap works because the kernel computes p v in two value
# halves (198 registers uncapped); uncapped it runs two programs per SM, capped three (benchmarks/probe_by_block.py
# at commit 416ee3c, results/probe_by_block_h100_s5b.jsonl: 5.17 vs 5.60 ms at 32K, 24.7 vs 26.9 at 128K).
# BY_BLOCK_MAX_REGISTERS None: the compiler's choice.
BY_BLOCK_ROWS = 64
BY_BLOCK_LAUNCH = (4, 2)
BY_BLOCK_MAX_REGISTERS = 168
BY_BLOCK_MERGE_WARPS = 4
# Cost model (same unit as TILE_STEP_COST: ns), fitted to the same runs: ns per program step of BY_BLOCK_ROWS
# rows (implied 11.2-12.4 across randn and structured selections at 32K and 128K), ns per token for what scales
# with tokens (merge, index sort, small kernels) and BY_BLOCK_CALL_COST (ns per call, spread over the tokens)
# for what does not: launches and the planner's sync. The last two were refitted (least squares over randn and
# structured, 4K-32K, results/tune_selection_planner_h100_s7.jsonl) after the list building became four small
# kernels: 80 ns per token and 0.42 ms per call (before: 105 ns and 1.2 ms). With them the planner picks the
# faster layout at every length of that sweep but 12K randn (block-major 3.80 vs tiles 3.92 ms, taken on
# tiles): block-major for randn from 16K (4.38 vs 5.58 ms on tiles), the tiles for every structured length up
# to 32K (8.32 vs 8.78 ms) and below 12K; structured 128K goes block-major (38.2 vs 48.1 ms, fifth session).
BY_BLOCK_STEP_COST = 12.5
BY_BLOCK_TOKEN_COST = 80.0
BY_BLOCK_CALL_COST = 4.2e5
# The block-major dq (`launch_dq_by_block`): launch (warps, loop stages), register cap, and its cost model in
# the same units, weighed by `plan_dq` against the query-tile dq (DQ_TILE_STEP_COST). H100, bf16, D=128, 7:1,
# with do_scale (benchmarks/tune_selection.py --dq-by-block, results/tune_selection_dq_by_block_h100_s7.jsonl):
# 64 rows, 4 warps, 2 loop stages, no register cap: 46.9 ms at 128K randn (query tiles 73.3), 10.5 at 32K
# (15.8), 5.3 at 16K (5.8); structured 44.5 at 128K (tiles 47.6), 10.3 at 32K (tiles 8.6). 3 stages within
# 2%; a 168-register cap 11-15% slower, 8 warps 36-43%, 32 rows 28-40%. The measured 314-358 ns per token
# fit 18.5 ns per step with the forward's per-token and per-call costs; with them `plan_dq` picks the faster
# layout in all six cases (block-major for randn from 16K and structured 128K).
DQ_BY_BLOCK_LAUNCH = (4, 2)
DQ_BY_BLOCK_MAX_REGISTERS = None
DQ_BY_BLOCK_STEP_COST = 18.5
DQ_BY_BLOCK_TOKEN_COST = 80.0
DQ_BY_BLOCK_CALL_COST = 4.2e5



# ----------------------------------------------------------------------------------------------------------
# Host-side index structures


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


def inverse_lists(
    block_indices: Tensor, cu_seqlens: Tensor, block_size: int, n_blocks: int, units: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """For every (key block, KV group): the tokens that selected it, ascending.

    block_indices: int32 [T, HKV, S]; n_blocks: rows of `tiles_of(cu_seqlens, block_size)` (the key blocks), so
    global block id = first block of the token's sequence + its block id within the sequence.
    Returns (offsets int64 [n_blocks * HKV + 1], tokens int32 [T * HKV * S]): the tokens of (block j, group g)
    are tokens[offsets[j * HKV + g] : offsets[j * HKV + g + 1]] (packed rows); entries past offsets[-1] belong
    to unused slots. These are `block_lists` with a single chunk, each triple reduced to its token (ids of
    blocks with no key at or before the token, which add nothing to dk/dv, are left out there). units: as in
    `block_lists`.
    """
    total, heads_kv, slots = block_indices.shape
    lists = block_lists(block_indices, cu_seqlens, block_size, chunk_tokens=max(total, 1), n_blocks=n_blocks,
                        units=units)
    return lists.offsets, (lists.pairs // (heads_kv * slots)).to(torch.int32)


def union_blocks(block_indices: Tensor, tiles: Tensor, tokens_per_tile: int) -> tuple[Tensor, Tensor, Tensor]:
    """Same result as `union_blocks_torch` (blocks past count are unspecified), one program per (tile, group).

    Each program sorts its tile's tokens_per_tile * S entries (block * BT + token) in registers, keeps the first
    entry of each block and ORs the token bits together.
    """
    total, heads_kv, slots = block_indices.shape
    # The kernel reads tile rows at tile * 4: a strided view (plan_tiles samples tiles[::8]) must be copied, or
    # it would read the first rows of the full table instead (which once biased the tile-height choice to
    # the start of the sequence and picked 64-row tiles on random selections where 16 rows are 1.25x faster).
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


@dataclass
class TilePlan:
    """Query tiles of one selection call and the union of blocks each tile walks (see `union_blocks`)."""

    block_m: int  # matrix rows per program
    tokens: int  # tokens per tile (block_m // G)
    tiles: Tensor  # int32 [n_tiles, 4], `tiles_of`
    blocks: Tensor  # int32 [n_tiles, HKV, tokens * S]
    count: Tensor  # int32 [n_tiles, HKV]
    bits: Tensor  # int32 [n_tiles, HKV, tokens * S, ceil(tokens / 32)]


# The planner samples every PLAN_SAMPLE_EVERY-th window of consecutive tokens (a tile's worth for each height).
PLAN_SAMPLE_EVERY = 8


@dataclass
class SelectionSample:
    """What the layout planner knows of a selection, from every `PLAN_SAMPLE_EVERY`-th token window."""

    steps_per_token: dict[int, float]  # BLOCK_M -> (tile, group) union entries per token on tiles that tall
    used_per_token: float  # used slots per token, all groups
    tokens: int  # tokens of the call


def sample_selection(block_indices: Tensor, group: int, heights: list[int]) -> SelectionSample:
    """Union sizes of the tiles of each height in `heights` (query rows), measured on sampled windows of
    consecutive packed tokens: one program per (window, group) sorts the window's ids (`_sample_kernel`), and
    the counts come back in one small copy (one host read; a few launches instead of building tile tables).
    Windows ignore sequence boundaries: one straddling two sequences may merge equal block ids of both,
    which only matters for an estimate when sequences are a few tiles long."""
    return PendingSample.start(block_indices, group, heights).result()


@dataclass
class PendingSample:
    """A `sample_selection` whose counts are still on their way to the host (`start` launches the sampling
    and the copy; `result` waits for that copy alone)."""

    counts: HostCopy  # per height: distinct ids, tokens; then the used slots of the first height's windows
    block_ms: list[int]  # BLOCK_M of each height
    tokens: int

    @classmethod
    def start(cls, block_indices: Tensor, group: int, heights: list[int]) -> PendingSample:
        total, heads_kv, slots = block_indices.shape
        bts = dict(tile_shape(group, rows) for rows in heights)  # BLOCK_M -> tokens per tile
        counts = torch.zeros(2 * len(bts) + 1, dtype=torch.int64, device=block_indices.device)
        for h, bt in enumerate(bts.values() if total else ()):
            stride = PLAN_SAMPLE_EVERY * bt
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
    sample: SelectionSample, group: int, rows: int = BY_BLOCK_ROWS, *, dq: bool = False
) -> float:
    """Estimated ns per token of the block-major forward (`launch_fwd_by_block`), or with dq of the block-major
    dq (`launch_dq_by_block`): the used slots per token (all groups) in steps of BT tokens, plus the per-token
    costs of sorting and merging and the fixed cost of a call spread over the tokens."""
    bt = tile_shape(group, rows)[1]
    step, token, call = ((DQ_BY_BLOCK_STEP_COST, DQ_BY_BLOCK_TOKEN_COST, DQ_BY_BLOCK_CALL_COST) if dq
                         else (BY_BLOCK_STEP_COST, BY_BLOCK_TOKEN_COST, BY_BLOCK_CALL_COST))
    return sample.used_per_token / bt * step + token + call / max(sample.tokens, 1)


def plan_tiles(
    block_indices: Tensor, cu_seqlens: Tensor, group: int, tile_rows: int | None = None,
    step_cost: dict[int, float] | None = None, candidates: tuple[int, ...] | None = None,
) -> TilePlan:
    """Tiles for the forward / dq kernels: `tile_rows` rows per program, or (None) the height among
    `candidates` (default `TILE_CANDIDATES`) with the least estimated time (`tile_estimate` on a
    `sample_selection`; `step_cost` defaults to `TILE_STEP_COST`, the dq kernel passes `DQ_TILE_STEP_COST`).
    One host sync for the choice, one for the tile table."""
    step_cost = step_cost or TILE_STEP_COST
    heights = [tile_rows] if tile_rows else list(candidates or TILE_CANDIDATES)
    block_m = tile_shape(group, heights[0])[0]
    if len({tile_shape(group, rows)[0] for rows in heights}) > 1:
        sample = sample_selection(block_indices, group, heights)
        block_m = min(sample.steps_per_token, key=lambda bm: tile_estimate(sample, bm, step_cost))
    return _tile_plan(block_indices, cu_seqlens, block_m, group)


def _tile_plan(block_indices: Tensor, cu_seqlens: Tensor, block_m: int, group: int) -> TilePlan:
    """The `TilePlan` of tiles of block_m rows (one host sync, the tile count)."""
    bt = block_m // group
    tiles = tiles_of(cu_seqlens, bt)
    return TilePlan(block_m, bt, tiles, *union_blocks(block_indices, tiles, bt))


def plan_forward(block_indices: Tensor, cu_seqlens: Tensor, group: int, block_size: int) -> TilePlan | None:
    """The forward's layout with the least estimated time: a `TilePlan` (query tiles of each height in
    `TILE_CANDIDATES`), or None for the block-major forward (only for blocks of at most 64 keys, which one
    program holds). One host read for the choice, and one sync more for the tile table when tiles win."""
    return choose_layout(block_indices, cu_seqlens, group, block_size).resolve()


def plan_dq(block_indices: Tensor, cu_seqlens: Tensor, group: int, block_size: int) -> TilePlan | None:
    """dq's layout, as `plan_forward` chooses the forward's: query tiles priced by `DQ_TILE_STEP_COST`, or None
    for the block-major dq (`launch_dq_by_block`). Independent of the forward's choice."""
    return choose_layout(block_indices, cu_seqlens, group, block_size, dq=True).resolve()


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

    def resolve(self) -> TilePlan | None:
        sample = self.sample.result()
        step_cost = DQ_TILE_STEP_COST if self.dq else TILE_STEP_COST
        estimates = {block_m: tile_estimate(sample, block_m, step_cost) for block_m in sample.steps_per_token}
        if self.block_size <= 64 and by_block_estimate(sample, self.group, dq=self.dq) < min(estimates.values()):
            return None
        return _tile_plan(self.block_indices, self.cu_seqlens, min(estimates, key=estimates.get), self.group)


def choose_layout(
    block_indices: Tensor, cu_seqlens: Tensor, group: int, block_size: int, dq: bool = False
) -> LayoutChoice:
    """Start choosing the forward's (or dq's) layout: launches the planner's sampling and the copy of its
    counts, and returns at once. Queue independent GPU work, then pass the result to `selected_attention_fwd`
    (`layout=`) or `selected_attention_bwd` (`dq_layout=`): the host then waits for the counts, not for the
    whole queue, and the GPU does not idle while it decides and launches. block_indices: int32 [T, HKV, S]
    contiguous, as the kernels take it."""
    sample = PendingSample.start(block_indices, group, list(TILE_CANDIDATES))
    return LayoutChoice(block_indices, cu_seqlens, group, block_size, dq, sample)


def _launch_config(block_m: int, head_dim: int, kind: str = "fwd") -> tuple[int, int]:
    """(num_warps, num_stages) for a program with block_m rows.

    H100, Triton 3.6, bf16, D=128, 7:1, 128K (benchmarks/tune_selection.py, kernel-only ms on randn
    selections): forward 16 rows 4 warps 2 stages 73.3 (3 stages 79.9), 64 rows 4w/2s 93.0 (4w/3s 96.3, 8w/3s
    165.9); dq 16 rows 4w/3s 73.4 (4w/2s 81.0, 8w/3s 88.1), 64 rows 4w/2s 100.7 (4w/3s 125.3, 8w/3s 185.7: the
    8 warps needed fewer registers but ran far slower); dk/dv 32 rows 4w/2s 42.1 (8w/2s 66.3). 128-row tiles are
    not measured with these kernels (kept at 8 warps).
    """
    if kind == "dkdv":  # 16 rows: 3 stages 42.8 ms, 2 stages 51.7 (results/tune_selection_dkdv_h100_s3.jsonl)
        return (8, 2) if block_m >= 128 else (4, 3)
    if block_m >= 128 and head_dim > 64:
        return 8, 3
    if kind == "dq":
        return 4, (3 if block_m <= 16 else 2)
    return 4, 2


# ----------------------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def _slc_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, fold_ptr,
    tiles_ptr, ublocks_ptr, ucount_ptr, ubits_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    n_slots, head_dim, qk_scale,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, WORDS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr, FOLD: tl.constexpr = False,
):
    # FOLD: o already holds a partial sum and fold_ptr a per-row gate [T, HQ]; o <- o + gate * (this output),
    # in float32 with one rounding (see `selected_attention_fwd`'s fold_into).
    tile = tl.program_id(0)
    g = tl.program_id(1)
    row0 = tl.load(tiles_ptr + tile * 4)
    n_tok = tl.load(tiles_ptr + tile * 4 + 1)
    seq0 = tl.load(tiles_ptr + tile * 4 + 2)
    seq_end = tl.load(tiles_ptr + tile * 4 + 3)

    r = tl.arange(0, BLOCK_M)
    tok = r // G
    head = g * G + r % G
    row_ok = tok < n_tok
    t_row = row0 + tok
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    q = tl.load(
        q_ptr + t_row.to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
        mask=row_ok[:, None] & d_ok[None, :], other=0.0,
    )
    word = tok // 32
    bit = tok % 32
    n = tl.arange(0, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    slot0 = (tile * HKV + g).to(tl.int64) * n_slots
    count = tl.load(ucount_ptr + tile * HKV + g)
    for u in range(count):
        blk = tl.load(ublocks_ptr + slot0 + u)
        bits = tl.load(ubits_ptr + (slot0 + u) * WORDS + word)
        hit = (((bits >> bit) & 1) != 0) & row_ok
        for c in tl.static_range(BLOCK_SIZE // BLOCK_N):
            k_row = seq0 + blk * BLOCK_SIZE + c * BLOCK_N + n
            k_ok = k_row < seq_end
            kv_off = k_row.to(tl.int64)[:, None] * stride_kt + g * stride_kh + d[None, :]
            kb = tl.load(k_ptr + kv_off, mask=k_ok[:, None] & d_ok[None, :], other=0.0)
            s = tl.dot(q, tl.trans(kb), input_precision=DOT_PREC) * qk_scale
            allowed = hit[:, None] & k_ok[None, :] & (k_row[None, :] <= t_row[:, None])
            s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_use)
            p = tl.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            v_off = k_row.to(tl.int64)[:, None] * stride_vt + g * stride_vh + d[None, :]
            vb = tl.load(v_ptr + v_off, mask=k_ok[:, None] & d_ok[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=DOT_PREC)
            m_i = m_new

    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    o_off = t_row.to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
    if FOLD:
        gate = tl.load(fold_ptr + t_row.to(tl.int64) * HQ + head, mask=row_ok, other=0.0).to(tl.float32)
        prev = tl.load(o_ptr + o_off, mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        out = prev + gate[:, None] * out
    tl.store(o_ptr + o_off, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + t_row.to(tl.int64) * HQ + head, lse, mask=row_ok)


@triton.jit
def _slc_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, do_scale_ptr, lse_ptr, delta_ptr, dq_ptr,
    tiles_ptr, ublocks_ptr, ucount_ptr, ubits_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh,
    n_slots, head_dim, qk_scale, scale,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, WORDS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr, HAS_DO_SCALE: tl.constexpr,
):
    tile = tl.program_id(0)
    g = tl.program_id(1)
    row0 = tl.load(tiles_ptr + tile * 4)
    n_tok = tl.load(tiles_ptr + tile * 4 + 1)
    seq0 = tl.load(tiles_ptr + tile * 4 + 2)
    seq_end = tl.load(tiles_ptr + tile * 4 + 3)

    r = tl.arange(0, BLOCK_M)
    tok = r // G
    head = g * G + r % G
    row_ok = tok < n_tok
    t_row = row0 + tok
    t_row64 = t_row.to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    qd_mask = row_ok[:, None] & d_ok[None, :]
    q_off = t_row64[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_off, mask=qd_mask, other=0.0)
    do_off = t_row64[:, None] * stride_dot + head[:, None] * stride_doh + d[None, :]
    do = tl.load(do_ptr + do_off, mask=qd_mask, other=0.0)
    if HAS_DO_SCALE:
        # The gradient of o is do * g per row (g a gate). The do tile is left as loaded (a scaled float32 copy
        # would cost [rows, D] registers for the whole loop); g multiplies the float32 rows of do.v^T instead.
        # delta already includes g (the caller's).
        row_scale = tl.load(do_scale_ptr + t_row64 * HQ + head, mask=row_ok, other=0.0).to(tl.float32)
    lse2 = tl.load(lse_ptr + t_row64 * HQ + head, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(delta_ptr + t_row64 * HQ + head, mask=row_ok, other=0.0)
    word = tok // 32
    bit = tok % 32
    n = tl.arange(0, BLOCK_N)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    slot0 = (tile * HKV + g).to(tl.int64) * n_slots
    count = tl.load(ucount_ptr + tile * HKV + g)
    for u in range(count):
        blk = tl.load(ublocks_ptr + slot0 + u)
        bits = tl.load(ubits_ptr + (slot0 + u) * WORDS + word)
        hit = (((bits >> bit) & 1) != 0) & row_ok
        for c in tl.static_range(BLOCK_SIZE // BLOCK_N):
            k_row = seq0 + blk * BLOCK_SIZE + c * BLOCK_N + n
            k_ok = k_row < seq_end
            kb = tl.load(
                k_ptr + k_row.to(tl.int64)[:, None] * stride_kt + g * stride_kh + d[None, :],
                mask=k_ok[:, None] & d_ok[None, :], other=0.0,
            )
            vb = tl.load(
                v_ptr + k_row.to(tl.int64)[:, None] * stride_vt + g * stride_vh + d[None, :],
                mask=k_ok[:, None] & d_ok[None, :], other=0.0,
            )
            s = tl.dot(q, tl.trans(kb), input_precision=DOT_PREC) * qk_scale
            allowed = hit[:, None] & k_ok[None, :] & (k_row[None, :] <= t_row[:, None])
            p = tl.where(allowed, tl.exp2(s - lse2[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(vb), input_precision=DOT_PREC)
            if HAS_DO_SCALE:
                dp = dp * row_scale[:, None]
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(kb.dtype), kb, input_precision=DOT_PREC)

    dq_off = t_row64[:, None] * stride_dqt + head[:, None] * stride_dqh + d[None, :]
    tl.store(dq_ptr + dq_off, (dq * scale).to(dq_ptr.dtype.element_ty), mask=qd_mask)


@triton.jit
def _slc_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, do_scale_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, dk_part_ptr, dv_part_ptr,
    key_blocks_ptr, items_ptr, n_items_ptr, tokens_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh,
    head_dim, qk_scale, scale,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, BT: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr, HAS_DO_SCALE: tl.constexpr,
):
    item = tl.program_id(0)
    sub = tl.program_id(1)  # which BLOCK_N slice of the key block
    if item >= tl.load(n_items_ptr):  # the launch is a bound on the item count (`split_lists`)
        return
    owner = tl.load(items_ptr + item * 4)
    start = tl.load(items_ptr + item * 4 + 1)
    end = tl.load(items_ptr + item * 4 + 2)
    part = tl.load(items_ptr + item * 4 + 3)
    blk = owner // HKV
    g = owner % HKV
    # The block-major forward repeats this prologue: a shared @triton.jit helper for it made this kernel 3.6%
    # slower (43.7 vs 42.2 ms at 128K, H100, same outputs bit for bit), so each kernel keeps its own copy.
    k_row0 = tl.load(key_blocks_ptr + blk * 4)
    n_keys = tl.load(key_blocks_ptr + blk * 4 + 1)
    n = tl.arange(0, BLOCK_N)
    k_row = k_row0 + sub * BLOCK_N + n
    k_ok = sub * BLOCK_N + n < n_keys
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    kd_mask = k_ok[:, None] & d_ok[None, :]
    k_row64 = k_row.to(tl.int64)
    kb = tl.load(k_ptr + k_row64[:, None] * stride_kt + g * stride_kh + d[None, :], mask=kd_mask, other=0.0)
    vb = tl.load(v_ptr + k_row64[:, None] * stride_vt + g * stride_vh + d[None, :], mask=kd_mask, other=0.0)

    # As in the block-major forward: only steps whose first token lies before the slice's end need the causal
    # mask, and a short slice (a sequence's last block) keeps it throughout.
    full_from = k_row0 + sub * BLOCK_N + BLOCK_N
    short = sub * BLOCK_N + BLOCK_N > n_keys

    r = tl.arange(0, BLOCK_M)
    tok = r // G
    head = g * G + r % G
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # The token ids of the next step are loaded one step ahead so that the gather of the rows does not wait on
    # them (with 3 stages: 42.8 ms against 49.5 at 128K, H100; loading the next rows ahead as well spilled
    # registers and took 72-83 ms, results/tune_selection_dkdv_h100_s3.jsonl).
    row_ok = (tok < BT) & (start + tok < end)
    t_row = tl.load(tokens_ptr + start + tok, mask=row_ok, other=0)
    for c0 in range(start, end, BT):
        next_ok = (tok < BT) & (c0 + BT + tok < end)
        next_t_row = tl.load(tokens_ptr + c0 + BT + tok, mask=next_ok, other=0)
        t_row64 = t_row.to(tl.int64)
        # Query rows loaded transposed ([D, rows]) so that every product below is a plain dot.
        q_t = tl.load(q_ptr + t_row64[None, :] * stride_qt + head[None, :] * stride_qh + d[:, None],
                      mask=row_ok[None, :] & d_ok[:, None], other=0.0)
        do = tl.load(
            do_ptr + t_row64[:, None] * stride_dot + head[:, None] * stride_doh + d[None, :],
            mask=row_ok[:, None] & d_ok[None, :], other=0.0,
        )
        lse2 = tl.load(lse_ptr + t_row64 * HQ + head, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_ptr + t_row64 * HQ + head, mask=row_ok, other=0.0)
        s_t = tl.dot(kb, q_t, input_precision=DOT_PREC) * qk_scale  # [BLOCK_N, BLOCK_M]
        # Rows past the step's end load q, do, lse, delta (and do_scale) as 0: p = 1 there, but every product
        # it enters (p do, p (dp - delta) q) is exactly 0, so they need no mask.
        p_t = tl.exp2(s_t - lse2[None, :])
        if short | (tl.load(tokens_ptr + c0) < full_from):
            p_t = tl.where(k_ok[:, None] & (k_row[:, None] <= t_row[None, :]), p_t, 0.0)
        if HAS_DO_SCALE:
            # Gradient of o = do * g per row (g a gate): dv += (p g)^T do and dp = g (do v^T), g applied to the
            # float32 columns of p^T and dp^T, so the do tile is used as loaded (no scaled copy in registers).
            row_scale = tl.load(do_scale_ptr + t_row64 * HQ + head, mask=row_ok, other=0.0).to(tl.float32)
            dv += tl.dot((p_t * row_scale[None, :]).to(do.dtype), do, input_precision=DOT_PREC)
        else:
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)
        dp_t = tl.dot(vb, tl.trans(do), input_precision=DOT_PREC)
        if HAS_DO_SCALE:
            dp_t = dp_t * row_scale[None, :]
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), input_precision=DOT_PREC)
        t_row, row_ok = next_t_row, next_ok

    if part < 0:  # the block's whole token list: final values (dk and dv share one contiguous layout)
        out_off = k_row64[:, None] * stride_dkt + g * stride_dkh + d[None, :]
        tl.store(dk_ptr + out_off, (dk * scale).to(dk_ptr.dtype.element_ty), mask=kd_mask)
        tl.store(dv_ptr + out_off, dv.to(dv_ptr.dtype.element_ty), mask=kd_mask)
    else:  # one piece of a long list: float32 partial sums, added up in order by `_slc_dkdv_reduce_kernel`
        part_off = ((part * (BLOCK_SIZE // BLOCK_N) + sub) * BLOCK_N + n)[:, None] * BLOCK_D + d[None, :]
        tl.store(dk_part_ptr + part_off, dk)
        tl.store(dv_part_ptr + part_off, dv)


@triton.jit
def _slc_dkdv_reduce_kernel(
    dk_ptr, dv_ptr, dk_part_ptr, dv_part_ptr, key_blocks_ptr, pieces_ptr, part_end_ptr,
    stride_dkt, stride_dkh, head_dim, scale,
    HKV: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (list, BLOCK_N slice): a list cut in several pieces gets the sum of their partials;
    the programs of the other lists (written whole by the dk/dv kernel) return."""
    owner = tl.program_id(0)
    sub = tl.program_id(1)
    pieces = tl.load(pieces_ptr + owner)
    if pieces <= 1:
        return
    first = tl.load(part_end_ptr + owner) - pieces
    blk = owner // HKV
    g = owner % HKV
    k_row0 = tl.load(key_blocks_ptr + blk * 4)
    n_keys = tl.load(key_blocks_ptr + blk * 4 + 1)
    n = tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for j in range(pieces):  # fixed order: deterministic
        part_off = (((first + j) * (BLOCK_SIZE // BLOCK_N) + sub) * BLOCK_N + n)[:, None] * BLOCK_D + d[None, :]
        dk += tl.load(dk_part_ptr + part_off)
        dv += tl.load(dv_part_ptr + part_off)
    k_ok = sub * BLOCK_N + n < n_keys
    mask = k_ok[:, None] & (d < head_dim)[None, :]
    out_off = (k_row0 + sub * BLOCK_N + n).to(tl.int64)[:, None] * stride_dkt + g * stride_dkh + d[None, :]
    tl.store(dk_ptr + out_off, (dk * scale).to(dk_ptr.dtype.element_ty), mask=mask)
    tl.store(dv_ptr + out_off, dv.to(dv_ptr.dtype.element_ty), mask=mask)


@dataclass
class ListPieces:
    """Work items of the dk/dv kernels (`split_lists`)."""

    items: Tensor  # int64 [n_slots, 4]: (list, first, end token index, partial slot or -1), longest first
    n_items: Tensor  # int64 [1] on the device: the real items (rows past them are never run)
    pieces: Tensor  # int64 [L]: pieces per list (>= 1)
    part_end: Tensor  # int64 [L]: running sum of the pieces of the lists cut in several (their partial slots)
    n_parts: HostCopy  # part_end[-1], the partial slots, on its way to the host


def default_dkdv_split(n_triples: int) -> int:
    """The longest token list of one dk/dv program: DKDV_SPLIT, more for huge inputs so that the partial
    buffers stay bounded (at most 2 * 8192 pieces of a split list)."""
    return max(DKDV_SPLIT, -(-n_triples // 8192))


def split_lists(offsets: Tensor, split: int, n_triples: int | None = None) -> ListPieces:
    """Cut the inverse lists into work items of at most `split` tokens, longest first.

    offsets: int64 [L + 1] from `inverse_lists` (list l = key block l // HKV, group l % HKV); n_triples: a bound
    on the listed tokens (None: offsets[-1], read with a host sync).
    Every list, even an empty one, gets an item, so every key's dk/dv is written; the pieces of a list cut in
    several get consecutive partial slots, summed in order by the reduce kernel. Two small kernels, a running
    sum and a sort, no host sync: the item rows are a bound (one item per list plus one per `split` tokens)
    and the partial count is copied to the host without blocking (`ListPieces.n_parts`).
    """
    n_lists = offsets.numel() - 1
    if n_triples is None:
        n_triples = int(offsets[-1])
    block = 1024
    pieces = torch.empty(n_lists, dtype=torch.int64, device=offsets.device)
    _list_pieces_kernel[(triton.cdiv(n_lists, block),)](offsets, pieces, n_lists, split, 1, BLOCK=block)
    part_end = torch.cumsum(torch.where(pieces > 1, pieces, 0), 0)
    n_parts = HostCopy(part_end[-1:] if n_lists else part_end.new_zeros(1))
    # One chunk of all lists, whose longest possible piece is `split` tokens.
    items, bounds = _deal_pieces(offsets, pieces, n_lists + n_triples // split, n_lists, 1, split, split,
                                 part_end=part_end)
    return ListPieces(items, bounds[1:], pieces, part_end, n_parts)


# ----------------------------------------------------------------------------------------------------------
# Block-major forward ("by block")
#
# When neighbouring tokens share few blocks (random selections), the query-tile forward brings every chosen
# key block into an SM once per token: 32 KiB of keys and values for each (token, group, block) triple, ~515 GB
# at 128K, which caps it at the L2-to-SM bandwidth. The block-major forward turns the loop around, as the dk/dv
# kernel does: one program per (key block, group) holds the block's keys and values and walks the tokens that
# chose it, writing one normalised partial output and its log-sum-exp per (token, group, slot) triple; long
# lists are cut into pieces run by separate programs (`BY_BLOCK_SPLIT`). A second kernel merges each token's
# S partials by their log-sum-exps. Per triple that moves the G query rows in and G partial rows out
# (2 x 1.75 KiB at 7:1, D=128) instead of 32 KiB of keys and values. The partials are bounded by working on
# chunks of consecutive tokens (`BY_BLOCK_PARTIAL_BYTES`), one pair of launches each.

@dataclass
class BlockLists:
    """The (token, group, slot) triples of a selection sorted by (chunk of tokens, key block, group).

    The triples of key block j, group g whose token lies in chunk c are
    pairs[offsets[l] : offsets[l + 1]] with l = (c * n_blocks + j) * HKV + g, ascending by token; each entry is
    the flat triple index (t * HKV + g) * S + s, i.e. where that triple's partial output lives.
    """

    offsets: Tensor  # int64 [n_chunks * n_blocks * HKV + 1]
    pairs: Tensor  # int32 (int64 past 2^31 triples) [T * HKV * S]: the used slots, then the unused ones
    block_indices: Tensor  # int32 [T, HKV, S]: the input, -1 for ids of blocks with no key at or before the token
    chunk_tokens: int
    n_chunks: int
    n_blocks: int  # key blocks numbered (the real ones, or an upper bound on them: see `block_lists`)
    block_size: int
    n_seqs: int


def block_lists(
    block_indices: Tensor, cu_seqlens: Tensor, block_size: int, chunk_tokens: int, n_blocks: int | None = None,
    units: Tensor | None = None,
) -> BlockLists:
    """Sort the selection's triples into `BlockLists` (one kernel for the sort keys, one stable device sort,
    no host sync).

    n_blocks: the number of key blocks (rows of `tiles_of(cu_seqlens, block_size)`), or None for the bound
    `max_tiles_of`, which needs no sync (lists past the real blocks stay empty). A slot is used when its id
    names a block of the token's sequence that starts at or before the token: ids past the sequence have no
    keys, and a block after the token only masked ones, so dropping them changes no output. units:
    `sequence_units(cu_seqlens, block_size)` if the caller has it.
    """
    total, heads_kv, slots = block_indices.shape
    device = block_indices.device
    cu_seqlens = offsets32(cu_seqlens)
    n_seqs = cu_seqlens.numel() - 1
    if n_blocks is None:
        n_blocks = max_tiles_of(total, n_seqs, block_size)
    n_chunks = -(-total // chunk_tokens)
    n_lists = n_chunks * n_blocks * heads_kv
    n_triples = block_indices.numel()
    chosen = torch.empty_like(block_indices)
    key = torch.empty(n_triples, dtype=torch.int32 if n_lists < 2**31 - 1 else torch.int64, device=device)
    if n_triples:
        block = 1024
        _triple_keys_kernel[(triton.cdiv(n_triples, block),)](
            block_indices, cu_seqlens, sequence_units(cu_seqlens, block_size) if units is None else units, chosen,
            key,
            n_triples, n_seqs, n_seqs.bit_length(), block_size, chunk_tokens, n_blocks, n_lists,
            HKV=heads_kv, S=slots, BLOCK=block,
        )
    sorted_key, order = torch.sort(key, stable=True)  # stable: tokens stay ascending within a list
    # List l starts where the sorted keys reach l: no histogram and no host sync (the unused slots, key
    # n_lists, stay at the end of `pairs`, past offsets[-1]).
    offsets = torch.searchsorted(sorted_key, torch.arange(n_lists + 1, device=device, dtype=key.dtype))
    pairs = order.to(torch.int32) if n_triples < 2**31 else order
    return BlockLists(offsets, pairs, chosen, chunk_tokens, n_chunks, n_blocks, block_size, n_seqs)


@triton.jit
def _triple_keys_kernel(
    idx_ptr, cu_ptr, first_block_ptr, chosen_ptr, key_ptr, n_triples, n_seqs, n_iter, block_size, chunk_tokens,
    n_blocks, n_lists, HKV: tl.constexpr, S: tl.constexpr, BLOCK: tl.constexpr,
):
    """Per (token, group, slot) triple: the id if the slot is used (else -1), and the sort key
    (chunk * n_blocks + global block) * HKV + group of its list (n_lists, past every list, if unused)."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n_triples
    t = i // (HKV * S)
    seq = tl.minimum(searchsorted_right(cu_ptr + 1, t.to(tl.int32), n_seqs, n_iter), n_seqs - 1)
    own_block = (t - tl.load(cu_ptr + seq)) // block_size
    blk = tl.load(idx_ptr + i, mask=ok, other=-1)
    used = (blk >= 0) & (blk <= own_block)
    tl.store(chosen_ptr + i, tl.where(used, blk, -1), mask=ok)
    global_block = tl.load(first_block_ptr + seq) + blk
    key = ((t // chunk_tokens) * n_blocks + global_block) * HKV + (i // S) % HKV
    tl.store(key_ptr + i, tl.where(used, key, n_lists).to(key_ptr.dtype.element_ty), mask=ok)


@dataclass
class BlockItems:
    """Work items of the block-major forward, chunk by chunk (see `by_block_items`)."""

    items: Tensor  # int64 [n_slots, 3]: (block * HKV + group within the chunk, first, end index into pairs)
    bounds: Tensor  # int64 [n_chunks + 1]: chunk c's items are items[bounds[c] : bounds[c + 1]]
    grid: list[int]  # per chunk, a host bound on its item count (the programs launched for it)


def by_block_items(lists: BlockLists, heads_kv: int, split: int) -> BlockItems:
    """Work items of the block-major forward: every non-empty list cut into pieces of at most `split` triples
    (0: whole lists), grouped by chunk and, within a chunk, longest first (long items start early, short ones
    fill the tail). No host sync: the launch sizes are bounds computed from the shapes (chunk c's tokens
    [t0, t1) reach at most the lists of the blocks up to the one holding token t1 - 1, ((t1 - 1) // block +
    n_seqs) per group, and make at most one piece per non-empty list plus one per `split` triples), and the
    programs past a chunk's real items return at once. Two small kernels, a running sum and a sort.
    """
    offsets = lists.offsets
    n_lists = offsets.numel() - 1
    per_chunk = lists.n_blocks * heads_kv
    total, _, slots = lists.block_indices.shape
    grid = []
    for c in range(lists.n_chunks):
        t0, t1 = c * lists.chunk_tokens, min((c + 1) * lists.chunk_tokens, total)
        triples = (t1 - t0) * heads_kv * slots
        reachable = min(per_chunk, ((t1 - 1) // lists.block_size + lists.n_seqs) * heads_kv, triples)
        grid.append(reachable + (triples // split if split > 0 else 0))
    longest = lists.chunk_tokens * slots  # no list of a chunk is longer
    piece = split if split > 0 else longest
    block = 1024
    pieces = torch.empty(n_lists, dtype=torch.int64, device=offsets.device)
    _list_pieces_kernel[(triton.cdiv(n_lists, block),)](offsets, pieces, n_lists, piece, 0, BLOCK=block)
    items, bounds = _deal_pieces(offsets, pieces, sum(grid), per_chunk, lists.n_chunks, piece, longest)
    return BlockItems(items, bounds, grid)


def _deal_pieces(
    offsets: Tensor, pieces: Tensor, n_slots: int, per_chunk: int, n_chunks: int, piece: int, longest: int,
    part_end: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Deal the lists' pieces (pieces[l] of at most `piece` entries for list l of offsets [L + 1]) into
    n_slots >= their count item rows, grouped by chunk of per_chunk lists and longest first within a chunk
    (stable: list order among equals); the rows past the real pieces sort last. Returns the items, int64
    [n_slots, 3] (list within its chunk, start, end), or with part_end [n_slots, 4] (list, start, end, partial
    slot: part_end[l] - pieces[l] + piece index for lists in several pieces, else -1), and the chunk bounds
    int64 [n_chunks + 1] (bounds[-1]: the real item count)."""
    n_lists = offsets.numel() - 1
    ends = torch.cumsum(pieces, 0)
    with_parts = part_end is not None
    unsorted = torch.empty((n_slots, 4 if with_parts else 3), dtype=torch.int64, device=offsets.device)
    key = torch.empty(n_slots, dtype=torch.int64, device=offsets.device)
    bounds = torch.empty(n_chunks + 1, dtype=torch.int64, device=offsets.device)
    block = 1024
    _block_items_kernel[(triton.cdiv(max(n_slots, n_chunks + 1), block),)](
        offsets, ends, part_end if with_parts else ends, unsorted, key, bounds, n_slots, n_lists,
        n_lists.bit_length(), per_chunk, n_chunks, piece, longest, WITH_PARTS=with_parts, BLOCK=block,
    )
    return unsorted[torch.sort(key, stable=True).indices], bounds


@triton.jit
def _list_pieces_kernel(offsets_ptr, pieces_ptr, n_lists, piece, min_pieces, BLOCK: tl.constexpr):
    """Pieces of at most `piece` entries per list, at least min_pieces (1: empty lists get an item too)."""
    lst = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = lst < n_lists
    count = tl.load(offsets_ptr + lst + 1, mask=ok, other=0) - tl.load(offsets_ptr + lst, mask=ok, other=0)
    tl.store(pieces_ptr + lst, tl.maximum((count + piece - 1) // piece, min_pieces), mask=ok)


@triton.jit
def _block_items_kernel(
    offsets_ptr, ends_ptr, part_end_ptr, items_ptr, key_ptr, bounds_ptr, n_slots, n_lists, n_iter, per_chunk,
    n_chunks, piece, longest, WITH_PARTS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Item slot i: piece i of the lists' pieces dealt in order (ends = running sum of pieces per list), as
    (list within its chunk, start, end[, partial slot]), and its sort key: chunk, then longest first; slots
    past the real pieces sort last. Also the chunks' bounds: chunk c's items start at the pieces of its first
    list."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n_slots
    owner = searchsorted_right(ends_ptr, i, n_lists, n_iter)
    real = owner < n_lists
    owner = tl.minimum(owner, n_lists - 1)
    before = tl.load(ends_ptr + owner - 1, mask=ok & (owner > 0), other=0)
    start = tl.load(offsets_ptr + owner, mask=ok, other=0) + (i - before) * piece
    end = tl.minimum(start + piece, tl.load(offsets_ptr + owner + 1, mask=ok, other=0))
    key = tl.where(real, (owner // per_chunk) * (longest + 1) + longest - (end - start), n_chunks * (longest + 1))
    COLS: tl.constexpr = 4 if WITH_PARTS else 3
    tl.store(items_ptr + i * COLS, owner % per_chunk, mask=ok)
    tl.store(items_ptr + i * COLS + 1, start, mask=ok)
    tl.store(items_ptr + i * COLS + 2, end, mask=ok)
    if WITH_PARTS:
        n_pieces = tl.load(ends_ptr + owner, mask=ok, other=0) - before
        first_part = tl.load(part_end_ptr + owner, mask=ok, other=0) - n_pieces
        tl.store(items_ptr + i * COLS + 3, tl.where(n_pieces > 1, first_part + i - before, -1), mask=ok)
    tl.store(key_ptr + i, key, mask=ok)
    first_list = i * per_chunk  # chunk c = i
    c_ok = i <= n_chunks
    bound = tl.load(ends_ptr + first_list - 1, mask=c_ok & (i > 0), other=0)
    tl.store(bounds_ptr + i, bound, mask=c_ok)


def by_block_chunk_tokens(
    heads_q: int, heads_kv: int, slots: int, head_dim: int, elem_bytes: int, partial_bytes: int | None = None
) -> int:
    """Tokens per chunk so that one chunk's partial outputs fit in `partial_bytes` (None: BY_BLOCK_PARTIAL_BYTES)."""
    per_token = heads_kv * slots * (heads_q // heads_kv) * head_dim * elem_bytes
    return max(1, (partial_bytes or BY_BLOCK_PARTIAL_BYTES) // per_token)


@triton.jit
def _work_item(items_ptr, key_blocks_ptr, item, HKV: tl.constexpr):
    """Block-major work item `item` (`by_block_items`): (first, end index into pairs, KV group, first key row
    of its block, keys in the block)."""
    owner = tl.load(items_ptr + item * 3)  # blk * HKV + g
    blk = owner // HKV
    return (tl.load(items_ptr + item * 3 + 1), tl.load(items_ptr + item * 3 + 2), owner % HKV,
            tl.load(key_blocks_ptr + blk * 4), tl.load(key_blocks_ptr + blk * 4 + 1))


@triton.jit
def _slc_fwd_by_block_kernel(
    q_ptr, k_ptr, v_ptr, o_part_ptr, lse_part_ptr, key_blocks_ptr, items_ptr, bounds_ptr, pairs_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    chunk, pair0, head_dim, qk_scale,
    HKV: tl.constexpr, G: tl.constexpr, S: tl.constexpr, BT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
    LOOP_STAGES: tl.constexpr,
):
    """One program per work item of one chunk (a piece of the triples of one (key block, group), see
    `by_block_items`): softmax of those triples over that block. The launch is a bound on the chunk's item
    count; programs past bounds[chunk + 1] return.

    Writes o_part [triple - pair0, G, D] (normalised, in q's dtype) and lse_part [triple - pair0, G] (base 2,
    -inf where no key of the block is at or before the token)."""
    item = tl.load(bounds_ptr + chunk) + tl.program_id(0)
    if item >= tl.load(bounds_ptr + chunk + 1):
        return
    start, end, g, k_row0, n_keys = _work_item(items_ptr, key_blocks_ptr, item, HKV)
    n = tl.arange(0, BLOCK_N)
    k_row = k_row0 + n
    k_ok = n < n_keys  # work items are never empty (`by_block_items`)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    kd_mask = k_ok[:, None] & d_ok[None, :]
    k_row64 = k_row.to(tl.int64)
    # Loaded once, used for every token of the list: this is the whole point of the block-major order.
    kb = tl.load(k_ptr + k_row64[:, None] * stride_kt + g * stride_kh + d[None, :], mask=kd_mask, other=0.0)
    # Values as two column halves: p v is computed, scaled and stored half by half, so that both products share
    # the score tile's layout (no conversion of the row sums) and half an output tile is live at a time. The
    # registers this frees let the launch cap them at 168 (`BY_BLOCK_MAX_REGISTERS`), three programs per SM
    # instead of two: 5.2 vs 5.5 ms at 32K, 24.7 vs 26.8 at 128K (H100, results/probe_by_block_h100_s5b.jsonl).
    HALF: tl.constexpr = BLOCK_D // 2
    dh = tl.arange(0, HALF)
    lo_ok = dh < head_dim
    hi_ok = HALF + dh < head_dim
    v_rows = v_ptr + k_row64[:, None] * stride_vt + g * stride_vh
    vb_lo = tl.load(v_rows + dh[None, :], mask=k_ok[:, None] & lo_ok[None, :], other=0.0)
    vb_hi = tl.load(v_rows + HALF + dh[None, :], mask=k_ok[:, None] & hi_ok[None, :], other=0.0)
    # Only a step whose first token lies before the block's end can meet a key after one of its tokens: lists
    # ascend by token, so every later step sees the whole block and skips the mask (5.8 vs 6.4 ms at 32K,
    # H100). A short block (a sequence's last) keeps the mask throughout.
    full_from = k_row0 + BLOCK_N
    short = n_keys < BLOCK_N

    r = tl.arange(0, BLOCK_M)
    tok = r // G
    hh = r % G
    head_off = (g * G + hh)[:, None] * stride_qh + d[None, :]
    # Triton's loop pipeliner issues the next steps' triple ids and query-row gathers ahead (straight into
    # shared memory for the product); the partials stream out marked evict-first so that they do not push the
    # chunk's query rows, each read once per slot that chose the block, out of L2.
    for c0 in tl.range(start, end, BT, num_stages=LOOP_STAGES):
        row_ok = (tok < BT) & (c0 + tok < end)
        pair = tl.load(pairs_ptr + c0 + tok, mask=row_ok, other=0).to(tl.int64)
        t_row = pair // (HKV * S)
        q = tl.load(q_ptr + t_row[:, None] * stride_qt + head_off, mask=row_ok[:, None] & d_ok[None, :],
                    other=0.0, eviction_policy="evict_last")
        s = tl.dot(q, tl.trans(kb), input_precision=DOT_PREC) * qk_scale
        # Rows past the step's end hold q = 0 and are never stored, so they need no mask.
        if short | (tl.load(pairs_ptr + c0).to(tl.int64) // (HKV * S) < full_from):
            s = tl.where(k_ok[None, :] & (k_row64[None, :] <= t_row[:, None]), s, float("-inf"))
        m = tl.max(s, axis=1)
        m_use = tl.where(m == float("-inf"), 0.0, m)
        p = tl.exp2(s - m_use[:, None])
        l_sum = tl.sum(p, axis=1)
        has = l_sum > 0
        inv_l = 1.0 / tl.where(has, l_sum, 1.0)
        lse2 = tl.where(has, m_use + tl.log2(tl.where(has, l_sum, 1.0)), float("-inf"))
        slot = (pair - pair0) * G + hh
        part_rows = o_part_ptr + slot[:, None] * head_dim
        p = p.to(vb_lo.dtype)
        out = tl.dot(p, vb_lo, input_precision=DOT_PREC) * inv_l[:, None]
        tl.store(part_rows + dh[None, :], out.to(o_part_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & lo_ok[None, :], eviction_policy="evict_first")
        out = tl.dot(p, vb_hi, input_precision=DOT_PREC) * inv_l[:, None]
        tl.store(part_rows + HALF + dh[None, :], out.to(o_part_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & hi_ok[None, :], eviction_policy="evict_first")
        tl.store(lse_part_ptr + slot, lse2, mask=row_ok, eviction_policy="evict_first")


@triton.jit
def _slc_merge_kernel(
    o_part_ptr, lse_part_ptr, idx_ptr, o_ptr, lse_ptr, fold_ptr, stride_ot, stride_oh, t0, head_dim,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, S: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, FOLD: tl.constexpr = False,
):
    """One program per (token of the chunk, group): for each of the G heads, o = sum_s w_s o_s / sum_s w_s
    with w_s = 2^(lse_s - max_s lse_s); lse = natural log of the summed exponentials (-inf when no slot had a
    key). The slots' [G, D] partial rows are contiguous; the S loads are unrolled so that they are all in
    flight at once (the kernel is bound by reading the partials)."""
    t_local = tl.program_id(0)
    g = tl.program_id(1)
    t = (t0 + t_local).to(tl.int64)
    s_all = tl.arange(0, BLOCK_S)
    hh = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    head_ok = hh < G
    gd_mask = head_ok[:, None] & (d < head_dim)[None, :]
    idx_row = idx_ptr + (t * HKV + g) * S
    triple0 = (t_local.to(tl.int64) * HKV + g) * S
    used = (tl.load(idx_row + s_all, mask=s_all < S, other=-1) >= 0)[:, None] & head_ok[None, :]
    lse_all = tl.load(lse_part_ptr + (triple0 + s_all)[:, None] * G + hh[None, :], mask=used, other=float("-inf"))
    m = tl.max(lse_all, axis=0)  # [G]
    m_use = tl.where(m == float("-inf"), 0.0, m)
    total = tl.sum(tl.exp2(lse_all - m_use[None, :]), axis=0)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    # Each slot's id and lse are read again below (L1 hits) rather than taken out of `used` / `lse_all`: pulling
    # row s out of a register tile is a cross-thread reduction per slot in Triton.
    for s in tl.static_range(S):
        slot_ok = hh < tl.where(tl.load(idx_row + s) >= 0, G, 0)  # [G]; all False for an unused slot
        row = (triple0 + s) * G + hh
        w = tl.exp2(tl.load(lse_part_ptr + row, mask=slot_ok, other=float("-inf")) - m_use)
        part = tl.load(o_part_ptr + row[:, None] * head_dim + d[None, :], mask=gd_mask & slot_ok[:, None],
                       other=0.0)
        acc += part.to(tl.float32) * w[:, None]
    has = total > 0
    out = acc / tl.where(has, total, 1.0)[:, None]
    head = g * G + hh
    o_off = t * stride_ot + head[:, None] * stride_oh + d[None, :]
    if FOLD:  # as in _slc_fwd_kernel: o <- o + gate * out, one rounding
        gate = tl.load(fold_ptr + t * HQ + head, mask=head_ok, other=0.0).to(tl.float32)
        out = tl.load(o_ptr + o_off, mask=gd_mask, other=0.0).to(tl.float32) + gate[:, None] * out
    tl.store(o_ptr + o_off, out.to(o_ptr.dtype.element_ty), mask=gd_mask)
    lse = tl.where(has, (m_use + tl.log2(tl.where(has, total, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(lse_ptr + t * HQ + head, lse, mask=head_ok)


def _by_block_work(
    block_indices: Tensor, cu_seqlens: Tensor, block_size: int, chunk_tokens: int, split: int
) -> tuple[Tensor, BlockLists, BlockItems]:
    """The key-block table, the lists and the work items of a block-major pass (forward or dq). No host sync:
    the table and the lists are sized by bounds (`max_tiles_of`, `by_block_items`), so the launches queue
    behind the list building instead of waiting for it."""
    key_blocks, units = _key_blocks(cu_seqlens, block_indices.shape[0], block_size)
    lists = block_lists(
        block_indices, cu_seqlens, block_size, chunk_tokens, n_blocks=key_blocks.shape[0], units=units
    )
    return key_blocks, lists, by_block_items(lists, block_indices.shape[1], split)


def _key_blocks(cu_seqlens: Tensor, total: int, block_size: int) -> tuple[Tensor, Tensor]:
    """The key-block table sized by its bound (`bounded_tiles_of`) and the sequences' first blocks
    (`sequence_units`), which the list building reuses."""
    units = sequence_units(cu_seqlens, block_size)
    return bounded_tiles_of(cu_seqlens, total, block_size, units=units), units


def launch_fwd_by_block(
    q: Tensor, k: Tensor, v: Tensor, block_indices: Tensor, cu_seqlens: Tensor, block_size: int, scale: float,
    *, chunk_tokens: int | None = None, rows: int = BY_BLOCK_ROWS, num_warps: int = BY_BLOCK_LAUNCH[0],
    num_stages: int = BY_BLOCK_LAUNCH[1], merge_warps: int = BY_BLOCK_MERGE_WARPS,
    fold_into: Tensor | None = None, fold_scale: Tensor | None = None, split: int = BY_BLOCK_SPLIT,
    max_registers: int | None = BY_BLOCK_MAX_REGISTERS,
) -> tuple[Tensor, Tensor]:
    """The block-major forward (inputs already checked; block_size <= 64); returns o [T, HQ, D], lse [T, HQ].

    chunk_tokens: tokens per chunk (None: as many as `BY_BLOCK_PARTIAL_BYTES` allows, or
    `BY_BLOCK_PARTIAL_BYTES_FOLDED` with fold_into); rows: query rows per program step (BT = rows // G tokens);
    num_stages: pipeline stages of the main kernel's token loop; max_registers: its launch's register cap;
    split: longest piece of a list one program walks (0: whole lists; see `BY_BLOCK_SPLIT`).
    fold_into, fold_scale: see `selected_attention_fwd` (checked there); o is then fold_into."""
    total, heads_q, head_dim = q.shape
    heads_kv = k.shape[1]
    group = heads_q // heads_kv
    slots = block_indices.shape[-1]
    if block_size > 64:
        raise ValueError(f"selected attention by block: block_size <= 64 needed, got {block_size}")
    fold = fold_into is not None
    partial_bytes = BY_BLOCK_PARTIAL_BYTES_FOLDED if fold else BY_BLOCK_PARTIAL_BYTES
    chunk_tokens = chunk_tokens or by_block_chunk_tokens(
        heads_q, heads_kv, slots, head_dim, q.element_size(), partial_bytes
    )
    chunk_tokens = min(chunk_tokens, total)
    key_blocks, lists, work = _by_block_work(block_indices, cu_seqlens, block_size, chunk_tokens, split)
    o = fold_into if fold else torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((total, heads_q), dtype=torch.float32, device=q.device)
    o_part = torch.empty((chunk_tokens * heads_kv * slots * group, head_dim), dtype=q.dtype, device=q.device)
    lse_part = torch.empty(chunk_tokens * heads_kv * slots * group, dtype=torch.float32, device=q.device)
    block_m, bt = tile_shape(group, rows)
    block_d = max(32, next_pow2(head_dim))  # the main kernel's value halves are products of >= 16 columns
    for c in range(lists.n_chunks):
        t0 = c * chunk_tokens
        if work.grid[c]:  # else no token of the chunk can choose a block: the merge writes o = 0
            _slc_fwd_by_block_kernel[(work.grid[c],)](
                q, k, v, o_part, lse_part, key_blocks, work.items, work.bounds, lists.pairs,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                c, t0 * heads_kv * slots, head_dim, scale * LOG2E,
                HKV=heads_kv, G=group, S=slots, BT=bt, BLOCK_M=block_m, BLOCK_N=_block_n(block_size),
                BLOCK_D=block_d, DOT_PREC=dot_precision(q), LOOP_STAGES=num_stages, num_warps=num_warps,
                num_stages=1, maxnreg=max_registers,
            )
        _slc_merge_kernel[(min(chunk_tokens, total - t0), heads_kv)](
            o_part, lse_part, lists.block_indices, o, lse, fold_scale if fold else lse, o.stride(0), o.stride(1),
            t0, head_dim,
            HQ=heads_q, HKV=heads_kv, G=group, S=slots, BLOCK_S=max(2, next_pow2(slots)),
            BLOCK_G=max(2, next_pow2(group)), BLOCK_D=block_d, FOLD=fold, num_warps=merge_warps,
        )
    return o, lse


@triton.jit
def _slc_dq_by_block_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, do_scale_ptr, lse_ptr, delta_ptr, dq_part_ptr, key_blocks_ptr, items_ptr,
    bounds_ptr, pairs_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    chunk, pair0, head_dim, qk_scale, scale,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, S: tl.constexpr, BT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
    HAS_DO_SCALE: tl.constexpr, LOOP_STAGES: tl.constexpr,
):
    """dq of the block-major layout: one program per work item of one chunk (as `_slc_fwd_by_block_kernel`).
    For each triple of the item, the G rows of ds k over this block's keys, with p = 2^(s - lse) from the
    forward's lse (the softmax over all of the token's blocks) and ds = p (do v^T - delta), times the softmax
    scale: the triple's share of dq, so a partial has the magnitude of dq itself (fp16 partials overflow no
    sooner than dq). Writes dq_part [triple - pair0, G, D] in the partial dtype; `_slc_dq_merge_kernel` sums a
    token's slots."""
    item = tl.load(bounds_ptr + chunk) + tl.program_id(0)
    if item >= tl.load(bounds_ptr + chunk + 1):
        return
    start, end, g, k_row0, n_keys = _work_item(items_ptr, key_blocks_ptr, item, HKV)
    n = tl.arange(0, BLOCK_N)
    k_row64 = (k_row0 + n).to(tl.int64)
    k_ok = n < n_keys
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    kd_mask = k_ok[:, None] & d_ok[None, :]
    kb = tl.load(k_ptr + k_row64[:, None] * stride_kt + g * stride_kh + d[None, :], mask=kd_mask, other=0.0)
    vb = tl.load(v_ptr + k_row64[:, None] * stride_vt + g * stride_vh + d[None, :], mask=kd_mask, other=0.0)
    full_from = k_row0 + BLOCK_N
    short = n_keys < BLOCK_N

    r = tl.arange(0, BLOCK_M)
    tok = r // G
    hh = r % G
    head = g * G + hh
    for c0 in tl.range(start, end, BT, num_stages=LOOP_STAGES):
        row_ok = (tok < BT) & (c0 + tok < end)
        pair = tl.load(pairs_ptr + c0 + tok, mask=row_ok, other=0).to(tl.int64)
        t_row = pair // (HKV * S)
        rd_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_ptr + t_row[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :], mask=rd_mask,
                    other=0.0, eviction_policy="evict_last")
        do = tl.load(do_ptr + t_row[:, None] * stride_dot + head[:, None] * stride_doh + d[None, :], mask=rd_mask,
                     other=0.0, eviction_policy="evict_last")
        stat = t_row * HQ + head
        lse2 = tl.load(lse_ptr + stat, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_ptr + stat, mask=row_ok, other=0.0)
        s = tl.dot(q, tl.trans(kb), input_precision=DOT_PREC) * qk_scale
        # As in the forward: only steps starting before the block's end meet keys after a token. Every triple
        # has a key at or before its token (block_lists drops later blocks), so its lse is finite.
        if short | (tl.load(pairs_ptr + c0).to(tl.int64) // (HKV * S) < full_from):
            s = tl.where(k_ok[None, :] & (k_row64[None, :] <= t_row[:, None]), s, float("-inf"))
        p = tl.exp2(s - lse2[:, None])
        dp = tl.dot(do, tl.trans(vb), input_precision=DOT_PREC)
        if HAS_DO_SCALE:  # as in the query-tile dq: the gate scales the float32 rows of do v^T
            dp = dp * tl.load(do_scale_ptr + stat, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        ds = p * (dp - delta[:, None])
        part = tl.dot(ds.to(kb.dtype), kb, input_precision=DOT_PREC)
        slot = (pair - pair0) * G + hh
        tl.store(dq_part_ptr + slot[:, None] * head_dim + d[None, :], (part * scale).to(dq_part_ptr.dtype.element_ty),
                 mask=rd_mask, eviction_policy="evict_first")


@triton.jit
def _slc_dq_merge_kernel(
    dq_part_ptr, idx_ptr, dq_ptr, stride_dqt, stride_dqh, t0, head_dim,
    HKV: tl.constexpr, G: tl.constexpr, S: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program per (token of the chunk, group): dq of its G heads = the sum of its used slots' partial
    rows, in float32, in slot order (deterministic)."""
    t_local = tl.program_id(0)
    g = tl.program_id(1)
    t = (t0 + t_local).to(tl.int64)
    hh = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    head_ok = hh < G
    gd_mask = head_ok[:, None] & (d < head_dim)[None, :]
    idx_row = idx_ptr + (t * HKV + g) * S
    triple0 = (t_local.to(tl.int64) * HKV + g) * S
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for s in tl.static_range(S):
        slot_ok = hh < tl.where(tl.load(idx_row + s) >= 0, G, 0)
        row = (triple0 + s) * G + hh
        acc += tl.load(dq_part_ptr + row[:, None] * head_dim + d[None, :], mask=gd_mask & slot_ok[:, None],
                       other=0.0).to(tl.float32)
    head = g * G + hh
    tl.store(dq_ptr + t * stride_dqt + head[:, None] * stride_dqh + d[None, :],
             acc.to(dq_ptr.dtype.element_ty), mask=gd_mask)


def launch_dq_by_block(
    q: Tensor, k: Tensor, v: Tensor, do: Tensor, lse: Tensor, delta: Tensor, block_indices: Tensor,
    cu_seqlens: Tensor, block_size: int, scale: float, *, do_scale: Tensor | None = None,
    chunk_tokens: int | None = None, rows: int = BY_BLOCK_ROWS, num_warps: int = DQ_BY_BLOCK_LAUNCH[0],
    num_stages: int = DQ_BY_BLOCK_LAUNCH[1], split: int = BY_BLOCK_SPLIT,
    max_registers: int | None = DQ_BY_BLOCK_MAX_REGISTERS,
) -> Tensor:
    """dq in the block-major layout (inputs already checked; block_size <= 64): the forward's lists and work
    items, one partial dq per (token, group, slot) triple from the program that holds the block's keys and
    values, summed per token by `_slc_dq_merge_kernel`. Moves each triple's query and gradient rows in and a
    partial out and back instead of the block's 32 KiB of keys and values (`launch_dq`'s query tiles), which
    pays when neighbouring tokens share few blocks. lse, delta float32 [T, HQ] contiguous; do_scale as in
    `launch_dq`. The partials are in q's dtype (float32 for float32 inputs), chunked like the forward's
    (`BY_BLOCK_PARTIAL_BYTES`). Returns dq [T, HQ, D]."""
    total, heads_q, head_dim = q.shape
    heads_kv = k.shape[1]
    group = heads_q // heads_kv
    slots = block_indices.shape[-1]
    if block_size > 64:
        raise ValueError(f"selected attention dq by block: block_size <= 64 needed, got {block_size}")
    chunk_tokens = min(chunk_tokens or by_block_chunk_tokens(heads_q, heads_kv, slots, head_dim, q.element_size()),
                       total)
    key_blocks, lists, work = _by_block_work(block_indices, cu_seqlens, block_size, chunk_tokens, split)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dq_part = torch.empty((chunk_tokens * heads_kv * slots * group, head_dim), dtype=q.dtype, device=q.device)
    block_m, bt = tile_shape(group, rows)
    block_d = max(16, next_pow2(head_dim))
    for c in range(lists.n_chunks):
        t0 = c * chunk_tokens
        if work.grid[c]:
            _slc_dq_by_block_kernel[(work.grid[c],)](
                q, k, v, do, do if do_scale is None else do_scale, lse, delta, dq_part, key_blocks, work.items,
                work.bounds, lists.pairs,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0),
                do.stride(1), c, t0 * heads_kv * slots, head_dim, scale * LOG2E, scale,
                HQ=heads_q, HKV=heads_kv, G=group, S=slots, BT=bt, BLOCK_M=block_m, BLOCK_N=_block_n(block_size),
                BLOCK_D=block_d, DOT_PREC=dot_precision(q), HAS_DO_SCALE=do_scale is not None,
                LOOP_STAGES=num_stages, num_warps=num_warps, num_stages=1, maxnreg=max_registers,
            )
        _slc_dq_merge_kernel[(min(chunk_tokens, total - t0), heads_kv)](
            dq_part, lists.block_indices, dq, dq.stride(0), dq.stride(1), t0, head_dim,
            HKV=heads_kv, G=group, S=slots, BLOCK_G=max(2, next_pow2(group)), BLOCK_D=block_d,
            num_warps=BY_BLOCK_MERGE_WARPS,
        )
    return dq


# ----------------------------------------------------------------------------------------------------------
# Entry points


def _check(q: Tensor, k: Tensor, v: Tensor, block_indices: Tensor, cu_seqlens: Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape:
        raise ValueError(
            f"selected attention: q [T,HQ,D], k/v [T,HKV,D] expected, got {q.shape}, {k.shape}, {v.shape}"
        )
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"selected attention: incompatible q {tuple(q.shape)} and k {tuple(k.shape)}")
    if block_indices.shape[:2] != k.shape[:2] or block_indices.dim() != 3:
        raise ValueError(
            f"selected attention: block_indices must be [T, HKV, S], got {tuple(block_indices.shape)}"
        )
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("selected attention: cu_seqlens must be 1-D with at least 2 entries")
    if q.dtype not in KERNEL_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"selected attention: q, k, v must share one of bfloat16, float16, float32, got {q.dtype}, {k.dtype}, "
            f"{v.dtype}"
        )


def _pass_plan(
    block_indices: Tensor, cu_seqlens: Tensor, group: int, block_size: int, tile_rows: int | None,
    by_block: bool | None, layout: LayoutChoice | None, dq: bool,
) -> TilePlan | None:
    """The layout of the forward (or with dq of the dq pass) from the caller's switches: query tiles of
    tile_rows rows (or the planned height) when tile_rows is given or by_block is False, block-major (None)
    when by_block is True, else the planner's choice (`layout`, started earlier by `choose_layout`, or made
    here). A layout choice must be for this pass and this selection, and not come with a forced layout."""
    pass_name, switch, layout_name = ("dq", "dq_by_block", "dq_layout") if dq else ("forward", "by_block", "layout")
    if by_block and tile_rows is not None:
        raise ValueError(f"selected attention: tile_rows applies to the query-tile {pass_name}, not {switch}=True")
    if layout is not None:
        if tile_rows is not None or by_block is not None:
            raise ValueError(f"selected attention: {layout_name} cannot be combined with tile_rows or a forced layout")
        if layout.dq != dq:
            raise ValueError(
                f"selected attention: {layout_name} was chosen for the {'dq' if layout.dq else 'forward'} pass"
            )
        if layout.block_indices.shape != block_indices.shape:
            raise ValueError(
                f"selected attention: {layout_name} was chosen for block_indices "
                f"{tuple(layout.block_indices.shape)}, got {tuple(block_indices.shape)}"
            )
    if tile_rows is not None or by_block is False:
        return plan_tiles(block_indices, cu_seqlens, group, tile_rows, DQ_TILE_STEP_COST if dq else None)
    if by_block:
        return None
    return (layout or choose_layout(block_indices, cu_seqlens, group, block_size, dq=dq)).resolve()


def _block_n(block_size: int) -> int:
    """Keys per inner step: the whole block up to 64 keys, else 64-key slices of it."""
    if block_size & (block_size - 1) != 0:
        raise ValueError(f"selected attention: block_size must be a power of two, got {block_size}")
    if block_size < 16:
        raise ValueError(f"selected attention: block_size must be >= 16 (tensor-core tile), got {block_size}")
    return min(block_size, 64)


def _prepare(q: Tensor, k: Tensor, v: Tensor, block_indices: Tensor, cu_seqlens: Tensor, block_size: int):
    _check(q, k, v, block_indices, cu_seqlens)
    _block_n(block_size)  # validates block_size before anything is launched
    return kernel_input(q), kernel_input(k), kernel_input(v), block_indices.to(torch.int32).contiguous()


def launch_fwd(
    q: Tensor, k: Tensor, v: Tensor, plan: TilePlan, block_size: int, scale: float,
    num_warps: int | None = None, num_stages: int | None = None,
    *, fold_into: Tensor | None = None, fold_scale: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The forward kernel over a `TilePlan` (inputs already checked); returns o [T, HQ, D], lse [T, HQ].
    fold_into, fold_scale: see `selected_attention_fwd` (checked there); o is then fold_into."""
    total, heads_q, head_dim = q.shape
    heads_kv = k.shape[1]
    fold = fold_into is not None
    o = fold_into if fold else torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((total, heads_q), dtype=torch.float32, device=q.device)
    warps, stages = _launch_config(plan.block_m, head_dim)
    _slc_fwd_kernel[(plan.tiles.shape[0], heads_kv)](
        q, k, v, o, lse, fold_scale if fold else lse, plan.tiles, plan.blocks, plan.count, plan.bits,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        o.stride(0), o.stride(1), plan.blocks.shape[-1], head_dim, scale * LOG2E,
        HQ=heads_q, HKV=heads_kv, G=heads_q // heads_kv, WORDS=plan.bits.shape[-1],
        BLOCK_SIZE=block_size, BLOCK_M=plan.block_m, BLOCK_N=_block_n(block_size),
        BLOCK_D=max(16, next_pow2(head_dim)), DOT_PREC=dot_precision(q), FOLD=fold,
        num_warps=num_warps or warps, num_stages=num_stages or stages,
    )
    return o, lse


def launch_dq(
    q: Tensor, k: Tensor, v: Tensor, do: Tensor, lse: Tensor, delta: Tensor, plan: TilePlan, block_size: int,
    scale: float, num_warps: int | None = None, num_stages: int | None = None, *, do_scale: Tensor | None = None,
) -> Tensor:
    """The dq kernel over a `TilePlan`; lse, delta float32 [T, HQ] contiguous; do_scale [T, HQ] contiguous or
    None (then do is used as it is, else do * do_scale per row). Returns dq [T, HQ, D]."""
    heads_q, head_dim = q.shape[1], q.shape[2]
    heads_kv = k.shape[1]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    warps, stages = _launch_config(plan.block_m, head_dim, "dq")
    _slc_bwd_dq_kernel[(plan.tiles.shape[0], heads_kv)](
        q, k, v, do, do if do_scale is None else do_scale, lse, delta, dq,
        plan.tiles, plan.blocks, plan.count, plan.bits,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1), dq.stride(0), dq.stride(1),
        plan.blocks.shape[-1], head_dim, scale * LOG2E, scale,
        HQ=heads_q, HKV=heads_kv, G=heads_q // heads_kv, WORDS=plan.bits.shape[-1],
        BLOCK_SIZE=block_size, BLOCK_M=plan.block_m, BLOCK_N=_block_n(block_size),
        BLOCK_D=max(16, next_pow2(head_dim)), DOT_PREC=dot_precision(q), HAS_DO_SCALE=do_scale is not None,
        num_warps=num_warps or warps, num_stages=num_stages or stages,
    )
    return dq


def launch_dkdv(
    q: Tensor, k: Tensor, v: Tensor, do: Tensor, lse: Tensor, delta: Tensor, key_blocks: Tensor,
    offsets: Tensor, tokens: Tensor, block_size: int, scale: float, rows: int = DKDV_ROWS,
    num_warps: int | None = None, num_stages: int | None = None, split: int | None = None,
    *, do_scale: Tensor | None = None, pieces: ListPieces | None = None,
) -> tuple[Tensor, Tensor]:
    """The dk/dv kernels over the inverse lists (`inverse_lists`); returns dk, dv [T, HKV, D]. do_scale
    [T, HQ] contiguous or None: as in `launch_dq`. pieces: `split_lists` of these lists made earlier (then
    split is not used), so that its host read overlaps the work queued since; None: made here, cut at `split`
    tokens (None: `default_dkdv_split`).

    Lists longer than `split` tokens (blocks that many queries chose, e.g. attention sinks) are cut into
    pieces run by separate programs, whose float32 partial sums a second kernel adds in a fixed order, so
    one heavy block cannot stall the whole launch and the result stays deterministic.
    """
    heads_q, head_dim = q.shape[1], q.shape[2]
    heads_kv = k.shape[1]
    group = heads_q // heads_kv
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    block_n = _block_n(block_size)
    block_d = max(16, next_pow2(head_dim))
    n_sub = block_size // block_n
    if pieces is None:
        pieces = split_lists(offsets, split or default_dkdv_split(tokens.numel()), tokens.numel())
    n_parts = pieces.n_parts.tolist()[0]  # waits for that copy only: the work queued before goes on
    part_shape = (max(n_parts, 1), n_sub, block_n, block_d)
    dk_part = torch.empty(part_shape, dtype=torch.float32, device=q.device)
    dv_part = torch.empty(part_shape, dtype=torch.float32, device=q.device)
    block_m, bt = tile_shape(group, rows)
    warps, stages = _launch_config(block_m, head_dim, "dkdv")
    _slc_bwd_dkdv_kernel[(pieces.items.shape[0], n_sub)](
        q, k, v, do, do if do_scale is None else do_scale, lse, delta, dk, dv, dk_part, dv_part, key_blocks,
        pieces.items, pieces.n_items, tokens,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1), dk.stride(0), dk.stride(1), head_dim, scale * LOG2E, scale,
        HQ=heads_q, HKV=heads_kv, G=group, BT=bt,
        BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, DOT_PREC=dot_precision(q),
        HAS_DO_SCALE=do_scale is not None, num_warps=num_warps or warps, num_stages=num_stages or stages,
    )
    if n_parts:
        _slc_dkdv_reduce_kernel[(pieces.pieces.numel(), n_sub)](
            dk, dv, dk_part, dv_part, key_blocks, pieces.pieces, pieces.part_end, dk.stride(0), dk.stride(1),
            head_dim, scale, HKV=heads_kv, BLOCK_SIZE=block_size, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4,
        )
    return dk, dv


def selected_attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_indices: Tensor,
    cu_seqlens: Tensor,
    block_size: int,
    scale: float,
    *,
    tile_rows: int | None = None,
    by_block: bool | None = None,
    fold_into: Tensor | None = None,
    fold_scale: Tensor | None = None,
    layout: LayoutChoice | None = None,
) -> tuple[Tensor, Tensor]:
    """Causal attention of each query over the keys of its selected blocks.

    Args:
        q: [T, HQ, D]; k, v: [T, HKV, D] (packed; bf16, fp16 or fp32).
        block_indices: int32 [T, HKV, S], block ids within the token's sequence, ascending, -1 = unused.
        cu_seqlens: int32 [N+1] sequence offsets.
        block_size: keys per block (power of two, >= 16).
        scale: softmax scale.
        tile_rows: matrix rows per program of the query-tile forward (128, 64 or 16, say); implies
            by_block=False.
        by_block: True runs the block-major forward (`launch_fwd_by_block`, block_size <= 64), False the
            query-tile forward; None picks the layout with the least estimated time (`plan_forward`).
        fold_into: optional contiguous [T, HQ, D] tensor in q's dtype holding a partial gated sum; the output
            is then added into it in place, scaled per row by fold_scale [T, HQ] (o <- o + g * attention, in
            float32, rounded once) and no separate output is made. For inference, where the selection output
            is not kept for a backward; the block-major forward then uses larger chunks
            (`BY_BLOCK_PARTIAL_BYTES_FOLDED`).
        layout: the planner's choice started earlier by `choose_layout` on these block_indices (instead of
            planning here), so that its host read overlaps the GPU work queued since; only with by_block and
            tile_rows None.

    Returns:
        o [T, HQ, D] in q's dtype (0 for rows with no allowed key; fold_into itself when given) and lse float32
        [T, HQ] (-inf there).
    """
    q, k, v, block_indices = _prepare(q, k, v, block_indices, cu_seqlens, block_size)
    if (fold_into is None) != (fold_scale is None):
        raise ValueError("selected attention: fold_into and fold_scale go together")
    if fold_into is not None:
        if fold_into.shape != q.shape or fold_into.dtype != q.dtype or not fold_into.is_contiguous():
            raise ValueError(
                f"selected attention: fold_into must be a contiguous {tuple(q.shape)} {q.dtype} tensor, got "
                f"{tuple(fold_into.shape)} {fold_into.dtype}"
            )
        if fold_scale.shape != q.shape[:2]:
            raise ValueError(f"selected attention: fold_scale must be [T, HQ], got {tuple(fold_scale.shape)}")
        fold_scale = fold_scale.contiguous()
    if q.shape[0] == 0:
        o = torch.empty_like(q) if fold_into is None else fold_into
        return o, torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    group = q.shape[1] // k.shape[1]
    plan = _pass_plan(block_indices, cu_seqlens, group, block_size, tile_rows, by_block, layout, dq=False)
    fold = dict(fold_into=fold_into, fold_scale=fold_scale)
    if plan is None:
        return launch_fwd_by_block(q, k, v, block_indices, cu_seqlens, block_size, scale, **fold)
    return launch_fwd(q, k, v, plan, block_size, scale, **fold)


def selected_attention_bwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor | None,
    lse: Tensor,
    do: Tensor,
    block_indices: Tensor,
    cu_seqlens: Tensor,
    block_size: int,
    scale: float,
    *,
    tile_rows: int | None = None,
    dq_by_block: bool | None = None,
    dkdv_rows: int = DKDV_ROWS,
    dkdv_split: int | None = None,
    delta: Tensor | None = None,
    do_scale: Tensor | None = None,
    dq_layout: LayoutChoice | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of `selected_attention_fwd`.

    Args:
        q, k, v, block_indices, cu_seqlens, block_size, scale: as in the forward.
        o: [T, HQ, D] and lse float32 [T, HQ], the forward's outputs (o may be None when delta is given);
            do: [T, HQ, D], gradient of o, or (with do_scale) the gradient before a per-row factor.
        tile_rows: rows per program of the query-tile dq (implies dq_by_block=False); dq_by_block: True runs
            the block-major dq (`launch_dq_by_block`, block_size <= 64), False the query tiles, None picks the
            layout with the least estimated time (`plan_dq`; independent of the forward's layout). dkdv_rows:
            query rows per dk/dv step; dkdv_split: longest token list of one dk/dv program (None: `DKDV_SPLIT`
            or more).
        delta: float32 [T, HQ], sum_d o * (gradient of o), if the caller has it (else computed here).
        do_scale: [T, HQ] (any float dtype) or None. When given, the gradient of o is do * do_scale[..., None]
            (e.g. a gate times the gated sum's gradient). It is never formed: the kernels scale the float32
            rows of p (for dv) and of do.v^T (for dp) by do_scale instead, so the result equals the gradient
            of do * do_scale in exact arithmetic, without the rounding of a materialised product. A missing
            delta is then do_scale * row_dot(o, do).
        dq_layout: dq's layout choice started earlier by `choose_layout(..., dq=True)` on these block_indices
            (see `selected_attention_fwd`'s layout); only with dq_by_block and tile_rows None.

    Returns:
        dq [T, HQ, D] (q's dtype), dk, dv [T, HKV, D] (k's dtype), summed over the G heads of each group and
        all queries that selected each block. Deterministic: no atomics on gradients.
    """
    q, k, v, block_indices = _prepare(q, k, v, block_indices, cu_seqlens, block_size)
    do = kernel_input(do)
    if q.shape[0] == 0:
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    lse = lse.float().contiguous()
    if do_scale is not None:
        if do_scale.shape != q.shape[:2]:
            raise ValueError(f"selected attention: do_scale must be [T, HQ], got {tuple(do_scale.shape)}")
        do_scale = do_scale.contiguous()
    if delta is None:
        if o is None:
            raise ValueError("selected attention backward: o is needed when delta is not given")
        delta = row_dot(o, do)
        if do_scale is not None:
            delta = delta * do_scale.float()
    elif delta.shape != q.shape[:2]:
        raise ValueError(f"selected attention: delta must be [T, HQ], got {tuple(delta.shape)}")
    delta = delta.float().contiguous()
    group = q.shape[1] // k.shape[1]
    plan = _pass_plan(block_indices, cu_seqlens, group, block_size, tile_rows, dq_by_block, dq_layout, dq=True)
    # dk/dv's lists and work items first: the host read of their partial count then waits only for them,
    # while the dq kernels queued next keep the GPU busy.
    key_blocks, units = _key_blocks(cu_seqlens, q.shape[0], block_size)
    offsets, tokens = inverse_lists(block_indices, cu_seqlens, block_size, key_blocks.shape[0], units=units)
    pieces = split_lists(offsets, dkdv_split or default_dkdv_split(tokens.numel()), tokens.numel())
    if plan is None:
        dq = launch_dq_by_block(q, k, v, do, lse, delta, block_indices, cu_seqlens, block_size, scale,
                                do_scale=do_scale)
    else:
        dq = launch_dq(q, k, v, do, lse, delta, plan, block_size, scale, do_scale=do_scale)
    del plan
    dk, dv = launch_dkdv(
        q, k, v, do, lse, delta, key_blocks, offsets, tokens, block_size, scale, dkdv_rows, do_scale=do_scale,
        pieces=pieces,
    )
    return dq, dk, dv


__all__ = [
    "KERNEL_DTYPES", "BlockItems", "BlockLists", "LayoutChoice", "ListPieces", "PendingSample", "SelectionSample",
    "TilePlan", "block_lists", "bounded_tiles_of", "by_block_estimate", "by_block_items", "choose_layout",
    "default_dkdv_split", "launch_dkdv", "launch_dq", "launch_dq_by_block", "launch_fwd", "launch_fwd_by_block",
    "max_tiles_of", "next_pow2", "plan_dq", "plan_forward", "plan_tiles", "row_dot", "sample_selection",
    "selected_attention_bwd", "selected_attention_fwd", "sequence_units", "split_lists", "tile_estimate",
    "tiles_of", "union_blocks", "union_blocks_torch",
]
