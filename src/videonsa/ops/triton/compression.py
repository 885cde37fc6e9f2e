"""Compression branch of NSA in Triton: block mean pooling and attention over the compressed keys.

All tensors are packed varlen (see `utils.pack`): q [total_T, HQ, D], k/v [total_T, HKV, D], cu_seqlens int32
[N+1]. Compressed keys are packed the same way: k_cmp/v_cmp [total_NB, HKV, D] where sequence s owns the rows
cu_cmp[s]..cu_cmp[s+1]-1, one per complete block (L_s // block_size of them).

Query t of a sequence sees compressed block j iff (j+1)*block_size <= t+1, i.e. j < (t+1) // block_size.

The attention kernels give one program a tile of consecutive queries of one sequence with all G = HQ/HKV query
heads of one KV head as the rows of the matrix product ("row r = token (r // G), head (r % G)"), so that 7:1
grouping fills the tensor-core M dimension (18 tokens x 7 heads = 126 of 128 rows) without padding heads.
Offsets into the token dimension are int64 so that packed lengths beyond 2^31 / (HQ*D) elements are safe.

Backward is deterministic: dq comes from a query-tile kernel, dK~/dV~ from a key-tile kernel that loops over
the queries of one segment of the sequence and writes a partial sum per segment, summed afterwards in a fixed
order (no float atomics).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from videonsa.ops.triton.utils import LOG2E, dot_precision, next_pow2, query_tiles, row_dot, tile_shape

# ----------------------------------------------------------------------------------------------------------
# Bookkeeping


def compressed_cu_seqlens(cu_seqlens: Tensor, block_size: int) -> Tensor:
    """int32 [N+1] offsets of each sequence's complete blocks in the packed compressed tensors."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    counts = torch.div(lengths, block_size, rounding_mode="floor")
    out = torch.zeros(cu_seqlens.numel(), dtype=torch.int32, device=cu_seqlens.device)
    out[1:] = counts.cumsum(0).to(torch.int32)
    return out


def _block_starts(cu_seqlens: Tensor, cu_cmp: Tensor, block_size: int, total_blocks: int) -> Tensor:
    """int64 [total_NB]: packed token index of the first token of every complete block."""
    counts = (cu_cmp[1:] - cu_cmp[:-1]).long()
    seq = torch.repeat_interleave(
        torch.arange(counts.numel(), device=cu_seqlens.device), counts, output_size=total_blocks
    )
    local = torch.arange(total_blocks, device=cu_seqlens.device) - cu_cmp.long()[seq]
    return cu_seqlens.long()[seq] + local * block_size




# ----------------------------------------------------------------------------------------------------------
# Mean pooling


@triton.jit
def _pool_fwd_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, starts_ptr,
    H: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BLOCK: tl.constexpr, BB: tl.constexpr,
    ONE_SEQ: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    # One sequence at token 0: block n starts at n * BLOCK (no starts tensor to build).
    start = n * BLOCK if ONE_SEQ else tl.load(starts_ptr + n)
    i = tl.arange(0, BB)
    d = tl.arange(0, BD)
    mask = (i[:, None] < BLOCK) & (d[None, :] < D)
    offs = (start + i[:, None]).to(tl.int64) * (H * D) + h * D + d[None, :]
    k_mean = tl.sum(tl.load(k_ptr + offs, mask=mask, other=0.0).to(tl.float32), axis=0) / BLOCK
    v_mean = tl.sum(tl.load(v_ptr + offs, mask=mask, other=0.0).to(tl.float32), axis=0) / BLOCK
    out = n * (H * D) + h * D + d
    tl.store(kc_ptr + out, k_mean.to(kc_ptr.dtype.element_ty), mask=d < D)
    tl.store(vc_ptr + out, v_mean.to(vc_ptr.dtype.element_ty), mask=d < D)


@triton.jit
def _pool_bwd_kernel(
    dkc_ptr, dvc_ptr, dk_ptr, dv_ptr, starts_ptr,
    H: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BLOCK: tl.constexpr, BB: tl.constexpr,
    ONE_SEQ: tl.constexpr,
):
    # dk[t] += dK~[t // b] / b for every token of a complete block; dk already holds the other branches.
    n = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    start = n * BLOCK if ONE_SEQ else tl.load(starts_ptr + n)
    i = tl.arange(0, BB)
    d = tl.arange(0, BD)
    src = n * (H * D) + h * D + d
    dkc = tl.load(dkc_ptr + src, mask=d < D, other=0.0).to(tl.float32) / BLOCK
    dvc = tl.load(dvc_ptr + src, mask=d < D, other=0.0).to(tl.float32) / BLOCK
    mask = (i[:, None] < BLOCK) & (d[None, :] < D)
    offs = (start + i[:, None]).to(tl.int64) * (H * D) + h * D + d[None, :]
    dk = tl.load(dk_ptr + offs, mask=mask, other=0.0).to(tl.float32) + dkc[None, :]
    dv = tl.load(dv_ptr + offs, mask=mask, other=0.0).to(tl.float32) + dvc[None, :]
    tl.store(dk_ptr + offs, dk.to(dk_ptr.dtype.element_ty), mask=mask)
    tl.store(dv_ptr + offs, dv.to(dv_ptr.dtype.element_ty), mask=mask)


def mean_pool_fwd(
    k: Tensor, v: Tensor, cu_seqlens: Tensor, block_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Mean of every complete block of k and v.

    Args:
        k, v: [total_T, HKV, D] packed keys and values.
        cu_seqlens: int32 [N+1] with cu_seqlens[-1] == total_T (with N = 1 the block count is taken from the
            shape, without reading cu_seqlens on the host).
    Returns:
        k_cmp, v_cmp: [total_NB, HKV, D] in k's dtype (accumulated in float32);
        cu_cmp: int32 [N+1] offsets of each sequence's blocks.
    """
    cu_cmp = compressed_cu_seqlens(cu_seqlens, block_size)
    total, heads, head_dim = k.shape
    one_seq = cu_seqlens.numel() == 2
    # One sequence: its block count follows from the shape; several need their lengths (one host sync).
    total_blocks = total // block_size if one_seq else int(cu_cmp[-1])
    k_cmp = k.new_empty(total_blocks, heads, head_dim)
    v_cmp = v.new_empty(total_blocks, heads, head_dim)
    if total_blocks:
        starts = cu_cmp if one_seq else _block_starts(cu_seqlens, cu_cmp, block_size, total_blocks)
        _pool_fwd_kernel[(total_blocks, heads)](
            k, v, k_cmp, v_cmp, starts,
            H=heads, D=head_dim, BD=next_pow2(head_dim), BLOCK=block_size, BB=next_pow2(block_size), ONE_SEQ=one_seq,
            num_warps=4,
        )
    return k_cmp, v_cmp, cu_cmp


def mean_pool_bwd(
    dk_cmp: Tensor,
    dv_cmp: Tensor,
    dk: Tensor,
    dv: Tensor,
    cu_seqlens: Tensor,
    cu_cmp: Tensor,
    block_size: int,
) -> None:
    """Add the gradient of the mean pooling into dk, dv in place.

    dk_cmp, dv_cmp: [total_NB, HKV, D] (any float dtype); dk, dv: [total_T, HKV, D] contiguous accumulators.
    """
    total_blocks, heads, head_dim = dk_cmp.shape
    if not total_blocks:
        return
    one_seq = cu_seqlens.numel() == 2
    starts = cu_cmp if one_seq else _block_starts(cu_seqlens, cu_cmp, block_size, total_blocks)
    _pool_bwd_kernel[(total_blocks, heads)](
        dk_cmp, dv_cmp, dk, dv, starts,
        H=heads, D=head_dim, BD=next_pow2(head_dim), BLOCK=block_size, BB=next_pow2(block_size), ONE_SEQ=one_seq,
        num_warps=4,
    )


# ----------------------------------------------------------------------------------------------------------
# Compressed attention


@triton.jit
def _cmp_fwd_kernel(
    q_ptr, kc_ptr, vc_ptr, o_ptr, lse_ptr, cu_ptr, cuk_ptr, cuc_ptr, tiles_ptr, qk_scale,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    BLOCK: tl.constexpr, BT: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr, PREC: tl.constexpr,
):
    # cu_ptr: the queries' offsets; cuk_ptr: the keys' (the same tensor unless the queries end a longer key
    # sequence: then query i of a sequence sits at key position shift + i, shift = len_k - len_q).
    tile = tl.program_id(0)
    g = tl.program_id(1)
    seq = tl.load(tiles_ptr + 2 * tile)
    start = tl.load(tiles_ptr + 2 * tile + 1)
    bos = tl.load(cu_ptr + seq).to(tl.int64)
    seq_len = (tl.load(cu_ptr + seq + 1) - tl.load(cu_ptr + seq)).to(tl.int32)
    shift = (tl.load(cuk_ptr + seq + 1) - tl.load(cuk_ptr + seq)).to(tl.int32) - seq_len
    cbos = tl.load(cuc_ptr + seq).to(tl.int64)

    r = tl.arange(0, BM)
    idx = start + r // G  # index of row r's query among its sequence's queries
    pos = shift + idx  # its key position within the sequence
    head = g * G + r % G
    row_ok = (r < BT * G) & (idx < seq_len)
    d = tl.arange(0, BD)
    d_ok = d < D
    row_off = (bos + idx).to(tl.int64) * (HQ * D) + head * D
    q = tl.load(q_ptr + row_off[:, None] + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    n_visible = (pos + 1) // BLOCK  # row r sees blocks j < n_visible
    n_loop = (shift + tl.minimum(start + BT, seq_len)) // BLOCK  # blocks any row of the tile sees

    m = tl.full([BM], float("-inf"), dtype=tl.float32)
    acc_l = tl.zeros([BM], dtype=tl.float32)
    acc = tl.zeros([BM, BD], dtype=tl.float32)
    for j0 in range(0, n_loop, BC):
        j = j0 + tl.arange(0, BC)
        kv_off = (cbos + j).to(tl.int64) * (HKV * D) + g * D
        j_ok = j < n_loop
        kt = tl.load(kc_ptr + kv_off[None, :] + d[:, None], mask=j_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q, kt, input_precision=PREC) * qk_scale  # log2 domain
        s = tl.where(j[None, :] < n_visible[:, None], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        acc_l = acc_l * alpha + tl.sum(p, axis=1)
        vc = tl.load(vc_ptr + kv_off[:, None] + d[None, :], mask=j_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(vc.dtype), vc, input_precision=PREC)
        m = m_new

    seen = acc_l > 0.0
    o = acc / tl.where(seen, acc_l, 1.0)[:, None]
    lse = tl.where(seen, (m + tl.log2(tl.where(seen, acc_l, 1.0))) / 1.4426950408889634, float("-inf"))
    # Output addresses and mask rebuilt from a loop result, so that the compiler cannot reuse (and keep live
    # in registers across the loop) the [BM, BD] offsets and mask of the q load.
    out_ok = row_ok & (acc_l >= 0.0)
    out_off = row_off + (acc_l < 0.0).to(tl.int64)
    tl.store(o_ptr + (out_off[:, None] + d[None, :].to(tl.int64)), o.to(o_ptr.dtype.element_ty),
             mask=out_ok[:, None] & (d[None, :] < D))
    tl.store(lse_ptr + (bos + idx).to(tl.int64) * HQ + head, lse, mask=row_ok)


@triton.jit
def _cmp_delta_kernel(
    q_ptr, kc_ptr, vc_ptr, lse_ptr, do_ptr, dos_ptr, delta_ptr, cu_ptr, cuc_ptr, tiles_ptr, qk_scale,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    BLOCK: tl.constexpr, BT: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr, PREC: tl.constexpr,
    DO_SCALE: tl.constexpr,
):
    # delta = sum_d o_cmp * do = sum_j p_j (do . V~_j): the forward kernel's loop with the saved lse in place of
    # the online max/sum (p is final at once, so no rescaling), and do V~^T in place of p V~, so the only
    # accumulator is one float32 per row instead of a [BM, BD] o_cmp tile, and p is never rounded to feed a
    # matrix product. Both products per step have the same shape ([BM, BD] tile in registers times a [BD, BC]
    # transposed key/value tile), as many FLOPs as q K~^T plus p V~.
    tile = tl.program_id(0)
    g = tl.program_id(1)
    seq = tl.load(tiles_ptr + 2 * tile)
    start = tl.load(tiles_ptr + 2 * tile + 1)
    bos = tl.load(cu_ptr + seq).to(tl.int64)
    seq_len = (tl.load(cu_ptr + seq + 1) - tl.load(cu_ptr + seq)).to(tl.int32)
    cbos = tl.load(cuc_ptr + seq).to(tl.int64)

    r = tl.arange(0, BM)
    pos = start + r // G
    head = g * G + r % G
    row_ok = (r < BT * G) & (pos < seq_len)
    d = tl.arange(0, BD)
    d_ok = d < D
    row_off = (bos + pos).to(tl.int64) * (HQ * D) + head * D
    q = tl.load(q_ptr + row_off[:, None] + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    stat_off = (bos + pos).to(tl.int64) * HQ + head
    do = tl.load(do_ptr + row_off[:, None] + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    lse2 = tl.load(lse_ptr + stat_off, mask=row_ok, other=0.0) * 1.4426950408889634
    n_visible = tl.where(row_ok, (pos + 1) // BLOCK, 0)  # rows with lse = -inf see nothing: p masked to 0
    n_loop = tl.minimum(start + BT, seq_len) // BLOCK

    delta = tl.zeros([BM], dtype=tl.float32)
    for j0 in range(0, n_loop, BC):
        j = j0 + tl.arange(0, BC)
        kv_off = (cbos + j).to(tl.int64) * (HKV * D) + g * D
        kv_mask = (j < n_loop)[None, :] & d_ok[:, None]
        kt = tl.load(kc_ptr + kv_off[None, :] + d[:, None], mask=kv_mask, other=0.0)
        vt = tl.load(vc_ptr + kv_off[None, :] + d[:, None], mask=kv_mask, other=0.0)
        s = tl.dot(q, kt, input_precision=PREC) * qk_scale
        p = tl.where(j[None, :] < n_visible[:, None], tl.exp2(s - lse2[:, None]), 0.0)
        dpv = tl.dot(do, vt, input_precision=PREC)  # [BM, BC]: do . V~_j
        delta += tl.sum(p * dpv, axis=1)

    if DO_SCALE:
        delta = delta * tl.load(dos_ptr + stat_off, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(delta_ptr + stat_off, delta, mask=row_ok)


@triton.jit
def _cmp_bwd_dq_kernel(
    q_ptr, kc_ptr, vc_ptr, do_ptr, dos_ptr, lse_ptr, delta_ptr, dq_ptr, cu_ptr, cuc_ptr, tiles_ptr, qk_scale, scale,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    BLOCK: tl.constexpr, BT: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr, PREC: tl.constexpr,
    ACCUMULATE: tl.constexpr, DO_SCALE: tl.constexpr,
):
    tile = tl.program_id(0)
    g = tl.program_id(1)
    seq = tl.load(tiles_ptr + 2 * tile)
    start = tl.load(tiles_ptr + 2 * tile + 1)
    bos = tl.load(cu_ptr + seq).to(tl.int64)
    seq_len = (tl.load(cu_ptr + seq + 1) - tl.load(cu_ptr + seq)).to(tl.int32)
    cbos = tl.load(cuc_ptr + seq).to(tl.int64)

    r = tl.arange(0, BM)
    pos = start + r // G
    head = g * G + r % G
    row_ok = (r < BT * G) & (pos < seq_len)
    d = tl.arange(0, BD)
    d_ok = d < D
    row_off = (bos + pos).to(tl.int64) * (HQ * D) + head * D
    tile_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + row_off[:, None] + d[None, :], mask=tile_mask, other=0.0)
    do = tl.load(do_ptr + row_off[:, None] + d[None, :], mask=tile_mask, other=0.0)
    stat_off = (bos + pos).to(tl.int64) * HQ + head
    if DO_SCALE:
        # The caller's upstream gradient is do * do_scale (e.g. the gate times the operator's do). It enters
        # only through dp = do_scale * (do . V~^T): the float32 dp rows are scaled in the loop, so the do tile
        # stays the loaded operand (no float32 [BM, BD] product and re-rounded copy in registers).
        dos = tl.load(dos_ptr + stat_off, mask=row_ok, other=0.0).to(tl.float32)
    lse2 = tl.load(lse_ptr + stat_off, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(delta_ptr + stat_off, mask=row_ok, other=0.0)
    n_visible = tl.where(row_ok, (pos + 1) // BLOCK, 0)
    n_loop = tl.minimum(start + BT, seq_len) // BLOCK

    dq = tl.zeros([BM, BD], dtype=tl.float32)
    token = tl.zeros([1], dtype=tl.float32)  # loop-carried, opaque to the compiler: see the stores below
    for j0 in range(0, n_loop, BC):
        token += 1.0
        j = j0 + tl.arange(0, BC)
        kv_off = (cbos + j).to(tl.int64) * (HKV * D) + g * D
        j_ok = j < n_loop
        kt = tl.load(kc_ptr + kv_off[None, :] + d[:, None], mask=j_ok[None, :] & d_ok[:, None], other=0.0)
        vt = tl.load(vc_ptr + kv_off[None, :] + d[:, None], mask=j_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q, kt, input_precision=PREC) * qk_scale
        p = tl.where(j[None, :] < n_visible[:, None], tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, vt, input_precision=PREC)
        if DO_SCALE:
            dp = dp * dos[:, None]
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PREC)
    dq = dq * scale
    # Addresses and mask rebuilt from the loop's token so that the [BM, BD] ones of the q/do loads are not
    # kept live in registers across the loop.
    out_ptr = dq_ptr + ((row_off + (token < 0.0).to(tl.int64))[:, None] + d[None, :].to(tl.int64))
    out_mask = (row_ok & (token >= 0.0))[:, None] & (d[None, :] < D)
    if ACCUMULATE:
        dq += tl.load(out_ptr, mask=out_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr, dq.to(dq_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _cmp_bwd_dkv_kernel(
    q_ptr, kc_ptr, vc_ptr, do_ptr, dos_ptr, lse_ptr, delta_ptr, dkc_ptr, dvc_ptr, cu_ptr, cuc_ptr, ktiles_ptr,
    qk_scale, scale, seg_len, total_blocks,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    BLOCK: tl.constexpr, BT: tl.constexpr, BM: tl.constexpr, BKC: tl.constexpr, PREC: tl.constexpr,
    DO_SCALE: tl.constexpr,
):
    # One program: BKC compressed blocks of one sequence and KV head, against the queries of segment `seg`
    # of that sequence; writes its partial dK~, dV~ to slot `seg` of the [n_seg, total_NB, HKV, D] buffers.
    ktile = tl.program_id(0)
    seg = tl.program_id(1)
    g = tl.program_id(2)
    seq = tl.load(ktiles_ptr + 2 * ktile)
    jstart = tl.load(ktiles_ptr + 2 * ktile + 1)
    bos = tl.load(cu_ptr + seq).to(tl.int64)
    seq_len = (tl.load(cu_ptr + seq + 1) - tl.load(cu_ptr + seq)).to(tl.int32)
    cbos = tl.load(cuc_ptr + seq).to(tl.int64)
    n_blocks = (tl.load(cuc_ptr + seq + 1) - tl.load(cuc_ptr + seq)).to(tl.int32)

    j = jstart + tl.arange(0, BKC)
    j_ok = j < n_blocks
    d = tl.arange(0, BD)
    d_ok = d < D
    kv_off = (cbos + j).to(tl.int64) * (HKV * D) + g * D
    kv_mask = j_ok[:, None] & d_ok[None, :]
    kc = tl.load(kc_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
    vc = tl.load(vc_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BKC, BD], dtype=tl.float32)
    dv = tl.zeros([BKC, BD], dtype=tl.float32)

    # Queries before (jstart+1)*BLOCK - 1 see none of these blocks.
    lo = tl.maximum(seg * seg_len, (jstart + 1) * BLOCK - 1)
    hi = tl.minimum((seg + 1) * seg_len, seq_len)
    # Row r of a step is token t0 + r // G, head g*G + r % G: its q/do address is a per-step scalar (t0) plus a
    # loop-invariant int32 offset, so no [BM, BD] int64 address tensor is rebuilt (and kept in registers) per
    # step. On sm_90 this took the 8-warp 32x128 tile from spilling to 231 registers, none spilled.
    r = tl.arange(0, BM)
    tok = r // G
    r_ok = r < BT * G
    inner = tok * (HQ * D) + (r % G) * D  # [BM] int32 (< BT * HQ * D); broadcast over d inside the loop
    stat_inner = tok * HQ + r % G
    token = tl.zeros([1], dtype=tl.float32)  # loop-carried, opaque to the compiler: see the stores below
    for t0 in range(lo, hi, BT):
        token += 1.0
        pos = t0 + tok
        row_ok = r_ok & (pos < hi)
        row0 = (bos + t0) * HQ + g * G  # int64 (token, head) row of token t0, head g*G
        tile_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_ptr + row0 * D + inner[:, None] + d[None, :], mask=tile_mask, other=0.0)
        do = tl.load(do_ptr + row0 * D + inner[:, None] + d[None, :], mask=tile_mask, other=0.0)
        stat_off = row0 + stat_inner
        lse2 = tl.load(lse_ptr + stat_off, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_ptr + stat_off, mask=row_ok, other=0.0)
        n_visible = tl.where(row_ok, (pos + 1) // BLOCK, 0)
        st = tl.dot(kc, tl.trans(q), input_precision=PREC) * qk_scale  # [BKC, BM]
        pt = tl.where(j[:, None] < n_visible[None, :], tl.exp2(st - lse2[None, :]), 0.0)
        # do_scale g (upstream gradient g * do) without touching the do tile: dV~ += (p g)^T do and
        # dp = g (V~ do^T) scale the float32 [BKC, BM] columns that are in registers anyway. Of the equivalent
        # forms, ds = (p g) dp - p delta with p g shared by both products is the one that does not spill
        # registers on sm_90 (32x128 tile, 8 warps, 3 stages, bf16 D=128), and dV~ comes before dK~ for the same
        # reason.
        if DO_SCALE:
            dos = tl.load(dos_ptr + stat_off, mask=row_ok, other=0.0).to(tl.float32)
            pg = pt * dos[None, :]
            dv += tl.dot(pg.to(do.dtype), do, input_precision=PREC)
            dpt = tl.dot(vc, tl.trans(do), input_precision=PREC)
            dst = pg * dpt - pt * delta[None, :]
            dk += tl.dot(dst.to(q.dtype), q, input_precision=PREC)
        else:
            dv += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
            dpt = tl.dot(vc, tl.trans(do), input_precision=PREC)
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(q.dtype), q, input_precision=PREC)

    # Fresh (not CSE-able) [BKC, BD] mask and offsets, so the kc/vc loads' ones are not live across the loop.
    out = (seg.to(tl.int64) * total_blocks + cbos + j) * (HKV * D) + g * D
    out_off = out[:, None] + d[None, :]
    tl.store(dkc_ptr + out_off, dk * scale, mask=kv_mask)
    tl.store(dvc_ptr + out_off, dv, mask=kv_mask)


@dataclass(frozen=True)
class KernelLaunch:
    """Launch of one compression kernel: matrix rows per query tile (tokens x the G heads of a group), keys per
    step (compressed keys per program for dK~/dV~), warps and pipeline stages."""

    rows: int
    keys: int
    warps: int
    stages: int


@dataclass(frozen=True)
class CompressionSettings:
    """Launch settings of the compression kernels, chosen from the sm_90 register reports (no spills) and the
    H100 timings of benchmarks/tune/tune_compression.py; results in docs/performance.md.

    dkv_min_segment, dkv_max_segments: the dK~/dV~ programs walk segments of at least min_segment query tokens,
    at most max_segments per sequence, each writing a float32 partial sum (max_segments * total_NB * HKV * D
    floats for each of dK~ and dV~) summed afterwards in a fixed order: segments balance the causal triangle
    without float atomics.
    """

    fwd: KernelLaunch = KernelLaunch(rows=64, keys=64, warps=4, stages=3)
    delta: KernelLaunch = KernelLaunch(rows=128, keys=32, warps=8, stages=3)
    dq: KernelLaunch = KernelLaunch(rows=128, keys=32, warps=8, stages=2)
    dkv: KernelLaunch = KernelLaunch(rows=32, keys=128, warps=8, stages=3)
    dkv_min_segment: int = 2048
    dkv_max_segments: int = 32


COMPRESSION_SETTINGS = CompressionSettings()


def compressed_attention_fwd(
    q: Tensor,
    k_cmp: Tensor,
    v_cmp: Tensor,
    cu_seqlens: Tensor,
    cu_cmp: Tensor,
    block_size: int,
    scale: float,
    settings: CompressionSettings = COMPRESSION_SETTINGS,
    cu_seqlens_k: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention of every query over the compressed blocks it can see.

    Args:
        q: [total_T, HQ, D]; k_cmp, v_cmp: [total_NB, HKV, D] from `mean_pool_fwd`.
        cu_seqlens, cu_cmp: int32 [N+1] query and compressed-block offsets.
        settings: launch settings (`CompressionSettings.fwd`).
        cu_seqlens_k: int32 [N+1] offsets of the keys k_cmp was pooled from, when the queries are the last
            part of longer key sequences (docs/operator.md); None: the queries are the keys' tokens.
    Returns:
        o: [total_T, HQ, D] in q's dtype (zeros where no block is visible);
        lse: float32 [total_T, HQ], natural log-sum-exp of the scaled scores (-inf where none is visible).
    """
    total, heads_q, head_dim = q.shape
    heads_kv = k_cmp.shape[1]
    group = heads_q // heads_kv
    o = torch.empty_like(q)
    lse = torch.empty(total, heads_q, dtype=torch.float32, device=q.device)
    cfg = settings.fwd
    bm, bt = tile_shape(group, cfg.rows if head_dim <= 128 else 64)
    tiles = query_tiles(cu_seqlens, bt, total)
    _cmp_fwd_kernel[(tiles.shape[0], heads_kv)](
        q, k_cmp, v_cmp, o, lse, cu_seqlens, cu_seqlens if cu_seqlens_k is None else cu_seqlens_k, cu_cmp, tiles,
        scale * LOG2E,
        HQ=heads_q, HKV=heads_kv, G=group, D=head_dim, BD=next_pow2(max(head_dim, 16)),
        BLOCK=block_size, BT=bt, BM=bm, BC=cfg.keys, PREC=dot_precision(q),
        num_warps=cfg.warps, num_stages=cfg.stages,
    )
    return o, lse


def compressed_attention_delta(
    q: Tensor,
    k_cmp: Tensor,
    v_cmp: Tensor,
    lse: Tensor,
    do: Tensor,
    cu_seqlens: Tensor,
    cu_cmp: Tensor,
    block_size: int,
    scale: float,
    do_scale: Tensor | None = None,
    settings: CompressionSettings = COMPRESSION_SETTINGS,
) -> Tensor:
    """The compression backward's softmax delta without o_cmp in memory: sum_d o_cmp * do (times do_scale).

    Never forms o_cmp: from the saved lse, each step computes P = softmax(q K~^T) and do V~^T for a tile of
    compressed keys and adds the row sums of their product (sum_j p_j (do . V~_j) = sum_d o_cmp * do).

    Args:
        q, do: [total_T, HQ, D]; k_cmp, v_cmp: [total_NB, HKV, D]; lse: float32 [total_T, HQ] from
            `compressed_attention_fwd` with the same scale; cu_seqlens, cu_cmp: int32 [N+1].
        do_scale: optional [total_T, HQ] (any float dtype); the result is multiplied by it.
        settings: launch settings (`CompressionSettings.delta`).
    Returns:
        float32 [total_T, HQ]; 0 for rows that see no compressed block.
    """
    total, heads_q, head_dim = q.shape
    heads_kv = k_cmp.shape[1]
    group = heads_q // heads_kv
    delta = torch.empty(total, heads_q, dtype=torch.float32, device=q.device)
    cfg = settings.delta
    bm, bt = tile_shape(group, cfg.rows if head_dim <= 128 else 64)
    tiles = query_tiles(cu_seqlens, bt, total)
    do = do.contiguous()
    dos = do_scale.contiguous() if do_scale is not None else delta
    _cmp_delta_kernel[(tiles.shape[0], heads_kv)](
        q, k_cmp, v_cmp, lse, do, dos, delta, cu_seqlens, cu_cmp, tiles, scale * LOG2E,
        HQ=heads_q, HKV=heads_kv, G=group, D=head_dim, BD=next_pow2(max(head_dim, 16)),
        BLOCK=block_size, BT=bt, BM=bm, BC=cfg.keys, PREC=dot_precision(q),
        DO_SCALE=do_scale is not None, num_warps=cfg.warps, num_stages=cfg.stages,
    )
    return delta


def compressed_attention_bwd(
    q: Tensor,
    k_cmp: Tensor,
    v_cmp: Tensor,
    o: Tensor | None,
    lse: Tensor,
    do: Tensor,
    cu_seqlens: Tensor,
    cu_cmp: Tensor,
    block_size: int,
    scale: float,
    dq: Tensor | None = None,
    delta: Tensor | None = None,
    do_scale: Tensor | None = None,
    settings: CompressionSettings = COMPRESSION_SETTINGS,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of `compressed_attention_fwd`.

    Args:
        q, o, do: [total_T, HQ, D]; k_cmp, v_cmp: [total_NB, HKV, D]; lse: float32 [total_T, HQ].
            `o` is only read to compute a missing delta (pass None with a delta).
        dq: optional [total_T, HQ, D] accumulator; dq_cmp is added in place (float32 sum), and it is returned.
        delta: optional float32 [total_T, HQ] = sum_d do' * o when the caller already has it (do' below).
        do_scale: optional [total_T, HQ] (any float dtype): the upstream gradient is then
            do'[t, h, :] = do[t, h, :] * do_scale[t, h], never materialised: the kernels scale the float32
            rows of dp = do V~^T and of P (for dV~ = (P g)^T do) instead of the do tile; a missing delta is
            do_scale * sum_d o * do.
        settings: launch settings (`CompressionSettings.dq`, `dkv` and the dK~/dV~ segments).
    Returns:
        dq [total_T, HQ, D] (q's dtype unless `dq` was given), dk_cmp and dv_cmp float32 [total_NB, HKV, D].
    """
    total, heads_q, head_dim = q.shape
    total_blocks, heads_kv, _ = k_cmp.shape
    group = heads_q // heads_kv
    do = do.contiguous()
    if delta is None:
        delta = row_dot(do, o, block_rows=16)
        if do_scale is not None:
            delta = delta * do_scale.float()
    dos = do_scale.contiguous() if do_scale is not None else delta
    accumulate = dq is not None
    if dq is None:
        dq = torch.empty_like(q)
    prec = dot_precision(q)
    bd = next_pow2(max(head_dim, 16))
    cfg = settings.dq
    bm, bt = tile_shape(group, cfg.rows if head_dim <= 128 else 64)
    tiles = query_tiles(cu_seqlens, bt, total)
    _cmp_bwd_dq_kernel[(tiles.shape[0], heads_kv)](
        q, k_cmp, v_cmp, do, dos, lse, delta, dq, cu_seqlens, cu_cmp, tiles, scale * LOG2E, scale,
        HQ=heads_q, HKV=heads_kv, G=group, D=head_dim, BD=bd,
        BLOCK=block_size, BT=bt, BM=bm, BC=cfg.keys, PREC=prec, ACCUMULATE=accumulate,
        DO_SCALE=do_scale is not None,
        num_warps=cfg.warps, num_stages=cfg.stages,
    )

    # Query segments bound each dK~/dV~ program's loop (load balance across the causal triangle) and the
    # partial-sum buffer: n_seg * total_NB * HKV * D float32 each for dk and dv.
    max_len = total if cu_seqlens.numel() == 2 else int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    cfg = settings.dkv
    bm_kv, bt_kv = tile_shape(group, cfg.rows)
    seg_len = max(settings.dkv_min_segment, triton.cdiv(max_len, settings.dkv_max_segments))
    seg_len = triton.cdiv(seg_len, bt_kv) * bt_kv
    n_seg = triton.cdiv(max_len, seg_len)
    # Every (segment, block) slot is written, zeros by programs whose segment is before their blocks: no memset.
    dk_parts = torch.empty(n_seg, total_blocks, heads_kv, head_dim, dtype=torch.float32, device=q.device)
    dv_parts = torch.empty_like(dk_parts)
    if total_blocks:
        ktiles = query_tiles(cu_cmp, cfg.keys, total_blocks)
        _cmp_bwd_dkv_kernel[(ktiles.shape[0], n_seg, heads_kv)](
            q, k_cmp, v_cmp, do, dos, lse, delta, dk_parts, dv_parts, cu_seqlens, cu_cmp, ktiles,
            scale * LOG2E, scale, seg_len, total_blocks,
            HQ=heads_q, HKV=heads_kv, G=group, D=head_dim, BD=bd,
            BLOCK=block_size, BT=bt_kv, BM=bm_kv, BKC=cfg.keys, PREC=prec, DO_SCALE=do_scale is not None,
            num_warps=cfg.warps, num_stages=cfg.stages,
        )
    if n_seg == 1:
        return dq, dk_parts[0], dv_parts[0]
    return dq, dk_parts.sum(0), dv_parts.sum(0)


__all__ = [
    "COMPRESSION_SETTINGS",
    "CompressionSettings",
    "KernelLaunch",
    "compressed_attention_bwd",
    "compressed_attention_delta",
    "compressed_attention_fwd",
    "compressed_cu_seqlens",
    "mean_pool_bwd",
    "mean_pool_fwd",
]
