"""What every NSA kernel module shares: constants, launch helpers, varlen tile tables and small kernels.

Every kernel works on packed varlen tensors ([total_T, H, D] with int32 cu_seqlens [N+1]); `pack` turns a batch
[B, T, ...] into that form, so batched and `cu_seqlens` inputs take one code path. The branch modules
(compression, topk, selection, window) import from here and never from each other.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = 1.4426950408889634
# What the kernels compute in (float32 accumulation throughout); float64 callers use the reference operator.
KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def next_pow2(x: int) -> int:
    """Smallest power of two >= x (>= 1)."""
    return 1 << max(0, int(x) - 1).bit_length()


def dot_precision(x: Tensor) -> str:
    """Matrix-product precision for the kernels: exact float32 ("ieee") for float32 inputs, so that float32
    callers get float32 accuracy rather than tf32; bf16 / fp16 products are exact either way."""
    return "ieee" if x.dtype == torch.float32 else "tf32"


def kernel_input(x: Tensor) -> Tensor:
    """x with a unit stride in its last dim (the kernels take the other strides as arguments)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def tile_shape(group: int, rows: int) -> tuple[int, int]:
    """(BLOCK_M, tokens per tile) for about `rows` matrix rows of `group` query heads each: BLOCK_M is a power of
    two >= 16 holding tokens * group rows (a 7:1 group fills the tensor-core tile without padding heads)."""
    block_m = max(rows, next_pow2(group), 16)
    return block_m, block_m // group


def pack(x: Tensor, cu_seqlens: Tensor | None) -> tuple[Tensor, Tensor]:
    """x [B, T, ...] -> (x [B*T, ...], int32 cu_seqlens [N+1] on x's device); cu_seqlens None means
    [0, T, 2T, ...] (every batch row its own sequence)."""
    batch, seq_len = x.shape[:2]
    if cu_seqlens is None:
        cu_seqlens = torch.arange(0, (batch + 1) * seq_len, seq_len, dtype=torch.int32, device=x.device)
    return x.reshape(batch * seq_len, *x.shape[2:]), cu_seqlens.to(device=x.device, dtype=torch.int32)


@triton.jit
def searchsorted_right(sorted_ptr, x, n, n_iter):
    """Per element of x: how many of the ascending values sorted[0:n] are <= x (torch.searchsorted with
    right=True), by bisection; n_iter >= n.bit_length() halvings."""
    lo = tl.zeros_like(x)
    hi = lo + n
    for _ in range(n_iter):
        open_ = lo < hi
        mid = (lo + hi) // 2
        above = tl.load(sorted_ptr + mid, mask=open_, other=0) > x
        hi = tl.where(open_ & above, mid, hi)
        lo = tl.where(open_ & ~above, mid + 1, lo)
    return lo


def offsets32(cu_seqlens: Tensor) -> Tensor:
    """cu_seqlens as the contiguous int32 tensor the index kernels read (itself when it already is one)."""
    return cu_seqlens.to(torch.int32).contiguous()


def sequence_units(cu_seqlens: Tensor, unit: int) -> Tensor:
    """int32 [N + 1]: where each sequence's run of `unit`-token pieces (tiles, key blocks) starts when they
    are numbered sequence by sequence (ceil(length / unit) per sequence); the last entry is the total. One
    small kernel, no host sync."""
    cu_seqlens = offsets32(cu_seqlens)
    n_seqs = cu_seqlens.numel() - 1
    first = torch.empty(n_seqs + 1, dtype=torch.int32, device=cu_seqlens.device)
    _units_prefix_kernel[(1,)](cu_seqlens, first, n_seqs, unit, BLOCK=1024)
    return first


@triton.jit
def _units_prefix_kernel(cu_ptr, first_ptr, n_seqs, unit, BLOCK: tl.constexpr):
    """One program: the exclusive running sum of ceil(length / unit) over the sequences, BLOCK at a time."""
    tl.store(first_ptr, 0)
    carry = tl.zeros([], dtype=tl.int32)
    for s0 in range(0, n_seqs, BLOCK):
        s = s0 + tl.arange(0, BLOCK)
        ok = s < n_seqs
        length = tl.load(cu_ptr + s + 1, mask=ok, other=0) - tl.load(cu_ptr + s, mask=ok, other=0)
        units = (length + unit - 1) // unit
        tl.store(first_ptr + s + 1, carry + tl.cumsum(units, 0), mask=ok)
        carry += tl.sum(units, 0)


def tiles_of(
    cu_seqlens: Tensor, tokens_per_tile: int, max_tiles: int | None = None, units: Tensor | None = None
) -> Tensor:
    """Split every sequence into tiles of `tokens_per_tile` consecutive tokens (the last one may be shorter).

    cu_seqlens: int32 [N+1] on the kernels' device.
    Returns int32 [n_tiles, 4]: (packed row of the tile's first token, tokens in the tile, packed row where
    the tile's sequence starts, packed row where it ends). Two small kernels; one host sync for the tile
    count, or none when the caller gives `max_tiles` (an upper bound such as `max_tiles_of`): the table then
    has max_tiles rows, those past the real tiles empty (T, 0, T, T). units: `sequence_units(cu_seqlens,
    tokens_per_tile)` if the caller has it.
    """
    cu_seqlens = offsets32(cu_seqlens)
    n_seqs = cu_seqlens.numel() - 1
    first = sequence_units(cu_seqlens, tokens_per_tile) if units is None else units
    n_tiles = int(first[-1]) if max_tiles is None else max_tiles
    tiles = torch.empty((n_tiles, 4), dtype=torch.int32, device=cu_seqlens.device)
    if n_tiles:
        block = 256
        _tiles_kernel[(triton.cdiv(n_tiles, block),)](
            cu_seqlens, first, tiles, n_tiles, n_seqs, n_seqs.bit_length(), tokens_per_tile, BLOCK=block
        )
    return tiles


@triton.jit
def _tiles_kernel(cu_ptr, first_ptr, tiles_ptr, n_tiles, n_seqs, n_iter, tokens_per_tile, BLOCK: tl.constexpr):
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = r < n_tiles
    # Tile r belongs to the sequence whose run of tiles holds it; rows past the real tiles get the last one.
    seq = tl.minimum(searchsorted_right(first_ptr + 1, r, n_seqs, n_iter), n_seqs - 1)
    real = r < tl.load(first_ptr + n_seqs)
    end = tl.load(cu_ptr + n_seqs)
    seq_start = tl.load(cu_ptr + seq, mask=ok, other=0)
    seq_end = tl.load(cu_ptr + seq + 1, mask=ok, other=0)
    row0 = seq_start + (r - tl.load(first_ptr + seq, mask=ok, other=0)) * tokens_per_tile
    count = tl.where(real, tl.minimum(seq_end - row0, tokens_per_tile), 0)
    out = tiles_ptr + r.to(tl.int64) * 4
    tl.store(out, tl.where(real, row0, end), mask=ok)
    tl.store(out + 1, count, mask=ok)
    tl.store(out + 2, tl.where(real, seq_start, end), mask=ok)
    tl.store(out + 3, tl.where(real, seq_end, end), mask=ok)


def max_tiles_of(total: int, n_seqs: int, tokens_per_tile: int) -> int:
    """Upper bound on the tiles of `n_seqs` sequences of `total` tokens in all (no device data needed): each
    sequence adds at most one partial tile."""
    return total // tokens_per_tile + n_seqs


def bounded_tiles_of(cu_seqlens: Tensor, total: int, tokens_per_tile: int, units: Tensor | None = None) -> Tensor:
    """`tiles_of` sized by `max_tiles_of` for `total` packed tokens: no host sync, so the host keeps queueing
    while the GPU works; the (at most one per sequence) rows past the real tiles are empty (T, 0, T, T), and
    kernels reading them load and store nothing. units: as in `tiles_of`."""
    bound = max_tiles_of(total, cu_seqlens.numel() - 1, tokens_per_tile)
    return tiles_of(cu_seqlens, tokens_per_tile, bound, units=units)



def query_tiles(cu_seqlens: Tensor, tile: int, total: int | None = None) -> Tensor:
    """int32 [n_tiles, 2]: (sequence, first position within it) of every tile of `tiles_of`: the same tiles in
    the form of the kernels that look up per-sequence offsets themselves (compression, top-k).

    The row count needs one device->host sync (`tiles_of`'s), except for a single sequence whose length `total`
    (the packed tensors' first dimension) the caller passes: then everything is known on the host and nothing
    waits for the device.
    """
    if total is not None and cu_seqlens.numel() == 2:
        n_tiles = triton.cdiv(total, tile)
        first = torch.arange(0, n_tiles * tile, tile, dtype=torch.int32, device=cu_seqlens.device)
        return torch.stack([torch.zeros_like(first), first], dim=1)
    cu_seqlens = offsets32(cu_seqlens)
    tiles = tiles_of(cu_seqlens, tile)
    # A tile's sequence: the number of sequence ends at or before its first row (empty sequences end there too).
    first_rows = tiles[:, 0].contiguous()
    seq = torch.searchsorted(cu_seqlens[1:], first_rows, right=True)
    return torch.stack([seq.to(torch.int32), first_rows - tiles[:, 2]], dim=1).contiguous()


def key_tiles(tiles: Tensor, cu_seqlens: Tensor, cu_seqlens_k: Tensor | None) -> Tensor:
    """The key side of a `tiles_of` table of query tiles, for queries that end a longer key sequence.

    tiles: int32 [n_tiles, 4] from `tiles_of(cu_seqlens, ...)` (query rows); cu_seqlens_k: int32 [N+1], the
    keys' offsets of the same sequences (each sequence's queries are its last keys), or None.
    Returns int32 [n_tiles, 4]: (key row of the tile's first query, tokens in the tile, key row where its
    sequence starts, key row where it ends). Query row r of sequence s has key row r + cu_seqlens_k[s+1] -
    cu_seqlens[s+1] (the ends line up). With cu_seqlens_k None the keys are the queries: `tiles` itself, so the
    kernels read the same numbers as before. No host sync.
    """
    if cu_seqlens_k is None:
        return tiles
    cu_q, cu_k = offsets32(cu_seqlens), offsets32(cu_seqlens_k)
    n_seqs = cu_q.numel() - 1
    # Rows past the real tiles (first row T, 0 tokens) map to the last sequence: they load nothing.
    seq = torch.searchsorted(cu_q[1:], tiles[:, 0].contiguous(), right=True).clamp(max=n_seqs - 1)
    shift = (cu_k[1:] - cu_q[1:])[seq]
    out = torch.stack([tiles[:, 0] + shift, tiles[:, 1], cu_k[:-1][seq], cu_k[1:][seq]], dim=1)
    return out.to(torch.int32).contiguous()


def row_dot(o: Tensor, do: Tensor, *, block_rows: int = 64) -> Tensor:
    """delta [T, H] float32 = sum_d o * do, for o, do [T, H, D] (the softmax backward's row term).

    block_rows: rows per program. The float32 sum's order follows the program's layout, so a caller that must
    reproduce earlier results keeps its block_rows (the compression backward uses 16).
    """
    o, do = o.contiguous(), do.contiguous()
    rows = o.shape[0] * o.shape[1]
    delta = torch.empty(o.shape[:2], dtype=torch.float32, device=o.device)
    if rows == 0:
        return delta
    _row_dot_kernel[(triton.cdiv(rows, block_rows),)](
        o, do, delta, rows, o.shape[2], BLOCK_R=block_rows, BLOCK_D=max(16, next_pow2(o.shape[2])), num_warps=4
    )
    return delta


@triton.jit
def _row_dot_kernel(o_ptr, do_ptr, delta_ptr, rows, head_dim, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    d = tl.arange(0, BLOCK_D)
    mask = (r < rows)[:, None] & (d < head_dim)[None, :]
    offs = r.to(tl.int64)[:, None] * head_dim + d[None, :]
    o = tl.load(o_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(do_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(delta_ptr + r, tl.sum(o * do, axis=1), mask=r < rows)


__all__ = [
    "KERNEL_DTYPES", "LOG2E", "bounded_tiles_of", "dot_precision", "kernel_input", "key_tiles", "max_tiles_of",
    "next_pow2", "offsets32", "pack", "query_tiles", "row_dot", "searchsorted_right", "sequence_units", "tile_shape",
    "tiles_of",
]
