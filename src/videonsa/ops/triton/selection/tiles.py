"""The query-tile layout of the selection forward and dq: one program per (query tile, KV group) walks the union
of the blocks its tokens selected (`plan.union_blocks`), loads each key block once and masks, per row, whether
that row's token chose the block, and causality.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from videonsa.ops.triton.selection.plan import TilePlan, block_n
from videonsa.ops.triton.utils import LOG2E, dot_precision, next_pow2


def _launch_config(block_m: int, head_dim: int, kind: str = "fwd") -> tuple[int, int]:
    """(num_warps, num_stages) of the forward (kind "fwd") or dq ("dq") program with block_m rows: the fastest
    launches of benchmarks/tune/tune_selection.py on the H100 (docs/performance.md). Below 128 rows 8 warps
    needed fewer registers but ran far slower; 128-row tiles, which the planner never picks, keep 8 warps."""
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
    tiles_ptr, ktiles_ptr, ublocks_ptr, ucount_ptr, ubits_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    n_slots, head_dim, qk_scale,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, WORDS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr, FOLD: tl.constexpr = False,
):
    # FOLD: o already holds a partial sum and fold_ptr a per-row gate [T, HQ]; o <- o + gate * (this output),
    # in float32 with one rounding (see `selected_attention_fwd`'s fold_into). ktiles_ptr: the tiles' key rows
    # (`utils.key_tiles`; tiles_ptr itself unless the queries end a longer key sequence): q, o and lse live at
    # query rows, the blocks and causality are in key rows.
    tile = tl.program_id(0)
    g = tl.program_id(1)
    row0 = tl.load(tiles_ptr + tile * 4)
    n_tok = tl.load(tiles_ptr + tile * 4 + 1)
    k_row0 = tl.load(ktiles_ptr + tile * 4)
    seq0 = tl.load(ktiles_ptr + tile * 4 + 2)
    seq_end = tl.load(ktiles_ptr + tile * 4 + 3)

    r = tl.arange(0, BLOCK_M)
    tok = r // G
    head = g * G + r % G
    row_ok = tok < n_tok
    t_row = row0 + tok
    t_key = k_row0 + tok  # the query's own key row
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
            allowed = hit[:, None] & k_ok[None, :] & (k_row[None, :] <= t_key[:, None])
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


def launch_fwd(
    q: Tensor, k: Tensor, v: Tensor, plan: TilePlan, block_size: int, scale: float,
    num_warps: int | None = None, num_stages: int | None = None,
    *, fold_into: Tensor | None = None, fold_scale: Tensor | None = None, key_rows: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The forward kernel over a `TilePlan` (inputs already checked); returns o [T, HQ, D], lse [T, HQ].
    fold_into, fold_scale: see `selected_attention_fwd` (checked there); o is then fold_into. key_rows: the
    plan's tiles in key rows (`utils.key_tiles`) when the queries end longer key sequences, else None."""
    total, heads_q, head_dim = q.shape
    heads_kv = k.shape[1]
    fold = fold_into is not None
    o = fold_into if fold else torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((total, heads_q), dtype=torch.float32, device=q.device)
    warps, stages = _launch_config(plan.block_m, head_dim)
    _slc_fwd_kernel[(plan.tiles.shape[0], heads_kv)](
        q, k, v, o, lse, fold_scale if fold else lse, plan.tiles, plan.tiles if key_rows is None else key_rows,
        plan.blocks, plan.count, plan.bits,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        o.stride(0), o.stride(1), plan.blocks.shape[-1], head_dim, scale * LOG2E,
        HQ=heads_q, HKV=heads_kv, G=heads_q // heads_kv, WORDS=plan.bits.shape[-1],
        BLOCK_SIZE=block_size, BLOCK_M=plan.block_m, BLOCK_N=block_n(block_size),
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
        BLOCK_SIZE=block_size, BLOCK_M=plan.block_m, BLOCK_N=block_n(block_size),
        BLOCK_D=max(16, next_pow2(head_dim)), DOT_PREC=dot_precision(q), HAS_DO_SCALE=do_scale is not None,
        num_warps=num_warps or warps, num_stages=num_stages or stages,
    )
    return dq


__all__ = ["launch_dq", "launch_fwd"]
