"""Attention over the selected key blocks (NSA's selection branch): Triton forward and backward.

All tensors are packed varlen: q [total_T, HQ, D], k/v [total_T, HKV, D], cu_seqlens int32 [N+1]. The
G = HQ // HKV query heads of a KV group share one selection: block_indices int32 [total_T, HKV, S] lists, per
token and group, the chosen block ids of the token's own sequence (ascending, -1 = unused). Query t attends to
the keys of its selected blocks with key position <= t.

Work layout (why it looks like this):

* Forward and dq in the query-tile layout run one program per (query tile, KV group). A tile is BT consecutive
  tokens of one sequence times the G heads of the group, flattened into BLOCK_M = BT * G (+ padding) rows, so a 7:1
  ratio fills the tensor-core tile without padding query heads. The program walks the *union* of the blocks its BT
  tokens selected (built once per call by `union_blocks`), loads each key block once and masks, per row, whether
  that row's token chose the block (a bitmask per union entry) and causality. Neighbouring tokens mostly pick the
  same blocks in real models, so big tiles load far fewer key blocks than per-token programs. When selections barely
  overlap (random inputs), big tiles waste rows on masked blocks; `plan_tiles` then falls back to small tiles
  (BLOCK_M = 16: two tokens of a 7:1 group), which behave like per-token programs.
* When they share almost nothing, the forward can instead run block-major (`launch_fwd_by_block`): one
  program per (key block, KV group) walks the tokens that chose the block and writes one partial output per
  (token, group, slot), merged afterwards by log-sum-exp. That moves the query rows and the partials (2 x G
  rows per triple) instead of 32 KiB of keys and values per triple, which wins on random selections at long
  lengths. `plan_forward` picks the layout from the sampled union sizes and a fitted cost model (`plan.py`,
  `SelectionSettings`).
* dq has the same two layouts: the query tiles (`launch_dq`) or block-major (`launch_dq_by_block`: the
  forward's lists, one partial dq per triple, summed per token), chosen by `plan_dq` independently of the
  forward.
* dk/dv run one program per (key block, KV group) over the inverse index (`inverse_lists`): the sorted list
  of tokens that selected the block. Each program owns its keys, so dk/dv need no atomics and are
  deterministic; the tokens' query rows are gathered in chunks of BT tokens x G heads.

Modules: `plan` (block unions, the sampled cost model, the layout choice), `lists` (token lists of the
block-major kernels), `tiles` (query-tile forward and dq), `by_block` (block-major forward and dq, merges),
`backward` (dk/dv), `settings` (tuning values); this module checks inputs and runs the passes. The operator's
semantics are in docs/operator.md, the measurements behind the settings in docs/performance.md.

Softmax statistics: lse is the natural-log log-sum-exp of scale * q.k over the allowed keys (float32), -inf
for rows with nothing allowed (their output is 0). Kernels work in base 2 internally (exp2, scale * log2(e)).
"""

from __future__ import annotations

import torch
from torch import Tensor

from videonsa.ops.triton.selection.backward import launch_dkdv
from videonsa.ops.triton.selection.by_block import by_block_chunk_tokens, launch_dq_by_block, launch_fwd_by_block
from videonsa.ops.triton.selection.lists import (
    BlockItems,
    BlockLists,
    ListPieces,
    block_lists,
    by_block_items,
    default_dkdv_split,
    inverse_lists,
    key_block_table,
    split_lists,
)
from videonsa.ops.triton.selection.plan import (
    LayoutChoice,
    PendingSample,
    SelectionSample,
    TilePlan,
    block_n,
    by_block_estimate,
    choose_layout,
    plan_dq,
    plan_forward,
    plan_tiles,
    sample_selection,
    tile_estimate,
    union_blocks,
    union_blocks_torch,
)
from videonsa.ops.triton.selection.settings import SELECTION_SETTINGS, SelectionSettings
from videonsa.ops.triton.selection.tiles import launch_dq, launch_fwd
from videonsa.ops.triton.utils import KERNEL_DTYPES, kernel_input, key_tiles, row_dot


def _check(
    q: Tensor, k: Tensor, v: Tensor, block_indices: Tensor, cu_seqlens: Tensor, cu_seqlens_k: Tensor | None = None
) -> None:
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape:
        raise ValueError(
            f"selected attention: q [T,HQ,D], k/v [T,HKV,D] expected, got {q.shape}, {k.shape}, {v.shape}"
        )
    same_rows = cu_seqlens_k is not None or q.shape[0] == k.shape[0]  # keys may run longer with their own offsets
    if not same_rows or q.shape[2] != k.shape[2] or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"selected attention: incompatible q {tuple(q.shape)} and k {tuple(k.shape)}")
    if block_indices.shape[:2] != (q.shape[0], k.shape[1]) or block_indices.dim() != 3:
        raise ValueError(
            f"selected attention: block_indices must be [T, HKV, S], got {tuple(block_indices.shape)}"
        )
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("selected attention: cu_seqlens must be 1-D with at least 2 entries")
    if q.dtype not in KERNEL_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"selected attention: q, k, v must share one of bfloat16, float16, float32, got {q.dtype}, {k.dtype}, "
            f"{v.dtype}"
        )


def _pass_plan(
    block_indices: Tensor, cu_seqlens: Tensor, group: int, block_size: int, tile_rows: int | None,
    by_block: bool | None, layout: LayoutChoice | None, dq: bool, settings: SelectionSettings,
) -> TilePlan | None:
    """The layout of the forward (or with dq of the dq pass) from the caller's switches: query tiles of
    tile_rows rows (or the planned height) when tile_rows is given or by_block is False, block-major (None)
    when by_block is True, else the planner's choice (`layout`, started earlier by `choose_layout`, or made
    here). A layout choice must be for this pass and this selection, and not come with a forced layout."""
    pass_name, switch, layout_name = ("dq", "dq_by_block", "dq_layout") if dq else ("forward", "by_block", "layout")
    if by_block and tile_rows is not None:
        raise ValueError(f"selected attention: tile_rows applies to the query-tile {pass_name}, not {switch}=True")
    if layout is not None:
        if tile_rows is not None or by_block is not None:
            raise ValueError(f"selected attention: {layout_name} cannot be combined with tile_rows or a forced layout")
        if layout.dq != dq:
            raise ValueError(
                f"selected attention: {layout_name} was chosen for the {'dq' if layout.dq else 'forward'} pass"
            )
        if layout.block_indices.shape != block_indices.shape:
            raise ValueError(
                f"selected attention: {layout_name} was chosen for block_indices "
                f"{tuple(layout.block_indices.shape)}, got {tuple(block_indices.shape)}"
            )
    if tile_rows is not None or by_block is False:
        return plan_tiles(block_indices, cu_seqlens, group, tile_rows, dq=dq, settings=settings)
    if by_block:
        return None
    return (layout or choose_layout(block_indices, cu_seqlens, group, block_size, dq, settings)).resolve()


def _prepare(
    q: Tensor, k: Tensor, v: Tensor, block_indices: Tensor, cu_seqlens: Tensor, block_size: int,
    cu_seqlens_k: Tensor | None = None,
):
    _check(q, k, v, block_indices, cu_seqlens, cu_seqlens_k)
    block_n(block_size)  # validates block_size before anything is launched
    return kernel_input(q), kernel_input(k), kernel_input(v), block_indices.to(torch.int32).contiguous()


def selected_attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_indices: Tensor,
    cu_seqlens: Tensor,
    block_size: int,
    scale: float,
    *,
    tile_rows: int | None = None,
    by_block: bool | None = None,
    fold_into: Tensor | None = None,
    fold_scale: Tensor | None = None,
    layout: LayoutChoice | None = None,
    settings: SelectionSettings = SELECTION_SETTINGS,
    cu_seqlens_k: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Causal attention of each query over the keys of its selected blocks.

    Args:
        q: [T, HQ, D]; k, v: [T, HKV, D] (packed; bf16, fp16 or fp32).
        block_indices: int32 [T, HKV, S], block ids within the token's sequence, ascending, -1 = unused.
        cu_seqlens: int32 [N+1] sequence offsets.
        block_size: keys per block (power of two, >= 16).
        scale: softmax scale.
        tile_rows: matrix rows per program of the query-tile forward (128, 64 or 16, say); implies
            by_block=False.
        by_block: True runs the block-major forward (`launch_fwd_by_block`, block_size <= 64), False the
            query-tile forward; None picks the layout with the least estimated time (`plan_forward`).
        fold_into: optional contiguous [T, HQ, D] tensor in q's dtype holding a partial gated sum; the output
            is then added into it in place, scaled per row by fold_scale [T, HQ] (o <- o + g * attention, in
            float32, rounded once) and no separate output is made. For inference, where the selection output
            is not kept for a backward; the block-major forward then uses larger chunks
            (`SelectionSettings.by_block_partial_bytes_folded`).
        layout: the planner's choice started earlier by `choose_layout` on these block_indices (instead of
            planning here), so that its host read overlaps the GPU work queued since; only with by_block and
            tile_rows None.
        settings: launch settings and the planner's cost model (`SelectionSettings`).
        cu_seqlens_k: int32 [N+1] or None. Given, k and v are [Tk, HKV, D] packed by these offsets and each
            sequence's queries (cu_seqlens) are its last keys: query i of a sequence with len_q queries and
            len_k keys sits at key position len_k - len_q + i, its block ids count the sequence's key blocks
            (docs/operator.md). Both layouts take it; there is no backward for it.

    Returns:
        o [T, HQ, D] in q's dtype (0 for rows with no allowed key; fold_into itself when given) and lse float32
        [T, HQ] (-inf there).
    """
    q, k, v, block_indices = _prepare(q, k, v, block_indices, cu_seqlens, block_size, cu_seqlens_k)
    if (fold_into is None) != (fold_scale is None):
        raise ValueError("selected attention: fold_into and fold_scale go together")
    if fold_into is not None:
        if fold_into.shape != q.shape or fold_into.dtype != q.dtype or not fold_into.is_contiguous():
            raise ValueError(
                f"selected attention: fold_into must be a contiguous {tuple(q.shape)} {q.dtype} tensor, got "
                f"{tuple(fold_into.shape)} {fold_into.dtype}"
            )
        if fold_scale.shape != q.shape[:2]:
            raise ValueError(f"selected attention: fold_scale must be [T, HQ], got {tuple(fold_scale.shape)}")
        fold_scale = fold_scale.contiguous()
    if q.shape[0] == 0:
        o = torch.empty_like(q) if fold_into is None else fold_into
        return o, torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    group = q.shape[1] // k.shape[1]
    plan = _pass_plan(block_indices, cu_seqlens, group, block_size, tile_rows, by_block, layout, False, settings)
    fold = dict(fold_into=fold_into, fold_scale=fold_scale)
    if plan is None:
        return launch_fwd_by_block(q, k, v, block_indices, cu_seqlens, block_size, scale, **fold, settings=settings,
                                   cu_seqlens_k=cu_seqlens_k)
    key_rows = None if cu_seqlens_k is None else key_tiles(plan.tiles, cu_seqlens, cu_seqlens_k)
    return launch_fwd(q, k, v, plan, block_size, scale, **fold, key_rows=key_rows)


def selected_attention_bwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor | None,
    lse: Tensor,
    do: Tensor,
    block_indices: Tensor,
    cu_seqlens: Tensor,
    block_size: int,
    scale: float,
    *,
    tile_rows: int | None = None,
    dq_by_block: bool | None = None,
    delta: Tensor | None = None,
    do_scale: Tensor | None = None,
    dq_layout: LayoutChoice | None = None,
    settings: SelectionSettings = SELECTION_SETTINGS,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of `selected_attention_fwd`.

    Args:
        q, k, v, block_indices, cu_seqlens, block_size, scale: as in the forward.
        o: [T, HQ, D] and lse float32 [T, HQ], the forward's outputs (o may be None when delta is given);
            do: [T, HQ, D], gradient of o, or (with do_scale) the gradient before a per-row factor.
        tile_rows: rows per program of the query-tile dq (implies dq_by_block=False); dq_by_block: True runs
            the block-major dq (`launch_dq_by_block`, block_size <= 64), False the query tiles, None picks the
            layout with the least estimated time (`plan_dq`; independent of the forward's layout).
        delta: float32 [T, HQ], sum_d o * (gradient of o), if the caller has it (else computed here).
        do_scale: [T, HQ] (any float dtype) or None. When given, the gradient of o is do * do_scale[..., None]
            (e.g. a gate times the gated sum's gradient). It is never formed: the kernels scale the float32
            rows of p (for dv) and of do.v^T (for dp) by do_scale instead, so the result equals the gradient
            of do * do_scale in exact arithmetic, without the rounding of a materialised product. A missing
            delta is then do_scale * row_dot(o, do).
        dq_layout: dq's layout choice started earlier by `choose_layout(..., dq=True)` on these block_indices
            (see `selected_attention_fwd`'s layout); only with dq_by_block and tile_rows None.
        settings: launch settings and the planner's cost model (`SelectionSettings`; dk/dv: `dkdv_rows` query
            rows per step, `dkdv_split` the longest token list of one program).

    Returns:
        dq [T, HQ, D] (q's dtype), dk, dv [T, HKV, D] (k's dtype), summed over the G heads of each group and
        all queries that selected each block. Deterministic: no atomics on gradients.
    """
    q, k, v, block_indices = _prepare(q, k, v, block_indices, cu_seqlens, block_size)
    do = kernel_input(do)
    if q.shape[0] == 0:
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    lse = lse.float().contiguous()
    if do_scale is not None:
        if do_scale.shape != q.shape[:2]:
            raise ValueError(f"selected attention: do_scale must be [T, HQ], got {tuple(do_scale.shape)}")
        do_scale = do_scale.contiguous()
    if delta is None:
        if o is None:
            raise ValueError("selected attention backward: o is needed when delta is not given")
        delta = row_dot(o, do)
        if do_scale is not None:
            delta = delta * do_scale.float()
    elif delta.shape != q.shape[:2]:
        raise ValueError(f"selected attention: delta must be [T, HQ], got {tuple(delta.shape)}")
    delta = delta.float().contiguous()
    group = q.shape[1] // k.shape[1]
    plan = _pass_plan(block_indices, cu_seqlens, group, block_size, tile_rows, dq_by_block, dq_layout, True, settings)
    # dk/dv's lists and work items first: the host read of their partial count then waits only for them,
    # while the dq kernels queued next keep the GPU busy.
    key_blocks, units = key_block_table(cu_seqlens, q.shape[0], block_size)
    offsets, tokens = inverse_lists(block_indices, cu_seqlens, block_size, key_blocks.shape[0], units=units)
    pieces = split_lists(offsets, default_dkdv_split(tokens.numel(), settings), tokens.numel())
    if plan is None:
        dq = launch_dq_by_block(q, k, v, do, lse, delta, block_indices, cu_seqlens, block_size, scale,
                                do_scale=do_scale, settings=settings)
    else:
        dq = launch_dq(q, k, v, do, lse, delta, plan, block_size, scale, do_scale=do_scale)
    del plan
    dk, dv = launch_dkdv(
        q, k, v, do, lse, delta, key_blocks, offsets, tokens, block_size, scale, do_scale=do_scale,
        pieces=pieces, settings=settings,
    )
    return dq, dk, dv


__all__ = [
    "SELECTION_SETTINGS", "BlockItems", "BlockLists", "LayoutChoice", "ListPieces", "PendingSample",
    "SelectionSample", "SelectionSettings", "TilePlan", "block_lists", "block_n", "by_block_chunk_tokens",
    "by_block_estimate", "by_block_items", "choose_layout", "default_dkdv_split", "inverse_lists", "key_block_table",
    "launch_dkdv", "launch_dq", "launch_dq_by_block", "launch_fwd", "launch_fwd_by_block", "plan_dq", "plan_forward",
    "plan_tiles", "sample_selection", "selected_attention_bwd", "selected_attention_fwd", "split_lists",
    "tile_estimate", "union_blocks", "union_blocks_torch",
]
