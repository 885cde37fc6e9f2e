"""The official mode's anti-causal compression branch as one Triton kernel (docs/official-mode.md, section 5.2).

`anticausal_compression_triton` computes what `videonsa.ops.official.anticausal_compression` computes: query t
attends to the compressed blocks c >= t // block_size (its own block and every later one), padded head h reads
KV head h // (HP // HKV), scores fp32(q . k_cmp) * scale, the unnormalised probabilities rounded to the input
dtype before they multiply v_cmp, the output rounded once; it returns o [B, T, HP, D] and the natural-log lse,
float32, heads first [B, HP, T], contiguous (the layout the top-k reads, wrongly, as tokens first).

Optionally the output is multiplied by a per-row gate before it is stored (`gate`): o = round(round(o_cmp) * g),
which is bit for bit the original's bf16 product o_cmp * g_cmp, so the compression output can serve as the
start of the gated sum without another pass over [B, T, HP, D].

Kernel shape: one program per (tile of BT consecutive tokens, batch, KV group). Its BLOCK_M matrix rows are the
BT tokens x the G query heads of the group (row r: token r // G, head r % G), which are contiguous in memory for
each token. The program walks the compressed blocks from its first token's block to the last in steps of
BLOCK_N with an online softmax (flash-attention style, base-2 exponentials), masking c < t // block_size per row.
Early tiles see the most blocks; they get the lowest program ids, so the long programs start first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from videonsa.ops.triton.utils import LOG2E, dot_precision, next_pow2

_SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class CompressionLaunch:
    """Launch settings of `anticausal_compression_triton` (the result does not depend on them beyond float32
    rounding of the online softmax).

    rows: matrix rows per program, tokens x the G heads of one KV group (a power of two >= 16; raised to
        next_power_of_two(G) when G is larger).
    block_n: compressed blocks per inner step (a power of two >= 16).
    num_warps, num_stages: Triton's launch settings.
    """

    rows: int = 128
    block_n: int = 64
    num_warps: int = 8
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name, low in (("rows", 16), ("block_n", 16), ("num_warps", 1)):
            value = getattr(self, name)
            if value < low or value & (value - 1):
                raise ValueError(f"CompressionLaunch.{name} must be a power of two >= {low}, got {value}")
        if self.num_stages < 1:
            raise ValueError(f"CompressionLaunch.num_stages must be >= 1, got {self.num_stages}")


DEFAULT_LAUNCH = CompressionLaunch()


@triton.jit
def _anticausal_compression_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, gate_ptr,
    seq_len, n_blocks, head_dim, qk_scale,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
    HP: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, BLOCK_SIZE: tl.constexpr, BT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr, HAS_GATE: tl.constexpr,
):
    # o [B, T, HP, D] contiguous; lse float32 [B, HP, T] contiguous; gate [B, T, HP] contiguous (HAS_GATE).
    tile = tl.program_id(0)
    batch_group = tl.program_id(1)
    b = batch_group // HKV
    group = batch_group % HKV

    r = tl.arange(0, BLOCK_M)
    tok = r // G
    head = group * G + r % G
    t = tile * BT + tok
    row_ok = (tok < BT) & (t < seq_len)
    own_block = t // BLOCK_SIZE
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    rd_mask = row_ok[:, None] & d_ok[None, :]
    t64 = t.to(tl.int64)
    b64 = b.to(tl.int64)
    q = tl.load(q_ptr + b64 * stride_qb + t64[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=rd_mask, other=0.0)

    n = tl.arange(0, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = k_ptr + b64 * stride_kb + group * stride_kh
    v_base = v_ptr + b64 * stride_vb + group * stride_vh
    first = (tile * BT) // BLOCK_SIZE  # the tile's earliest own block: no row sees anything before it
    for start in range(first, n_blocks, BLOCK_N):
        c = start + n
        c_ok = c < n_blocks
        kv_mask = c_ok[:, None] & d_ok[None, :]
        kb = tl.load(k_base + c.to(tl.int64)[:, None] * stride_kn + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(kb), input_precision=DOT_PREC) * qk_scale
        s = tl.where(c_ok[None, :] & (c[None, :] >= own_block[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows past T see nothing
        alpha = tl.exp2(m_i - m_use)
        p = tl.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vb = tl.load(v_base + c.to(tl.int64)[:, None] * stride_vn + d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(vb.dtype), vb, input_precision=DOT_PREC)
        m_i = m_new

    has = l_i > 0
    safe_l = tl.where(has, l_i, 1.0)
    out = acc / safe_l[:, None]
    row = b64 * seq_len + t64  # token index over the batch
    if HAS_GATE:
        gate = tl.load(gate_ptr + row * HP + head, mask=row_ok, other=0.0).to(tl.float32)
        out = out.to(o_ptr.dtype.element_ty).to(tl.float32) * gate[:, None]
    tl.store(o_ptr + (row * HP + head)[:, None] * head_dim + d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=rd_mask)
    lse = (m_i + tl.log2(safe_l)) * 0.6931471805599453
    tl.store(lse_ptr + (b64 * HP + head) * seq_len + t64, lse, mask=row_ok)


def anticausal_compression_triton(
    q: Tensor, k_cmp: Tensor, v_cmp: Tensor, block_size: int, scale: float, *,
    gate: Tensor | None = None, launch: CompressionLaunch = DEFAULT_LAUNCH,
) -> tuple[Tensor, Tensor]:
    """`videonsa.ops.official.anticausal_compression` on one Triton kernel (CUDA, or the Triton interpreter).

    Args:
        q: [B, T, HP, D]; k_cmp, v_cmp: [B, NB, HKV, D] with NB = ceil(T / block_size); bf16, fp16 or fp32, one
            dtype. HP must be a multiple of HKV.
        block_size: tokens per compressed block (>= 1).
        scale: softmax scale.
        gate: optional [B, T, HP] (any float dtype): the output is then round(round(o_cmp) * gate) per row.
        launch: launch settings.

    Returns:
        o [B, T, HP, D] in q's dtype (contiguous) and lse float32 [B, HP, T] (natural log, contiguous).
    """
    _check(q, k_cmp, v_cmp, block_size, gate)
    batch, seq_len, heads, dim = q.shape
    n_blocks, heads_kv = k_cmp.shape[1], k_cmp.shape[2]
    group = heads // heads_kv
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, heads, seq_len, dtype=torch.float32, device=q.device)
    if q.numel() == 0:
        return o, lse
    q, k_cmp, v_cmp = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k_cmp, v_cmp))
    if gate is not None:
        gate = gate.contiguous()
    block_m = max(launch.rows, next_pow2(group))
    tokens = block_m // group
    grid = (triton.cdiv(seq_len, tokens), batch * heads_kv)
    _anticausal_compression_kernel[grid](
        q, k_cmp, v_cmp, o, lse, gate if gate is not None else lse,
        seq_len, n_blocks, dim, scale * LOG2E,
        q.stride(0), q.stride(1), q.stride(2), k_cmp.stride(0), k_cmp.stride(1), k_cmp.stride(2),
        v_cmp.stride(0), v_cmp.stride(1), v_cmp.stride(2),
        HP=heads, HKV=heads_kv, G=group, BLOCK_SIZE=block_size, BT=tokens, BLOCK_M=block_m,
        BLOCK_N=launch.block_n, BLOCK_D=max(16, next_pow2(dim)), DOT_PREC=dot_precision(q),
        HAS_GATE=gate is not None, num_warps=launch.num_warps, num_stages=launch.num_stages,
    )
    return o, lse


def _check(q: Tensor, k_cmp: Tensor, v_cmp: Tensor, block_size: int, gate: Tensor | None) -> None:
    if q.dim() != 4 or k_cmp.dim() != 4 or k_cmp.shape != v_cmp.shape:
        raise ValueError(f"official compression: q [B, T, HP, D], k_cmp / v_cmp [B, NB, HKV, D] expected, got "
                         f"{tuple(q.shape)}, {tuple(k_cmp.shape)}, {tuple(v_cmp.shape)}")
    batch, seq_len, heads, dim = q.shape
    if block_size < 1:
        raise ValueError(f"official compression: block_size must be positive, got {block_size}")
    n_blocks = -(-seq_len // block_size)
    if k_cmp.shape[0] != batch or k_cmp.shape[1] != n_blocks or k_cmp.shape[3] != dim:
        raise ValueError(f"official compression: k_cmp must be [B={batch}, NB={n_blocks}, HKV, D={dim}], got "
                         f"{tuple(k_cmp.shape)}")
    if k_cmp.shape[2] == 0 or heads % k_cmp.shape[2]:
        raise ValueError(f"official compression: HP={heads} is not a multiple of HKV={k_cmp.shape[2]}")
    if q.dtype not in _SUPPORTED_DTYPES or k_cmp.dtype != q.dtype or v_cmp.dtype != q.dtype:
        raise ValueError(f"official compression: q, k_cmp, v_cmp must share bf16 / fp16 / fp32, got {q.dtype}, "
                         f"{k_cmp.dtype}, {v_cmp.dtype}")
    if gate is not None and tuple(gate.shape) != (batch, seq_len, heads):
        raise ValueError(f"official compression: gate must be [B, T, HP] = {(batch, seq_len, heads)}, got "
                         f"{tuple(gate.shape)}")


__all__ = ["DEFAULT_LAUNCH", "CompressionLaunch", "anticausal_compression_triton"]
