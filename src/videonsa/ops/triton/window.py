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

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from videonsa.ops.triton.utils import (
    LOG2E,
    bounded_tiles_of,
    dot_precision,
    kernel_input,
    key_tiles,
    next_pow2,
    row_dot,
    tile_shape,
)


@dataclass(frozen=True)
class WindowSettings:
    """Launch settings of the window kernels. Measured by benchmarks/bench/bench_ops.py on the H100; results in
    docs/performance.md.

    query_rows: matrix rows (tokens x heads of a group) per forward / dq program (64 beat 128); key_step: keys
    per inner step; dkdv_rows: query rows per dk/dv step (32 beat 64); num_warps, num_stages: the launch of
    every window kernel (None: `_launch_config`'s rule).
    """

    query_rows: int = 64
    key_step: int = 64
    dkdv_rows: int = 32
    num_warps: int | None = None
    num_stages: int | None = None

    def launch(self, block_m: int, head_dim: int) -> dict[str, int]:
        """num_warps and num_stages of a program with block_m rows (the fields, else `_launch_config`)."""
        warps, stages = _launch_config(block_m, head_dim)
        return dict(num_warps=self.num_warps or warps, num_stages=self.num_stages or stages)


def _launch_config(block_m: int, head_dim: int) -> tuple[int, int]:
    """(num_warps, num_stages) for a program with block_m rows and head dim head_dim."""
    if block_m >= 128:
        return (8 if head_dim > 64 else 4), 2
    return 4, 2


WINDOW_SETTINGS = WindowSettings()


@triton.jit
def _swa_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, tiles_ptr, ktiles_ptr, g_in_ptr, g_ptr, do_ptr, dot_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
    head_dim, window, qk_scale,
    HQ: tl.constexpr, G: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr, MODE: tl.constexpr, HAS_G_IN: tl.constexpr,
):
    # MODE 0: write o and lse. MODE 1 (fold): o <- g_in * o + g * o_swa (o holds another branch's output; the
    # sum is formed in float32 and rounded once, o_swa itself is never stored) and write lse. MODE 2 (delta
    # only): write dot[t, h] = sum_d do * o_swa in float32 (o_swa rebuilt here, never stored; lse not written).
    # ktiles_ptr: the tiles' key rows (`utils.key_tiles`; tiles_ptr itself unless the queries end a longer key
    # sequence): q, o and the statistics live at query rows, the band and causality are in key rows.
    tile = tl.program_id(0)
    g = tl.program_id(1)
    row0 = tl.load(tiles_ptr + tile * 4)
    n_tok = tl.load(tiles_ptr + tile * 4 + 1)
    k_row0 = tl.load(ktiles_ptr + tile * 4)
    seq0 = tl.load(ktiles_ptr + tile * 4 + 2)

    r = tl.arange(0, BLOCK_M)
    tok = r // G
    head = g * G + r % G
    row_ok = tok < n_tok
    t_row = row0 + tok
    t_key = k_row0 + tok  # the query's own key row
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    q_off = t_row.to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :]
    q = tl.load(q_ptr + q_off, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    n = tl.arange(0, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lo = tl.maximum(seq0, k_row0 - window + 1)
    hi = k_row0 + n_tok
    for start in range(lo, hi, BLOCK_N):
        k_row = start + n
        k_ok = k_row < hi
        kv_mask = k_ok[:, None] & d_ok[None, :]
        kb = tl.load(k_ptr + k_row.to(tl.int64)[:, None] * stride_kt + g * stride_kh + d[None, :],
                     mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(kb), input_precision=DOT_PREC) * qk_scale
        allowed = (
            row_ok[:, None] & k_ok[None, :]
            & (k_row[None, :] <= t_key[:, None]) & (k_row[None, :] > t_key[:, None] - window)
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
    t_row64 = t_row.to(tl.int64)
    od_mask = row_ok[:, None] & d_ok[None, :]
    if MODE == 2:
        do_off = t_row64[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
        do = tl.load(do_ptr + do_off, mask=od_mask, other=0.0).to(tl.float32)
        tl.store(dot_ptr + t_row64 * HQ + head, tl.sum(do * out, axis=1), mask=row_ok)
    else:
        o_off = t_row64[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
        if MODE == 1:
            gate = tl.load(g_ptr + t_row64 * HQ + head, mask=row_ok, other=0.0).to(tl.float32)
            prev = tl.load(o_ptr + o_off, mask=od_mask, other=0.0).to(tl.float32)
            if HAS_G_IN:
                prev = prev * tl.load(g_in_ptr + t_row64 * HQ + head, mask=row_ok, other=0.0).to(tl.float32)[:, None]
            out = prev + gate[:, None] * out
        tl.store(o_ptr + o_off, out.to(o_ptr.dtype.element_ty), mask=od_mask)
        tl.store(lse_ptr + t_row64 * HQ + head, lse, mask=row_ok)


@triton.jit
def _swa_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, do_scale_ptr, lse_ptr, delta_ptr, dq_ptr, tiles_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh,
    head_dim, window, qk_scale, scale,
    HQ: tl.constexpr, G: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr, HAS_DO_SCALE: tl.constexpr, ACCUMULATE: tl.constexpr,
):
    # With HAS_DO_SCALE the gradient of o is do * do_scale[row]: the factor multiplies dp = do.v (exact, and
    # do keeps its stored rounding). With ACCUMULATE, dq is added to what dq_ptr holds (float32 sum, one
    # rounding) instead of overwriting it.
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
    if HAS_DO_SCALE:
        do_scale = tl.load(do_scale_ptr + t_row64 * HQ + head, mask=row_ok, other=0.0).to(tl.float32)
    else:
        do_scale = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
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
        if HAS_DO_SCALE:
            dp = dp * do_scale[:, None]
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kb.dtype), kb, input_precision=DOT_PREC)

    dq_off = t_row64[:, None] * stride_dqt + head[:, None] * stride_dqh + d[None, :]
    dq = dq * scale
    if ACCUMULATE:
        dq += tl.load(dq_ptr + dq_off, mask=qd_mask, other=0.0).to(tl.float32)
    tl.store(dq_ptr + dq_off, dq.to(dq_ptr.dtype.element_ty), mask=qd_mask)


@triton.jit
def _swa_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, do_scale_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, key_tiles_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh,
    head_dim, window, qk_scale, scale,
    HQ: tl.constexpr, G: tl.constexpr, BT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr, HAS_DO_SCALE: tl.constexpr, ACCUMULATE: tl.constexpr,
):
    # With HAS_DO_SCALE the gradient of o is do * do_scale[query row]: the factor scales the columns of P^T
    # before P^T.do (dv) and of dP^T = v.do^T (dk), so the scaled do is never formed. With ACCUMULATE, dk and
    # dv are added to what dk_ptr, dv_ptr hold (float32 sum, one rounding); each program owns its keys.
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
        if HAS_DO_SCALE:
            do_scale = tl.load(do_scale_ptr + t_row64 * HQ + head, mask=row_ok, other=0.0).to(tl.float32)
            dv += tl.dot((p_t * do_scale[None, :]).to(do.dtype), do, input_precision=DOT_PREC)
            dp_t = tl.dot(vb, tl.trans(do), input_precision=DOT_PREC) * do_scale[None, :]
        else:
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)
            dp_t = tl.dot(vb, tl.trans(do), input_precision=DOT_PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), input_precision=DOT_PREC)

    out_off = k_row64[:, None] * stride_dkt + g * stride_dkh + d[None, :]
    dk = dk * scale
    if ACCUMULATE:
        dk += tl.load(dk_ptr + out_off, mask=kd_mask, other=0.0).to(tl.float32)
        dv += tl.load(dv_ptr + out_off, mask=kd_mask, other=0.0).to(tl.float32)
    tl.store(dk_ptr + out_off, dk.to(dk_ptr.dtype.element_ty), mask=kd_mask)
    tl.store(dv_ptr + out_off, dv.to(dv_ptr.dtype.element_ty), mask=kd_mask)


def _check(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, window_size: int, cu_seqlens_k: Tensor | None = None
) -> None:
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"window attention: q [T,HQ,D], k/v [T,HKV,D] expected, got {q.shape}, {k.shape}")
    same_rows = cu_seqlens_k is not None or q.shape[0] == k.shape[0]  # keys may run longer with their own offsets
    if not same_rows or q.shape[2] != k.shape[2] or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"window attention: incompatible q {tuple(q.shape)} and k {tuple(k.shape)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("window attention: cu_seqlens must be 1-D with at least 2 entries")
    if window_size <= 0:
        raise ValueError(f"window attention: window_size must be positive, got {window_size}")


def _launch_fwd(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, window_size: int, scale: float, mode: int,
    o: Tensor, lse: Tensor, g_in: Tensor | None, gate: Tensor | None, do: Tensor | None, dot: Tensor | None,
    settings: WindowSettings, cu_seqlens_k: Tensor | None = None,
) -> None:
    """Launch `_swa_fwd_kernel` in `mode` (see the kernel); o is the output buffer (mode 0/1) or do (mode 2)."""
    total, heads_q, head_dim = q.shape
    group = heads_q // k.shape[1]
    block_m, bt = tile_shape(group, settings.query_rows)
    tiles = bounded_tiles_of(cu_seqlens, q.shape[0], bt)
    out = do if mode == 2 else o
    _swa_fwd_kernel[(tiles.shape[0], k.shape[1])](
        q, k, v, o, lse, tiles, key_tiles(tiles, cu_seqlens, cu_seqlens_k),
        g_in if g_in is not None else lse, gate if gate is not None else lse,
        do if do is not None else q, dot if dot is not None else lse,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), head_dim, window_size, scale * LOG2E,
        HQ=heads_q, G=group, BLOCK_M=block_m, BLOCK_N=settings.key_step, BLOCK_D=max(16, next_pow2(head_dim)),
        DOT_PREC=dot_precision(q), MODE=mode, HAS_G_IN=g_in is not None, **settings.launch(block_m, head_dim),
    )


def _row_stat(x: Tensor, total: int, heads_q: int, name: str) -> Tensor:
    """x [T, HQ] as a contiguous tensor (the kernels index it as t * HQ + h)."""
    if x.shape != (total, heads_q):
        raise ValueError(f"window attention: {name} must be [T, HQ] = {(total, heads_q)}, got {tuple(x.shape)}")
    return x.contiguous()


def window_attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens: Tensor,
    window_size: int,
    scale: float,
    *,
    fold_into: Tensor | None = None,
    fold_scale: Tensor | None = None,
    gate: Tensor | None = None,
    settings: WindowSettings = WINDOW_SETTINGS,
    cu_seqlens_k: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Causal sliding-window attention.

    Args:
        q: [T, HQ, D]; k, v: [T, HKV, D] (packed, bf16 / fp16 / fp32); cu_seqlens: int32 [N+1].
        cu_seqlens_k: int32 [N+1] or None. Given, k and v are [Tk, HKV, D] packed by these offsets and each
            sequence's queries (cu_seqlens) are its last keys: query i of a sequence with len_q queries and
            len_k keys sits at key position len_k - len_q + i (docs/operator.md). Forward only.
        window_size: keys per query (the query's own position included); scale: softmax scale.
        fold_into: optional [T, HQ, D] (unit last stride) holding another branch's output. Then o_swa is not
            stored: fold_into <- fold_scale * fold_into + gate * o_swa in place (float32 sum, rounded once to
            fold_into's dtype) and returned in o's place. fold_scale [T, HQ] may be None (factor 1); gate
            [T, HQ] is required with fold_into. This is how the lean NSA forward adds the gated window
            branch without a [T, HQ, D] temporary.
        settings: launch settings (`WindowSettings`).

    Returns:
        o [T, HQ, D] in q's dtype (or fold_into, updated) and lse float32 [T, HQ].
    """
    _check(q, k, v, cu_seqlens, window_size, cu_seqlens_k)
    q, k, v = kernel_input(q), kernel_input(k), kernel_input(v)
    total, heads_q, _ = q.shape
    lse = torch.empty((total, heads_q), dtype=torch.float32, device=q.device)
    if fold_into is None:
        if gate is not None or fold_scale is not None:
            raise ValueError("window attention: gate / fold_scale are only used with fold_into")
        o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        mode, g_in = 0, None
    else:
        if fold_into.shape != q.shape or fold_into.stride(-1) != 1:
            raise ValueError(f"window attention: fold_into must be [T, HQ, D] = {tuple(q.shape)} with a unit "
                             f"last stride, got {tuple(fold_into.shape)}")
        if gate is None:
            raise ValueError("window attention: fold_into needs gate")
        o, mode = fold_into, 1
        gate = _row_stat(gate, total, heads_q, "gate")
        g_in = None if fold_scale is None else _row_stat(fold_scale, total, heads_q, "fold_scale")
    if total == 0:
        return o, lse
    _launch_fwd(q, k, v, cu_seqlens, window_size, scale, mode, o, lse, g_in, gate, None, None,
                settings, cu_seqlens_k)
    return o, lse


def window_attention_delta(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lse: Tensor,
    do: Tensor,
    cu_seqlens: Tensor,
    window_size: int,
    scale: float,
    *,
    settings: WindowSettings = WINDOW_SETTINGS,
) -> Tensor:
    """sum_d do * o_swa per row, float32 [T, HQ], without o_swa in memory.

    o_swa is rebuilt tile by tile with the forward's loop (in float32, not rounded to q's dtype) and dotted
    with do; lse (float32 [T, HQ], from the forward) is accepted for the interface's symmetry with the other
    branches but the rebuild recomputes its own softmax statistics, so it is only shape-checked.
    Args as in `window_attention_fwd`; do [T, HQ, D] is the gradient of o_swa (or of the gated sum).
    """
    _check(q, k, v, cu_seqlens, window_size)
    q, k, v, do = kernel_input(q), kernel_input(k), kernel_input(v), kernel_input(do)
    total, heads_q, _ = q.shape
    if do.shape != q.shape:
        raise ValueError(f"window attention: do must have q's shape {tuple(q.shape)}, got {tuple(do.shape)}")
    _row_stat(lse, total, heads_q, "lse")
    dot = torch.empty((total, heads_q), dtype=torch.float32, device=q.device)
    if total:
        _launch_fwd(q, k, v, cu_seqlens, window_size, scale, 2, do, dot, None, None, do, dot,
                    settings)
    return dot


def launch_dq(
    q: Tensor, k: Tensor, v: Tensor, do: Tensor, lse: Tensor, delta: Tensor, cu_seqlens: Tensor,
    window_size: int, scale: float, *, do_scale: Tensor | None = None, dq: Tensor | None = None,
    settings: WindowSettings = WINDOW_SETTINGS,
) -> Tensor:
    """The dq kernel (inputs already checked; lse, delta float32 [T, HQ] contiguous; do_scale [T, HQ]
    contiguous or None). Returns dq [T, HQ, D]: a new tensor, or the given `dq` (unit last stride) with the
    window's dq added in place."""
    heads_q, head_dim = q.shape[1], q.shape[2]
    heads_kv = k.shape[1]
    group = heads_q // heads_kv
    accumulate = dq is not None
    if dq is None:
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    block_m, bt = tile_shape(group, settings.query_rows)
    tiles = bounded_tiles_of(cu_seqlens, q.shape[0], bt)
    _swa_bwd_dq_kernel[(tiles.shape[0], heads_kv)](
        q, k, v, do, do if do_scale is None else do_scale, lse, delta, dq, tiles,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1), dq.stride(0), dq.stride(1), head_dim, window_size, scale * LOG2E, scale,
        HQ=heads_q, G=group, BLOCK_M=block_m, BLOCK_N=settings.key_step, BLOCK_D=max(16, next_pow2(head_dim)),
        DOT_PREC=dot_precision(q), HAS_DO_SCALE=do_scale is not None, ACCUMULATE=accumulate,
        **settings.launch(block_m, head_dim),
    )
    return dq


def launch_dkdv(
    q: Tensor, k: Tensor, v: Tensor, do: Tensor, lse: Tensor, delta: Tensor, cu_seqlens: Tensor,
    window_size: int, scale: float, *, do_scale: Tensor | None = None, dk: Tensor | None = None,
    dv: Tensor | None = None, settings: WindowSettings = WINDOW_SETTINGS,
) -> tuple[Tensor, Tensor]:
    """The dk/dv kernel (key-tile-major, no atomics; do_scale as in `launch_dq`). Returns dk, dv [T, HKV, D]:
    new tensors, or the given dk and dv (both or neither, same strides) with the window's gradients added."""
    heads_q, head_dim = q.shape[1], q.shape[2]
    heads_kv = k.shape[1]
    group = heads_q // heads_kv
    accumulate = dk is not None
    if not accumulate:
        dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
        dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    block_m, bt = tile_shape(group, settings.dkdv_rows)
    key_tiles = bounded_tiles_of(cu_seqlens, q.shape[0], settings.key_step)
    _swa_bwd_dkdv_kernel[(key_tiles.shape[0], heads_kv)](
        q, k, v, do, do if do_scale is None else do_scale, lse, delta, dk, dv, key_tiles,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        do.stride(0), do.stride(1), dk.stride(0), dk.stride(1), head_dim, window_size, scale * LOG2E, scale,
        HQ=heads_q, G=group, BT=bt, BLOCK_M=block_m, BLOCK_N=settings.key_step,
        BLOCK_D=max(16, next_pow2(head_dim)), DOT_PREC=dot_precision(q), HAS_DO_SCALE=do_scale is not None,
        ACCUMULATE=accumulate, **settings.launch(block_m, head_dim),
    )
    return dk, dv


def window_attention_bwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor | None,
    lse: Tensor,
    do: Tensor,
    cu_seqlens: Tensor,
    window_size: int,
    scale: float,
    *,
    delta: Tensor | None = None,
    do_scale: Tensor | None = None,
    dq: Tensor | None = None,
    dk: Tensor | None = None,
    dv: Tensor | None = None,
    settings: WindowSettings = WINDOW_SETTINGS,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of `window_attention_fwd`.

    Args:
        q, k, v, cu_seqlens, window_size, scale: as in the forward; o [T, HQ, D], lse float32 [T, HQ]: its
            outputs (o may be None when delta is given); do [T, HQ, D]: gradient of o, or (with do_scale) the
            gradient before a per-row factor.
        delta: float32 [T, HQ] = sum_d o * (gradient of o), if the caller has it (else computed from o).
        do_scale: [T, HQ] (any float dtype) or None. When given, the gradient of o is do * do_scale[..., None]
            (a gate times the gated sum's gradient); the kernels apply the factor to their float32 products
            (dP = do.v^T and P before P^T.do), so the scaled do is never stored nor rounded.
        dq: optional [T, HQ, D] accumulator (unit last stride, e.g. the selection branch's dq): the window's
            dq is added to it in place (float32 sum, rounded once) and it is returned.
        dk, dv: optional [T, HKV, D] accumulators (both or neither, same shape and strides, unit last stride),
            likewise: the lean NSA backward adds the window's dk, dv into the selection's without temporaries.

    Returns:
        dq [T, HQ, D] (q's dtype, or the given dq), dk, dv [T, HKV, D] (k's dtype). Deterministic: no atomics.
    """
    _check(q, k, v, cu_seqlens, window_size)
    q, k, v, do = kernel_input(q), kernel_input(k), kernel_input(v), kernel_input(do)
    total, heads_q, _ = q.shape
    if dq is not None and (dq.shape != q.shape or dq.stride(-1) != 1):
        raise ValueError(f"window attention: dq must be [T, HQ, D] = {tuple(q.shape)} with a unit last stride")
    if (dk is None) != (dv is None):
        raise ValueError("window attention: give both dk and dv accumulators or neither")
    if dk is not None and (dk.shape != k.shape or dv.shape != k.shape or dk.stride() != dv.stride()
                           or dk.stride(-1) != 1):
        raise ValueError(f"window attention: dk, dv must be [T, HKV, D] = {tuple(k.shape)} with equal strides")
    if total == 0:
        return (torch.empty_like(q) if dq is None else dq), (torch.empty_like(k) if dk is None else dk), (
            torch.empty_like(v) if dv is None else dv)
    lse = lse.float().contiguous()
    if do_scale is not None:
        do_scale = _row_stat(do_scale, total, heads_q, "do_scale")
    if delta is None:
        if o is None:
            raise ValueError("window attention: o or delta is needed for the backward")
        delta = row_dot(o, do)
        if do_scale is not None:
            delta = delta * do_scale.float()
    else:
        delta = _row_stat(delta, total, heads_q, "delta").float()
    dq = launch_dq(q, k, v, do, lse, delta, cu_seqlens, window_size, scale, do_scale=do_scale, dq=dq,
                   settings=settings)
    dk, dv = launch_dkdv(q, k, v, do, lse, delta, cu_seqlens, window_size, scale, do_scale=do_scale, dk=dk, dv=dv,
                         settings=settings)
    return dq, dk, dv


__all__ = [
    "WINDOW_SETTINGS", "WindowSettings", "launch_dkdv", "launch_dq", "window_attention_bwd", "window_attention_delta",
    "window_attention_fwd",
]
