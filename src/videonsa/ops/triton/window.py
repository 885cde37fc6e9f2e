"""Sliding-window attention (NSA's window branch): Triton forward and backward.

Packed varlen tensors: q [total_T, HQ, D], k/v [total_T, HKV, D], cu_seqlens int32 [N+1]. Query t of a
sequence attends to keys max(0, t - window_size + 1) .. t of the same sequence; head h uses KV head
h // (HQ / HKV).

Layout, flash-attention style over the band of keys:

* Forward and dq: one program per (query tile, KV group); a tile is BT consecutive tokens x the G heads of the
  group flattened into BLOCK_M matrix rows (no padding of query heads for ratios like 7:1). The program loops
  over the keys row0 - window + 1 .. row0 + BT - 1 of its sequence in BLOCK_N steps and masks the band.
* dk/dv: one program per (key tile of BLOCK_N keys, KV group) over the queries that can see those keys (the
  next window + BLOCK_N - 1 tokens), in chunks of BT tokens x G heads. Each program owns its keys: no atomics,
  deterministic.

lse is natural-log, float32 [total_T, HQ]; every query sees at least itself, so it is always finite.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from videonsa.ops.triton.selection import LOG2E, dot_precision, kernel_input, next_pow2, row_dot, tiles_of

# Matrix rows (tokens x heads of a group) per query program, and keys per step.
QUERY_ROWS = 64  # 64 measured faster than 128 on an H100 at 32K and 128K
KEY_STEP = 64
DKDV_ROWS = 32  # H100, 128K: 6.0 ms against 8.5 ms for 64 rows


def _rows(group: int, rows: int) -> tuple[int, int]:
    """(BLOCK_M, tokens per tile): BLOCK_M a power of two >= 16 holding tokens * group rows."""
    block_m = max(rows, next_pow2(group), 16)
    return block_m, block_m // group


def _launch_config(block_m: int, head_dim: int) -> tuple[int, int]:
    """(num_warps, num_stages) for a program with block_m rows and head dim head_dim."""
    if block_m >= 128:
        return (8 if head_dim > 64 else 4), 2
    return 4, 2


@triton.jit
def _swa_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, tiles_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    head_dim, window, qk_scale,
    HQ: tl.constexpr, G: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    tile = tl.program_id(0)
    g = tl.program_id(1)
    row0 = tl.load(tiles_ptr + tile * 4)
    n_tok = tl.load(tiles_ptr + tile * 4 + 1)
    seq0 = tl.load(tiles_ptr + tile * 4 + 2)

    r = tl.arange(0, BLOCK_M)
    tok = r // G
    head = g * G + r % G
    row_ok = tok < n_tok
    t_row = row0 + tok
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    q_off = t_row.to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_off, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    n = tl.arange(0, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo = tl.maximum(seq0, row0 - window + 1)
    hi = row0 + n_tok
    for start in range(lo, hi, BLOCK_N):
        k_row = start + n
        k_ok = k_row < hi
        kv_mask = k_ok[:, None] & d_ok[None, :]
        kb = tl.load(k_ptr + k_row.to(tl.int64)[:, None] * stride_kt + g * stride_kh + d[None, :],
                     mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(kb), input_precision=DOT_PREC) * qk_scale
        allowed = (
            row_ok[:, None] & k_ok[None, :]
            & (k_row[None, :] <= t_row[:, None]) & (k_row[None, :] > t_row[:, None] - window)
        )
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vb = tl.load(v_ptr + k_row.to(tl.int64)[:, None] * stride_vt + g * stride_vh + d[None, :],
                     mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=DOT_PREC)
        m_i = m_new

    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    o_off = t_row.to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
    tl.store(o_ptr + o_off, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + t_row.to(tl.int64) * HQ + head, lse, mask=row_ok)


@triton.jit
def _swa_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr, tiles_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh,
    head_dim, window, qk_scale, scale,
    HQ: tl.constexpr, G: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    tile = tl.program_id(0)
    g = tl.program_id(1)
    row0 = tl.load(tiles_ptr + tile * 4)
    n_tok = tl.load(tiles_ptr + tile * 4 + 1)
    seq0 = tl.load(tiles_ptr + tile * 4 + 2)

    r = tl.arange(0, BLOCK_M)
    tok = r // G
    head = g * G + r % G
    row_ok = tok < n_tok
    t_row = row0 + tok
    t_row64 = t_row.to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    qd_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + t_row64[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=qd_mask, other=0.0)
    do = tl.load(do_ptr + t_row64[:, None] * stride_dot + head[:, None] * stride_doh + d[None, :],
                 mask=qd_mask, other=0.0)
    lse2 = tl.load(lse_ptr + t_row64 * HQ + head, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(delta_ptr + t_row64 * HQ + head, mask=row_ok, other=0.0)
    n = tl.arange(0, BLOCK_N)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo = tl.maximum(seq0, row0 - window + 1)
    hi = row0 + n_tok
    for start in range(lo, hi, BLOCK_N):
        k_row = start + n
        k_ok = k_row < hi
        kv_mask = k_ok[:, None] & d_ok[None, :]
        kb = tl.load(k_ptr + k_row.to(tl.int64)[:, None] * stride_kt + g * stride_kh + d[None, :],
                     mask=kv_mask, other=0.0)
        vb = tl.load(v_ptr + k_row.to(tl.int64)[:, None] * stride_vt + g * stride_vh + d[None, :],
                     mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(kb), input_precision=DOT_PREC) * qk_scale
        allowed = (
            row_ok[:, None] & k_ok[None, :]
            & (k_row[None, :] <= t_row[:, None]) & (k_row[None, :] > t_row[:, None] - window)
        )
        p = tl.where(allowed, tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(vb), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kb.dtype), kb, input_precision=DOT_PREC)

    dq_off = t_row64[:, None] * stride_dqt + head[:, None] * stride_dqh + d[None, :]
    tl.store(dq_ptr + dq_off, (dq * scale).to(dq_ptr.dtype.element_ty), mask=qd_mask)


@triton.jit
def _swa_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, key_tiles_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh,
    head_dim, window, qk_scale, scale,
    HQ: tl.constexpr, G: tl.constexpr, BT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    kt = tl.program_id(0)
    g = tl.program_id(1)
    k_row0 = tl.load(key_tiles_ptr + kt * 4)
    n_keys = tl.load(key_tiles_ptr + kt * 4 + 1)
    seq_end = tl.load(key_tiles_ptr + kt * 4 + 3)
    n = tl.arange(0, BLOCK_N)
    k_row = k_row0 + n
    k_ok = n < n_keys
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    kd_mask = k_ok[:, None] & d_ok[None, :]
    k_row64 = k_row.to(tl.int64)
    kb = tl.load(k_ptr + k_row64[:, None] * stride_kt + g * stride_kh + d[None, :], mask=kd_mask, other=0.0)
    vb = tl.load(v_ptr + k_row64[:, None] * stride_vt + g * stride_vh + d[None, :], mask=kd_mask, other=0.0)

    r = tl.arange(0, BLOCK_M)
    tok = r // G
    head = g * G + r % G
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # Queries that see any of these keys: k_row0 .. k_row0 + n_keys - 1 + window - 1 (same sequence).
    t_hi = tl.minimum(seq_end, k_row0 + n_keys + window - 1)
    for c0 in range(k_row0, t_hi, BT):
        t_row = c0 + tok
        row_ok = (tok < BT) & (t_row < t_hi)
        t_row64 = t_row.to(tl.int64)
        q_off = t_row64[None, :] * stride_qt + head[None, :] * stride_qh + d[:, None]
        q_t = tl.load(q_ptr + q_off, mask=row_ok[None, :] & d_ok[:, None], other=0.0)  # [D, rows]
        do_off = t_row64[:, None] * stride_dot + head[:, None] * stride_doh + d[None, :]
        do = tl.load(do_ptr + do_off, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        lse2 = tl.load(lse_ptr + t_row64 * HQ + head, mask=row_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(delta_ptr + t_row64 * HQ + head, mask=row_ok, other=0.0)
        s_t = tl.dot(kb, q_t, input_precision=DOT_PREC) * qk_scale  # [BLOCK_N, BLOCK_M]
        allowed = (
            row_ok[None, :] & k_ok[:, None]
            & (k_row[:, None] <= t_row[None, :]) & (k_row[:, None] > t_row[None, :] - window)
        )
        p_t = tl.where(allowed, tl.exp2(s_t - lse2[None, :]), 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)
        dp_t = tl.dot(vb, tl.trans(do), input_precision=DOT_PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), input_precision=DOT_PREC)

    out_off = k_row64[:, None] * stride_dkt + g * stride_dkh + d[None, :]
    tl.store(dk_ptr + out_off, (dk * scale).to(dk_ptr.dtype.element_ty), mask=kd_mask)
    tl.store(dv_ptr + out_off, dv.to(dv_ptr.dtype.element_ty), mask=kd_mask)


def _check(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, window_size: int) -> None:
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"window attention: q [T,HQ,D], k/v [T,HKV,D] expected, got {q.shape}, {k.shape}")
    if q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"window attention: incompatible q {tuple(q.shape)} and k {tuple(k.shape)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("window attention: cu_seqlens must be 1-D with at least 2 entries")
    if window_size <= 0:
        raise ValueError(f"window attention: window_size must be positive, got {window_size}")


def window_attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    window_size: int,
    scale: float,
    *,
    tile_rows: int = QUERY_ROWS,
    key_step: int = KEY_STEP,
    num_warps: int | None = None,
    num_stages: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Causal sliding-window attention.

    Args:
        q: [T, HQ, D]; k, v: [T, HKV, D] (packed, bf16 / fp16 / fp32); cu_seqlens: int32 [N+1].
        window_size: keys per query (the query's own position included); scale: softmax scale.
        tile_rows, key_step, num_warps, num_stages: query rows per program, keys per inner step, launch
            settings (tuning; defaults measured on an H100).

    Returns:
        o [T, HQ, D] in q's dtype and lse float32 [T, HQ].
    """
    _check(q, k, v, cu_seqlens, window_size)
    q, k, v = kernel_input(q), kernel_input(k), kernel_input(v)
    total, heads_q, head_dim = q.shape
    group = heads_q // k.shape[1]
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((total, heads_q), dtype=torch.float32, device=q.device)
    if total == 0:
        return o, lse
    block_m, bt = _rows(group, tile_rows)
    tiles = tiles_of(cu_seqlens, bt)
    warps, stages = _launch_config(block_m, head_dim)
    _swa_fwd_kernel[(tiles.shape[0], k.shape[1])](
        q, k, v, o, lse, tiles,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        o.stride(0), o.stride(1), head_dim, window_size, scale * LOG2E,
        HQ=heads_q, G=group, BLOCK_M=block_m, BLOCK_N=key_step, BLOCK_D=max(16, next_pow2(head_dim)),
        DOT_PREC=dot_precision(q),
        num_warps=num_warps or warps, num_stages=num_stages or stages,
    )
    return o, lse


def launch_dq(
    q: Tensor, k: Tensor, v: Tensor, do: Tensor, lse: Tensor, delta: Tensor, cu_seqlens: Tensor,
    window_size: int, scale: float, tile_rows: int = QUERY_ROWS, key_step: int = KEY_STEP,
    num_warps: int | None = None, num_stages: int | None = None,
) -> Tensor:
    """The dq kernel (inputs already checked; lse, delta float32 [T, HQ] contiguous). Returns dq [T, HQ, D]."""
    heads_q, head_dim = q.shape[1], q.shape[2]
    heads_kv = k.shape[1]
    group = heads_q // heads_kv
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    block_m, bt = _rows(group, tile_rows)
    tiles = tiles_of(cu_seqlens, bt)
    warps, stages = _launch_config(block_m, head_dim)
    _swa_bwd_dq_kernel[(tiles.shape[0], heads_kv)](
        q, k, v, do, lse, delta, dq, tiles,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1), dq.stride(0), dq.stride(1), head_dim, window_size, scale * LOG2E, scale,
        HQ=heads_q, G=group, BLOCK_M=block_m, BLOCK_N=key_step, BLOCK_D=max(16, next_pow2(head_dim)),
        DOT_PREC=dot_precision(q),
        num_warps=num_warps or warps, num_stages=num_stages or stages,
    )
    return dq


def launch_dkdv(
    q: Tensor, k: Tensor, v: Tensor, do: Tensor, lse: Tensor, delta: Tensor, cu_seqlens: Tensor,
    window_size: int, scale: float, rows: int = DKDV_ROWS, key_step: int = KEY_STEP,
    num_warps: int | None = None, num_stages: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The dk/dv kernel (key-tile-major, no atomics). Returns dk, dv [T, HKV, D]."""
    heads_q, head_dim = q.shape[1], q.shape[2]
    heads_kv = k.shape[1]
    group = heads_q // heads_kv
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    block_m, bt = _rows(group, rows)
    key_tiles = tiles_of(cu_seqlens, key_step)
    warps, stages = _launch_config(block_m, head_dim)
    _swa_bwd_dkdv_kernel[(key_tiles.shape[0], heads_kv)](
        q, k, v, do, lse, delta, dk, dv, key_tiles,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1), dk.stride(0), dk.stride(1), head_dim, window_size, scale * LOG2E, scale,
        HQ=heads_q, G=group, BT=bt, BLOCK_M=block_m, BLOCK_N=key_step, BLOCK_D=max(16, next_pow2(head_dim)),
        DOT_PREC=dot_precision(q),
        num_warps=num_warps or warps, num_stages=num_stages or stages,
    )
    return dk, dv


def window_attention_bwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Tensor,
    do: Tensor,
    cu_seqlens: Tensor,
    window_size: int,
    scale: float,
    *,
    tile_rows: int = QUERY_ROWS,
    key_step: int = KEY_STEP,
    dkdv_rows: int = DKDV_ROWS,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of `window_attention_fwd`.

    Args:
        q, k, v, cu_seqlens, window_size, scale: as in the forward; o [T, HQ, D], lse float32 [T, HQ]: its
            outputs; do [T, HQ, D]: gradient of o. tile_rows, key_step, dkdv_rows: tuning.

    Returns:
        dq [T, HQ, D] (q's dtype), dk, dv [T, HKV, D] (k's dtype). Deterministic: no atomics.
    """
    _check(q, k, v, cu_seqlens, window_size)
    q, k, v, do = kernel_input(q), kernel_input(k), kernel_input(v), kernel_input(do)
    if q.shape[0] == 0:
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    lse = lse.float().contiguous()
    delta = row_dot(o, do)
    dq = launch_dq(q, k, v, do, lse, delta, cu_seqlens, window_size, scale, tile_rows, key_step)
    dk, dv = launch_dkdv(q, k, v, do, lse, delta, cu_seqlens, window_size, scale, dkdv_rows, key_step)
    return dq, dk, dv


__all__ = ["launch_dkdv", "launch_dq", "window_attention_bwd", "window_attention_fwd"]
