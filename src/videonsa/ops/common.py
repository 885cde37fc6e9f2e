"""What every NSA implementation shares: the settings (`NSAConfig`, from `config`), input validation and the
parts returned for analysis."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from videonsa.ops.config import NSAConfig


@dataclass
class NSAParts:
    """Everything one `nsa_attention` call computes, for analysis.

    T is the queries' length (q's second dimension), whatever the keys' length.
    o, o_cmp, o_slc, o_swa: [B, T, HQ, D] in q's dtype; o is the gated sum of the three branch outputs.
    block_indices: int32 [B, T, HKV, block_count], the blocks each query's KV group attended to in the
        selection branch, ascending, padded with -1 where fewer blocks were available.
    lse_cmp: float32 [B, T, HQ], log-sum-exp of the scaled compression scores (-inf where no block is visible);
        exp(scale * q.K~_j - lse_cmp) is the compression softmax.
    """

    o: Tensor
    o_cmp: Tensor
    o_slc: Tensor
    o_swa: Tensor
    block_indices: Tensor
    lse_cmp: Tensor


@dataclass(frozen=True)
class Span:
    """One independent sequence of a call: its queries are rows q_start..q_end-1 of batch row `batch`, its keys
    rows k_start..k_end-1; the queries are the last (q_end - q_start) key positions (docs/operator.md,
    "Queries that end a longer key sequence")."""

    batch: int
    q_start: int
    q_end: int
    k_start: int
    k_end: int

    @property
    def first_position(self) -> int:
        """Key position of the first query: len_k - len_q (0 when queries and keys are the same tokens)."""
        return (self.k_end - self.k_start) - (self.q_end - self.q_start)


def query_key_spans(
    cu_seqlens: Tensor | None, cu_seqlens_k: Tensor | None, batch: int, len_q: int, len_k: int
) -> list[Span]:
    """The sequences of a call with queries [B, len_q] and keys [B, len_k]; checks both offset tensors.

    Dense batch (both None): every row is a sequence, its len_q queries the last of its len_k keys. Packed
    (B = 1): cu_seqlens holds the queries' offsets, cu_seqlens_k the keys' (None: the same offsets, so the
    keys must be exactly the queries' tokens); every sequence needs at least as many keys as queries.
    """
    if cu_seqlens is None:
        if cu_seqlens_k is not None:
            raise ValueError("nsa_attention: cu_seqlens_k needs cu_seqlens (the queries' offsets of those sequences)")
        if len_k < len_q:
            raise ValueError(f"nsa_attention: k has T={len_k} keys, fewer than the T={len_q} queries of q")
        return [Span(b, 0, len_q, 0, len_k) for b in range(batch)]
    q_offsets = _checked_offsets("cu_seqlens", cu_seqlens, batch, len_q)
    if cu_seqlens_k is None:
        if len_k != len_q:
            raise ValueError(
                f"nsa_attention: k has {len_k} packed keys but q {len_q} packed queries; pass cu_seqlens_k "
                "to give the keys' own offsets"
            )
        k_offsets = q_offsets
    else:
        k_offsets = _checked_offsets("cu_seqlens_k", cu_seqlens_k, batch, len_k)
        if len(k_offsets) != len(q_offsets):
            raise ValueError(
                f"nsa_attention: cu_seqlens_k has {len(k_offsets)} entries but cu_seqlens {len(q_offsets)}: "
                "both must describe the same sequences"
            )
    spans = [Span(0, *q, *k) for q, k in zip(zip(q_offsets, q_offsets[1:]), zip(k_offsets, k_offsets[1:]))]
    for n, span in enumerate(spans):
        if span.first_position < 0:
            raise ValueError(
                f"nsa_attention: sequence {n} has {span.q_end - span.q_start} queries (cu_seqlens) but only "
                f"{span.k_end - span.k_start} keys (cu_seqlens_k); its queries must be its last keys"
            )
    return spans


def _checked_offsets(name: str, offsets_tensor: Tensor, batch: int, total: int) -> list[int]:
    """The offsets of a cu_seqlens-like tensor as Python ints, checked (1-D integer, from 0, strictly
    increasing, ending at the packed length `total`, batch 1)."""
    if batch != 1:
        raise ValueError(f"nsa_attention: {name} needs batch size 1 (packed sequences), got B={batch}")
    if offsets_tensor.dim() != 1 or offsets_tensor.numel() < 2:
        shape = tuple(offsets_tensor.shape)
        raise ValueError(f"nsa_attention: {name} must be 1-D with at least 2 entries, got shape {shape}")
    if offsets_tensor.dtype.is_floating_point or offsets_tensor.dtype == torch.bool:
        raise ValueError(f"nsa_attention: {name} must be an integer tensor, got {offsets_tensor.dtype}")
    offsets = [int(x) for x in offsets_tensor.tolist()]
    if offsets[0] != 0:
        raise ValueError(f"nsa_attention: {name} must start at 0, got {offsets[0]}")
    if any(b <= a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"nsa_attention: {name} must be strictly increasing, got {offsets}")
    if offsets[-1] != total:
        raise ValueError(f"nsa_attention: {name} ends at {offsets[-1]} but the packed length is {total}")
    return offsets


def check_inputs(q: Tensor, k: Tensor, v: Tensor, g_cmp: Tensor, g_slc: Tensor, g_swa: Tensor) -> None:
    """Shapes, dtypes and devices of `nsa_attention`'s tensors; raises ValueError naming the first problem.

    k and v may be longer than q along T (queries that end a longer key sequence); `query_key_spans` checks
    how the two lengths relate."""
    if q.dim() != 4:
        raise ValueError(f"nsa_attention: q must be [B, T, HQ, D], got shape {tuple(q.shape)}")
    batch, seq_len, heads_q, head_dim = q.shape
    if head_dim == 0:
        raise ValueError("nsa_attention: head dimension D must be positive, got D=0")
    if heads_q == 0:
        raise ValueError("nsa_attention: HQ=0: q needs at least one head")
    for name, x in (("k", k), ("v", v)):
        if x.dim() != 4 or x.shape[0] != batch or x.shape[1] < seq_len or x.shape[3] != head_dim:
            raise ValueError(
                f"nsa_attention: {name} must be [B={batch}, T={seq_len}, HKV, D={head_dim}] (or longer in T, for "
                f"queries that end a longer key sequence), got {tuple(x.shape)}"
            )
    if k.shape != v.shape:
        raise ValueError(f"nsa_attention: k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    heads_kv = k.shape[2]
    if heads_kv == 0 or heads_q % heads_kv != 0:
        raise ValueError(f"nsa_attention: HQ={heads_q} is not a multiple of HKV={heads_kv}")
    for name, g in (("g_cmp", g_cmp), ("g_slc", g_slc), ("g_swa", g_swa)):
        if tuple(g.shape) != (batch, seq_len, heads_q):
            expected = [batch, seq_len, heads_q]
            raise ValueError(f"nsa_attention: {name} must be [B, T, HQ]={expected}, got {list(g.shape)}")
    tensors = {"q": q, "k": k, "v": v, "g_cmp": g_cmp, "g_slc": g_slc, "g_swa": g_swa}
    if not q.dtype.is_floating_point:
        raise ValueError(f"nsa_attention: q must be floating point, got {q.dtype}")
    for name, x in tensors.items():
        if x.dtype != q.dtype:
            raise ValueError(f"nsa_attention: {name} has dtype {x.dtype} but q has {q.dtype}")
        if x.device != q.device:
            raise ValueError(f"nsa_attention: {name} is on {x.device} but q is on {q.device}")


def empty_batch_parts(
    q: Tensor, k: Tensor, v: Tensor, g_cmp: Tensor, g_slc: Tensor, g_swa: Tensor, block_count: int
) -> NSAParts:
    """The parts of a call with no sequences (B = 0): every tensor empty, with the right shapes and dtypes.

    The outputs are connected to every input (through sums of empty tensors, which are 0), so backward gives
    each input an empty gradient of its own shape instead of None.
    """
    batch, seq_len, heads_q, _ = q.shape
    heads_kv = k.shape[2]
    anchor = sum(x.sum() for x in (k, v, g_cmp, g_slc, g_swa)) * 0
    o = (q * 0 + anchor.to(q.dtype)).contiguous()
    indices = torch.full((batch, seq_len, heads_kv, block_count), -1, dtype=torch.int32, device=q.device)
    lse = torch.full((batch, seq_len, heads_q), -torch.inf, dtype=torch.float32, device=q.device)
    return NSAParts(o, o.clone(), o.clone(), o.clone(), indices, lse)


# NSAConfig is defined in `config` (torch-free) and re-exported here with the rest of the shared pieces.
__all__ = ["NSAConfig", "NSAParts", "Span", "check_inputs", "empty_batch_parts", "query_key_spans"]
