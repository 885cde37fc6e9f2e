"""How close the block-major selection forward's merge gets to the card's read rate, and which layout of its
loads does best: variants of `selection._slc_merge_kernel` on the operator's own partial outputs.

    python benchmarks/probe/probe_merge.py [--lengths 32768 131072] [--out DIR]

For each length (randn inputs, `harness.shapes`) the main kernel fills the partial buffer for the last full chunk
(nearly every slot used there); each variant then merges that chunk once per chunk of the sequence (the merge's work
per chunk; earlier chunks use fewer slots, so this is an upper bound for all variants alike). Every variant's
o and lse are compared bit for bit with the library merge on the same partials. Variants:

* ``library``: `_slc_merge_kernel` as the operator launches it (one program per (token, group), the S slot
  loads of [G, D] unrolled).
* ``stream``: the same with the partial loads marked evict-first (they are read once).
* ``slab<K>``: one program per (token, group) loads K slots at a time as a [K, G, D] tile and sums over the
  slot axis (fewer, larger loads).
* ``token``: one program per token takes all HKV groups: one [HKV * G, D] load per slot.

Prints one JSON line per variant and launch setting; writes OUT/probe_merge.jsonl.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
from harness import BLOCK, COUNT, HKV, HQ, PROBE_LENGTHS, D, bench, open_run  # noqa: E402
from harness.operator import by_block_work  # noqa: E402
from videonsa.ops.triton import selection as slc  # noqa: E402
from videonsa.ops.triton import utils as U  # noqa: E402

LOG2E = 1.4426950408889634


@triton.jit
def _merge_slab_kernel(
    o_part_ptr, lse_part_ptr, idx_ptr, o_ptr, lse_ptr, stride_ot, stride_oh, t0, head_dim,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, S: tl.constexpr, K: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, STREAM: tl.constexpr,
):
    """The library merge with its slots read K at a time as [K, BLOCK_G, BLOCK_D] tiles."""
    t_local = tl.program_id(0)
    g = tl.program_id(1)
    t = (t0 + t_local).to(tl.int64)
    hh = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    kk = tl.arange(0, K)
    head_ok = hh < G
    idx_row = idx_ptr + (t * HKV + g) * S
    triple0 = (t_local.to(tl.int64) * HKV + g) * S
    # Pass 1: the row maxima of the slots' lse (all S at once; S * G floats).
    ss = tl.arange(0, S)
    used = (tl.load(idx_row + ss) >= 0)[:, None] & head_ok[None, :]
    lse_all = tl.load(lse_part_ptr + (triple0 + ss)[:, None] * G + hh[None, :], mask=used, other=float("-inf"))
    m = tl.max(lse_all, axis=0)
    m_use = tl.where(m == float("-inf"), 0.0, m)
    total = tl.sum(tl.exp2(lse_all - m_use[None, :]), axis=0)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for s0 in tl.static_range(0, S, K):
        s = s0 + kk
        ok = (tl.load(idx_row + s) >= 0)[:, None] & head_ok[None, :]  # [K, G]
        row = (triple0 + s)[:, None] * G + hh[None, :]
        w = tl.exp2(tl.load(lse_part_ptr + row, mask=ok, other=float("-inf")) - m_use[None, :])
        offs = row[:, :, None] * head_dim + d[None, None, :]
        mask = ok[:, :, None] & (d < head_dim)[None, None, :]
        if STREAM:
            part = tl.load(o_part_ptr + offs, mask=mask, other=0.0, eviction_policy="evict_first")
        else:
            part = tl.load(o_part_ptr + offs, mask=mask, other=0.0)
        acc += tl.sum(part.to(tl.float32) * w[:, :, None], axis=0)
    has = total > 0
    out = acc / tl.where(has, total, 1.0)[:, None]
    head = g * G + hh
    o_off = t * stride_ot + head[:, None] * stride_oh + d[None, :]
    tl.store(o_ptr + o_off, out.to(o_ptr.dtype.element_ty), mask=head_ok[:, None] & (d < head_dim)[None, :])
    lse = tl.where(has, (m_use + tl.log2(tl.where(has, total, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(lse_ptr + t * HQ + head, lse, mask=head_ok)


@triton.jit
def _merge_token_kernel(
    o_part_ptr, lse_part_ptr, idx_ptr, o_ptr, lse_ptr, stride_ot, stride_oh, t0, head_dim,
    HQ: tl.constexpr, HKV: tl.constexpr, G: tl.constexpr, S: tl.constexpr, BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr, STREAM: tl.constexpr,
):
    """One program per token, all groups: rows (group, head) of a [HKV * BLOCK_G, BLOCK_D] tile per slot."""
    R: tl.constexpr = HKV * BLOCK_G
    t_local = tl.program_id(0)
    t = (t0 + t_local).to(tl.int64)
    r = tl.arange(0, R)
    g = r // BLOCK_G
    hh = r % BLOCK_G
    d = tl.arange(0, BLOCK_D)
    row_ok = hh < G
    triple0 = (t_local.to(tl.int64) * HKV + g) * S  # [R]
    idx_row = idx_ptr + (t * HKV + g) * S
    m = tl.full([R], float("-inf"), tl.float32)
    for s in tl.static_range(S):
        ok = row_ok & (tl.load(idx_row + s) >= 0)
        m = tl.maximum(m, tl.load(lse_part_ptr + (triple0 + s) * G + hh, mask=ok, other=float("-inf")))
    m_use = tl.where(m == float("-inf"), 0.0, m)
    total = tl.zeros([R], tl.float32)
    acc = tl.zeros([R, BLOCK_D], dtype=tl.float32)
    for s in tl.static_range(S):
        ok = row_ok & (tl.load(idx_row + s) >= 0)
        row = (triple0 + s) * G + hh
        w = tl.exp2(tl.load(lse_part_ptr + row, mask=ok, other=float("-inf")) - m_use)
        total += w
        mask = ok[:, None] & (d < head_dim)[None, :]
        if STREAM:
            part = tl.load(o_part_ptr + row[:, None] * head_dim + d[None, :], mask=mask, other=0.0,
                           eviction_policy="evict_first")
        else:
            part = tl.load(o_part_ptr + row[:, None] * head_dim + d[None, :], mask=mask, other=0.0)
        acc += part.to(tl.float32) * w[:, None]
    has = total > 0
    out = acc / tl.where(has, total, 1.0)[:, None]
    head = g * G + hh
    o_off = t * stride_ot + head[:, None] * stride_oh + d[None, :]
    tl.store(o_ptr + o_off, out.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & (d < head_dim)[None, :])
    lse = tl.where(has, (m_use + tl.log2(tl.where(has, total, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(lse_ptr + t * HQ + head, lse, mask=row_ok)


def probe(seq_len: int, emit) -> None:
    # The partials of one chunk, made by launch_fwd_by_block's own pieces.
    q, k, v, _, _, chunk, key_blocks, lists, work, o_part, lse_part, block_m, bt = by_block_work(seq_len)
    group = HQ // HKV
    scale = D**-0.5
    c = max(lists.n_chunks - 2, 0)  # the last full chunk
    t0 = c * chunk
    tokens = min(chunk, seq_len - t0)
    slc.by_block._slc_fwd_by_block_kernel[(work.grid[c],)](
        q, k, v, o_part, lse_part, key_blocks, work.items, work.bounds, lists.pairs,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        c, t0 * HKV * COUNT, D, scale * LOG2E,
        HKV=HKV, G=group, S=COUNT, BT=bt, BLOCK_M=block_m, BLOCK_N=BLOCK, BLOCK_D=D,
        DOT_PREC=U.dot_precision(q), LOOP_STAGES=slc.SELECTION_SETTINGS.by_block_loop_stages,
        num_warps=slc.SELECTION_SETTINGS.by_block_warps, num_stages=1,
        maxnreg=slc.SELECTION_SETTINGS.by_block_max_registers,
    )
    used = int((lists.block_indices[t0 : t0 + tokens] >= 0).sum())
    read_bytes = used * group * (D * q.element_size() + 4) + tokens * HQ * D * q.element_size()
    common = (o_part, lse_part, lists.block_indices)
    results = {}

    def run(name: str, launch) -> None:
        o = torch.zeros_like(q)
        lse = torch.full(q.shape[:2], float("nan"), dtype=torch.float32, device=q.device)
        try:
            launch(o, lse)
            ms = bench(lambda: [launch(o, lse) for _ in range(lists.n_chunks)]) / lists.n_chunks
        except Exception as error:  # a variant that does not compile or fit
            emit(kind="error", T=seq_len, variant=name, error=str(error)[:300])
            return
        mine = (o[t0 : t0 + tokens].clone(), lse[t0 : t0 + tokens].clone())
        ref = results.setdefault("library", mine)  # the first run is the library's
        same = torch.equal(ref[0], mine[0]) and torch.equal(ref[1], mine[1])
        diff = float((ref[0].float() - mine[0].float()).abs().max())
        emit(kind="time", T=seq_len, variant=name, ms_per_chunk=round(ms, 4), tbps=round(read_bytes / ms / 1e9, 3),
             same_bits_as_library=same, max_abs_diff=diff)

    merge_args = dict(HQ=HQ, HKV=HKV, G=group, S=COUNT, BLOCK_G=8, BLOCK_D=D)
    for warps in (4, 2, 8):
        name = "library" if warps == slc.SELECTION_SETTINGS.merge_warps else f"library_w{warps}"
        run(name, lambda o, lse, w=warps: slc.by_block._slc_merge_kernel[(tokens, HKV)](
            *common, o, lse, lse, o.stride(0), o.stride(1), t0, D, BLOCK_S=COUNT, FOLD=False,
            num_warps=w, **merge_args))
    for stream in (False, True):
        for slab in (4, 8):
            for warps in (4, 8):
                run(f"slab{slab}{'_stream' if stream else ''}_w{warps}",
                    lambda o, lse, s=slab, w=warps, st=stream: _merge_slab_kernel[(tokens, HKV)](
                        *common, o, lse, o.stride(0), o.stride(1), t0, D, K=s, STREAM=st, num_warps=w, **merge_args))
        for warps in (4, 8, 16):
            run(f"token{'_stream' if stream else ''}_w{warps}",
                lambda o, lse, w=warps, st=stream: _merge_token_kernel[(tokens,)](
                    *common, o, lse, o.stride(0), o.stride(1), t0, D, STREAM=st, num_warps=w, **merge_args))
    fill = torch.empty(read_bytes // 2, dtype=torch.bfloat16, device=q.device)
    copy_ms = bench(lambda: fill.sum())  # a plain read of as many bytes: the card's read rate
    emit(kind="time", T=seq_len, variant="read (torch sum of as many bytes)", ms_per_chunk=round(copy_ms, 4),
         tbps=round(read_bytes / copy_ms / 1e9, 3))
    emit(kind="info", T=seq_len, chunk_tokens=chunk, tokens_merged=tokens, chunks=lists.n_chunks,
         used_slots=used, read_gb=round(read_bytes / 1e9, 4))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=PROBE_LENGTHS)
    args, results = open_run(parser, argv, "probe_merge")
    for seq_len in args.lengths:
        probe(seq_len, lambda **row: results.row(row))
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
