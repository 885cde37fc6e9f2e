"""Selection forward / dq kernels at a real shape: launch settings and tile heights, old defaults against new.

    python benchmarks/tune/tune_selection.py [--length 131072] [--budget-s 85] [--out DIR]
    python benchmarks/tune/tune_selection.py --defaults

Shape: B=1, HQ=28, HKV=4, D=128, bf16, block 64, 32 blocks (`harness.shapes`). Selections are the operator's
own (`harness.operator.operator_selection`: make_inputs -> mean pooling -> compressed attention -> top-k), for
"randn" (plain randn inputs: every token's top-k an independent draw, neighbouring tokens share almost
nothing) and "structured" (queries drifting over 256-token stretches, keys with per-block offsets).

For each selection: union steps per token at every tile height (what `plan_tiles` weighs), the height the
planner picks with the forward's and with the dq kernel's step-cost table, then CUDA-event medians of the
forward and dq kernels alone (index building excluded) for each (rows, warps, stages) variant, with the time
of one step (ns per tile-union entry: the unit of TILE_STEP_COST / DQ_TILE_STEP_COST). Correctness at the
same shape: every dq variant against the 16-row old-default dq (relative error), dk/dv launch variants
against the default's, dq with `do_scale` against dq of
the materialised do * do_scale, and forward outputs of every variant against the 16-row forward.

--by-block times the block-major forward (`launch_fwd_by_block`) against the query-tile forward on the same
selections: index sort alone, each (rows, warps, stages) launch and chunk size, outputs checked against the
16-row tile forward, the per-kernel split from the profiler, and the cost-model constants those times imply
(BY_BLOCK_STEP_COST, BY_BLOCK_TOKEN_COST) next to the planner's estimates.

--splits S... times the block-major forward at its default launch for each list split (the longest piece of a
(key block, group) token list one program walks; 0 = whole lists), training and inference (fold_into) chunk
sizes, outputs checked bit for bit against the first split.

--dq-by-block times the block-major dq (`launch_dq_by_block`) for each launch variant against the query-tile
dq with planning, checked against it, with the planner's estimates (for DQ_BY_BLOCK_*_COST).

--dkdv times the dk/dv kernel (with do_scale, as the operator runs it) for each (rows, warps, stages)
variant, checked against the default launch, next to the dq kernel's default time.

--defaults times only the current defaults (planner-chosen tiles, `_launch_config`, `dkdv_rows`): forward, dq
and dk/dv each without and with `do_scale` (a random gate), the do_scale results checked against the
unscaled kernels run on the materialised do * gate (kind = "default" lines, plus "check" lines).

Prints one JSON object per line (kind = "time" / "check" / "summary" / "info") and writes them to
OUT/tune_selection_<mode>_<selections>.jsonl, the environment first (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
from harness import (  # noqa: E402
    BLOCK,
    COUNT,
    HKV,
    HQ,
    INPUT_KINDS,
    D,
    Results,
    bench,
    kernel_split,
    open_run,
)
from harness import rel_error as rel  # noqa: E402
from harness.operator import operator_selection as operator_inputs  # noqa: E402

# Kernel internals: the selection module's launchers, planners and list builders (the only ones used here).
from videonsa.ops.triton import selection as slc  # noqa: E402
from videonsa.ops.triton import utils as U  # noqa: E402

# Launch settings before this change (selection.py at commit a937654): 4 warps below 128 rows, 3 stages.
OLD_DQ = {16: (4, 3), 64: (4, 3), 128: (8, 3)}
OLD_FWD = {16: (4, 3), 64: (4, 3), 128: (8, 3)}
# Variants timed per height: (warps, stages).
FWD_VARIANTS = {16: [(4, 3), (4, 2)], 64: [(4, 3), (8, 3), (4, 2)], 128: [(8, 3)]}
DQ_VARIANTS = {16: [(4, 3), (4, 2), (8, 3)], 64: [(4, 3), (8, 3), (8, 2), (4, 2)], 128: [(8, 3), (8, 2)]}
DKDV_VARIANTS = [(32, 4, 2), (32, 8, 2), (16, 4, 2)]  # (rows, warps, stages); first = old default
DEVICE = "cuda"
RESULTS: Results | None = None  # set by main()


def emit(**row) -> None:
    RESULTS.row(row)


def backward_inputs(name: str, seq_len: int):
    """`operator_inputs` plus an upstream gradient do [T, HQ, D] and a gate [T, HQ] (the do_scale the operator
    passes), both from a fixed seed."""
    q, k, v, cu, idx = operator_inputs(seq_len, name == "structured")
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    do = torch.randn(q.shape, device=DEVICE, dtype=q.dtype, generator=gen)
    gate = torch.rand(q.shape[:2], device=DEVICE, generator=gen).to(q.dtype)
    return q, k, v, cu, idx, do, gate


def run_selection(name: str, seq_len: int, deadline: float) -> None:
    structured = name == "structured"
    q, k, v, cu, idx = operator_inputs(seq_len, structured)
    scale = D**-0.5
    group = HQ // HKV
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    do = torch.randn(q.shape, device=DEVICE, dtype=q.dtype, generator=gen)
    heights = [16, 64, 128] if structured else [16, 64]  # 128 rows on randn: ~8x the 16-row work, skipped
    plans = {rows: slc.plan_tiles(idx, cu, group, rows) for rows in heights}
    tokens = q.shape[0]
    steps = {rows: int(plans[rows].count.sum()) for rows in heights}
    emit(kind="info", selection=name, T=seq_len,
         union_steps_per_token_per_group={rows: steps[rows] / tokens / HKV for rows in heights},
         auto_rows_fwd_costs=slc.plan_tiles(idx, cu, group).block_m,
         auto_rows_dq_costs=slc.plan_tiles(idx, cu, group, None, dq=True).block_m)

    # Reference forward (16 rows, old launch) and its lse / delta, shared by every dq variant.
    o_ref, lse = slc.launch_fwd(q, k, v, plans[16], BLOCK, scale, *OLD_FWD[16])
    delta = U.row_dot(o_ref, do)
    best: dict[str, tuple[float, int, int, int]] = {}
    for kernel, variants, old in (("dq", DQ_VARIANTS, OLD_DQ), ("fwd", FWD_VARIANTS, OLD_FWD)):  # dq first
        ref = None  # dq of the first variant (16 rows, old launch): every tiling must agree with it
        for rows in heights:
            plan = plans[rows]
            for warps, stages in variants[rows]:
                if time.time() > deadline:
                    emit(kind="info", skipped=f"{name} {kernel} rows{rows} w{warps}s{stages}: over budget")
                    continue
                if kernel == "fwd":
                    fn = partial(slc.launch_fwd, q, k, v, plan, BLOCK, scale, warps, stages)
                else:
                    fn = partial(slc.launch_dq, q, k, v, do, lse, delta, plan, BLOCK, scale, warps, stages)
                out = fn()
                if kernel == "fwd":
                    err = max(rel(out[0], o_ref), rel(torch.nan_to_num(out[1], neginf=0.0),
                                                      torch.nan_to_num(lse, neginf=0.0)))
                else:
                    ref = out if ref is None else ref
                    err = rel(out, ref)
                    if torch.isnan(out).any():
                        err = float("nan")
                ms = bench(fn)
                is_old = (warps, stages) == old[rows]
                is_new = (warps, stages) == slc.tiles._launch_config(rows, D, "dq" if kernel == "dq" else "fwd")
                emit(kind="time", selection=name, kernel=kernel, rows=rows, warps=warps, stages=stages, ms=ms,
                     ns_per_step=ms * 1e6 / steps[rows], rel_err=err, old_default=is_old, new_default=is_new)
                if not best.get(kernel) or ms < best[kernel][0]:
                    best[kernel] = (ms, rows, warps, stages)

    # dk/dv (inverse lists): sm_90 compile of the default (32 rows, 4 warps, 2 stages) spills 184 bytes at
    # 255 registers; 8 warps needs 247 and no spill. Checked against the default's dk, dv.
    key_blocks = U.tiles_of(cu, BLOCK)
    offsets, tok_list = slc.inverse_lists(idx, cu, BLOCK, key_blocks.shape[0])
    ref = None
    for rows, warps, stages in DKDV_VARIANTS:
        if time.time() > deadline + 6.0:
            emit(kind="info", skipped=f"{name} dkdv rows{rows} w{warps}s{stages}: over budget")
            continue
        fn = partial(slc.launch_dkdv, q, k, v, do, lse, delta, key_blocks, offsets, tok_list, BLOCK, scale,
                     settings=slc.SelectionSettings(dkdv_rows=rows, dkdv_warps=warps, dkdv_stages=stages))
        out = fn()
        ref = out if ref is None else ref
        err = max(rel(out[0], ref[0]), rel(out[1], ref[1]))
        ms = bench(fn)
        emit(kind="time", selection=name, kernel="dkdv", rows=rows, warps=warps, stages=stages, ms=ms,
             rel_err=err, old_default=(rows, warps, stages) == (32, 4, 2))

    # do_scale: the gate folded into the kernels against the materialised product.
    gate = torch.rand(q.shape[:2], device=DEVICE, generator=gen).to(q.dtype)
    plan = plans[16]
    scaled = (do.float() * gate.float()[..., None]).to(do.dtype)
    want = slc.launch_dq(q, k, v, scaled, lse, U.row_dot(o_ref, scaled), plan, BLOCK, scale)
    got = slc.launch_dq(q, k, v, do, lse, delta * gate.float(), plan, BLOCK, scale, do_scale=gate)
    emit(kind="check", selection=name, what="dq do_scale vs materialised", rel_err=rel(got, want))

    # Whole entry points: old (forward's costs, old launch) against new defaults.
    fwd_auto = slc.plan_tiles(idx, cu, group)
    dq_auto = slc.plan_tiles(idx, cu, group, None, dq=True)
    fwd_ms = bench(partial(slc.launch_fwd, q, k, v, fwd_auto, BLOCK, scale))
    old_dq_ms = bench(partial(slc.launch_dq, q, k, v, do, lse, delta, fwd_auto, BLOCK, scale,
                              *OLD_DQ[fwd_auto.block_m]))
    new_dq_ms = bench(partial(slc.launch_dq, q, k, v, do, lse, delta, dq_auto, BLOCK, scale))
    emit(kind="summary", selection=name, T=seq_len, fwd_rows=fwd_auto.block_m, fwd_ms=fwd_ms,
         dq_old_rows=fwd_auto.block_m, dq_old_ms=old_dq_ms, dq_new_rows=dq_auto.block_m, dq_new_ms=new_dq_ms,
         dq_over_fwd_old=old_dq_ms / fwd_ms, dq_over_fwd_new=new_dq_ms / fwd_ms,
         best={kern: dict(zip(("ms", "rows", "warps", "stages"), b, strict=True)) for kern, b in best.items()})
    if DEVICE == "cuda":
        torch.cuda.empty_cache()

BY_BLOCK_VARIANTS = [(64, 4, 2), (64, 4, 3), (64, 4, 1), (32, 4, 2), (16, 4, 2), (128, 8, 2), (128, 4, 2)]
BY_BLOCK_PARTIALS_MIB = [256, 1024]


def by_block_steps(idx: torch.Tensor, cu: torch.Tensor, group: int, rows: int, chunk_tokens: int) -> int:
    """Program steps of the block-major forward: sum over lists of ceil(length / BT)."""
    bt = U.tile_shape(group, rows)[1]
    lists = slc.block_lists(idx, cu, BLOCK, chunk_tokens)
    lengths = lists.offsets[1:] - lists.offsets[:-1]
    return int(((lengths + bt - 1) // bt).sum())


def run_by_block(name: str, seq_len: int, deadline: float) -> None:
    q, k, v, cu, idx = operator_inputs(seq_len, name == "structured")
    scale = D**-0.5
    group = HQ // HKV
    sample = slc.sample_selection(idx, group, list(slc.SELECTION_SETTINGS.tile_candidates))
    costs = slc.SELECTION_SETTINGS.tile_step_cost
    estimates = {bm: slc.tile_estimate(sample, bm, costs) for bm in sample.steps_per_token}
    emit(kind="info", selection=name, T=seq_len, tile_estimates_ns_per_token=estimates,
         by_block_estimate_ns_per_token=slc.by_block_estimate(sample, group),
         planner="by_block" if slc.plan_forward(idx, cu, group, BLOCK) is None else "tiles")
    plan16 = slc.plan_tiles(idx, cu, group, 16)
    o16, lse16 = slc.launch_fwd(q, k, v, plan16, BLOCK, scale)
    tile_plan = slc.plan_tiles(idx, cu, group)
    tile_ms = bench(partial(slc.launch_fwd, q, k, v, tile_plan, BLOCK, scale))
    tile_total_ms = bench(partial(slc.selected_attention_fwd, q, k, v, idx, cu, BLOCK, scale, by_block=False))
    emit(kind="time", selection=name, kernel="tile fwd", rows=tile_plan.block_m, ms=tile_ms,
         with_planning_ms=tile_total_ms)
    default_chunk = slc.by_block_chunk_tokens(HQ, HKV, COUNT, D, q.element_size())
    sort_ms = bench(partial(slc.block_lists, idx, cu, BLOCK, default_chunk))
    emit(kind="time", selection=name, kernel="block_lists", chunk_tokens=default_chunk, ms=sort_ms)

    results = []

    def run(rows: int, warps: int, stages: int, chunk: int, merge_warps: int) -> None:
        if time.time() > deadline or any(r[1:] == (rows, warps, stages, chunk, merge_warps) for r in results):
            return
        launch = slc.SelectionSettings(by_block_rows=rows, by_block_warps=warps, by_block_loop_stages=stages,
                                       merge_warps=merge_warps)
        fn = partial(slc.launch_fwd_by_block, q, k, v, idx, cu, BLOCK, scale, chunk_tokens=chunk, settings=launch)
        o, lse = fn()
        finite = torch.isfinite(lse16)
        err = rel(o, o16)
        lse_err = float((lse - lse16)[finite].abs().max()) if bool(finite.any()) else 0.0
        same_inf = bool(torch.equal(torch.isinf(lse), torch.isinf(lse16)))
        del o, lse
        ms = bench(fn)
        results.append((ms, rows, warps, stages, chunk, merge_warps))
        emit(kind="time", selection=name, kernel="by_block fwd", rows=rows, warps=warps, stages=stages,
             chunk_tokens=chunk, merge_warps=merge_warps, ms=ms, rel_err_vs_tile16=err, lse_max_diff=lse_err,
             same_empty_rows=same_inf, speedup_vs_tiles=tile_total_ms / ms)

    # Launches of the main kernel, then the merge kernel's warps and the chunk size at the best so far.
    for rows, warps, stages in BY_BLOCK_VARIANTS:
        run(rows, warps, stages, default_chunk, 4)
    for merge_warps in (2, 8):
        run(*min(results)[1:5], merge_warps)
    per_token = HKV * COUNT * group * D * q.element_size()
    for mib in BY_BLOCK_PARTIALS_MIB:
        run(*min(results)[1:4], (mib << 20) // per_token, min(results)[5])
    if not results:
        return
    ms, rows, warps, stages, chunk, merge_warps = min(results)
    launch = slc.SelectionSettings(by_block_rows=rows, by_block_warps=warps, by_block_loop_stages=stages,
                                   merge_warps=merge_warps)
    split = kernel_split(partial(slc.launch_fwd_by_block, q, k, v, idx, cu, BLOCK, scale, chunk_tokens=chunk,
                                 settings=launch))
    fwd_kernel_ms = sum(v for key, v in split.items() if "by_block" in key)
    # The planner's step count (used slots / BT, as `by_block_estimate` counts) and the exact one.
    bt = U.tile_shape(group, rows)[1]
    approx_steps = float((idx >= 0).sum()) / bt
    emit(kind="summary", selection=name, T=seq_len, best=dict(ms=ms, rows=rows, warps=warps, stages=stages,
         chunk_tokens=chunk, merge_warps=merge_warps), kernels=split, steps=by_block_steps(idx, cu, group, rows, chunk),
         approx_steps=approx_steps, implied_step_cost_ns=fwd_kernel_ms * 1e6 / max(approx_steps, 1.0),
         implied_token_cost_ns=(ms - fwd_kernel_ms) * 1e6 / seq_len, tile_ms=tile_total_ms)
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def run_by_block_splits(name: str, seq_len: int, splits: list[int]) -> None:
    """The block-major forward at its default launch for each list split (`BY_BLOCK_SPLIT`; 0 = whole lists),
    with the training chunk size and the inference one (fold_into: BY_BLOCK_PARTIAL_BYTES_FOLDED), checked bit
    for bit against split 0; the planner's tile forward alongside."""
    q, k, v, cu, idx = operator_inputs(seq_len, name == "structured")
    scale = D**-0.5
    group = HQ // HKV
    tile_ms = bench(partial(slc.selected_attention_fwd, q, k, v, idx, cu, BLOCK, scale, by_block=False))
    # The planner's estimates (ns per token), the block-major one without its fixed per-call part, so that
    # BY_BLOCK_CALL_COST can be refitted from these lines.
    sample = slc.sample_selection(idx, group, list(slc.SELECTION_SETTINGS.tile_candidates))
    emit(kind="time", selection=name, T=seq_len, kernel="tile fwd (with planning)", ms=tile_ms,
         planner="by_block" if slc.plan_forward(idx, cu, group, BLOCK) is None else "tiles",
         tile_estimates_ns_per_token={bm: slc.tile_estimate(sample, bm, slc.SELECTION_SETTINGS.tile_step_cost)
                                      for bm in sample.steps_per_token},
         by_block_estimate_without_call_ns_per_token=slc.by_block_estimate(sample, group)
         - slc.SELECTION_SETTINGS.by_block_call_cost / seq_len)
    gate = torch.rand(q.shape[:2], device=q.device, dtype=q.dtype)
    base = torch.randn_like(q)
    for mode in ("training", "inference"):
        fold = {} if mode == "training" else dict(fold_into=base.clone(), fold_scale=gate)
        want = None
        for split in splits:
            fn = partial(slc.launch_fwd_by_block, q, k, v, idx, cu, BLOCK, scale, **fold,
                         settings=slc.SelectionSettings(by_block_split=split))
            if fold:
                fold["fold_into"].copy_(base)
            o, lse = fn()
            o = o.clone()
            if want is None:
                want = (o, lse)
            same = bool(torch.equal(o, want[0]) and torch.equal(lse, want[1]))
            del o, lse
            emit(kind="time", selection=name, T=seq_len, kernel="by_block fwd", mode=mode, split=split,
                 ms=bench(fn), equal_to_first_split=same)
        del want
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


DKDV_TUNE_VARIANTS = [(16, 4, 3), (16, 4, 2), (16, 4, 4), (32, 4, 3), (32, 4, 2), (64, 8, 2)]  # rows, warps, stages


def run_dkdv(name: str, seq_len: int, deadline: float) -> None:
    q, k, v, cu, idx, do, gate = backward_inputs(name, seq_len)
    scale = D**-0.5
    o, lse = slc.selected_attention_fwd(q, k, v, idx, cu, BLOCK, scale)
    delta = U.row_dot(o, do) * gate.float()
    dq_plan = slc.plan_tiles(idx, cu, HQ // HKV, None, dq=True)
    emit(kind="time", selection=name, T=seq_len, kernel="dq default", rows=dq_plan.block_m,
         ms=bench(partial(slc.launch_dq, q, k, v, do, lse, delta, dq_plan, BLOCK, scale, do_scale=gate)))
    key_blocks = U.tiles_of(cu, BLOCK)
    offsets, tok_list = slc.inverse_lists(idx, cu, BLOCK, key_blocks.shape[0])
    common = (q, k, v, do, lse, delta, key_blocks, offsets, tok_list, BLOCK, scale)
    ref = slc.launch_dkdv(*common, do_scale=gate)
    for rows, warps, stages in DKDV_TUNE_VARIANTS:
        if time.time() > deadline:
            emit(kind="skip", selection=name, kernel="dkdv", rows=rows, warps=warps, stages=stages)
            continue
        fn = partial(slc.launch_dkdv, *common, do_scale=gate,
                     settings=slc.SelectionSettings(dkdv_rows=rows, dkdv_warps=warps, dkdv_stages=stages))
        got = fn()
        err = max(rel(got[0], ref[0]), rel(got[1], ref[1]))
        del got
        emit(kind="time", selection=name, T=seq_len, kernel="dkdv", rows=rows, warps=warps, stages=stages,
             ms=bench(fn), rel_err_vs_default=err)
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def run_defaults(name: str, seq_len: int) -> None:
    """Forward, dq and dk/dv at the current defaults, unscaled and with do_scale (checked against the unscaled
    kernels on the materialised do * gate)."""
    q, k, v, cu, idx, do, gate = backward_inputs(name, seq_len)
    scale = D**-0.5
    group = HQ // HKV
    scaled = (do.float() * gate.float()[..., None]).to(do.dtype)  # the materialised gradient of o

    fwd_plan = slc.plan_tiles(idx, cu, group)
    dq_plan = slc.plan_tiles(idx, cu, group, None, dq=True)
    o, lse = slc.launch_fwd(q, k, v, fwd_plan, BLOCK, scale)
    o16, lse16 = slc.launch_fwd(q, k, v, slc.plan_tiles(idx, cu, group, 16), BLOCK, scale)
    emit(kind="check", selection=name, what="fwd default vs 16-row fwd", rel_err=rel(o, o16))
    emit(kind="default", selection=name, kernel="fwd", rows=fwd_plan.block_m,
         launch=slc.tiles._launch_config(fwd_plan.block_m, D, "fwd"),
         ms=bench(partial(slc.launch_fwd, q, k, v, fwd_plan, BLOCK, scale)))

    delta = U.row_dot(o, do)
    delta_g = delta * gate.float()
    delta_mat = U.row_dot(o, scaled)
    dq = partial(slc.launch_dq, q, k, v, do, lse, delta, dq_plan, BLOCK, scale)
    dq_g = partial(slc.launch_dq, q, k, v, do, lse, delta_g, dq_plan, BLOCK, scale, do_scale=gate)
    dq_mat = partial(slc.launch_dq, q, k, v, scaled, lse, delta_mat, dq_plan, BLOCK, scale)
    emit(kind="check", selection=name, what="dq do_scale vs materialised", rel_err=rel(dq_g(), dq_mat()),
         unscaled_rel_diff=rel(dq(), dq_mat()))
    launch = slc.tiles._launch_config(dq_plan.block_m, D, "dq")
    for variant, fn in (("plain", dq), ("do_scale", dq_g)):
        emit(kind="default", selection=name, kernel="dq", variant=variant, rows=dq_plan.block_m, launch=launch,
             ms=bench(fn))

    key_blocks = U.tiles_of(cu, BLOCK)
    offsets, tok_list = slc.inverse_lists(idx, cu, BLOCK, key_blocks.shape[0])
    common = (key_blocks, offsets, tok_list, BLOCK, scale)
    dkdv = partial(slc.launch_dkdv, q, k, v, do, lse, delta, *common)
    dkdv_g = partial(slc.launch_dkdv, q, k, v, do, lse, delta_g, *common, do_scale=gate)
    dkdv_mat = partial(slc.launch_dkdv, q, k, v, scaled, lse, delta_mat, *common)
    got, want = dkdv_g(), dkdv_mat()
    emit(kind="check", selection=name, what="dk/dv do_scale vs materialised",
         rel_err=max(rel(got[0], want[0]), rel(got[1], want[1])))
    old32 = partial(slc.launch_dkdv, q, k, v, do, lse, delta_g, *common, do_scale=gate,
                    settings=slc.SelectionSettings(dkdv_rows=32))
    got32 = old32()
    emit(kind="check", selection=name, what="dk/dv do_scale 32 rows vs default rows",
         rel_err=max(rel(got32[0], got[0]), rel(got32[1], got[1])))
    del got, want, got32
    rows_default = slc.SELECTION_SETTINGS.dkdv_rows
    for variant, rows, fn in (("plain", rows_default, dkdv), ("do_scale", rows_default, dkdv_g),
                              ("do_scale", 32, old32)):
        emit(kind="default", selection=name, kernel="dkdv", variant=variant, rows=rows,
             launch=((8, 2) if U.tile_shape(group, rows)[0] >= 128 else (4, 3)), ms=bench(fn))
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


# Block-major dq launch variants: (rows, warps, loop stages, register cap); the first is the library default.
DQ_BY_BLOCK_VARIANTS = [(64, 4, 2, None), (64, 4, 2, 168), (64, 8, 2, None), (64, 4, 3, None), (32, 4, 2, None)]


def run_dq_by_block(name: str, seq_len: int, deadline: float) -> None:
    """The block-major dq (`launch_dq_by_block`) against the query-tile dq the planner would otherwise take:
    times (with do_scale, as the operator runs it), each launch variant checked against the tile dq, and the
    planner's estimates (ns per token; the block-major one without its per-call part) for refitting
    DQ_BY_BLOCK_STEP_COST / _TOKEN_COST / _CALL_COST."""
    q, k, v, cu, idx, do, gate = backward_inputs(name, seq_len)
    scale = D**-0.5
    group = HQ // HKV
    o, lse = slc.selected_attention_fwd(q, k, v, idx, cu, BLOCK, scale)
    delta = U.row_dot(o, do) * gate.float()

    def tiles() -> torch.Tensor:  # what the operator ran before the block-major dq: planning included
        plan = slc.plan_tiles(idx, cu, group, None, dq=True)
        return slc.launch_dq(q, k, v, do, lse, delta, plan, BLOCK, scale, do_scale=gate)

    want = tiles()
    sample = slc.sample_selection(idx, group, list(slc.SELECTION_SETTINGS.tile_candidates))
    emit(kind="time", selection=name, T=seq_len, kernel="dq tiles (with planning)", ms=bench(tiles),
         planner="by_block" if slc.plan_dq(idx, cu, group, BLOCK) is None else "tiles",
         tile_estimates_ns_per_token={bm: slc.tile_estimate(sample, bm, slc.DQ_TILE_STEP_COST)
                                      for bm in sample.steps_per_token},
         by_block_estimate_without_call_ns_per_token=slc.by_block_estimate(sample, group, dq=True)
         - slc.DQ_BY_BLOCK_CALL_COST / seq_len, used_per_token=sample.used_per_token)
    for rows, warps, stages, regs in DQ_BY_BLOCK_VARIANTS:
        if time.time() > deadline:
            emit(kind="skip", selection=name, T=seq_len, reason="budget", rows=rows, warps=warps)
            continue
        fn = partial(slc.launch_dq_by_block, q, k, v, do, lse, delta, idx, cu, BLOCK, scale, do_scale=gate,
                     rows=rows, num_warps=warps, num_stages=stages, max_registers=regs)
        try:
            got = fn()
        except Exception as error:  # a launch that does not compile or fit
            emit(kind="error", selection=name, T=seq_len, rows=rows, warps=warps, error=str(error)[:300])
            continue
        emit(kind="time", selection=name, T=seq_len, kernel="dq by block", rows=rows, warps=warps, stages=stages,
             max_registers=regs, ms=bench(fn), rel_vs_tiles=rel(got, want), finite=bool(torch.isfinite(got).all()))
        del got
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def run_name(args: argparse.Namespace) -> str:
    """The result files' name: tune_selection_<mode>_<selections>."""
    tag = ("splits_" if args.splits else "dkdv_" if args.dkdv else "dq_by_block_" if args.dq_by_block
           else "by_block_" if args.by_block else "defaults_" if args.defaults else "")
    return f"tune_selection_{tag}{'_'.join(args.selections)}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--length", type=int, default=131072)
    parser.add_argument("--selections", nargs="*", default=list(INPUT_KINDS))
    parser.add_argument("--budget-s", type=float, default=85.0, help="skip remaining variants past this")
    parser.add_argument("--defaults", action="store_true", help="time and check only the current defaults")
    parser.add_argument("--by-block", action="store_true", help="the block-major forward against the tiles")
    parser.add_argument("--dkdv", action="store_true", help="dk/dv launch variants")
    parser.add_argument("--dq-by-block", action="store_true", help="the block-major dq against the query tiles")
    parser.add_argument("--lengths", type=int, nargs="*", help="several lengths (--by-block, --splits)")
    parser.add_argument("--splits", type=int, nargs="*",
                        help="time the block-major forward's list splits (BY_BLOCK_SPLIT values; 0 = none)")
    start = time.time()
    global RESULTS
    args, RESULTS = open_run(parser, argv, run_name)
    for i, name in enumerate(args.selections):
        # Each selection gets its share of the budget (the summary of each still runs).
        share = start + args.budget_s * (i + 1) / len(args.selections) - 8.0
        if args.splits:
            for length in args.lengths or [args.length]:
                run_by_block_splits(name, length, args.splits)
        elif args.dkdv:
            run_dkdv(name, args.length, share)
        elif args.dq_by_block:
            for length in args.lengths or [args.length]:
                run_dq_by_block(name, length, share)
        elif args.by_block:
            for length in args.lengths or [args.length]:
                run_by_block(name, length, share)
        elif args.defaults:
            run_defaults(name, args.length)
        else:
            run_selection(name, args.length, share)
    emit(kind="info", wall_s=time.time() - start)


if __name__ == "__main__":
    main()
