"""Token lists of the key-block-major kernels (the dk/dv backward and the block-major forward and dq): for every
(key block, KV group), the tokens that selected it, sorted on the device without a host sync, and the work items
that cut long lists into pieces.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from videonsa.ops.triton.host import HostCopy
from videonsa.ops.triton.selection.settings import SELECTION_SETTINGS, SelectionSettings
from videonsa.ops.triton.utils import bounded_tiles_of, max_tiles_of, offsets32, searchsorted_right, sequence_units


def key_block_table(cu_seqlens: Tensor, total: int, block_size: int) -> tuple[Tensor, Tensor]:
    """The key-block table sized by its bound (`bounded_tiles_of`) and the sequences' first blocks
    (`sequence_units`), which the list building reuses."""
    units = sequence_units(cu_seqlens, block_size)
    return bounded_tiles_of(cu_seqlens, total, block_size, units=units), units


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


@dataclass
class ListPieces:
    """Work items of the dk/dv kernels (`split_lists`)."""

    items: Tensor  # int64 [n_slots, 4]: (list, first, end token index, partial slot or -1), longest first
    n_items: Tensor  # int64 [1] on the device: the real items (rows past them are never run)
    pieces: Tensor  # int64 [L]: pieces per list (>= 1)
    part_end: Tensor  # int64 [L]: running sum of the pieces of the lists cut in several (their partial slots)
    n_parts: HostCopy  # part_end[-1], the partial slots, on its way to the host


def default_dkdv_split(n_triples: int, settings: SelectionSettings = SELECTION_SETTINGS) -> int:
    """The longest token list of one dk/dv program: `settings.dkdv_split`, more for huge inputs so that the
    partial buffers stay bounded (at most 2 * 8192 pieces of a split list)."""
    return max(settings.dkdv_split, -(-n_triples // 8192))


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
    keys_beyond_queries: bool = False  # the queries end longer key sequences (cu_seqlens_k given)


def block_lists(
    block_indices: Tensor, cu_seqlens: Tensor, block_size: int, chunk_tokens: int, n_blocks: int | None = None,
    units: Tensor | None = None, cu_seqlens_k: Tensor | None = None,
) -> BlockLists:
    """Sort the selection's triples into `BlockLists` (one kernel for the sort keys, one stable device sort,
    no host sync).

    n_blocks: the number of key blocks (rows of `tiles_of(cu_seqlens, block_size)`), or None for the bound
    `max_tiles_of`, which needs no sync (lists past the real blocks stay empty). A slot is used when its id
    names a block of the token's sequence that starts at or before the token: ids past the sequence have no
    keys, and a block after the token only masked ones, so dropping them changes no output. units:
    `sequence_units(cu_seqlens, block_size)` if the caller has it (of cu_seqlens_k when given).
    cu_seqlens_k: the keys' offsets when each sequence's queries (cu_seqlens) are its last keys; key blocks are
    then numbered over the keys and a token's own block is the one holding its key position. n_blocks must
    then be given (the key-block table's rows).
    """
    total, heads_kv, slots = block_indices.shape
    device = block_indices.device
    cu_seqlens = offsets32(cu_seqlens)
    cu_keys = cu_seqlens if cu_seqlens_k is None else offsets32(cu_seqlens_k)
    n_seqs = cu_seqlens.numel() - 1
    if n_blocks is None:
        if cu_seqlens_k is not None:
            raise ValueError("block_lists: n_blocks is needed with cu_seqlens_k")
        n_blocks = max_tiles_of(total, n_seqs, block_size)
    n_chunks = -(-total // chunk_tokens)
    n_lists = n_chunks * n_blocks * heads_kv
    n_triples = block_indices.numel()
    chosen = torch.empty_like(block_indices)
    key = torch.empty(n_triples, dtype=torch.int32 if n_lists < 2**31 - 1 else torch.int64, device=device)
    if n_triples:
        block = 1024
        _triple_keys_kernel[(triton.cdiv(n_triples, block),)](
            block_indices, cu_seqlens, cu_keys, sequence_units(cu_keys, block_size) if units is None else units,
            chosen, key,
            n_triples, n_seqs, n_seqs.bit_length(), block_size, chunk_tokens, n_blocks, n_lists,
            HKV=heads_kv, S=slots, BLOCK=block,
        )
    sorted_key, order = torch.sort(key, stable=True)  # stable: tokens stay ascending within a list
    # List l starts where the sorted keys reach l: no histogram and no host sync (the unused slots, key
    # n_lists, stay at the end of `pairs`, past offsets[-1]).
    offsets = torch.searchsorted(sorted_key, torch.arange(n_lists + 1, device=device, dtype=key.dtype))
    pairs = order.to(torch.int32) if n_triples < 2**31 else order
    return BlockLists(offsets, pairs, chosen, chunk_tokens, n_chunks, n_blocks, block_size, n_seqs,
                      cu_seqlens_k is not None)


@triton.jit
def _triple_keys_kernel(
    idx_ptr, cu_ptr, cuk_ptr, first_block_ptr, chosen_ptr, key_ptr, n_triples, n_seqs, n_iter, block_size,
    chunk_tokens, n_blocks, n_lists, HKV: tl.constexpr, S: tl.constexpr, BLOCK: tl.constexpr,
):
    """Per (token, group, slot) triple: the id if the slot is used (else -1), and the sort key
    (chunk * n_blocks + global block) * HKV + group of its list (n_lists, past every list, if unused).
    cu_ptr: the queries' offsets; cuk_ptr: the keys' (cu_ptr again unless the queries end longer key
    sequences), whose blocks first_block_ptr numbers."""
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n_triples
    t = i // (HKV * S)
    seq = tl.minimum(searchsorted_right(cu_ptr + 1, t.to(tl.int32), n_seqs, n_iter), n_seqs - 1)
    # The token's key position: its query index plus len_k - len_q (0 unless the keys run longer).
    shift = (tl.load(cuk_ptr + seq + 1) - tl.load(cuk_ptr + seq)) - (tl.load(cu_ptr + seq + 1) - tl.load(cu_ptr + seq))
    own_block = (t - tl.load(cu_ptr + seq) + shift) // block_size
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
        reachable = min(per_chunk, triples)
        if not lists.keys_beyond_queries:  # else a token's blocks may lie anywhere in its longer key sequence
            reachable = min(reachable, ((t1 - 1) // lists.block_size + lists.n_seqs) * heads_kv)
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


__all__ = [
    "BlockItems", "BlockLists", "ListPieces", "block_lists", "by_block_items", "default_dkdv_split", "inverse_lists",
    "key_block_table", "split_lists",
]
