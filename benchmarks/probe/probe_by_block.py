"""What limits the block-major selection forward's main kernel: its full work against its data movement alone
and its arithmetic alone, on the operator's own selections.

    python benchmarks/probe/probe_by_block.py [--lengths 32768 131072] [--out DIR]

For each length (randn inputs, `harness.shapes`) the triples are sorted and cut into work items exactly as
`launch_fwd_by_block` does (training chunk size), then every chunk's main-kernel launch is timed (CUDA-event
median of all chunks' launches together, merge excluded) for:

* ``library``: `selection._slc_fwd_by_block_kernel` as the operator launches it.
* ``move``: the same gathers of triple ids and query rows and the same partial stores (evict-first), no products
  or softmax: the kernel's data movement at this access pattern (`_probe_kernel`, the hand-prefetched loop the
  library kernel had before commit 5d5c896).
* ``math``: the same loads and products, stores masked off at run time (the compiler cannot drop them; also
  `_probe_kernel`).
* ``write``: one contiguous fill of the same partial bytes (torch), the HBM write rate this card reaches.

The candidate changes measured this way in the fifth session (the probe at commits 5d5c896 and 416ee3c, results
in the git history) are summarised in docs/kernels.md; those adopted are now
the library kernel.

Each compiled variant's registers and spills are printed; the library kernel's TTGIR and PTX go to OUT.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
from harness import (  # noqa: E402
    BLOCK,
    COUNT,
    HKV,
    HQ,
    PROBE_LENGTHS,
    D,
    bench,
    kernel_split,
    open_run,
)
from harness.operator import by_block_work  # noqa: E402
from videonsa.ops.triton import selection as slc  # noqa: E402
from videonsa.ops.triton import utils as U  # noqa: E402

LOG2E = 1.4426950408889634


@triton.jit
def _probe_kernel(
    q_ptr, k_ptr, v_ptr, o_part_ptr, lse_part_ptr, key_blocks_ptr, items_ptr, pairs_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    item0, pair0, head_dim, qk_scale,
    HKV: tl.constexpr, G: tl.constexpr, S: tl.constexpr, BT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    MATH: tl.constexpr, STORE: tl.constexpr, EVICT: tl.constexpr = False,
):
    """`selection._slc_fwd_by_block_kernel` with its products (MATH) and its stores (STORE) switchable."""
    item = (item0 + tl.program_id(0)).to(tl.int64)
    owner = tl.load(items_ptr + item * 3)
    start = tl.load(items_ptr + item * 3 + 1)
    end = tl.load(items_ptr + item * 3 + 2)
    blk = owner // HKV
    g = owner % HKV
    k_row0 = tl.load(key_blocks_ptr + blk * 4)
    n_keys = tl.load(key_blocks_ptr + blk * 4 + 1)
    n = tl.arange(0, BLOCK_N)
    k_row = k_row0 + n
    k_ok = n < n_keys
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    kd_mask = k_ok[:, None] & d_ok[None, :]
    k_row64 = k_row.to(tl.int64)
    if MATH:
        kb = tl.load(k_ptr + k_row64[:, None] * stride_kt + g * stride_kh + d[None, :], mask=kd_mask, other=0.0)
        vb = tl.load(v_ptr + k_row64[:, None] * stride_vt + g * stride_vh + d[None, :], mask=kd_mask, other=0.0)
    # STORE is a run-time condition too: `start >= 0` always holds but the compiler cannot know it.
    r = tl.arange(0, BLOCK_M)
    keep = r + start >= 0 if STORE else r + start < 0
    tok = r // G
    hh = r % G
    head_off = (g * G + hh)[:, None] * stride_qh + d[None, :]
    row_ok = (tok < BT) & (start + tok < end)
    pair = tl.load(pairs_ptr + start + tok, mask=row_ok, other=0).to(tl.int64)
    q = tl.load(q_ptr + (pair // (HKV * S))[:, None] * stride_qt + head_off, mask=row_ok[:, None] & d_ok[None, :],
                other=0.0)
    for c0 in range(start, end, BT):
        next_ok = (tok < BT) & (c0 + BT + tok < end)
        next_pair = tl.load(pairs_ptr + c0 + BT + tok, mask=next_ok, other=0).to(tl.int64)
        next_q = tl.load(q_ptr + (next_pair // (HKV * S))[:, None] * stride_qt + head_off,
                         mask=next_ok[:, None] & d_ok[None, :], other=0.0,
                         eviction_policy="evict_last" if EVICT else "")
        if MATH:
            t_row = pair // (HKV * S)
            s = tl.dot(q, tl.trans(kb)) * qk_scale
            allowed = row_ok[:, None] & k_ok[None, :] & (k_row64[None, :] <= t_row[:, None])
            s = tl.where(allowed, s, float("-inf"))
            m = tl.max(s, axis=1)
            m_use = tl.where(m == float("-inf"), 0.0, m)
            p = tl.exp2(s - m_use[:, None])
            l_sum = tl.sum(p, axis=1)
            has = l_sum > 0
            out = tl.dot(p.to(vb.dtype), vb) / tl.where(has, l_sum, 1.0)[:, None]
            lse2 = tl.where(has, m_use + tl.log2(tl.where(has, l_sum, 1.0)), float("-inf"))
        else:
            out = q.to(tl.float32)
            lse2 = tl.sum(out, axis=1)
        slot = (pair - pair0) * G + hh
        tl.store(
            o_part_ptr + slot[:, None] * head_dim + d[None, :], out.to(o_part_ptr.dtype.element_ty),
            mask=(keep & row_ok)[:, None] & d_ok[None, :], eviction_policy="evict_first" if EVICT else "",
        )
        tl.store(lse_part_ptr + slot, lse2, mask=keep & row_ok)
        pair, q, row_ok = next_pair, next_q, next_ok


def probe(seq_len: int, emit, out_dir: Path) -> None:
    """Time the variants at one length (module docstring); write the library kernel's TTGIR and PTX."""
    q, k, v, cu, idx, chunk, key_blocks, lists, work, o_part, lse_part, block_m, bt = by_block_work(seq_len)
    group = HQ // HKV
    scale = D**-0.5
    items, bounds = work.items, work.bounds.tolist()
    triples = int(lists.offsets[-1])
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1))
    compiled = {}

    def launch(kernel, name: str, warps: int, stages: int, **flags) -> None:
        for c in range(lists.n_chunks):
            n_items = bounds[c + 1] - bounds[c]
            if not n_items:
                continue
            if kernel is slc.by_block._slc_fwd_by_block_kernel:  # launched on the chunk's bound, reads its real count
                grid, args = work.grid[c], (items, work.bounds, lists.pairs, *strides, c)
            else:  # the old kernel: exactly the chunk's items, from item bounds[c] on
                grid, args = n_items, (items, lists.pairs, *strides, bounds[c])
            compiled[name] = kernel[(grid,)](
                q, k, v, o_part, lse_part, key_blocks, *args, c * chunk * HKV * COUNT, D, scale * LOG2E,
                HKV=HKV, G=group, S=COUNT, BT=bt, BLOCK_M=block_m, BLOCK_N=BLOCK, BLOCK_D=D,
                num_warps=warps, num_stages=stages, **flags,
            )

    library = dict(DOT_PREC=U.dot_precision(q), LOOP_STAGES=slc.SELECTION_SETTINGS.by_block_loop_stages,
                   maxnreg=slc.SELECTION_SETTINGS.by_block_max_registers)
    runs = [("library", slc.by_block._slc_fwd_by_block_kernel, library, (slc.SELECTION_SETTINGS.by_block_warps, 1))]
    runs.append(("move", _probe_kernel, dict(MATH=False, STORE=True, EVICT=True), (4, 3)))
    runs.append(("math", _probe_kernel, dict(MATH=True, STORE=False), (4, 3)))
    partial_bytes = triples * group * (D * q.element_size() + 4)
    for name, kernel, flags, (warps, stages) in runs:
        ms = bench(partial(launch, kernel, name, warps, stages, **flags))
        handle = compiled[name]
        emit(kind="time", T=seq_len, variant=name, warps=warps, stages=stages, ms=round(ms, 3),
             partial_write_tbps=round(partial_bytes / ms / 1e9, 3), n_regs=handle.n_regs,
             n_spills=handle.n_spills, shared=handle.metadata.shared)
    fold_o, fold_gate = torch.zeros_like(q), torch.ones(q.shape[:2], dtype=q.dtype, device=q.device)
    whole = {
        "block_lists": partial(slc.block_lists, idx, cu, BLOCK, chunk),
        "by_block_items": partial(slc.by_block_items, lists, HKV, slc.SELECTION_SETTINGS.by_block_split),
        "launch_fwd_by_block (training)": partial(slc.launch_fwd_by_block, q, k, v, idx, cu, BLOCK, scale),
        "launch_fwd_by_block (inference)": partial(
            slc.launch_fwd_by_block, q, k, v, idx, cu, BLOCK, scale, fold_into=fold_o, fold_scale=fold_gate
        ),
    }
    for name, fn in whole.items():
        emit(kind="time", T=seq_len, variant=name, ms=round(bench(fn), 3))
    emit(kind="kernels", T=seq_len, variant="launch_fwd_by_block (training)",
         self_cuda_ms=kernel_split(whole["launch_fwd_by_block (training)"]))

    def fill() -> None:
        for _ in range(lists.n_chunks):
            o_part.fill_(1.0)

    fill_ms = bench(fill)
    emit(kind="time", T=seq_len, variant="write (torch fill of the partial buffer, once per chunk)",
         ms=round(fill_ms, 3), tbps=round(o_part.numel() * o_part.element_size() * lists.n_chunks / fill_ms / 1e9, 3))
    emit(kind="info", T=seq_len, triples=triples, chunks=lists.n_chunks, chunk_tokens=chunk,
         items=int(items.shape[0]), steps=int(((items[:, 2] - items[:, 1] + bt - 1) // bt).sum()),
         partial_gb=round(partial_bytes / 1e9, 3))
    for key in ("ttgir", "ptx"):
        (Path(out_dir) / f"probe_by_block_library.{key}").write_text(compiled["library"].asm[key])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=PROBE_LENGTHS)
    args, results = open_run(parser, argv, "probe_by_block")
    for seq_len in args.lengths:
        probe(seq_len, lambda **row: results.row(row), results.directory)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
