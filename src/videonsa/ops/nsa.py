"""The public NSA entry points and the choice between the Triton kernels and the PyTorch reference."""

from __future__ import annotations

import os
import warnings
from functools import cache

import torch
from torch import Tensor

from videonsa.ops.common import NSAParts
from videonsa.ops.config import NSAConfig
from videonsa.ops.reference import nsa_parts_reference

BACKENDS = ("auto", "triton", "reference")
_ENV_BACKEND = "VIDEONSA_NSA_BACKEND"


@cache
def _triton_module():
    """The Triton implementation, or None where Triton (or the kernels) cannot be imported."""
    try:
        from videonsa.ops import triton_nsa
    except ImportError:
        return None
    return triton_nsa


@cache
def _warn_reference_fallback(block_size: int) -> None:
    warnings.warn(
        f"nsa_attention: block_size={block_size} is not a power of two >= 16, which the Triton kernels need; "
        "running the (much slower) PyTorch reference instead",
        stacklevel=4,
    )


def available_backends() -> list[str]:
    """Backends usable in this process ("reference" always; "triton" where Triton and a kernel exist)."""
    return ["reference"] + (["triton"] if _triton_module() is not None else [])


def triton_supports(block_size: int) -> bool:
    """Whether the Triton kernels take this budget: their key tiles are whole blocks, so block_size must be a
    power of two of at least 16 (a tensor-core tile)."""
    return block_size >= 16 and block_size & (block_size - 1) == 0


def _resolve_backend(backend: str | None, q: Tensor, config: NSAConfig) -> str:
    backend = backend or os.environ.get(_ENV_BACKEND, "auto")
    if backend not in BACKENDS:
        raise ValueError(f"nsa_attention: backend must be one of {BACKENDS}, got {backend!r}")
    if q.dim() == 4 and (q.shape[0] == 0 or q.shape[1] == 0):
        # No query (an empty batch, or a chunk without vision tokens): nothing to compute, and the kernels'
        # launch grids cannot be empty; the reference returns the empty result, connected for autograd.
        return "reference"
    block_size = config.block_size
    if backend == "auto":
        interpret = os.environ.get("TRITON_INTERPRET") == "1"
        # float64 stays on the reference, which computes in float64; the kernels accumulate in float32.
        use_triton = (q.is_cuda or interpret) and q.dtype != torch.float64 and _triton_module() is not None
        if use_triton and not triton_supports(block_size):
            _warn_reference_fallback(block_size)
            use_triton = False
        return "triton" if use_triton else "reference"
    if backend == "triton" and _triton_module() is None:
        raise ValueError("nsa_attention: backend='triton' requested but Triton kernels are not available")
    return backend


def nsa_attention(
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
    backend: str | None = None,
    cu_seqlens_k: Tensor | None = None,
) -> Tensor:
    """Native Sparse Attention: compression, top-k selection and sliding-window branches, gated.

    Args:
        q: [B, Tq, HQ, D]; k, v: [B, Tk, HKV, D] with HQ % HKV == 0 (any ratio) and Tk >= Tq: the queries are
            the last Tq key positions (Tk > Tq: a chunk of a longer prompt whose earlier keys are cached).
        g_cmp, g_slc, g_swa: [B, Tq, HQ] gates, already in [0, 1].
        block_size, block_count, window_size: NSA budget (defaults: `NSAConfig`'s, 64, 32, 256).
        init_blocks, local_blocks: blocks every query selects regardless of score (VideoNSA: 0 and 1).
        cu_seqlens: int32 [N+1] offsets of the queries of sequences packed along Tq (then B must be 1).
        scale: softmax scale, default D ** -0.5.
        backend: "auto" (Triton on CUDA, else the reference), "triton" or "reference"; the environment
            variable VIDEONSA_NSA_BACKEND sets the default.
        cu_seqlens_k: int32 [N+1] offsets of the same sequences' keys along Tk (None: cu_seqlens); every
            sequence has at least as many keys as queries, and its queries are its last keys.

    Each query's result is its row of the one-pass operator over all the keys (docs/operator.md, "Queries that
    end a longer key sequence"). The Triton backward refuses Tq < Tk (NotImplementedError); the reference
    differentiates it.

    Returns:
        o: [B, Tq, HQ, D] in q's dtype.
    """
    kwargs = dict(
        block_size=block_size, block_count=block_count, window_size=window_size,
        init_blocks=init_blocks, local_blocks=local_blocks, cu_seqlens=cu_seqlens, scale=scale,
        cu_seqlens_k=cu_seqlens_k,
    )
    config = NSAConfig(block_size, block_count, window_size, init_blocks, local_blocks)  # checked first
    if _resolve_backend(backend, q, config) == "triton":
        return _triton_module().nsa_attention_triton(q, k, v, g_cmp, g_slc, g_swa, **kwargs)
    return nsa_parts_reference(q, k, v, g_cmp, g_slc, g_swa, **kwargs).o


def nsa_attention_parts(
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
    backend: str | None = None,
    cu_seqlens_k: Tensor | None = None,
) -> NSAParts:
    """`nsa_attention` returning every part: branch outputs, selected blocks, compression lse (`NSAParts`)."""
    kwargs = dict(
        block_size=block_size, block_count=block_count, window_size=window_size,
        init_blocks=init_blocks, local_blocks=local_blocks, cu_seqlens=cu_seqlens, scale=scale,
        cu_seqlens_k=cu_seqlens_k,
    )
    config = NSAConfig(block_size, block_count, window_size, init_blocks, local_blocks)  # checked first
    if _resolve_backend(backend, q, config) == "triton":
        return _triton_module().nsa_parts_triton(q, k, v, g_cmp, g_slc, g_swa, **kwargs)
    return nsa_parts_reference(q, k, v, g_cmp, g_slc, g_swa, **kwargs)
