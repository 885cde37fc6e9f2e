"""The original VideoNSA top-k block selection in Triton (docs/official-mode.md, "The Triton top-k kernel").

`original_topk_triton` has the signature and the output of `videonsa.ops.official.original_topk_reference`: for
token t of sequence b and KV group i (query heads h = i*G .. i*G+G-1), with cur = t // block_size,

    importance[c] = sum over g of  exp(s[g, c] - lse_used[g])   for c <  cur,  s[g, c] = (q_h * scale) . k_cmp[c]
                                   1                            for c == cur  (the current block: exactly G)
                                   0                            for c >  cur

where q_h * scale is rounded to the input dtype, the dot products and the exponentials are float32, and
lse_used is the compression branch's lse read with the wrong layout: the [B, HP, T] tensor is indexed as if it
were [B, T, HP], so lse_used[g] = lse.flatten()[(b*T + t)*HP + i*G + g]. Candidate c carries the id c+1 when
c <= cur and 0 otherwise; the ids are ordered by a fixed bitonic network and the first S of the final order,
minus one, are the output (-1 = empty slot).

The network, which also decides every tie (equal importances are swapped by the descending steps), works on
chunks of BC = block_size candidates:
  * every chunk: bitonic stages 1 .. log2(BC)-1, runs of 2**stage alternating ascending / descending;
  * the first chunk: a final merge descending;
  * each later chunk: a final merge ascending; then the first BC/2 entries of the previous (descending) result
    replace the first BC/2 of the chunk, and the BC entries are merged descending again (a running merge that
    keeps only the best BC/2 of the earlier chunks).

A compare-exchange of the pair (left, right) swaps values and ids together when (left > right) != flip, where
flip is 1 in descending runs; both positions of a pair make the same decision.

Kernel shape: one program per (tile of TOK consecutive tokens, sequence, KV group). The tile lies inside one
block (TOK divides block_size), so all its tokens walk the same chunks; q is loaded once, each k_cmp chunk is
loaded once and scored for the tile's TOK*G query rows with one tl.dot. Each token keeps its own row of the
network: one int64 key per candidate, (float bits of the importance) << 32 | id, so a compare-exchange moves
one integer; the comparison itself is on the float value of the high word (exact float semantics).

Not reproduced: where an importance is +inf or NaN (an exp overflow, far outside the model's range), the
original's compare-exchange, which extracts a pair by multiplying with 0/1 masks, turns the pair into NaN
bit patterns that depend on the hardware; here values move unchanged and compare as floats.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

_SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclass(frozen=True)
class OfficialTopkLaunch:
    """Launch settings of `original_topk_triton` (the choice does not depend on them, except that the float32
    dot products may round differently with another tile shape and so flip a near tie).

    tokens_per_program: consecutive tokens of one program (a power of two). A program scores its tokens x G
        query rows against block_size compressed keys at a time; it takes min(tokens_per_program, block_size,
        max(1, max_rows // G)) tokens, so that a tile stays inside one block and within max_rows query rows.
    max_rows: the most query rows (tokens x G) one program holds (a power of two); with G = 16 (the 7B) the
        default admits 8 tokens, with G = 32 (the 3B) 4.
    num_warps, num_stages: Triton's launch settings.
    """

    # 8 tokens on 8 warps: one token's row per warp, so the network's exchanges are shuffles without barriers
    # (sm_90 PTX from Triton 3.6: 126 registers, no spills). Chosen from the compiled code, not yet timed:
    # benchmarks/tune/tune_official_topk.py --sweep times the alternatives.
    tokens_per_program: int = 8
    max_rows: int = 128
    num_warps: int = 8
    num_stages: int = 2

    def __post_init__(self) -> None:
        for name in ("tokens_per_program", "max_rows", "num_warps"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"OfficialTopkLaunch.{name} must be a power of two >= 1, got {value}")
        if self.num_stages < 1:
            raise ValueError(f"OfficialTopkLaunch.num_stages must be >= 1, got {self.num_stages}")

    def tokens_for(self, group: int, block_size: int) -> int:
        """Tokens per program for G = `group` query heads per KV head and this block size."""
        return min(self.tokens_per_program, block_size, max(1, self.max_rows // group))


DEFAULT_LAUNCH = OfficialTopkLaunch()


# ----------------------------------------------------------------------------------------------------------
# The network on int64 keys. A tile's keys are held as a [TOK, 2, ..., 2] hypercube (N_LOG twos): axis
# N_LOG - bit holds bit `bit` of the candidate's position in its row.


@triton.jit
def _bit_of_position(N_LOG: tl.constexpr, BIT: tl.constexpr):
    # 0/1 along the hypercube axis of position bit BIT, broadcastable to the [TOK, 2, ..., 2] keys.
    return tl.reshape(tl.arange(0, 2), [1] * (N_LOG - BIT) + [2] + [1] * BIT)


@triton.jit
def _importance_of(key):
    return (key >> 32).to(tl.int32).to(tl.float32, bitcast=True)


@triton.jit
def _compare_exchange(h, flip, N_LOG: tl.constexpr, BIT: tl.constexpr):
    # Pairs are the positions that differ in bit BIT. The partner's key is the pair's sum minus the own key
    # (int64 sums wrap the same way on the GPU and in numpy, so this is exact for any bits, and it is a cheap
    # numpy sum under TRITON_INTERPRET). Both members compare (left > right) and so decide alike, ties included.
    partner = tl.sum(h, axis=N_LOG - BIT, keep_dims=True) - h
    is_right = _bit_of_position(N_LOG, BIT) != 0
    left = _importance_of(tl.where(is_right, partner, h))
    right = _importance_of(tl.where(is_right, h, partner))
    return tl.where((left > right) != flip, partner, h)


@triton.jit
def _merge(h, flip, N_LOG: tl.constexpr, STAGE: tl.constexpr):
    # One bitonic merge step of runs of 2**STAGE positions: exchanges at distances 2**(STAGE-1), ..., 1.
    for j in tl.static_range(STAGE):
        h = _compare_exchange(h, flip, N_LOG, STAGE - 1 - j)
    return h


@triton.jit
def _alternating_stages(h, N_LOG: tl.constexpr):
    # Stages 1 .. N_LOG-1: runs of 2**stage positions, ascending where bit `stage` of the position is 0,
    # descending where it is 1.
    for stage in tl.static_range(1, N_LOG):
        h = _merge(h, _bit_of_position(N_LOG, stage) != 0, N_LOG, stage)
    return h


@triton.jit
def _all_runs(N_LOG: tl.constexpr, DESCENDING: tl.constexpr):
    return tl.full([1] * (N_LOG + 1), DESCENDING, tl.int1)


# ----------------------------------------------------------------------------------------------------------
# Scores


@triton.jit
def _chunk_keys(q_rows, lse_rows, k_base, stride_kc, c0, cur, NB, D,
                TOK: tl.constexpr, G: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr, N_LOG: tl.constexpr,
                USE_DOT: tl.constexpr, PRECISION: tl.constexpr):
    """Keys [TOK, 2, ..., 2] of candidates c0 .. c0+BC-1 for the tile's tokens (all in block `cur`)."""
    cols = c0 + tl.arange(0, BC)
    d = tl.arange(0, BD)
    k = tl.load(k_base + cols[None, :].to(tl.int64) * stride_kc + d[:, None],
                mask=(cols[None, :] < NB) & (d[:, None] < D), other=0.0)  # [BD, BC]
    if USE_DOT:
        s = tl.dot(q_rows, k, input_precision=PRECISION)  # [TOK*G, BC] float32
    else:  # tiles too small for tl.dot (tiny block sizes): exact products, float32 sums
        s = tl.sum(q_rows.to(tl.float32)[:, :, None] * k.to(tl.float32)[None, :, :], axis=1)
    s = tl.where(cols[None, :] < cur, s, float("-inf"))
    p = tl.where(cols[None, :] == cur, 1.0, tl.exp(s - lse_rows[:, None]))
    importance = tl.sum(tl.reshape(p, [TOK, G, BC]), axis=1)  # [TOK, BC]
    ids = tl.where(cols <= cur, cols + 1, 0).to(tl.int64)
    key = (importance.to(tl.int32, bitcast=True).to(tl.int64) << 32) | ids[None, :]
    return tl.reshape(key, [TOK] + [2] * N_LOG)


@triton.jit
def _original_topk_kernel(
    q, k_cmp, lse, out, scale, T, NB, D,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kc, stride_kh,
    HP: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, BD: tl.constexpr, BS: tl.constexpr, S: tl.constexpr,
    TOK: tl.constexpr, N_LOG: tl.constexpr, USE_DOT: tl.constexpr, PRECISION: tl.constexpr,
):
    BC: tl.constexpr = BS
    # Late tiles walk the most chunks: start them first so that the short ones fill the tail of the launch.
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    b = tl.program_id(1) // HKV
    i = tl.program_id(1) % HKV
    t0 = tile * TOK
    toks = t0 + tl.arange(0, TOK)
    live = toks < T
    heads = i * G + tl.arange(0, G)
    d = tl.arange(0, BD)

    q_tile = tl.load(q + b.to(tl.int64) * stride_qb + toks[:, None, None].to(tl.int64) * stride_qt
                     + heads[None, :, None] * stride_qh + d[None, None, :],
                     mask=live[:, None, None] & (d < D)[None, None, :], other=0.0)  # [TOK, G, BD]
    q_rows = tl.reshape((q_tile * scale).to(q_tile.dtype), [TOK * G, BD])  # rounded like the original
    # The layout bug: lse is [B, HP, T] in memory but read as [B, T, HP].
    lse_rows = tl.reshape(tl.load(lse + (b.to(tl.int64) * T + toks[:, None]) * HP + heads[None, :],
                                  mask=live[:, None], other=0.0), [TOK * G])

    cur = t0 // BS  # the tile's block (TOK divides BS)
    k_base = k_cmp + b.to(tl.int64) * stride_kb + i * stride_kh
    h = _chunk_keys(q_rows, lse_rows, k_base, stride_kc, 0, cur, NB, D, TOK, G, BD, BC, N_LOG, USE_DOT, PRECISION)
    h = _alternating_stages(h, N_LOG)
    h = _merge(h, _all_runs(N_LOG, True), N_LOG, N_LOG)
    first_half = _bit_of_position(N_LOG, N_LOG - 1) == 0
    for c0 in range(BC, cur + 1, BC):
        new = _chunk_keys(q_rows, lse_rows, k_base, stride_kc, c0, cur, NB, D, TOK, G, BD, BC, N_LOG, USE_DOT,
                          PRECISION)
        new = _alternating_stages(new, N_LOG)
        new = _merge(new, _all_runs(N_LOG, False), N_LOG, N_LOG)
        # best half of the earlier chunks (descending) + best half of this one (ascending): a bitonic sequence
        h = _merge(tl.where(first_half, h, new), _all_runs(N_LOG, True), N_LOG, N_LOG)

    ids = (tl.reshape(h, [TOK, BC]) & 0xFFFFFFFF).to(tl.int32) - 1
    slot = tl.arange(0, BC)
    tl.store(out + ((b.to(tl.int64) * T + toks[:, None]) * HKV + i) * S + slot[None, :], ids,
             mask=live[:, None] & (slot < S)[None, :])


# ----------------------------------------------------------------------------------------------------------
# Launcher


def _check_inputs(q: Tensor, k_cmp: Tensor, lse: Tensor, block_counts: int, block_size: int) -> None:
    if q.dim() != 4 or k_cmp.dim() != 4:
        raise ValueError(f"q must be [B, T, HP, D] and k_cmp [B, NB, HKV, D]; got {tuple(q.shape)} and "
                         f"{tuple(k_cmp.shape)}")
    batch, length, heads, dim = q.shape
    n_blocks, heads_kv = k_cmp.shape[1], k_cmp.shape[2]
    if block_size < 2 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 2 (the sorting network's width), got {block_size}")
    if block_counts < 1 or triton.next_power_of_2(block_counts) > block_size:
        raise ValueError(f"block_counts={block_counts}: next_power_of_2(block_counts) must be between 1 and "
                         f"block_size={block_size}")
    if k_cmp.shape[0] != batch or k_cmp.shape[3] != dim or n_blocks != -(-length // block_size):
        raise ValueError(f"k_cmp {tuple(k_cmp.shape)} does not fit q {tuple(q.shape)} with block_size "
                         f"{block_size} (expected [B, ceil(T / block_size), HKV, D])")
    group = heads // heads_kv if heads_kv else 0
    if heads_kv < 1 or heads % heads_kv or group & (group - 1):
        raise ValueError(f"q has {heads} heads and k_cmp {heads_kv}: HP / HKV must be a whole power of two")
    if tuple(lse.shape) != (batch, heads, length) or lse.dtype != torch.float32:
        raise ValueError(f"lse must be float32 [B, HP, T] = {(batch, heads, length)}, got {lse.dtype} "
                         f"{tuple(lse.shape)}")
    if q.dtype not in _SUPPORTED_DTYPES or k_cmp.dtype != q.dtype:
        raise ValueError(f"q and k_cmp must share one dtype of bf16/fp16/fp32, got {q.dtype} and {k_cmp.dtype}")
    if not (q.device == k_cmp.device == lse.device):
        raise ValueError(f"q, k_cmp and lse must be on one device, got {q.device}, {k_cmp.device}, {lse.device}")


def original_topk_triton(q: Tensor, k_cmp: Tensor, lse: Tensor, block_counts: int, block_size: int, scale: float,
                         launch: OfficialTopkLaunch = DEFAULT_LAUNCH) -> Tensor:
    """The original's top-k block selection (see the module docstring); same output as
    `videonsa.ops.official.original_topk_reference`.

    q: [B, T, HP, D], k_cmp: [B, NB, HKV, D] (NB = ceil(T / block_size)), one dtype of bf16/fp16/fp32, on CUDA
    (or on the CPU under TRITON_INTERPRET=1); lse: float32 [B, HP, T] (the compression branch's, heads first).
    HP / HKV = G query heads per KV group, a power of two. block_size: a power of two; S = next power of two
    >= block_counts must be at most block_size. Returns int32 [B, T, HKV, S]: block ids in the original's
    order (the sorting network's, descending importance), -1 for empty slots.
    """
    _check_inputs(q, k_cmp, lse, block_counts, block_size)
    batch, length, heads, dim = q.shape
    heads_kv = k_cmp.shape[2]
    slots = triton.next_power_of_2(block_counts)
    out = torch.empty(batch, length, heads_kv, slots, dtype=torch.int32, device=q.device)
    if batch == 0 or length == 0:
        return out
    group = heads // heads_kv
    tokens = launch.tokens_for(group, block_size)
    head_dim_tile = max(16, triton.next_power_of_2(dim))
    q = q if q.stride(-1) == 1 else q.contiguous()
    k_cmp = k_cmp if k_cmp.stride(-1) == 1 else k_cmp.contiguous()
    lse = lse.contiguous()  # read by flat offsets (the layout bug is defined on the contiguous tensor)
    grid = (triton.cdiv(length, tokens), batch * heads_kv)
    _original_topk_kernel[grid](
        q, k_cmp, lse, out, float(scale), length, k_cmp.shape[1], dim,
        q.stride(0), q.stride(1), q.stride(2), k_cmp.stride(0), k_cmp.stride(1), k_cmp.stride(2),
        HP=heads, HKV=heads_kv, G=group, BD=head_dim_tile, BS=block_size, S=slots, TOK=tokens,
        N_LOG=block_size.bit_length() - 1, USE_DOT=tokens * group >= 16 and block_size >= 16,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=launch.num_warps, num_stages=launch.num_stages,
    )
    return out
