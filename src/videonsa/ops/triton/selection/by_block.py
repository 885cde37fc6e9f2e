"""The block-major ("by block") layout of the selection forward and dq, for selections whose neighbouring tokens
share few blocks.

The query-tile kernels bring every chosen key block into an SM once per token when tiles share little: 32 KiB of
keys and values per (token, group, block) triple at D=128, which caps them at the L2-to-SM bandwidth. Here the loop
is turned around, as in the dk/dv kernel: one program per (key block, group) holds the block's keys and values and
walks the tokens that chose it, writing one normalised partial output and its log-sum-exp per (token, group, slot)
triple; long lists are cut into pieces run by separate programs. A merge kernel then combines each token's S
partials by their log-sum-exps. Per triple that moves the G query rows in and G partial rows out instead of the
block's keys and values. The partials are bounded by working on chunks of consecutive tokens, one pair of launches
each. dq works the same way: one partial dq per triple, summed per token in slot order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from videonsa.ops.triton.selection.lists import BlockItems, BlockLists, block_lists, by_block_items, key_block_table
from videonsa.ops.triton.selection.plan import block_n
from videonsa.ops.triton.selection.settings import SELECTION_SETTINGS, SelectionSettings
from videonsa.ops.triton.utils import LOG2E, dot_precision, next_pow2, tile_shape


def by_block_chunk_tokens(
    heads_q: int, heads_kv: int, slots: int, head_dim: int, elem_bytes: int, partial_bytes: int | None = None
) -> int:
    """Tokens per chunk so that one chunk's partial outputs fit in `partial_bytes` (None: the default settings'
    `by_block_partial_bytes`)."""
    per_token = heads_kv * slots * (heads_q // heads_kv) * head_dim * elem_bytes
    return max(1, (partial_bytes or SELECTION_SETTINGS.by_block_partial_bytes) // per_token)


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
    q_ptr, k_ptr, v_ptr, o_part_ptr, lse_part_ptr, key_blocks_ptr, items_ptr, bounds_ptr, pairs_ptr, shift_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    chunk, pair0, head_dim, qk_scale,
    HKV: tl.constexpr, G: tl.constexpr, S: tl.constexpr, BT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
    LOOP_STAGES: tl.constexpr, SHIFTED: tl.constexpr = False,
):
    """One program per work item of one chunk (a piece of the triples of one (key block, group), see
    `by_block_items`): softmax of those triples over that block. The launch is a bound on the chunk's item
    count; programs past bounds[chunk + 1] return.

    Writes o_part [triple - pair0, G, D] (normalised, in q's dtype) and lse_part [triple - pair0, G] (base 2,
    -inf where no key of the block is at or before the token).

    SHIFTED: the queries end longer key sequences; shift_ptr [key blocks] holds, per key block, what turns a
    query row of its sequence into that query's key row (the causal limit)."""
    item = tl.load(bounds_ptr + chunk) + tl.program_id(0)
    if item >= tl.load(bounds_ptr + chunk + 1):
        return
    start, end, g, k_row0, n_keys = _work_item(items_ptr, key_blocks_ptr, item, HKV)
    if SHIFTED:  # noqa: SIM108 (a compile-time branch inside a Triton kernel)
        shift = tl.load(shift_ptr + tl.load(items_ptr + item * 3) // HKV).to(tl.int64)
    else:
        shift = 0
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
    # registers this frees let the launch cap them (`SelectionSettings.by_block_max_registers`): three programs
    # per SM instead of two.
    HALF: tl.constexpr = BLOCK_D // 2
    dh = tl.arange(0, HALF)
    lo_ok = dh < head_dim
    hi_ok = HALF + dh < head_dim
    v_rows = v_ptr + k_row64[:, None] * stride_vt + g * stride_vh
    vb_lo = tl.load(v_rows + dh[None, :], mask=k_ok[:, None] & lo_ok[None, :], other=0.0)
    vb_hi = tl.load(v_rows + HALF + dh[None, :], mask=k_ok[:, None] & hi_ok[None, :], other=0.0)
    # Only a step whose first token lies before the block's end can meet a key after one of its tokens: lists
    # ascend by token, so every later step sees the whole block and skips the mask. A short block (a sequence's
    # last) keeps the mask throughout.
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
        if short | (tl.load(pairs_ptr + c0).to(tl.int64) // (HKV * S) + shift < full_from):
            s = tl.where(k_ok[None, :] & (k_row64[None, :] <= t_row[:, None] + shift), s, float("-inf"))
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
    block_indices: Tensor, cu_seqlens: Tensor, block_size: int, chunk_tokens: int, split: int,
    cu_seqlens_k: Tensor | None = None, total_keys: int | None = None,
) -> tuple[Tensor, BlockLists, BlockItems]:
    """The key-block table, the lists and the work items of a block-major pass (forward or dq). No host sync:
    the table and the lists are sized by bounds (`max_tiles_of`, `by_block_items`), so the launches queue
    behind the list building instead of waiting for it. cu_seqlens_k, total_keys: the keys' offsets and
    packed length when the queries end longer key sequences (None: the queries' own)."""
    if cu_seqlens_k is None:
        key_blocks, units = key_block_table(cu_seqlens, block_indices.shape[0], block_size)
    else:
        key_blocks, units = key_block_table(cu_seqlens_k, total_keys, block_size)
    lists = block_lists(
        block_indices, cu_seqlens, block_size, chunk_tokens, n_blocks=key_blocks.shape[0], units=units,
        cu_seqlens_k=cu_seqlens_k,
    )
    return key_blocks, lists, by_block_items(lists, block_indices.shape[1], split)


def _block_row_shifts(key_blocks: Tensor, cu_seqlens: Tensor, cu_seqlens_k: Tensor) -> Tensor:
    """int64 [key blocks]: per row of the key-block table (first key row, keys, sequence start, sequence end
    in key rows), key row minus query row of any query of the block's sequence (the ends line up)."""
    cu_q, cu_k = cu_seqlens.long(), cu_seqlens_k.long()
    seq = torch.searchsorted(cu_k[1:], key_blocks[:, 0].long().contiguous(), right=True)
    seq = seq.clamp(max=cu_k.numel() - 2)
    return (cu_k[1:] - cu_q[1:])[seq].contiguous()


def launch_fwd_by_block(
    q: Tensor, k: Tensor, v: Tensor, block_indices: Tensor, cu_seqlens: Tensor, block_size: int, scale: float,
    *, chunk_tokens: int | None = None, fold_into: Tensor | None = None, fold_scale: Tensor | None = None,
    settings: SelectionSettings = SELECTION_SETTINGS, cu_seqlens_k: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The block-major forward (inputs already checked; block_size <= 64); returns o [T, HQ, D], lse [T, HQ].

    chunk_tokens: tokens per chunk (None: as many as `settings.by_block_partial_bytes` allows, or
    `by_block_partial_bytes_folded` with fold_into). settings: `by_block_rows` query rows per program step
    (BT = rows // G tokens), `by_block_split` the longest piece of a list one program walks (0: whole lists),
    the launch (`by_block_warps`, `by_block_loop_stages`: pipeline stages of the token loop,
    `by_block_max_registers`, `merge_warps`).
    fold_into, fold_scale: see `selected_attention_fwd` (checked there); o is then fold_into.
    cu_seqlens_k: the keys' offsets when the queries end longer key sequences (k, v packed by them)."""
    total, heads_q, head_dim = q.shape
    heads_kv = k.shape[1]
    group = heads_q // heads_kv
    slots = block_indices.shape[-1]
    if block_size > 64:
        raise ValueError(f"selected attention by block: block_size <= 64 needed, got {block_size}")
    fold = fold_into is not None
    partial_bytes = settings.by_block_partial_bytes_folded if fold else settings.by_block_partial_bytes
    chunk_tokens = chunk_tokens or by_block_chunk_tokens(
        heads_q, heads_kv, slots, head_dim, q.element_size(), partial_bytes
    )
    chunk_tokens = min(chunk_tokens, total)
    key_blocks, lists, work = _by_block_work(
        block_indices, cu_seqlens, block_size, chunk_tokens, settings.by_block_split, cu_seqlens_k, k.shape[0]
    )
    shifted = cu_seqlens_k is not None
    shifts = _block_row_shifts(key_blocks, cu_seqlens, cu_seqlens_k) if shifted else key_blocks
    o = fold_into if fold else torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((total, heads_q), dtype=torch.float32, device=q.device)
    o_part = torch.empty((chunk_tokens * heads_kv * slots * group, head_dim), dtype=q.dtype, device=q.device)
    lse_part = torch.empty(chunk_tokens * heads_kv * slots * group, dtype=torch.float32, device=q.device)
    block_m, bt = tile_shape(group, settings.by_block_rows)
    block_d = max(32, next_pow2(head_dim))  # the main kernel's value halves are products of >= 16 columns
    for c in range(lists.n_chunks):
        t0 = c * chunk_tokens
        if work.grid[c]:  # else no token of the chunk can choose a block: the merge writes o = 0
            _slc_fwd_by_block_kernel[(work.grid[c],)](
                q, k, v, o_part, lse_part, key_blocks, work.items, work.bounds, lists.pairs, shifts,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                c, t0 * heads_kv * slots, head_dim, scale * LOG2E,
                HKV=heads_kv, G=group, S=slots, BT=bt, BLOCK_M=block_m, BLOCK_N=block_n(block_size),
                BLOCK_D=block_d, DOT_PREC=dot_precision(q), LOOP_STAGES=settings.by_block_loop_stages,
                SHIFTED=shifted,
                num_warps=settings.by_block_warps, num_stages=1, maxnreg=settings.by_block_max_registers,
            )
        _slc_merge_kernel[(min(chunk_tokens, total - t0), heads_kv)](
            o_part, lse_part, lists.block_indices, o, lse, fold_scale if fold else lse, o.stride(0), o.stride(1),
            t0, head_dim,
            HQ=heads_q, HKV=heads_kv, G=group, S=slots, BLOCK_S=max(2, next_pow2(slots)),
            BLOCK_G=max(2, next_pow2(group)), BLOCK_D=block_d, FOLD=fold, num_warps=settings.merge_warps,
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
    chunk_tokens: int | None = None, settings: SelectionSettings = SELECTION_SETTINGS,
) -> Tensor:
    """dq in the block-major layout (inputs already checked; block_size <= 64): the forward's lists and work
    items, one partial dq per (token, group, slot) triple from the program that holds the block's keys and
    values, summed per token by `_slc_dq_merge_kernel`. Moves each triple's query and gradient rows in and a
    partial out and back instead of the block's 32 KiB of keys and values (`launch_dq`'s query tiles), which
    pays when neighbouring tokens share few blocks. lse, delta float32 [T, HQ] contiguous; do_scale as in
    `launch_dq`. The partials are in q's dtype (float32 for float32 inputs), chunked like the forward's
    (`settings.by_block_partial_bytes`); settings: rows and split as the forward's, launch `dq_by_block_*`.
    Returns dq [T, HQ, D]."""
    total, heads_q, head_dim = q.shape
    heads_kv = k.shape[1]
    group = heads_q // heads_kv
    slots = block_indices.shape[-1]
    if block_size > 64:
        raise ValueError(f"selected attention dq by block: block_size <= 64 needed, got {block_size}")
    chunk_tokens = min(chunk_tokens or by_block_chunk_tokens(heads_q, heads_kv, slots, head_dim, q.element_size(),
                                                             settings.by_block_partial_bytes), total)
    key_blocks, lists, work = _by_block_work(
        block_indices, cu_seqlens, block_size, chunk_tokens, settings.by_block_split
    )
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dq_part = torch.empty((chunk_tokens * heads_kv * slots * group, head_dim), dtype=q.dtype, device=q.device)
    block_m, bt = tile_shape(group, settings.by_block_rows)
    block_d = max(16, next_pow2(head_dim))
    for c in range(lists.n_chunks):
        t0 = c * chunk_tokens
        if work.grid[c]:
            _slc_dq_by_block_kernel[(work.grid[c],)](
                q, k, v, do, do if do_scale is None else do_scale, lse, delta, dq_part, key_blocks, work.items,
                work.bounds, lists.pairs,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), do.stride(0),
                do.stride(1), c, t0 * heads_kv * slots, head_dim, scale * LOG2E, scale,
                HQ=heads_q, HKV=heads_kv, G=group, S=slots, BT=bt, BLOCK_M=block_m, BLOCK_N=block_n(block_size),
                BLOCK_D=block_d, DOT_PREC=dot_precision(q), HAS_DO_SCALE=do_scale is not None,
                LOOP_STAGES=settings.dq_by_block_loop_stages, num_warps=settings.dq_by_block_warps, num_stages=1,
                maxnreg=settings.dq_by_block_max_registers,
            )
        _slc_dq_merge_kernel[(min(chunk_tokens, total - t0), heads_kv)](
            dq_part, lists.block_indices, dq, dq.stride(0), dq.stride(1), t0, head_dim,
            HKV=heads_kv, G=group, S=slots, BLOCK_G=max(2, next_pow2(group)), BLOCK_D=block_d,
            num_warps=settings.merge_warps,
        )
    return dq


__all__ = ["by_block_chunk_tokens", "launch_dq_by_block", "launch_fwd_by_block"]
