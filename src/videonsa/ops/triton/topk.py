"""Top-k block selection of NSA in Triton, without materialising the [HKV, T, T/block] importance tensor.

For query t (position within its sequence) and KV head g, with b = block_size and c = t // b:

    importance[t, g, j] = sum over the G query heads h of g of exp(scale * q[t, h] . K~_j - lse_cmp[t, h])

for the visible compressed blocks j < (t+1) // b. The selected set is the forced blocks (0..init_blocks-1 and
c-local_blocks+1..c, those that exist) plus the highest-importance visible blocks, block_count in all; equal
scores go to the earlier block. The output lists the chosen blocks ascending, padded with -1.

Two kernels make this choice. The default, `_topk_bisect_kernel` (persistent; see its comments): the keys of a
tile's rows go to a per-program scratch row block, and the S-th largest key of each row is found by bisection
over the key values, the row held in registers, or, for rows wider than CONFIG["register_row_blocks"] (sequences
past 128K tokens at block 64), counted chunk by chunk from the scratch (`_select_chunked`). The sorting kernel
`_topk_kernel` (method="sort") is the exact oracle the tests compare it with:

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
def _top4_combine(a0, a1, a2, a3, b0, b1, b2, b3):
    """The 4 largest of two descending 4-lists (duplicates counted), descending. max(a_i, b_(3-i)) holds the 4
    largest of the 8 as a bitonic sequence (the first step of a bitonic merge); two compare-exchange rounds
    sort it."""
    t0 = tl.maximum(a0, b3)
    t1 = tl.maximum(a1, b2)
    t2 = tl.maximum(a2, b1)
    t3 = tl.maximum(a3, b0)
    t0, t2 = tl.maximum(t0, t2), tl.minimum(t0, t2)
    t1, t3 = tl.maximum(t1, t3), tl.minimum(t1, t3)
    t0, t1 = tl.maximum(t0, t1), tl.minimum(t0, t1)
    t2, t3 = tl.maximum(t2, t3), tl.minimum(t2, t3)
    return t0, t1, t2, t3


@triton.jit
def _topk_kernel(
    q_ptr, kc_ptr, lse_ptr, idx_ptr, cu_ptr, cuc_ptr, tiles_ptr, qk_scale,
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
    cbos = tl.load(cuc_ptr + seq).to(tl.int64)
    n_complete = (tl.load(cuc_ptr + seq + 1) - tl.load(cuc_ptr + seq)).to(tl.int32)

    # Rows: token r // GP of the tile, head r % GP of the group (rows with r % GP >= G are padding).
    r = tl.arange(0, BM)
    pos = start + r // GP
    head_in_group = r % GP
    row_ok = (head_in_group < G) & (pos < seq_len)
    d = tl.arange(0, BD)
    d_ok = d < D
    row_off = (bos + pos).to(tl.int64) * (HQ * D) + (g * G + head_in_group) * D
    q = tl.load(q_ptr + row_off[:, None] + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    stat_off = (bos + pos).to(tl.int64) * HQ + g * G + head_in_group
    lse2 = tl.load(lse_ptr + stat_off, mask=row_ok, other=0.0) * 1.4426950408889634
    row_visible = tl.where(row_ok, (pos + 1) // BLOCK, 0)

    # Per token of the tile.
    tt = tl.arange(0, BT)
    tpos = start + tt
    t_ok = tpos < seq_len
    t_visible = tl.where(t_ok, (tpos + 1) // BLOCK, 0)
    current = tpos // BLOCK
    # Up to and including the current block of the tile's last token (forced even while incomplete).
    n_loop = (tl.minimum(start + BT, seq_len) - 1) // BLOCK + 1

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
    out_off = (bos + tpos).to(tl.int64)[:, None] * (HKV * S) + g * S + rank[None, :]
    tl.store(idx_ptr + out_off, out, mask=t_ok[:, None] & (rank[None, :] < S))


@triton.jit
def _select_full_width(keys, col, out_row, t_ok, idx_ptr, lo0, hi0, BT: tl.constexpr, NBP: tl.constexpr,
                       S: tl.constexpr, SP: tl.constexpr, EARLY_EXIT: tl.constexpr):
    """The bisection kernel's full-width path: keys int32 [BT, NBP] (0 = not a candidate), col [NBP],
    out_row int64 [BT] (offset of each token's output row), t_ok [BT], lo0 <= (S-th largest key) <= hi0 [BT]
    where a row has more than S candidates (the bisection's starting bracket; 1 and 0x7F800001 always hold).
    Writes each row's chosen blocks."""
    # 3b. A threshold tau per row with count(keys >= tau) >= S >= count(keys > tau) (then the keys above tau
    #    and the earliest keys equal to it are the S best), by bisection over the int32 key range, keeping
    #    count(keys >= lo) >= S > count(keys > hi) until lo = hi. Rows with at most S candidates take all of
    #    them (tau = 1).
    n_valid = tl.sum((keys > 0).to(tl.int32), axis=1)
    many = n_valid > S
    lo = tl.where(many, lo0, 1)
    hi = tl.where(many, hi0, 1)
    if EARLY_EXIT:
        # A row is done as soon as some mid has exactly S keys at or above it (then tau = mid, whether or not
        # mid is a key): that happens once mid falls between the S-th and (S+1)-th largest keys, typically
        # after the exponent and a few mantissa bits, not 31 halvings. Only ties at the S-th key (or rows
        # without enough distinct keys) run the full bisection. The loop runs while any row of the tile is open.
        while tl.max(hi - lo, axis=0) > 0:
            mid = lo + ((hi - lo + 1) >> 1)
            # minus count(keys >= mid): see the fixed-count loop below for the sign-bit form
            neg_count = tl.sum((mid[:, None] - 1 - keys) >> 31, axis=1)
            open_row = lo < hi
            enough = neg_count <= -S
            lo = tl.where(open_row & enough, mid, lo)
            hi = tl.where(open_row, tl.where(neg_count == -S, mid, tl.where(enough, hi, mid - 1)), hi)
    else:
        for _ in range(31):
            mid = lo + ((hi - lo + 1) >> 1)
            # count(keys >= mid) as minus the sum of the sign bits of (mid - 1 - key): keys and mid are in
            # [0, 0x7F800001], so the difference cannot overflow and is negative exactly when key >= mid. Three
            # integer ops per key (sub, arithmetic shift, add); the compare form compiled on sm_90 to a
            # bit-packing popc sequence of ~5 (bisection loop body 286 instead of 390 PTX instructions per
            # iteration).
            enough = tl.sum((mid[:, None] - 1 - keys) >> 31, axis=1) <= -S
            lo = tl.where(enough, mid, lo)
            hi = tl.where(enough, hi, mid - 1)
    tau = tl.where(many, lo, 1)
    # Keys above tau are in; of the keys equal to tau, the earliest blocks fill the remaining slots.
    above = keys > tau[:, None]
    need = tl.where(many, S - tl.sum(above.to(tl.int32), axis=1), S)
    equal = keys == tau[:, None]
    chosen = above | (equal & (tl.cumsum(equal.to(tl.int32), axis=1) <= need[:, None]))

    # 4b. Write the chosen blocks in ascending order (the scan order), then -1 in the unused slots.
    rank = tl.cumsum(chosen.to(tl.int32), axis=1) - 1
    tl.store(idx_ptr + out_row[:, None] + rank, col[None, :] + tl.zeros([BT, NBP], dtype=tl.int32),
             mask=chosen & t_ok[:, None])
    n_chosen = tl.sum(chosen.to(tl.int32), axis=1)
    slots = tl.arange(0, SP)
    tl.store(idx_ptr + out_row[:, None] + slots[None, :], tl.full([BT, SP], -1, dtype=tl.int32),
             mask=(slots[None, :] >= n_chosen[:, None]) & (slots[None, :] < S) & t_ok[:, None])


@triton.jit
def _select_from_scratch(slot, n_loop, out_row, t_ok, idx_ptr, lo0, hi0, BT: tl.constexpr, NBP: tl.constexpr,
                         S: tl.constexpr, SP: tl.constexpr, HALF: tl.constexpr, EARLY_EXIT: tl.constexpr):
    """The full-width path on the key rows read back from the scratch slot ([BT, NBP] int32; columns >= n_loop
    are not read: key 0). With HALF, a tile whose blocks all lie in the first half of the row (n_loop <= NBP / 2,
    half the tiles of a long sequence) runs it on [BT, NBP / 2]: the other columns hold key 0 and are never
    counted or chosen, so the result is the same, for half the work per bisection step."""
    tt = tl.arange(0, BT)
    if HALF and NBP >= 32:
        if n_loop <= NBP // 2:
            col_h = tl.arange(0, NBP // 2)
            keys_h = tl.load(slot + tt[:, None] * NBP + col_h[None, :],
                             mask=(col_h[None, :] < n_loop) & (tt[:, None] < BT), other=0, cache_modifier=".cg")
            _select_full_width(keys_h, col_h, out_row, t_ok, idx_ptr, lo0, hi0, BT, NBP // 2, S, SP, EARLY_EXIT)
        else:
            col_f = tl.arange(0, NBP)
            keys_f = tl.load(slot + tt[:, None] * NBP + col_f[None, :],
                             mask=(col_f[None, :] < n_loop) & (tt[:, None] < BT), other=0, cache_modifier=".cg")
            _select_full_width(keys_f, col_f, out_row, t_ok, idx_ptr, lo0, hi0, BT, NBP, S, SP, EARLY_EXIT)
    else:
        col = tl.arange(0, NBP)
        keys = tl.load(slot + tt[:, None] * NBP + col[None, :], mask=(col[None, :] < n_loop) & (tt[:, None] < BT),
                       other=0, cache_modifier=".cg")
        _select_full_width(keys, col, out_row, t_ok, idx_ptr, lo0, hi0, BT, NBP, S, SP, EARLY_EXIT)


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
    q_ptr, kc_ptr, lse_ptr, idx_ptr, scratch_ptr, ckey_ptr, cblk_ptr, cu_ptr, cuc_ptr, tiles_ptr, n_work,
    qk_scale,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    BLOCK: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, NBP: tl.constexpr, S: tl.constexpr,
    SP: tl.constexpr, INIT: tl.constexpr, LOCAL: tl.constexpr, PREC: tl.constexpr, CB: tl.constexpr,
    NCLS: tl.constexpr, CJ: tl.constexpr, SCORE_ONLY: tl.constexpr = False, HALF: tl.constexpr = False,
    EARLY_EXIT: tl.constexpr = True, ROW_CHUNK: tl.constexpr = 0, SC: tl.constexpr = 1,
    BRACKET: tl.constexpr = False,
):
    # SCORE_ONLY (benchmarks only, output not written): step 1 alone, the selection steps 2-4 compiled out, so
    # that timing it against the full kernel tells the score pass's share of the time.
    # Persistent: program `pid` takes work items pid, pid + n_prog, ... (a work item = one tile x one KV head)
    # and owns scratch row block `pid` ([BT, NBP] int32 keys, reused for every item, so it stays in L2).
    BM: tl.constexpr = BT * GP
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    slot = scratch_ptr + pid.to(tl.int64) * (BT * NBP)
    cslot_key = ckey_ptr + pid.to(tl.int64) * (BT * CB)  # [BT, CB] compacted candidate keys
    cslot_blk = cblk_ptr + pid.to(tl.int64) * (BT * CB)  # and their block ids
    r = tl.arange(0, BM)
    tt = tl.arange(0, BT)
    col = tl.arange(0, NBP)
    d = tl.arange(0, BD)
    d_ok = d < D
    for w in range(pid, n_work, n_prog):
        tile = w // HKV
        g = w % HKV
        seq = tl.load(tiles_ptr + 2 * tile)
        start = tl.load(tiles_ptr + 2 * tile + 1)
        bos = tl.load(cu_ptr + seq).to(tl.int64)
        seq_len = (tl.load(cu_ptr + seq + 1) - tl.load(cu_ptr + seq)).to(tl.int32)
        cbos = tl.load(cuc_ptr + seq).to(tl.int64)
        n_complete = (tl.load(cuc_ptr + seq + 1) - tl.load(cuc_ptr + seq)).to(tl.int32)

        pos = start + r // GP
        head_in_group = r % GP
        row_ok = (head_in_group < G) & (pos < seq_len)
        row_off = (bos + pos).to(tl.int64) * (HQ * D) + (g * G + head_in_group) * D
        q = tl.load(q_ptr + row_off[:, None] + d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        stat_off = (bos + pos).to(tl.int64) * HQ + g * G + head_in_group
        lse2 = tl.load(lse_ptr + stat_off, mask=row_ok, other=0.0) * 1.4426950408889634
        row_visible = tl.where(row_ok, (pos + 1) // BLOCK, 0)
        tpos = start + tt
        t_ok = tpos < seq_len
        t_visible = tl.where(t_ok, (tpos + 1) // BLOCK, 0)
        current = tpos // BLOCK
        n_loop = (tl.minimum(start + BT, seq_len) - 1) // BLOCK + 1

        # 1. Keys of every candidate block (int32: float bits of the score + 1, forced above every finite
        #    score, 0 = not a candidate) into the scratch rows. Alongside, per row, the 4 largest keys of each
        #    strided column class j mod NCLS (descending, duplicates counted) for the candidate filter of step 2;
        #    kept here on [BT, BC] chunks because a reduction over the full-width rows spills registers.
        c0 = tl.zeros([BT, NCLS], dtype=tl.int32)
        c1 = tl.zeros([BT, NCLS], dtype=tl.int32)
        c2 = tl.zeros([BT, NCLS], dtype=tl.int32)
        c3 = tl.zeros([BT, NCLS], dtype=tl.int32)
        # With BRACKET: per row the largest key of each strided class j mod SC and the largest key that is not
        # forced, which bracket the S-th largest key before any bisection step.
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
            if CB > 0:
                # Chunks start at multiples of BC, a multiple of NCLS: column j0 + i is in class i mod NCLS.
                zero = tl.zeros([BT, BC // NCLS, NCLS], dtype=tl.int32)
                k0, k1, k2, k3 = tl.reduce((tl.reshape(key, [BT, BC // NCLS, NCLS]), zero, zero, zero), axis=1,
                                           combine_fn=_top4_combine)
                c0, c1, c2, c3 = _top4_combine(c0, c1, c2, c3, k0, k1, k2, k3)
            if BRACKET:
                class_max = tl.maximum(class_max, tl.max(tl.reshape(key, [BT, BC // SC, SC]), axis=1))
                free_max = tl.maximum(free_max, tl.max(tl.where(key == 0x7F800001, 0, key), axis=1))
        if not SCORE_ONLY:
            tl.debug_barrier()  # the keys written by every thread are read back by others
            out_row = (bos + tpos).to(tl.int64) * (HKV * S) + g * S
            # The bisection's starting bracket lo0 <= (S-th largest key) <= hi0: the SC class maxima are SC
            # distinct keys, so their minimum is at most the S-th largest (SC >= S); above the largest free key
            # only forced ones remain, fewer than S (INIT + LOCAL < S). Without BRACKET, the whole key range.
            if BRACKET and SC >= S:  # noqa: SIM108 (a compile-time branch inside a Triton kernel)
                lo0 = tl.maximum(tl.min(class_max, axis=1), 1)
            else:
                lo0 = tl.full([BT], 1, dtype=tl.int32)
            if BRACKET and INIT + LOCAL < S:  # noqa: SIM108
                hi0 = tl.maximum(free_max, lo0)
            else:
                hi0 = tl.full([BT], 0x7F800001, dtype=tl.int32)

            # 2. Candidate filter. A lower bound on each row's S-th largest key: the columns fall into NCLS strided
            #    classes (j mod NCLS); the 4th largest key of every class is reached by 4 distinct keys of that class,
            #    so the smallest of these NCLS values is reached by 4 * NCLS >= S distinct keys and is <= the S-th
            #    largest. Every key that can be chosen (all keys >= the S-th largest, ties included) is >= the bound;
            #    on random rows only ~3% of 2048 keys are. A row with fewer than 4 candidates in some class gets the
            #    bound 0, i.e. all its candidates.
            if CB > 0:
                keys = tl.load(slot + tt[:, None] * NBP + col[None, :],
                               mask=(col[None, :] < n_loop) & (tt[:, None] < BT), other=0, cache_modifier=".cg")
                if 4 * NCLS >= S:  # noqa: SIM108 (a compile-time branch inside a Triton kernel)
                    bound = tl.maximum(tl.min(c3, axis=1), 1)  # [BT]; key 0 is never a candidate
                else:  # too few classes to bound the S-th key: every candidate (still exact, rarely compact)
                    bound = tl.full([BT], 1, dtype=tl.int32)
                cand = keys >= bound[:, None]
                n_cand = tl.sum(cand.to(tl.int32), axis=1)
                fits = tl.max(n_cand, axis=0) <= CB
                if fits:
                    # 3a. Compact the candidates (in column order) into [BT, CB] and rank them against each
                    #     other: a candidate's rank is the number of candidates with a larger (key, earlier block)
                    #     pair, so the S best by key, ties to the earlier block, are those of rank < S: the same
                    #     set as the full path.
                    cpos = tl.cumsum(cand.to(tl.int32), axis=1) - 1
                    c_off = tt[:, None] * CB + cpos
                    # Only the block ids are compacted; their keys are gathered back from the scratch rows (storing the
                    # keys too would move the full-width key tensor into the store layout through shared memory).
                    tl.store(cslot_blk + c_off, col[None, :] + tl.zeros([BT, NBP], dtype=tl.int32), mask=cand)
                    tl.debug_barrier()  # the compacted rows written by every thread are read back by others
                    ci = tl.arange(0, CB)
                    c_ok = ci[None, :] < n_cand[:, None]
                    cblk = tl.load(cslot_blk + tt[:, None] * CB + ci[None, :], mask=c_ok, other=0, cache_modifier=".cg")
                    ckey = tl.load(slot + tt[:, None] * NBP + cblk, mask=c_ok, other=0, cache_modifier=".cg")
                    tl.store(cslot_key + tt[:, None] * CB + ci[None, :], ckey)
                    tl.debug_barrier()  # the pairwise loop below reads other threads' keys
                    # One int64 per candidate, unique within a row: key in the high word, 2^31 - 1 - block below it
                    # (empty slots: key 0, below every candidate).
                    pair = (ckey.to(tl.int64) << 32) | (0x7FFFFFFF - cblk).to(tl.int64)
                    # Pairwise counts in [BT, CB, CJ] slices (the whole [BT, CB, CB] comparison would spill), only over
                    # the slots some row of the tile uses.
                    crank = tl.zeros([BT, CB], dtype=tl.int32)
                    for cj0 in range(0, tl.max(n_cand, axis=0), CJ):
                        cj = cj0 + tl.arange(0, CJ)
                        j_off = tt[:, None] * CB + cj[None, :]
                        j_ok = cj[None, :] < n_cand[:, None]
                        kj = tl.load(cslot_key + j_off, mask=j_ok, other=0, cache_modifier=".cg")
                        bj = tl.load(cslot_blk + j_off, mask=j_ok, other=0, cache_modifier=".cg")
                        pj = (kj.to(tl.int64) << 32) | (0x7FFFFFFF - bj).to(tl.int64)
                        crank += tl.sum((pj[:, None, :] > pair[:, :, None]).to(tl.int32), axis=2)
                    cchosen = (ckey > 0) & (crank < S)
                    # 4a. Compaction kept the column order, so the chosen blocks' running count is their output slot.
                    cslot = tl.cumsum(cchosen.to(tl.int32), axis=1) - 1
                    tl.store(idx_ptr + out_row[:, None] + cslot, cblk, mask=cchosen & t_ok[:, None])
                    n_chosen = tl.sum(cchosen.to(tl.int32), axis=1)
                    slots = tl.arange(0, SP)
                    tl.store(idx_ptr + out_row[:, None] + slots[None, :], tl.full([BT, SP], -1, dtype=tl.int32),
                             mask=(slots[None, :] >= n_chosen[:, None]) & (slots[None, :] < S) & t_ok[:, None])
                else:
                    # Fallback (a row with more than CB candidates): the full-width path. The keys are read again
                    # (L1/L2 hits) so that they are not held in registers across the compact branch.
                    _select_from_scratch(slot, n_loop, out_row, t_ok, idx_ptr, lo0, hi0, BT, NBP, S, SP, HALF,
                                         EARLY_EXIT)
            elif ROW_CHUNK > 0:  # rows too wide for registers: counted ROW_CHUNK columns at a time
                _select_chunked(slot, n_loop, out_row, t_ok, idx_ptr, lo0, hi0, BT, NBP, ROW_CHUNK, S, SP)
            else:  # CB == 0: always the full-width path
                _select_from_scratch(slot, n_loop, out_row, t_ok, idx_ptr, lo0, hi0, BT, NBP, S, SP, HALF, EARLY_EXIT)
        tl.debug_barrier()  # the scratch rows are rewritten by the next work item


# Launch settings; `benchmarks/bench_ops.py` sweeps them. method: "auto" (the bisection kernel wherever its launch
# settings are valid, else the sorting kernel), "bisect" or "sort".
# register_row_blocks: key rows up to this many blocks are held in registers for the selection; wider ones
# (longer sequences) are counted row_chunk columns at a time from the scratch rows (`_select_chunked`, bracketed
# by the class maxima and the largest free key gathered in the score pass). H100, randn
# (results/tune_topk_h100_s8_wide.jsonl, all equal to the sorting kernel): 128K (2048 blocks) 19.5 ms in
# registers against 35.3-42.8 chunked; 256K (4096) 105.2 in registers at 16 warps against 132.5-150.2 chunked
# (before the bracket); beyond 4096 blocks the registers do not hold a row: at 640K (10,240 blocks) the chunked
# selection takes 552 / 561 ms (randn / structured; 842 with 2048-column chunks, 561 with 512) against the
# sorting kernel's 1318 / 1324 in the same call (results/tune_topk_h100_s8_bracket.jsonl; 863 before the bracket).
# With the bracket, 256K goes faster chunked (84.2 / 84.3 ms randn / structured against 104.6 / 99.3 in registers,
# results/tune_topk_h100_s8_256k_bracket.jsonl), so register_row_blocks is 2048 (128K: 19.7 in registers
# against 23.2 chunked). bisect_bracket: the register-held bisection starts from the same bracket (the chunked
# one always does). Off: gathering it costs the 255-register kernel more than the steps it saves at 128K (26.1
# against 20.0 ms randn, 26.3 / 18.5 structured; 256K in registers 114.1 / 105.5) and gains 1-5% at 32K (1.59
# / 1.61 randn, 1.61 / 1.69 structured; results/tune_topk_h100_s8_bracket_registers.jsonl).
# candidates: the width CB of the compacted candidate rows of the bisection kernel (0: always the full-width
# bisection); tiles with more candidates in a row than this take the full-width path. bisect_tokens: tokens per
# tile of the bisection kernel (None: 8; a power of two). Default 0: on the H100 at 128K the filter (128) measured
# 27.6 / 27.4 ms against 27.0 / 26.9 without it (randn / structured; 64: 35.1, 256: 41.0): its in-loop class
# bounds, spills and extra barriers cost more than the bisection steps it saves.
# bisect_chunk: blocks per score chunk BC (a power of two >= 16; capped at the key row width). bisect_stages:
# num_stages of the launch (the K~ chunk load is software-pipelined; the sm_90 PTX at 2 stages issues the next
# chunk's cp.async at the end of the loop body and waits for it at the top of the next, so nothing overlaps).
# bisect_half: tiles whose blocks fit the first half of the key row run the full-width selection on half-width
# rows (same result, half the compares per bisection step; a second copy of the selection code in the kernel).
# score_only: benchmarks only (tune_topk.py), launches the score pass without the selection; output unwritten.
# bisect_early_exit: stop a tile's bisection once each row has a threshold with exactly S keys at or above it
# (results/tune_topk_h100_s4_early_exit.jsonl, same choices: 128K 20.6 -> 19.5 ms randn, 20.6 -> 18.2
# structured; 32K 1.61 -> 1.60 / 1.60 -> 1.48).
# sm_90 reports (Triton 3.6, 16-byte pointer hints, HQ=28 HKV=4 D=128, 8 tokens, 2048-wide rows, 64-block chunks,
# 2 stages): candidates 0: 255 registers, no spills, 26 bar.sync in the kernel (3 per bisection step), one
# persistent program of 8 warps per SM is all the register file holds; candidates 128: 255 registers, 140 bytes
# spilled, 70 bar.sync, 16 convert_layout (4 without the filter); bisect_warps 16: 128 registers, ~100 bytes
# spilled; the score pass alone: 101 registers (60 at 16 warps). Per 64-block chunk the score loop is ~360 PTX
# instructions; one bisection step over the full 2048-wide rows is 286 (390 before the sign-bit count) and a work
# item takes 31 of them whatever its visible width: ~8.9K instructions per thread against ~5.8K for the average
# 16 chunks of the score loop at 128K (which also waits on its K~ loads: not overlapped at 2 stages).
# Defaults from the H100 run of benchmarks/tune_topk.py at 128K (results/tune_topk_h100_s2b.jsonl, all equal to the
# sorting kernel): full-width bisection 23.6 ms (randn) / 23.5 (structured); half-width rows where they fit 23.0
# / 22.4; 3 stages 22.8; both 21.5 (randn); 16 warps 29.3; the score pass alone 11.2 / 10.5.
# programs_per_sm 2 (results/tune_topk_h100_s3_pps*.jsonl, all equal to the sorting kernel): the
# 2048-wide rows of 128K leave room for one program per SM either way (20.4 vs 20.6 ms), but shorter rows need
# fewer registers and a second resident program hides the first's latency: 16K 0.80 -> 0.52 ms, 32K 2.59 ->
# 1.54, 64K 10.96 -> 6.24 (randn; structured alike). 3 or 4 programs are no better (32K: 2.00 / 1.59).
CONFIG = {"method": "auto", "programs_per_sm": 2, "max_keys_per_thread": 64, "bisect_warps": None, "candidates": 0,
          "bisect_tokens": None, "bisect_chunk": 64, "bisect_stages": 3, "score_only": False, "bisect_half": True,
          "bisect_early_exit": True, "register_row_blocks": 2048, "row_chunk": 1024, "bisect_bracket": False}


def _bisect_shape(group_pow2: int, n_blocks_pow2: int) -> tuple[int, int, int] | None:
    """(tokens per tile, num_warps, row chunk) for the bisection kernel, or None for settings it cannot run.
    Key rows up to CONFIG["register_row_blocks"] wide are held in registers (row chunk 0); wider ones are
    counted CONFIG["row_chunk"] columns at a time from the scratch rows."""
    # tl.dot needs M = tokens * GP >= 16; more tokens per tile let each K~ chunk load and product serve more rows.
    tokens = max(CONFIG["bisect_tokens"] or 8, triton.cdiv(16, group_pow2))
    row_chunk = 0 if n_blocks_pow2 <= CONFIG["register_row_blocks"] else min(CONFIG["row_chunk"], n_blocks_pow2)
    held = row_chunk or n_blocks_pow2  # key columns in registers at once
    warps = CONFIG["bisect_warps"] or max(4, triton.cdiv(tokens * held, 32 * CONFIG["max_keys_per_thread"]))
    if warps > 16 or warps & (warps - 1):
        return None
    return tokens, warps, row_chunk


def _num_programs(device: torch.device, n_work: int) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(n_work, sms * CONFIG["programs_per_sm"]))
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
    method: str | None = None,
) -> Tensor:
    """Blocks each query's KV group attends to in the selection branch.

    Args:
        q: [total_T, HQ, D]; k_cmp: [total_NB, HKV, D] (`mean_pool_fwd`); lse_cmp: float32 [total_T, HQ] from
            `compressed_attention_fwd` with the same scale.
        cu_seqlens, cu_cmp: int32 [N+1] token and compressed-block offsets.
        max_seqlen: longest sequence (read from cu_seqlens when None).
        method: "bisect", "sort" or None for CONFIG["method"] ("auto": bisection where it fits).
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
    if max_seqlen is None:  # known on the host for one sequence (as in the compression kernels): no sync
        max_seqlen = total if cu_seqlens.numel() == 2 else int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    n_blocks_pow2 = next_pow2(triton.cdiv(max_seqlen, block_size))
    method = method or CONFIG["method"]
    shape = _bisect_shape(group_pow2, n_blocks_pow2)
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
        n_prog = _num_programs(q.device, n_work)
        scratch = torch.empty(n_prog, tokens, max(n_blocks_pow2, 16), dtype=torch.int32, device=q.device)
        # Key rows at least 16 wide (tl.dot's N) and chunks of CONFIG['bisect_chunk'] blocks (at most the row).
        width = max(n_blocks_pow2, 16)
        cand_width = CONFIG["candidates"] if not row_chunk else 0  # the filter compacts register-held rows
        if cand_width & (cand_width - 1):
            raise ValueError(f"topk CONFIG['candidates'] must be 0 or a power of two, got {cand_width}")
        # NCLS strided column classes with 4 keys each bound the S-th largest key (4 * NCLS >= S); at most one
        # class per column of a chunk (the kernel skips the bound when that leaves 4 * NCLS < S).
        chunk = min(CONFIG["bisect_chunk"], width)
        if chunk < 16 or chunk & (chunk - 1):
            raise ValueError(f"topk CONFIG['bisect_chunk'] must be a power of two >= 16, got {chunk}")
        n_classes = min(max(next_pow2(block_count) // 4, 1), chunk)
        compact = torch.empty(2, n_prog, tokens, max(cand_width, 1), dtype=torch.int32, device=q.device)
        _topk_bisect_kernel[(n_prog,)](
            q, k_cmp, lse_cmp, indices, scratch, compact[0], compact[1], cu_seqlens, cu_cmp, tiles, n_work,
            scale * LOG2E,
            BT=tokens, BC=chunk, NBP=width, SP=next_pow2(block_count), CB=cand_width, NCLS=n_classes,
            CJ=min(16, max(cand_width, 1)), SCORE_ONLY=bool(CONFIG["score_only"]),
            HALF=bool(CONFIG["bisect_half"]), EARLY_EXIT=bool(CONFIG["bisect_early_exit"]), ROW_CHUNK=row_chunk,
            SC=min(next_pow2(block_count), chunk), BRACKET=bool(CONFIG["bisect_bracket"] or row_chunk),
            **common, num_warps=warps, num_stages=CONFIG["bisect_stages"],
        )
        return indices
    kp = next_pow2(block_count)
    tokens = min(16, max(1, 128 // group_pow2))
    tokens = max(tokens, triton.cdiv(16, group_pow2))  # tl.dot needs M >= 16
    tiles = query_tiles(cu_seqlens, tokens, total)
    _topk_kernel[(tiles.shape[0], heads_kv)](
        q, k_cmp, lse_cmp, indices, cu_seqlens, cu_cmp, tiles, scale * LOG2E,
        BT=tokens, BC=max(64, kp), KP=kp, **common,
        num_warps=8 if tokens * group_pow2 >= 128 else 4, num_stages=2,
    )
    return indices


__all__ = ["select_blocks_topk"]
