"""Top-k block selection of NSA in Triton, without materialising the [HKV, T, T/block] importance tensor.

For query t (position within its sequence) and KV head g, with b = block_size and c = t // b:

    importance[t, g, j] = sum over the G query heads h of g of exp(scale * q[t, h] . K~_j - lse_cmp[t, h])

for the visible compressed blocks j < (t+1) // b. The selected set is the forced blocks (0..init_blocks-1 and
c-local_blocks+1..c, those that exist) plus the highest-importance visible blocks, block_count in all; equal
scores go to the earlier block. The output lists the chosen blocks ascending, padded with -1.

Two kernels make this choice. The default, `_topk_bisect_kernel` (persistent; see its comments): the keys of a
tile's rows go to a per-program scratch row block, and the S-th largest key of each row is found by bisection
over the key values, the row held in registers, or, for rows wider than `TopkSettings.register_row_blocks`
(sequences past 128K tokens at block 64), counted chunk by chunk from the scratch (`_select_chunked`). The
sorting kernel `_topk_kernel` (method="sort") is the exact oracle the tests compare it with:

One program takes a tile of BT consecutive queries of one sequence and one KV head. Its rows are BT tokens x
GP (G rounded up to a power of two) heads, so the per-token sum over heads is a reshape and a reduction. It
recomputes the scores chunk by chunk (BC blocks at a time) and keeps, per token, the best KP = next power of
two >= block_count candidates in registers:

* each candidate is one int64 key, (float bits of the score + 1) << 32 | (2^31 - 1 - j): integer order equals
  score order (scores are >= 0), and among equal scores the earlier block has the larger key. Forced blocks get
  a high word above any finite float, unusable blocks the key 0.
* merging a chunk: sort the chunk ascending and keep its top KP (the last KP columns); the element-wise maximum
  of that ascending run and the descending buffer holds exactly the top KP of both (the first step of a bitonic
  merge); a descending sort makes it the next buffer.

Only the final [total_T, HKV, block_count] int32 indices reach memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from videonsa.ops.triton.utils import LOG2E, dot_precision, next_pow2, query_tiles


@triton.jit
def _indicator(N_LOG: tl.constexpr, BIT: tl.constexpr):
    # 0/1 along hypercube axis N_LOG - BIT of a [rows, 2, ..., 2] tensor: bit BIT of the element's column.
    return tl.reshape(tl.arange(0, 2), [1] * (N_LOG - BIT) + [2] + [1] * BIT)


@triton.jit
def _compare_swap(h, flip, N_LOG: tl.constexpr, BIT: tl.constexpr):
    # The partner of each element (its column with bit BIT flipped) is the pair's sum minus itself; integer
    # sums wrap identically on the GPU and in the interpreter, so this is exact for any int64 key, and unlike
    # tl.sort's xor-reduction it maps to a plain numpy sum under TRITON_INTERPRET (fast CPU tests).
    partner = tl.sum(h, axis=N_LOG - BIT, keep_dims=True) - h
    right = _indicator(N_LOG, BIT)
    return tl.where((h > partner) != ((flip ^ right) != 0), partner, h)


@triton.jit
def _sort_rows(x, ROWS: tl.constexpr, N_LOG: tl.constexpr, DESCENDING: tl.constexpr):
    """Bitonic sort of an integer [ROWS, 2**N_LOG] tensor along its last dim."""
    h = tl.reshape(x, [ROWS] + [2] * N_LOG)
    for stage in tl.static_range(1, N_LOG + 1):
        if stage < N_LOG:  # noqa: SIM108 (a compile-time branch inside a Triton kernel)
            flip = _indicator(N_LOG, stage)  # alternate direction between runs of 2**stage columns
        else:
            flip = tl.full([1] * (N_LOG + 1), DESCENDING, tl.int32)
        for i in tl.static_range(stage):
            h = _compare_swap(h, flip, N_LOG, stage - 1 - i)
    return tl.reshape(h, [ROWS, 2**N_LOG])



@triton.jit
def _topk_kernel(
    q_ptr, kc_ptr, lse_ptr, idx_ptr, cu_ptr, cuk_ptr, cuc_ptr, tiles_ptr, qk_scale,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    BLOCK: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, KP: tl.constexpr, S: tl.constexpr,
    INIT: tl.constexpr, LOCAL: tl.constexpr, PREC: tl.constexpr,
):
    BM: tl.constexpr = BT * GP
    BC_LOG: tl.constexpr = tl.constexpr(BC.bit_length() - 1)
    KP_LOG: tl.constexpr = tl.constexpr(KP.bit_length() - 1)
    tile = tl.program_id(0)
    g = tl.program_id(1)
    seq = tl.load(tiles_ptr + 2 * tile)
    start = tl.load(tiles_ptr + 2 * tile + 1)
    bos = tl.load(cu_ptr + seq).to(tl.int64)
    seq_len = (tl.load(cu_ptr + seq + 1) - tl.load(cu_ptr + seq)).to(tl.int32)
    # Queries that end a longer key sequence (cuk_ptr: the keys' offsets, else cu_ptr again): query i of the
    # sequence sits at key position shift + i.
    shift = (tl.load(cuk_ptr + seq + 1) - tl.load(cuk_ptr + seq)).to(tl.int32) - seq_len
    cbos = tl.load(cuc_ptr + seq).to(tl.int64)
    n_complete = (tl.load(cuc_ptr + seq + 1) - tl.load(cuc_ptr + seq)).to(tl.int32)

    # Rows: token r // GP of the tile, head r % GP of the group (rows with r % GP >= G are padding).
    r = tl.arange(0, BM)
    idx = start + r // GP
    pos = shift + idx
    head_in_group = r % GP
    row_ok = (head_in_group < G) & (idx < seq_len)
    d = tl.arange(0, BD)
    d_ok = d < D
    row_off = (bos + idx).to(tl.int64) * (HQ * D) + (g * G + head_in_group) * D
    q = tl.load(q_ptr + row_off[:, None] + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    stat_off = (bos + idx).to(tl.int64) * HQ + g * G + head_in_group
    lse2 = tl.load(lse_ptr + stat_off, mask=row_ok, other=0.0) * 1.4426950408889634
    row_visible = tl.where(row_ok, (pos + 1) // BLOCK, 0)

    # Per token of the tile.
    tt = tl.arange(0, BT)
    tidx = start + tt
    tpos = shift + tidx
    t_ok = tidx < seq_len
    t_visible = tl.where(t_ok, (tpos + 1) // BLOCK, 0)
    current = tpos // BLOCK
    # Up to and including the current block of the tile's last token (forced even while incomplete).
    n_loop = (shift + tl.minimum(start + BT, seq_len) - 1) // BLOCK + 1

    best = tl.zeros([BT, KP], dtype=tl.int64)  # sorted descending; key 0 = empty
    for j0 in range(0, n_loop, BC):
        j = j0 + tl.arange(0, BC)
        k_off = (cbos + j).to(tl.int64) * (HKV * D) + g * D
        kt = tl.load(kc_ptr + k_off[None, :] + d[:, None], mask=(j < n_complete)[None, :] & d_ok[:, None],
                     other=0.0)
        s = tl.dot(q, kt, input_precision=PREC) * qk_scale
        p = tl.where(j[None, :] < row_visible[:, None], tl.exp2(s - lse2[:, None]), 0.0)
        score = tl.sum(tl.reshape(p, [BT, GP, BC]), axis=1)  # [BT, BC]

        jj = j[None, :]
        forced = t_ok[:, None] & (jj <= current[:, None]) & ((jj < INIT) | (jj > current[:, None] - LOCAL))
        visible = jj < t_visible[:, None]
        high = tl.where(forced, 0x7F800001, score.to(tl.int32, bitcast=True) + 1)
        key = (high.to(tl.int64) << 32) | (0x7FFFFFFF - jj).to(tl.int64)
        key = tl.where(forced | visible, key, 0)
        ascending = _sort_rows(key, BT, BC_LOG, 0)
        chunk_top = tl.max(tl.reshape(ascending, [BT, BC // KP, KP]), axis=1)  # its KP largest, ascending
        best = _sort_rows(tl.maximum(best, chunk_top), BT, KP_LOG, 1)

    rank = tl.arange(0, KP)
    valid = (best > 0) & (rank[None, :] < S)
    block = (0x7FFFFFFF - (best & 0x7FFFFFFF)).to(tl.int32)
    order = _sort_rows(tl.where(valid, block, 0x7FFFFFFF), BT, KP_LOG, 0)  # chosen blocks ascending, empty slots last
    out = tl.where(order == 0x7FFFFFFF, -1, order)
    out_off = (bos + tidx).to(tl.int64)[:, None] * (HKV * S) + g * S + rank[None, :]
    tl.store(idx_ptr + out_off, out, mask=t_ok[:, None] & (rank[None, :] < S))


@triton.jit
def _select_full_width(keys, col, out_row, t_ok, idx_ptr, lo0, hi0, BT: tl.constexpr, NBP: tl.constexpr,
                       S: tl.constexpr, SP: tl.constexpr):
    """The bisection kernel's register-held selection: keys int32 [BT, NBP] (0 = not a candidate), col [NBP],
    out_row int64 [BT] (offset of each token's output row), t_ok [BT], lo0 <= (S-th largest key) <= hi0 [BT]
    where a row has more than S candidates (the bisection's starting bracket; 1 and 0x7F800001 always hold).
    Writes each row's chosen blocks."""
    # 2. A threshold tau per row with count(keys >= tau) >= S >= count(keys > tau) (then the keys above tau
    #    and the earliest keys equal to it are the S best), by bisection over the int32 key range, keeping
    #    count(keys >= lo) >= S > count(keys > hi) until lo = hi. Rows with at most S candidates take all of
    #    them (tau = 1).
    n_valid = tl.sum((keys > 0).to(tl.int32), axis=1)
    many = n_valid > S
    lo = tl.where(many, lo0, 1)
    hi = tl.where(many, hi0, 1)
    # A row is done as soon as some mid has exactly S keys at or above it (then tau = mid, whether or not mid is
    # a key): that happens once mid falls between the S-th and (S+1)-th largest keys, typically after the
    # exponent and a few mantissa bits, not 31 halvings. Only ties at the S-th key (or rows without enough
    # distinct keys) run the full bisection. The loop runs while any row of the tile is open.
    while tl.max(hi - lo, axis=0) > 0:
        mid = lo + ((hi - lo + 1) >> 1)
        # minus count(keys >= mid), as the sum of the sign bits of (mid - 1 - key): keys and mid are in
        # [0, 0x7F800001], so the difference cannot overflow and is negative exactly when key >= mid. Three
        # integer ops per key (sub, arithmetic shift, add) where a compare compiles to a longer bit-packing
        # sequence on sm_90.
        neg_count = tl.sum((mid[:, None] - 1 - keys) >> 31, axis=1)
        open_row = lo < hi
        enough = neg_count <= -S
        lo = tl.where(open_row & enough, mid, lo)
        hi = tl.where(open_row, tl.where(neg_count == -S, mid, tl.where(enough, hi, mid - 1)), hi)
    tau = tl.where(many, lo, 1)
    # Keys above tau are in; of the keys equal to tau, the earliest blocks fill the remaining slots.
    above = keys > tau[:, None]
    need = tl.where(many, S - tl.sum(above.to(tl.int32), axis=1), S)
    equal = keys == tau[:, None]
    chosen = above | (equal & (tl.cumsum(equal.to(tl.int32), axis=1) <= need[:, None]))

    # 3. Write the chosen blocks in ascending order (the scan order), then -1 in the unused slots.
    rank = tl.cumsum(chosen.to(tl.int32), axis=1) - 1
    tl.store(idx_ptr + out_row[:, None] + rank, col[None, :] + tl.zeros([BT, NBP], dtype=tl.int32),
             mask=chosen & t_ok[:, None])
    n_chosen = tl.sum(chosen.to(tl.int32), axis=1)
    slots = tl.arange(0, SP)
    tl.store(idx_ptr + out_row[:, None] + slots[None, :], tl.full([BT, SP], -1, dtype=tl.int32),
             mask=(slots[None, :] >= n_chosen[:, None]) & (slots[None, :] < S) & t_ok[:, None])


@triton.jit
def _select_from_scratch(slot, n_loop, out_row, t_ok, idx_ptr, lo0, hi0, BT: tl.constexpr, NBP: tl.constexpr,
                         S: tl.constexpr, SP: tl.constexpr):
    """`_select_full_width` on the key rows read back from the scratch slot ([BT, NBP] int32; columns >= n_loop
    are not read: key 0). A tile whose blocks all lie in the first half of the row (n_loop <= NBP / 2, half the
    tiles of a long sequence) runs it on [BT, NBP / 2]: the other columns hold key 0 and are never counted or
    chosen, so the result is the same, for half the work per bisection step."""
    tt = tl.arange(0, BT)
    if NBP >= 32:
        if n_loop <= NBP // 2:
            col_h = tl.arange(0, NBP // 2)
            keys_h = tl.load(slot + tt[:, None] * NBP + col_h[None, :],
                             mask=(col_h[None, :] < n_loop) & (tt[:, None] < BT), other=0, cache_modifier=".cg")
            _select_full_width(keys_h, col_h, out_row, t_ok, idx_ptr, lo0, hi0, BT, NBP // 2, S, SP)
        else:
            col_f = tl.arange(0, NBP)
            keys_f = tl.load(slot + tt[:, None] * NBP + col_f[None, :],
                             mask=(col_f[None, :] < n_loop) & (tt[:, None] < BT), other=0, cache_modifier=".cg")
            _select_full_width(keys_f, col_f, out_row, t_ok, idx_ptr, lo0, hi0, BT, NBP, S, SP)
    else:
        col = tl.arange(0, NBP)
        keys = tl.load(slot + tt[:, None] * NBP + col[None, :], mask=(col[None, :] < n_loop) & (tt[:, None] < BT),
                       other=0, cache_modifier=".cg")
        _select_full_width(keys, col, out_row, t_ok, idx_ptr, lo0, hi0, BT, NBP, S, SP)


@triton.jit
def _row_chunk(slot, c0, n_loop, BT: tl.constexpr, NBP: tl.constexpr, CH: tl.constexpr):
    """Keys int32 [BT, CH] of columns c0 .. c0 + CH - 1 of the scratch rows (0 past n_loop)."""
    tt = tl.arange(0, BT)
    col = c0 + tl.arange(0, CH)
    return tl.load(slot + tt[:, None] * NBP + col[None, :], mask=(col[None, :] < n_loop) & (tt[:, None] < BT),
                   other=0, cache_modifier=".cg")


@triton.jit
def _select_chunked(slot, n_loop, out_row, t_ok, idx_ptr, lo0, hi0, BT: tl.constexpr, NBP: tl.constexpr,
                    CH: tl.constexpr, S: tl.constexpr, SP: tl.constexpr):
    """The full-width selection for key rows too wide for registers: the same threshold, ties and output as
    `_select_full_width`, with every count taken over the scratch rows CH columns at a time (each bisection
    step re-reads the rows). Only columns < n_loop are read. lo0 <= (S-th largest key) <= hi0 [BT]: the
    bisection starts from that bracket (any valid one gives the same result, a narrow one in fewer steps)."""
    n_valid = tl.zeros([BT], dtype=tl.int32)
    for c0 in range(0, n_loop, CH):
        n_valid += tl.sum((_row_chunk(slot, c0, n_loop, BT, NBP, CH) > 0).to(tl.int32), axis=1)
    many = n_valid > S
    lo = tl.where(many, lo0, 1)
    hi = tl.where(many, hi0, 1)
    # Bisection as in `_select_full_width` (count(keys >= lo) >= S > count(keys > hi)), counted chunk by chunk,
    # always with its early stop (a row is done once some mid has exactly S keys at or above it).
    while tl.max(hi - lo, axis=0) > 0:
        mid = lo + ((hi - lo + 1) >> 1)
        neg_count = tl.zeros([BT], dtype=tl.int32)
        for c0 in range(0, n_loop, CH):
            keys = _row_chunk(slot, c0, n_loop, BT, NBP, CH)
            neg_count += tl.sum((mid[:, None] - 1 - keys) >> 31, axis=1)
        open_row = lo < hi
        enough = neg_count <= -S
        lo = tl.where(open_row & enough, mid, lo)
        hi = tl.where(open_row, tl.where(neg_count == -S, mid, tl.where(enough, hi, mid - 1)), hi)
    tau = tl.where(many, lo, 1)
    n_above = tl.zeros([BT], dtype=tl.int32)
    for c0 in range(0, n_loop, CH):
        n_above += tl.sum((_row_chunk(slot, c0, n_loop, BT, NBP, CH) > tau[:, None]).to(tl.int32), axis=1)
    need = tl.where(many, S - n_above, S)
    # Write the chosen blocks in ascending order: running counts of the equal keys seen and the blocks written.
    equal_seen = tl.zeros([BT], dtype=tl.int32)
    written = tl.zeros([BT], dtype=tl.int32)
    for c0 in range(0, n_loop, CH):
        keys = _row_chunk(slot, c0, n_loop, BT, NBP, CH)
        equal = keys == tau[:, None]
        equal_rank = equal_seen[:, None] + tl.cumsum(equal.to(tl.int32), axis=1)
        chosen = (keys > tau[:, None]) | (equal & (equal_rank <= need[:, None]))
        rank = written[:, None] + tl.cumsum(chosen.to(tl.int32), axis=1) - 1
        col = c0 + tl.arange(0, CH)
        tl.store(idx_ptr + out_row[:, None] + rank, col[None, :] + tl.zeros([BT, CH], dtype=tl.int32),
                 mask=chosen & t_ok[:, None])
        equal_seen += tl.sum(equal.to(tl.int32), axis=1)
        written += tl.sum(chosen.to(tl.int32), axis=1)
    slots = tl.arange(0, SP)
    tl.store(idx_ptr + out_row[:, None] + slots[None, :], tl.full([BT, SP], -1, dtype=tl.int32),
             mask=(slots[None, :] >= written[:, None]) & (slots[None, :] < S) & t_ok[:, None])


@triton.jit
def _topk_bisect_kernel(
    q_ptr, kc_ptr, lse_ptr, idx_ptr, scratch_ptr, cu_ptr, cuk_ptr, cuc_ptr, tiles_ptr, n_work, qk_scale,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    BLOCK: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, NBP: tl.constexpr, S: tl.constexpr,
    SP: tl.constexpr, INIT: tl.constexpr, LOCAL: tl.constexpr, PREC: tl.constexpr, ROW_CHUNK: tl.constexpr = 0,
    SC: tl.constexpr = 1,
):
    # Persistent: program `pid` takes work items pid, pid + n_prog, ... (a work item = one tile x one KV head)
    # and owns scratch row block `pid` ([BT, NBP] int32 keys, reused for every item, so it stays in L2).
    # ROW_CHUNK > 0: key rows too wide for registers, selected ROW_CHUNK columns at a time (`_select_chunked`).
    BM: tl.constexpr = BT * GP
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    slot = scratch_ptr + pid.to(tl.int64) * (BT * NBP)
    r = tl.arange(0, BM)
    tt = tl.arange(0, BT)
    d = tl.arange(0, BD)
    d_ok = d < D
    for w in range(pid, n_work, n_prog):
        tile = w // HKV
        g = w % HKV
        seq = tl.load(tiles_ptr + 2 * tile)
        start = tl.load(tiles_ptr + 2 * tile + 1)
        bos = tl.load(cu_ptr + seq).to(tl.int64)
        seq_len = (tl.load(cu_ptr + seq + 1) - tl.load(cu_ptr + seq)).to(tl.int32)
        # Query i of the sequence sits at key position shift + i (as in `_topk_kernel`).
        shift = (tl.load(cuk_ptr + seq + 1) - tl.load(cuk_ptr + seq)).to(tl.int32) - seq_len
        cbos = tl.load(cuc_ptr + seq).to(tl.int64)
        n_complete = (tl.load(cuc_ptr + seq + 1) - tl.load(cuc_ptr + seq)).to(tl.int32)

        idx = start + r // GP
        pos = shift + idx
        head_in_group = r % GP
        row_ok = (head_in_group < G) & (idx < seq_len)
        row_off = (bos + idx).to(tl.int64) * (HQ * D) + (g * G + head_in_group) * D
        q = tl.load(q_ptr + row_off[:, None] + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        stat_off = (bos + idx).to(tl.int64) * HQ + g * G + head_in_group
        lse2 = tl.load(lse_ptr + stat_off, mask=row_ok, other=0.0) * 1.4426950408889634
        row_visible = tl.where(row_ok, (pos + 1) // BLOCK, 0)
        tidx = start + tt
        tpos = shift + tidx
        t_ok = tidx < seq_len
        t_visible = tl.where(t_ok, (tpos + 1) // BLOCK, 0)
        current = tpos // BLOCK
        n_loop = (shift + tl.minimum(start + BT, seq_len) - 1) // BLOCK + 1

        # 1. Keys of every candidate block (int32: float bits of the score + 1, forced above every finite
        #    score, 0 = not a candidate) into the scratch rows. For the chunked selection, also per row the
        #    largest key of each strided class j mod SC and the largest key that is not forced, which bracket
        #    the S-th largest key before any bisection step.
        class_max = tl.zeros([BT, SC], dtype=tl.int32)
        free_max = tl.zeros([BT], dtype=tl.int32)
        for j0 in range(0, n_loop, BC):
            j = j0 + tl.arange(0, BC)
            k_off = (cbos + j).to(tl.int64) * (HKV * D) + g * D
            kt = tl.load(kc_ptr + k_off[None, :] + d[:, None], mask=(j < n_complete)[None, :] & d_ok[:, None],
                         other=0.0)
            s = tl.dot(q, kt, input_precision=PREC) * qk_scale
            p = tl.where(j[None, :] < row_visible[:, None], tl.exp2(s - lse2[:, None]), 0.0)
            score = tl.sum(tl.reshape(p, [BT, GP, BC]), axis=1)  # [BT, BC]
            jj = j[None, :]
            forced = t_ok[:, None] & (jj <= current[:, None]) & ((jj < INIT) | (jj > current[:, None] - LOCAL))
            visible = jj < t_visible[:, None]
            key = tl.where(forced, 0x7F800001, score.to(tl.int32, bitcast=True) + 1)
            key = tl.where(forced | visible, key, 0)
            tl.store(slot + tt[:, None] * NBP + jj, key, mask=(jj < n_loop) & (tt[:, None] < BT))
            if ROW_CHUNK > 0:
                class_max = tl.maximum(class_max, tl.max(tl.reshape(key, [BT, BC // SC, SC]), axis=1))
                free_max = tl.maximum(free_max, tl.max(tl.where(key == 0x7F800001, 0, key), axis=1))
        tl.debug_barrier()  # the keys written by every thread are read back by others
        out_row = (bos + tidx).to(tl.int64) * (HKV * S) + g * S
        # The bisection's starting bracket lo0 <= (S-th largest key) <= hi0: the SC class maxima are SC
        # distinct keys, so their minimum is at most the S-th largest (SC >= S); above the largest free key
        # only forced ones remain, fewer than S (INIT + LOCAL < S). Register-held rows start from the whole key
        # range (gathering the bracket costs the register-bound kernel more than the steps it saves).
        if ROW_CHUNK > 0 and SC >= S:  # noqa: SIM108 (a compile-time branch inside a Triton kernel)
            lo0 = tl.maximum(tl.min(class_max, axis=1), 1)
        else:
            lo0 = tl.full([BT], 1, dtype=tl.int32)
        if ROW_CHUNK > 0 and INIT + LOCAL < S:  # noqa: SIM108
            hi0 = tl.maximum(free_max, lo0)
        else:
            hi0 = tl.full([BT], 0x7F800001, dtype=tl.int32)
        if ROW_CHUNK > 0:  # rows too wide for registers: counted ROW_CHUNK columns at a time
            _select_chunked(slot, n_loop, out_row, t_ok, idx_ptr, lo0, hi0, BT, NBP, ROW_CHUNK, S, SP)
        else:
            _select_from_scratch(slot, n_loop, out_row, t_ok, idx_ptr, lo0, hi0, BT, NBP, S, SP)
        tl.debug_barrier()  # the scratch rows are rewritten by the next work item


@dataclass(frozen=True)
class TopkSettings:
    """Launch settings of the top-k bisection kernel. Measured by benchmarks/tune/tune_topk.py on the H100 (every
    setting chooses the same blocks as the sorting kernel); results in docs/performance.md.

    programs_per_sm: persistent programs per SM (a second resident program hides the first's latency where the
        key rows are short enough to leave it registers).
    max_keys_per_thread: key columns one thread holds for the register-held selection; sets the warps.
    warps: num_warps (None: from max_keys_per_thread, at least 4).
    tokens: tokens per tile (None: 8; raised so that tokens * G >= 16 for tl.dot).
    chunk: compressed blocks per score step (a power of two >= 16, capped at the key row width).
    stages: num_stages of the launch (pipelines the K~ chunk loads).
    register_row_blocks: key rows up to this many blocks are held in registers for the selection; wider rows
        (sequences past 128K tokens at block 64) are counted `row_chunk` columns at a time from the scratch rows.
    """

    programs_per_sm: int = 2
    max_keys_per_thread: int = 64
    warps: int | None = None
    tokens: int | None = None
    chunk: int = 64
    stages: int = 3
    register_row_blocks: int = 2048
    row_chunk: int = 1024


TOPK_SETTINGS = TopkSettings()


def _bisect_shape(group_pow2: int, n_blocks_pow2: int, settings: TopkSettings) -> tuple[int, int, int] | None:
    """(tokens per tile, num_warps, row chunk) for the bisection kernel, or None for settings it cannot run.
    Key rows up to settings.register_row_blocks wide are held in registers (row chunk 0); wider ones are
    counted settings.row_chunk columns at a time from the scratch rows."""
    # tl.dot needs M = tokens * GP >= 16; more tokens per tile let each K~ chunk load and product serve more rows.
    tokens = max(settings.tokens or 8, triton.cdiv(16, group_pow2))
    row_chunk = 0 if n_blocks_pow2 <= settings.register_row_blocks else min(settings.row_chunk, n_blocks_pow2)
    held = row_chunk or n_blocks_pow2  # key columns in registers at once
    warps = settings.warps or max(4, triton.cdiv(tokens * held, 32 * settings.max_keys_per_thread))
    if warps > 16 or warps & (warps - 1):
        return None
    return tokens, warps, row_chunk


def _num_programs(device: torch.device, n_work: int, settings: TopkSettings) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(n_work, sms * settings.programs_per_sm))
    return max(1, min(n_work, 3))  # interpreter: a few programs exercise the persistent loop


def select_blocks_topk(
    q: Tensor,
    k_cmp: Tensor,
    lse_cmp: Tensor,
    cu_seqlens: Tensor,
    cu_cmp: Tensor,
    *,
    block_size: int,
    block_count: int,
    init_blocks: int,
    local_blocks: int,
    scale: float,
    max_seqlen: int | None = None,
    method: str = "auto",
    settings: TopkSettings = TOPK_SETTINGS,
    cu_seqlens_k: Tensor | None = None,
) -> Tensor:
    """Blocks each query's KV group attends to in the selection branch.

    Args:
        q: [total_T, HQ, D]; k_cmp: [total_NB, HKV, D] (`mean_pool_fwd`); lse_cmp: float32 [total_T, HQ] from
            `compressed_attention_fwd` with the same scale.
        cu_seqlens, cu_cmp: int32 [N+1] query and compressed-block offsets.
        max_seqlen: longest key sequence (read from cu_seqlens_k, else cu_seqlens, when None).
        method: "auto" (the bisection kernel wherever its launch is valid, else the sorting kernel), "bisect"
            or "sort" (the sorting kernel, the exact oracle of the tests).
        settings: the bisection kernel's launch (`TopkSettings`).
        cu_seqlens_k: int32 [N+1] offsets of the keys k_cmp was pooled from, when each sequence's queries are
            its last keys (docs/operator.md); None: the queries are the keys' tokens.
    Returns:
        int32 [total_T, HKV, block_count]: chosen block ids (within the sequence) ascending, -1 padded.
    """
    total, heads_q, head_dim = q.shape
    heads_kv = k_cmp.shape[1]
    group = heads_q // heads_kv
    group_pow2 = next_pow2(group)
    indices = torch.empty(total, heads_kv, block_count, dtype=torch.int32, device=q.device)
    if total == 0:
        return indices
    cu_keys = cu_seqlens if cu_seqlens_k is None else cu_seqlens_k
    if max_seqlen is None:
        # Known on the host for one sequence whose keys are its queries (as in the compression kernels): no sync.
        one_sequence = cu_seqlens_k is None and cu_seqlens.numel() == 2
        max_seqlen = total if one_sequence else int((cu_keys[1:] - cu_keys[:-1]).max())
    n_blocks_pow2 = next_pow2(triton.cdiv(max_seqlen, block_size))
    if method not in ("auto", "bisect", "sort"):
        raise ValueError(f"select_blocks_topk: method must be 'auto', 'bisect' or 'sort', got {method!r}")
    shape = _bisect_shape(group_pow2, n_blocks_pow2, settings)
    if method == "bisect" and shape is None:
        raise ValueError(f"select_blocks_topk: {n_blocks_pow2} blocks per row do not fit the bisection kernel")
    common = dict(
        HQ=heads_q, HKV=heads_kv, G=group, GP=group_pow2, D=head_dim, BD=next_pow2(max(head_dim, 16)),
        BLOCK=block_size, S=block_count, INIT=init_blocks, LOCAL=local_blocks, PREC=dot_precision(q),
    )
    if method in ("auto", "bisect") and shape is not None:
        tokens, warps, row_chunk = shape
        tiles = query_tiles(cu_seqlens, tokens, total)
        n_work = tiles.shape[0] * heads_kv
        n_prog = _num_programs(q.device, n_work, settings)
        # Key rows at least 16 wide (tl.dot's N) and score chunks of settings.chunk blocks (at most the row).
        width = max(n_blocks_pow2, 16)
        scratch = torch.empty(n_prog, tokens, width, dtype=torch.int32, device=q.device)
        chunk = min(settings.chunk, width)
        if chunk < 16 or chunk & (chunk - 1):
            raise ValueError(f"select_blocks_topk: TopkSettings.chunk must be a power of two >= 16, got {chunk}")
        _topk_bisect_kernel[(n_prog,)](
            q, k_cmp, lse_cmp, indices, scratch, cu_seqlens, cu_keys, cu_cmp, tiles, n_work, scale * LOG2E,
            BT=tokens, BC=chunk, NBP=width, SP=next_pow2(block_count), ROW_CHUNK=row_chunk,
            SC=min(next_pow2(block_count), chunk), **common, num_warps=warps, num_stages=settings.stages,
        )
        return indices
    kp = next_pow2(block_count)
    tokens = min(16, max(1, 128 // group_pow2))
    tokens = max(tokens, triton.cdiv(16, group_pow2))  # tl.dot needs M >= 16
    tiles = query_tiles(cu_seqlens, tokens, total)
    _topk_kernel[(tiles.shape[0], heads_kv)](
        q, k_cmp, lse_cmp, indices, cu_seqlens, cu_keys, cu_cmp, tiles, scale * LOG2E,
        BT=tokens, BC=max(64, kp), KP=kp, **common,
        num_warps=8 if tokens * group_pow2 >= 128 else 4, num_stages=2,
    )
    return indices


__all__ = ["TOPK_SETTINGS", "TopkSettings", "select_blocks_topk"]
