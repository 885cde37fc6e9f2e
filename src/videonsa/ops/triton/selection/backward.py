"""dk/dv of the selection branch: one program per (key block, KV group) walks the tokens that selected the block
(`lists.inverse_lists`), gathering their query rows in chunks of BT tokens x G heads. Each program owns its keys,
so dk/dv need no atomics and are deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from videonsa.ops.triton.selection.lists import ListPieces, default_dkdv_split, split_lists
from videonsa.ops.triton.selection.plan import block_n
from videonsa.ops.triton.selection.settings import SELECTION_SETTINGS, SelectionSettings
from videonsa.ops.triton.utils import LOG2E, dot_precision, next_pow2, tile_shape


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
    # The block-major forward repeats this prologue: a shared @triton.jit helper for it made this kernel slower
    # (same outputs bit for bit), so each kernel keeps its own copy.
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
    # them (loading the next rows ahead as well spills registers and is much slower).
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


def launch_dkdv(
    q: Tensor, k: Tensor, v: Tensor, do: Tensor, lse: Tensor, delta: Tensor, key_blocks: Tensor,
    offsets: Tensor, tokens: Tensor, block_size: int, scale: float, *, do_scale: Tensor | None = None,
    pieces: ListPieces | None = None, settings: SelectionSettings = SELECTION_SETTINGS,
) -> tuple[Tensor, Tensor]:
    """The dk/dv kernels over the inverse lists (`inverse_lists`); returns dk, dv [T, HKV, D]. do_scale
    [T, HQ] contiguous or None: as in `launch_dq`. pieces: `split_lists` of these lists made earlier, so that
    its host read overlaps the work queued since; None: made here, cut at `default_dkdv_split` tokens.
    settings: `dkdv_rows` query rows per step, `dkdv_split`, the launch (`dkdv_warps`, `dkdv_stages`).

    Lists longer than the split (blocks that many queries chose, e.g. attention sinks) are cut into
    pieces run by separate programs, whose float32 partial sums a second kernel adds in a fixed order, so
    one heavy block cannot stall the whole launch and the result stays deterministic.
    """
    heads_q, head_dim = q.shape[1], q.shape[2]
    heads_kv = k.shape[1]
    group = heads_q // heads_kv
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    keys = block_n(block_size)
    block_d = max(16, next_pow2(head_dim))
    n_sub = block_size // keys
    if pieces is None:
        pieces = split_lists(offsets, default_dkdv_split(tokens.numel(), settings), tokens.numel())
    n_parts = pieces.n_parts.tolist()[0]  # waits for that copy only: the work queued before goes on
    part_shape = (max(n_parts, 1), n_sub, keys, block_d)
    dk_part = torch.empty(part_shape, dtype=torch.float32, device=q.device)
    dv_part = torch.empty(part_shape, dtype=torch.float32, device=q.device)
    block_m, bt = tile_shape(group, settings.dkdv_rows)
    warps, stages = (8, 2) if block_m >= 128 else (4, 3)
    warps, stages = settings.dkdv_warps or warps, settings.dkdv_stages or stages
    _slc_bwd_dkdv_kernel[(pieces.items.shape[0], n_sub)](
        q, k, v, do, do if do_scale is None else do_scale, lse, delta, dk, dv, dk_part, dv_part, key_blocks,
        pieces.items, pieces.n_items, tokens,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1), dk.stride(0), dk.stride(1), head_dim, scale * LOG2E, scale,
        HQ=heads_q, HKV=heads_kv, G=group, BT=bt,
        BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=keys, BLOCK_D=block_d, DOT_PREC=dot_precision(q),
        HAS_DO_SCALE=do_scale is not None, num_warps=warps, num_stages=stages,
    )
    if n_parts:
        _slc_dkdv_reduce_kernel[(pieces.pieces.numel(), n_sub)](
            dk, dv, dk_part, dv_part, key_blocks, pieces.pieces, pieces.part_end, dk.stride(0), dk.stride(1),
            head_dim, scale, HKV=heads_kv, BLOCK_SIZE=block_size, BLOCK_N=keys, BLOCK_D=block_d, num_warps=4,
        )
    return dk, dv


__all__ = ["launch_dkdv"]
