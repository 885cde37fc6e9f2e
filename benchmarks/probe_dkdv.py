"""The selection dk/dv kernel with its token loop pipelined by Triton instead of the hand-written one-step prefetch
of the token ids: time and bits against the library kernel at a real shape.

    PYTHONPATH=src python benchmarks/probe_dkdv.py [--length 131072] [--out $OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from functools import partial

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_ops import BLOCK, D, bench  # noqa: E402
from tune_selection import operator_inputs  # noqa: E402
from videonsa.ops.triton import selection as slc  # noqa: E402


@triton.jit
def _probe_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, do_scale_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, dk_part_ptr, dv_part_ptr,
    key_blocks_ptr, items_ptr, tokens_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh,
    head_dim, qk_scale, scale,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, BT: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_PREC: tl.constexpr, HAS_DO_SCALE: tl.constexpr,
):
    item = tl.program_id(0)
    sub = tl.program_id(1)  # which BLOCK_N slice of the key block
    owner = tl.load(items_ptr + item * 4)
    start = tl.load(items_ptr + item * 4 + 1)
    end = tl.load(items_ptr + item * 4 + 2)
    part = tl.load(items_ptr + item * 4 + 3)
    blk = owner // HKV
    g = owner % HKV
    # The block-major forward repeats this prologue: a shared @triton.jit helper for it made this kernel 3.6%
    # slower (43.7 vs 42.2 ms at 128K, H100, same outputs bit for bit), so each kernel keeps its own copy.
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
    # Each step loads its own token ids; Triton's pipeliner (the launch's num_stages) issues them and the
    # rows' gathers ahead.
    for c0 in tl.range(start, end, BT):
        row_ok = (tok < BT) & (c0 + tok < end)
        t_row = tl.load(tokens_ptr + c0 + tok, mask=row_ok, other=0)
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

    if part < 0:  # the block's whole token list: final values (dk and dv share one contiguous layout)
        out_off = k_row64[:, None] * stride_dkt + g * stride_dkh + d[None, :]
        tl.store(dk_ptr + out_off, (dk * scale).to(dk_ptr.dtype.element_ty), mask=kd_mask)
        tl.store(dv_ptr + out_off, dv.to(dv_ptr.dtype.element_ty), mask=kd_mask)
    else:  # one piece of a long list: float32 partial sums, added up in order by `_slc_dkdv_reduce_kernel`
        part_off = ((part * (BLOCK_SIZE // BLOCK_N) + sub) * BLOCK_N + n)[:, None] * BLOCK_D + d[None, :]
        tl.store(dk_part_ptr + part_off, dk)
        tl.store(dv_part_ptr + part_off, dv)



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    lines = []
    library = slc._slc_bwd_dkdv_kernel
    for seq_len in args.lengths:
        q, k, v, cu, idx = operator_inputs(seq_len, structured=False)
        scale = D**-0.5
        gen = torch.Generator(device="cuda").manual_seed(1)
        do = torch.randn(q.shape, device="cuda", dtype=q.dtype, generator=gen)
        gate = torch.rand(q.shape[:2], device="cuda", generator=gen).to(q.dtype)
        o, lse = slc.selected_attention_fwd(q, k, v, idx, cu, BLOCK, scale)
        delta = slc.row_dot(o, do) * gate.float()
        key_blocks = slc.tiles_of(cu, BLOCK)
        offsets, tokens = slc.inverse_lists(idx, cu, key_blocks)
        common = (q, k, v, do, lse, delta, key_blocks, offsets, tokens, BLOCK, scale)
        slc._slc_bwd_dkdv_kernel = library
        ref = slc.launch_dkdv(*common, do_scale=gate)
        for name, kernel, stages in [("library", library, None), ("pipelined s2", _probe_dkdv_kernel, 2),
                                     ("pipelined s3", _probe_dkdv_kernel, 3), ("pipelined s4", _probe_dkdv_kernel, 4),
                                     ("library again", library, None)]:
            slc._slc_bwd_dkdv_kernel = kernel
            fn = partial(slc.launch_dkdv, *common, num_stages=stages, do_scale=gate)
            got = fn()
            same = bool(torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]))
            row = dict(T=seq_len, variant=name, ms=round(bench(fn), 3), same_bits=same)
            lines.append(row)
            print(json.dumps(row), flush=True)
        slc._slc_bwd_dkdv_kernel = library
        torch.cuda.empty_cache()
    with open(os.path.join(args.out, "probe_dkdv.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in lines)


if __name__ == "__main__":
    main()
