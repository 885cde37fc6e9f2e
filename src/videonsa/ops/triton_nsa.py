"""NSA with Triton kernels: one autograd function over compression, top-k selection, selection, window, gating.

Same signature and semantics as `videonsa.ops.reference.nsa_parts_reference` (docs/operator.md). Inputs
are packed into varlen form ([B*T, H, D] with cu_seqlens, see `triton/utils.pack`) so that batches and packed
sequences take one code path. Forward, for b = block_size:

1. `mean_pool_fwd`: K~, V~ [total_NB, HKV, D], the means of complete blocks.
2. `compressed_attention_fwd`: o_cmp and lse_cmp.
3. `select_blocks_topk`: block_indices [total_T, HKV, block_count] from the compression softmax (recomputed
   tile by tile with lse_cmp; no score tensor in memory).
4. `window_attention_fwd`, `selected_attention_fwd`: o_swa, o_slc (and their lse, kept for backward). The
   selection's layout planner is started first (`choose_layout`) and read after the window kernel is queued,
   so its one host read does not leave the GPU idle.
5. `_gate_fwd_kernel`: o = g_cmp * o_cmp + g_slc * o_slc + g_swa * o_swa.

Backward runs the same steps in reverse: `_gate_bwd_kernel` splits do into the three branch gradients and the
gate gradients dg_x = sum_d do * o_x (plus the compression branch's softmax "delta"), then each branch's
kernels add their dq, dk, dv; the choice of blocks gets no gradient. Every kernel is deterministic.

That is `_NSAFunction`, used by `nsa_parts_triton` (every part returned, so every part is kept: at 128K with
HQ=28, D=128 bf16 each [T, HQ, D] tensor is 0.94 GiB). `nsa_attention_triton` returns o alone and uses
`_NSALeanFunction` instead, which keeps one such tensor (o_slc) and makes no other in the backward (the
operator's working-memory bound: 2 GB at 128K, docs/performance.md); see its docstring.

Queries that end a longer key sequence (a chunk of a prefill: k, v longer than q, or `cu_seqlens_k`) run the
same forward with the keys packed by their own offsets, which every kernel gets beside the queries'
(docs/operator.md, "Queries that end a longer key sequence"); the backward refuses them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from videonsa.ops.common import NSAParts, check_inputs, query_key_spans
from videonsa.ops.config import NSAConfig
from videonsa.ops.triton.compression import (
    COMPRESSION_SETTINGS,
    CompressionSettings,
    compressed_attention_bwd,
    compressed_attention_delta,
    compressed_attention_fwd,
    mean_pool_bwd,
    mean_pool_fwd,
)
from videonsa.ops.triton.selection import (
    SELECTION_SETTINGS,
    LayoutChoice,
    SelectionSettings,
    choose_layout,
    selected_attention_bwd,
    selected_attention_fwd,
)
from videonsa.ops.triton.topk import TOPK_SETTINGS, TopkSettings, select_blocks_topk
from videonsa.ops.triton.utils import KERNEL_DTYPES, next_pow2, pack, row_dot
from videonsa.ops.triton.window import (
    WINDOW_SETTINGS,
    WindowSettings,
    window_attention_bwd,
    window_attention_delta,
    window_attention_fwd,
)


@dataclass(frozen=True)
class KernelSettings:
    """The launch settings of every branch's kernels (each defaults to its module's measured settings); tests and
    benchmarks pass other values here instead of changing module globals."""

    compression: CompressionSettings = COMPRESSION_SETTINGS
    topk: TopkSettings = TOPK_SETTINGS
    selection: SelectionSettings = SELECTION_SETTINGS
    window: WindowSettings = WINDOW_SETTINGS


KERNEL_SETTINGS = KernelSettings()


# ----------------------------------------------------------------------------------------------------------
# Gated sum


@triton.jit
def _gate_fwd_kernel(
    oc_ptr, os_ptr, ow_ptr, gc_ptr, gs_ptr, gw_ptr, o_ptr, n_rows,
    D: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    d = tl.arange(0, BD)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (d[None, :] < D)
    offs = rows[:, None] * D + d[None, :]
    gc = tl.load(gc_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    gs = tl.load(gs_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    gw = tl.load(gw_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    o = gc[:, None] * tl.load(oc_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    o += gs[:, None] * tl.load(os_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    o += gw[:, None] * tl.load(ow_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(o_ptr + offs, o.to(o_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gate_bwd_kernel(
    do_ptr, oc_ptr, os_ptr, ow_ptr, gc_ptr, gs_ptr, gw_ptr,
    doc_ptr, dos_ptr, dow_ptr, dgc_ptr, dgs_ptr, dgw_ptr, delta_ptr, n_rows,
    D: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    d = tl.arange(0, BD)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (d[None, :] < D)
    offs = rows[:, None] * D + d[None, :]
    do = tl.load(do_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    oc = tl.load(oc_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    os = tl.load(os_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    ow = tl.load(ow_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    gc = tl.load(gc_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    gs = tl.load(gs_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    gw = tl.load(gw_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    tl.store(dgc_ptr + rows, tl.sum(do * oc, axis=1).to(dgc_ptr.dtype.element_ty), mask=row_ok)
    tl.store(dgs_ptr + rows, tl.sum(do * os, axis=1).to(dgs_ptr.dtype.element_ty), mask=row_ok)
    tl.store(dgw_ptr + rows, tl.sum(do * ow, axis=1).to(dgw_ptr.dtype.element_ty), mask=row_ok)
    doc = (gc[:, None] * do).to(doc_ptr.dtype.element_ty)
    tl.store(doc_ptr + offs, doc, mask=mask)
    tl.store(dos_ptr + offs, (gs[:, None] * do).to(dos_ptr.dtype.element_ty), mask=mask)
    tl.store(dow_ptr + offs, (gw[:, None] * do).to(dow_ptr.dtype.element_ty), mask=mask)
    # The compression backward's softmax delta, from the rounded do_cmp it will read (as if computed there).
    tl.store(delta_ptr + rows, tl.sum(doc.to(tl.float32) * oc, axis=1), mask=row_ok)


def _gate_rows(head_dim: int) -> int:
    # 16 elements per thread per tensor at 4 warps: the backward holds seven such tiles without spilling.
    return max(1, 2048 // next_pow2(head_dim))


def gate_fwd(o_cmp: Tensor, o_slc: Tensor, o_swa: Tensor, g_cmp: Tensor, g_slc: Tensor, g_swa: Tensor) -> Tensor:
    """o [total_T, HQ, D] = sum of g_x[..., None] * o_x over the branches; o_x [total_T, HQ, D], g_x [total_T, HQ]."""
    total, heads, head_dim = o_cmp.shape
    o = torch.empty_like(o_cmp)
    n_rows = total * heads
    if n_rows:
        br = _gate_rows(head_dim)
        _gate_fwd_kernel[(triton.cdiv(n_rows, br),)](
            o_cmp, o_slc, o_swa, g_cmp, g_slc, g_swa, o, n_rows,
            D=head_dim, BD=next_pow2(head_dim), BR=br, num_warps=4,
        )
    return o


def gate_bwd(
    do: Tensor, o_cmp: Tensor, o_slc: Tensor, o_swa: Tensor, g_cmp: Tensor, g_slc: Tensor, g_swa: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward of `gate_fwd`.

    Returns do_cmp, do_slc, do_swa [total_T, HQ, D] (do's dtype), dg_cmp, dg_slc, dg_swa [total_T, HQ] (the
    gates' dtype) and delta_cmp float32 [total_T, HQ] = sum_d do_cmp * o_cmp.
    """
    total, heads, head_dim = do.shape
    grads = [torch.empty_like(do) for _ in range(3)]
    gate_grads = [torch.empty_like(g) for g in (g_cmp, g_slc, g_swa)]
    delta = torch.empty(total, heads, dtype=torch.float32, device=do.device)
    n_rows = total * heads
    if n_rows:
        br = _gate_rows(head_dim)
        _gate_bwd_kernel[(triton.cdiv(n_rows, br),)](
            do, o_cmp, o_slc, o_swa, g_cmp, g_slc, g_swa, *grads, *gate_grads, delta, n_rows,
            D=head_dim, BD=next_pow2(head_dim), BR=br, num_warps=4,
        )
    return (*grads, *gate_grads, delta)


@triton.jit
def _gate_fold_kernel(o_ptr, x_ptr, g_ptr, n_rows, D: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr):
    # o <- o + g * x per row, in float32, rounded once to o's dtype.
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    d = tl.arange(0, BD)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (d[None, :] < D)
    offs = rows[:, None] * D + d[None, :]
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    o = tl.load(o_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    o += g[:, None] * tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(o_ptr + offs, o.to(o_ptr.dtype.element_ty), mask=mask)


def gate_fold_(o: Tensor, x: Tensor, g: Tensor) -> Tensor:
    """o += g[..., None] * x in place (float32 sum, one rounding); o, x [total_T, HQ, D] contiguous, g [total_T, HQ]."""
    total, heads, head_dim = o.shape
    if not (o.is_contiguous() and x.is_contiguous() and x.shape == o.shape and g.shape == o.shape[:2]):
        raise ValueError(f"gate_fold_: contiguous o, x {tuple(o.shape)} and g {tuple(o.shape[:2])} expected")
    n_rows = total * heads
    if n_rows:
        br = _gate_rows(head_dim)
        _gate_fold_kernel[(triton.cdiv(n_rows, br),)](
            o, x, g.contiguous(), n_rows, D=head_dim, BD=next_pow2(head_dim), BR=br, num_warps=4
        )
    return o


# ----------------------------------------------------------------------------------------------------------
# Autograd


def _add_(acc: Tensor, x: Tensor) -> Tensor:
    """acc += x, in acc's dtype (float32 when acc is)."""
    return acc.add_(x.to(acc.dtype))


def _choose_layout(
    q: Tensor, k: Tensor, indices: Tensor, cu_seqlens: Tensor, block_size: int, settings: KernelSettings,
    dq: bool = False,
) -> LayoutChoice:
    """Start the selection planner (`choose_layout`) before independent work is queued (the window branch in
    the forward, the delta kernels in the backward): its counts reach the host while those kernels run, so
    the GPU does not idle while the host decides and launches the selection."""
    return choose_layout(indices, cu_seqlens, q.shape[1] // k.shape[1], block_size, dq, settings.selection)


def _compress_and_select(
    q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, config: NSAConfig, scale: float, settings: KernelSettings,
    cu_seqlens_k: Tensor | None = None,
):
    """The forward steps both autograd functions share: pooled keys, the compression branch and the top-k.

    cu_seqlens_k: the keys' offsets when the queries end longer key sequences (k, v packed by them), else None.
    Returns k_cmp, v_cmp [total_NB, HKV, D], cu_cmp, o_cmp [total_T, HQ, D], lse_cmp float32 [total_T, HQ] and
    block_indices int32 [total_T, HKV, block_count].
    """
    b = config.block_size
    k_cmp, v_cmp, cu_cmp = mean_pool_fwd(k, v, cu_seqlens if cu_seqlens_k is None else cu_seqlens_k, b)
    o_cmp, lse_cmp = compressed_attention_fwd(
        q, k_cmp, v_cmp, cu_seqlens, cu_cmp, b, scale, settings.compression, cu_seqlens_k=cu_seqlens_k
    )
    indices = select_blocks_topk(
        q, k_cmp, lse_cmp, cu_seqlens, cu_cmp, block_size=b, block_count=config.block_count,
        init_blocks=config.init_blocks, local_blocks=config.local_blocks, scale=scale, settings=settings.topk,
        cu_seqlens_k=cu_seqlens_k, max_seqlen=_one_key_sequence_length(k, cu_seqlens_k),
    )
    return k_cmp, v_cmp, cu_cmp, o_cmp, lse_cmp, indices


def _one_key_sequence_length(k: Tensor, cu_seqlens_k: Tensor | None) -> int | None:
    """The key length of a chunked call over one sequence, known from k's shape (so the top-k reads no offsets
    on the host); None otherwise (the top-k finds the longest sequence itself)."""
    return k.shape[0] if cu_seqlens_k is not None and cu_seqlens_k.numel() == 2 else None


def _refuse_chunked_backward(cu_seqlens_k: Tensor | None) -> None:
    if cu_seqlens_k is not None:
        raise NotImplementedError(
            "nsa_attention: the Triton kernels have no backward for chunked queries (q shorter than k: queries "
            "that end a longer key sequence); run them without gradients, or use backend='reference'"
        )


class _NSAFunction(torch.autograd.Function):
    """Packed NSA: q [total_T, HQ, D], k/v [total_T, HKV, D], gates [total_T, HQ].

    Outputs o, o_cmp, o_slc, o_swa (differentiable) and block_indices, lse_cmp (not).
    """

    @staticmethod
    def forward(ctx, q, k, v, g_cmp, g_slc, g_swa, cu_seqlens, config: NSAConfig, scale: float,
                settings: KernelSettings, cu_seqlens_k: Tensor | None = None):
        b, slc = config.block_size, settings.selection
        k_cmp, v_cmp, cu_cmp, o_cmp, lse_cmp, indices = _compress_and_select(
            q, k, v, cu_seqlens, config, scale, settings, cu_seqlens_k
        )
        layout = _choose_layout(q, k, indices, cu_seqlens, b, settings)
        o_swa, lse_swa = window_attention_fwd(
            q, k, v, cu_seqlens, config.window_size, scale, settings=settings.window, cu_seqlens_k=cu_seqlens_k
        )
        o_slc, lse_slc = selected_attention_fwd(
            q, k, v, indices, cu_seqlens, b, scale, layout=layout, settings=slc, cu_seqlens_k=cu_seqlens_k
        )
        o = gate_fwd(o_cmp, o_slc, o_swa, g_cmp, g_slc, g_swa)
        ctx.cu_seqlens_k = cu_seqlens_k
        ctx.save_for_backward(
            q, k, v, g_cmp, g_slc, g_swa, cu_seqlens, k_cmp, v_cmp, cu_cmp,
            o_cmp, lse_cmp, indices, o_slc, lse_slc, o_swa, lse_swa,
        )
        ctx.config, ctx.scale, ctx.settings = config, scale, settings
        ctx.mark_non_differentiable(indices, lse_cmp)
        ctx.set_materialize_grads(False)
        return o, o_cmp, o_slc, o_swa, indices, lse_cmp

    @staticmethod
    def backward(ctx, do, do_cmp_extra, do_slc_extra, do_swa_extra, _indices, _lse):
        _refuse_chunked_backward(ctx.cu_seqlens_k)
        (q, k, v, g_cmp, g_slc, g_swa, cu_seqlens, k_cmp, v_cmp, cu_cmp,
         o_cmp, lse_cmp, indices, o_slc, lse_slc, o_swa, lse_swa) = ctx.saved_tensors
        config, scale, settings = ctx.config, ctx.scale, ctx.settings
        b = config.block_size
        if do is None:
            do_cmp, do_slc, do_swa = (torch.zeros_like(q) for _ in range(3))
            dg_cmp, dg_slc, dg_swa = (torch.zeros_like(g) for g in (g_cmp, g_slc, g_swa))
            delta_cmp = None
        else:
            do_cmp, do_slc, do_swa, dg_cmp, dg_slc, dg_swa, delta_cmp = gate_bwd(
                do.contiguous(), o_cmp, o_slc, o_swa, g_cmp, g_slc, g_swa
            )
        # Gradients that reach the branch outputs directly (nsa_parts_triton's o_cmp etc.).
        if do_cmp_extra is not None:
            _add_(do_cmp, do_cmp_extra)
            delta_cmp = None  # recomputed from the summed gradient
        if do_slc_extra is not None:
            _add_(do_slc, do_slc_extra)
        if do_swa_extra is not None:
            _add_(do_swa, do_swa_extra)

        dq, dk, dv = selected_attention_bwd(
            q, k, v, o_slc, lse_slc, do_slc, indices, cu_seqlens, b, scale, settings=settings.selection
        )
        dq_w, dk_w, dv_w = window_attention_bwd(
            q, k, v, o_swa, lse_swa, do_swa, cu_seqlens, config.window_size, scale, settings=settings.window
        )
        _add_(dq, dq_w)
        _add_(dk, dk_w)
        _add_(dv, dv_w)
        del dq_w, dk_w, dv_w
        dq, dk_cmp, dv_cmp = compressed_attention_bwd(
            q, k_cmp, v_cmp, o_cmp, lse_cmp, do_cmp, cu_seqlens, cu_cmp, b, scale, dq=dq, delta=delta_cmp,
            settings=settings.compression,
        )
        mean_pool_bwd(dk_cmp, dv_cmp, dk, dv, cu_seqlens, cu_cmp, b)
        return dq, dk, dv, dg_cmp, dg_slc, dg_swa, None, None, None, None, None


class _NSALeanFunction(torch.autograd.Function):
    """Packed NSA returning o alone, with at most one [total_T, HQ, D] tensor kept besides inputs and o.

    q [total_T, HQ, D], k/v [total_T, HKV, D], gates [total_T, HQ]. Working memory (<= 2 GB at 128K):

    * Forward: the compression output's buffer becomes o; the window kernel folds g_swa * o_swa into it
      (o <- g_cmp * o_cmp + g_swa * o_swa, o_swa never stored); then o += g_slc * o_slc (when no input needs a
      gradient, the selection kernels add it into o directly and nothing is saved). Saved: o_slc (needed
      for dg_slc and the selection delta, too costly to recompute), the three lse, the block indices and the
      small pooled keys. Rounding: o_cmp, o_slc, the partial sum and o are each rounded once to q's dtype;
      the fused gate of `_NSAFunction` rounds o_cmp, o_slc, o_swa and o: the same count.
    * Backward: every branch needs dg_b = sum_d do * o_b and delta_b = g_b * dg_b. Selection's comes from the
      saved o_slc, window's and compression's from delta-only kernels that rebuild o_b tile by tile from the
      inputs and never write it. The branch kernels read do itself and scale it by their gate per row
      (do_scale), so no do_b is stored; dq, dk, dv are the selection's buffers, which the window kernels (and
      compression for dq) add into.
    """

    @staticmethod
    def forward(ctx, q, k, v, g_cmp, g_slc, g_swa, cu_seqlens, config: NSAConfig, scale: float,
                settings: KernelSettings, cu_seqlens_k: Tensor | None = None):
        b, slc = config.block_size, settings.selection
        k_cmp, v_cmp, cu_cmp, o, lse_cmp, indices = _compress_and_select(
            q, k, v, cu_seqlens, config, scale, settings, cu_seqlens_k
        )
        layout = _choose_layout(q, k, indices, cu_seqlens, b, settings)
        # o holds o_cmp: the window kernel turns it into g_cmp * o_cmp + g_swa * o_swa in place.
        o, lse_swa = window_attention_fwd(
            q, k, v, cu_seqlens, config.window_size, scale, fold_into=o, fold_scale=g_cmp, gate=g_swa,
            settings=settings.window, cu_seqlens_k=cu_seqlens_k,
        )
        ctx.cu_seqlens_k = cu_seqlens_k
        if not any(ctx.needs_input_grad[:6]):
            # Nothing will call backward (inference): the selection adds g_slc * o_slc into o itself, so o_slc
            # is never made (one rounding fewer than the path below) and nothing is saved.
            selected_attention_fwd(
                q, k, v, indices, cu_seqlens, b, scale, fold_into=o, fold_scale=g_slc, layout=layout, settings=slc,
                cu_seqlens_k=cu_seqlens_k,
            )
            return o
        o_slc, lse_slc = selected_attention_fwd(
            q, k, v, indices, cu_seqlens, b, scale, layout=layout, settings=slc, cu_seqlens_k=cu_seqlens_k
        )
        gate_fold_(o, o_slc, g_slc)
        ctx.save_for_backward(
            q, k, v, g_cmp, g_slc, g_swa, cu_seqlens, k_cmp, v_cmp, cu_cmp,
            lse_cmp, indices, o_slc, lse_slc, lse_swa,
        )
        ctx.config, ctx.scale, ctx.settings = config, scale, settings
        return o

    @staticmethod
    def backward(ctx, do):
        _refuse_chunked_backward(ctx.cu_seqlens_k)
        (q, k, v, g_cmp, g_slc, g_swa, cu_seqlens, k_cmp, v_cmp, cu_cmp,
         lse_cmp, indices, o_slc, lse_slc, lse_swa) = ctx.saved_tensors
        config, scale, settings = ctx.config, ctx.scale, ctx.settings
        b, w = config.block_size, config.window_size
        need = ctx.needs_input_grad
        need_qkv = any(need[:3])
        do = do.contiguous()
        # dq's layout is chosen first, so the host reads the planner's counts while the delta kernels run.
        dq_layout = _choose_layout(q, k, indices, cu_seqlens, b, settings, dq=True) if need_qkv else None
        # dg_b = sum_d do * o_b (float32). Computed only where a gate gradient or a branch backward needs it.
        dg_slc = row_dot(o_slc, do) if (need_qkv or need[4]) else None
        dg_swa = (
            window_attention_delta(q, k, v, lse_swa, do, cu_seqlens, w, scale, settings=settings.window)
            if (need_qkv or need[5]) else None
        )
        dg_cmp = (
            compressed_attention_delta(
                q, k_cmp, v_cmp, lse_cmp, do, cu_seqlens, cu_cmp, b, scale, settings=settings.compression
            )
            if (need_qkv or need[3]) else None
        )
        dq = dk = dv = None
        if need_qkv:
            dq, dk, dv = selected_attention_bwd(
                q, k, v, None, lse_slc, do, indices, cu_seqlens, b, scale,
                delta=dg_slc * g_slc.float(), do_scale=g_slc, dq_layout=dq_layout, settings=settings.selection,
            )
            window_attention_bwd(
                q, k, v, None, lse_swa, do, cu_seqlens, w, scale,
                delta=dg_swa * g_swa.float(), do_scale=g_swa, dq=dq, dk=dk, dv=dv, settings=settings.window,
            )
            dq, dk_cmp, dv_cmp = compressed_attention_bwd(
                q, k_cmp, v_cmp, None, lse_cmp, do, cu_seqlens, cu_cmp, b, scale,
                dq=dq, delta=dg_cmp * g_cmp.float(), do_scale=g_cmp, settings=settings.compression,
            )
            mean_pool_bwd(dk_cmp, dv_cmp, dk, dv, cu_seqlens, cu_cmp, b)
        gate_grad = lambda dg, g, i: dg.to(g.dtype) if need[i] else None  # noqa: E731
        return (
            dq if need[0] else None, dk if need[1] else None, dv if need[2] else None,
            gate_grad(dg_cmp, g_cmp, 3), gate_grad(dg_slc, g_slc, 4), gate_grad(dg_swa, g_swa, 5),
            None, None, None, None, None,
        )


# ----------------------------------------------------------------------------------------------------------
# Public entry points


def _packed_call(q, k, v, g_cmp, g_slc, g_swa, block_size, block_count, window_size, init_blocks, local_blocks,
                 cu_seqlens, scale, settings, cu_seqlens_k=None):
    """Validate and pack the public arguments: (packed q, k, v, three gates, cu_seqlens, config, scale,
    settings, the keys' cu_seqlens or None when the keys are the queries' tokens)."""
    check_inputs(q, k, v, g_cmp, g_slc, g_swa)
    config = NSAConfig(block_size, block_count, window_size, init_blocks, local_blocks)
    batch, seq_len, heads_q, head_dim = q.shape
    spans = query_key_spans(cu_seqlens, cu_seqlens_k, batch, seq_len, k.shape[1])  # validates the offsets
    chunked = any(span.first_position for span in spans)
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"nsa_attention: the Triton kernels need a power-of-two block_size >= 16, got {block_size}")
    if q.dtype not in KERNEL_DTYPES:
        raise ValueError(f"nsa_attention: the Triton kernels take bfloat16, float16 or float32, got {q.dtype}")
    scale = head_dim**-0.5 if scale is None else float(scale)
    qp, cu = pack(q.contiguous(), cu_seqlens)
    # Queries that end longer key sequences: the keys are packed by their own offsets, which the kernels get
    # alongside the queries'; otherwise None, and every kernel runs exactly as for one-pass calls.
    key_offsets = cu_seqlens_k if cu_seqlens is not None else None
    kp, cu_k = pack(k.contiguous(), key_offsets if chunked else cu_seqlens)
    vp, _ = pack(v.contiguous(), key_offsets if chunked else cu_seqlens)
    gates = [pack(g.contiguous(), cu_seqlens)[0] for g in (g_cmp, g_slc, g_swa)]
    return qp, kp, vp, *gates, cu, config, scale, settings or KERNEL_SETTINGS, cu_k if chunked else None


def nsa_parts_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g_cmp: Tensor,
    g_slc: Tensor,
    g_swa: Tensor,
    *,
    block_size: int = NSAConfig.block_size,
    block_count: int = NSAConfig.block_count,
    window_size: int = NSAConfig.window_size,
    init_blocks: int = NSAConfig.init_blocks,
    local_blocks: int = NSAConfig.local_blocks,
    cu_seqlens: Tensor | None = None,
    scale: float | None = None,
    settings: KernelSettings | None = None,
    cu_seqlens_k: Tensor | None = None,
) -> NSAParts:
    """NSA over q [B, T, HQ, D], k/v [B, T, HKV, D], gates [B, T, HQ] with Triton kernels; every part returned.

    Returns `NSAParts`: o, o_cmp, o_slc, o_swa [B, T, HQ, D] in q's dtype (all differentiable),
    block_indices int32 [B, T, HKV, block_count] and lse_cmp float32 [B, T, HQ]. Keeps every branch output
    for the backward (about 4x the memory of `nsa_attention_triton`). settings: the kernels' launch settings
    (`KernelSettings`; None: the measured defaults). k, v may be longer than q ([B, Tk, HKV, D], or packed by
    cu_seqlens_k): the queries are the last of each sequence's keys; forward only (the backward raises
    NotImplementedError).
    """
    args = _packed_call(q, k, v, g_cmp, g_slc, g_swa, block_size, block_count, window_size, init_blocks,
                        local_blocks, cu_seqlens, scale, settings, cu_seqlens_k)
    o, o_cmp, o_slc, o_swa, indices, lse_cmp = _NSAFunction.apply(*args)
    batch, seq_len = q.shape[:2]
    out = lambda x: x.view(batch, seq_len, *x.shape[1:])  # noqa: E731
    return NSAParts(out(o), out(o_cmp), out(o_slc), out(o_swa), out(indices), out(lse_cmp))


def nsa_attention_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g_cmp: Tensor,
    g_slc: Tensor,
    g_swa: Tensor,
    *,
    block_size: int = NSAConfig.block_size,
    block_count: int = NSAConfig.block_count,
    window_size: int = NSAConfig.window_size,
    init_blocks: int = NSAConfig.init_blocks,
    local_blocks: int = NSAConfig.local_blocks,
    cu_seqlens: Tensor | None = None,
    scale: float | None = None,
    settings: KernelSettings | None = None,
    cu_seqlens_k: Tensor | None = None,
) -> Tensor:
    """NSA with Triton kernels: o [B, T, HQ, D] in q's dtype (see `videonsa.ops.nsa_attention`).

    The lean path (`_NSALeanFunction`): besides inputs and o it keeps one [B*T, HQ, D] tensor (o_slc) for the
    backward, and the backward holds no other such tensor beyond its outputs. settings: as in `nsa_parts_triton`.
    """
    args = _packed_call(q, k, v, g_cmp, g_slc, g_swa, block_size, block_count, window_size, init_blocks,
                        local_blocks, cu_seqlens, scale, settings, cu_seqlens_k)
    o = _NSALeanFunction.apply(*args)
    return o.view(q.shape)


__all__ = [
    "KERNEL_SETTINGS", "KernelSettings", "gate_bwd", "gate_fold_", "gate_fwd", "nsa_attention_triton",
    "nsa_parts_triton",
]
