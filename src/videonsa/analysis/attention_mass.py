"""How much attention each key receives in each NSA branch, from the operator's own parts (docs/analysis.md).

For one sequence of T vision tokens the attention probabilities of a branch form a T x T matrix (T x NB for the
compression branch), far too big at 64K tokens. Only its column sums are needed: the mass a key receives, summed
over the queries. They are accumulated over chunks of queries, each chunk rebuilding its probabilities from what
`nsa_attention_parts` returned, so memory stays linear in T:

- compression: p[t, j] = exp(scale * q_t . K~_j - lse_cmp[t]) over the complete blocks j visible to t
  ((j + 1) * block_size <= t + 1), K~_j the mean key of block j: the operator's softmax, given its lse;
- selection: the softmax of scale * q_t . k_s over the keys s of the blocks the operator selected for t's KV
  group (`block_indices`) with s <= t;
- sliding window: the softmax over the keys s with t - window_size < s <= t.

Each key's *audience* is the number of queries for which the branch gives it a probability (possibly tiny): the
queries that see the compressed block, that selected the key's block (and come after the key), or whose window
holds the key. The key's *share* is its mass divided by its audience: the mean attention it gets from the queries
that could attend to it. A key nobody can attend to has audience 0 and share 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from videonsa.ops.reference import compress_blocks

# Elements of the score / gathered-key tensors one query chunk may hold (float32: 4 bytes each): 64 MB on a CPU;
# 256 MB on a GPU, where fewer, larger chunks keep the kernel launches per layer in the hundreds at 64K tokens.
DEFAULT_CHUNK_ELEMENTS = 1 << 24
CUDA_CHUNK_ELEMENTS = 1 << 26


@dataclass(frozen=True)
class KeyMass:
    """mass: float64 [HQ, K], the probability key k received, summed over the queries, per query head.
    audience: float64 [HQ, K], the number of queries for which the branch gives key k a probability."""

    mass: Tensor
    audience: Tensor

    def share(self) -> Tensor:
        """[HQ, K]: mass / audience, the mean probability from the queries that could attend; 0 without any."""
        return torch.where(self.audience > 0, self.mass / self.audience.clamp_min(1), torch.zeros_like(self.mass))


def branch_key_mass(
    q: Tensor,
    k: Tensor,
    block_indices: Tensor,
    lse_cmp: Tensor,
    *,
    block_size: int,
    window_size: int,
    scale: float,
    chunk_elements: int | None = None,
) -> dict[str, KeyMass]:
    """Per-key attention mass of the three branches over one sequence.

    Args:
        q: [T, HQ, D]; k: [T, HKV, D] (rotary positions applied), HQ a multiple of HKV.
        block_indices: int [T, HKV, S], the operator's selected blocks (-1 = unused slot).
        lse_cmp: float [T, HQ], the operator's compression log-sum-exp (-inf where no block is visible).
        block_size, window_size, scale: the operator's settings.
        chunk_elements: bound on the elements of one chunk's tensors (sets the query chunk size); default
            `DEFAULT_CHUNK_ELEMENTS` on a CPU, `CUDA_CHUNK_ELEMENTS` on a GPU.

    Returns:
        {"cmp": KeyMass over the NB = T // block_size compressed blocks, "slc": over the T keys,
        "swa": over the T keys}.
    """
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k = q.to(compute), k.to(compute)
    if chunk_elements is None:
        chunk_elements = CUDA_CHUNK_ELEMENTS if q.is_cuda else DEFAULT_CHUNK_ELEMENTS
    return {
        "cmp": compression_mass(q, k, lse_cmp, block_size, scale, chunk_elements),
        "slc": selection_mass(q, k, block_indices, block_size, scale, chunk_elements),
        "swa": window_mass(q, k, window_size, scale, chunk_elements),
    }


def _chunk(per_query: int, chunk_elements: int, seq_len: int) -> int:
    return max(1, min(seq_len, chunk_elements // max(per_query, 1)))


def compression_mass(q: Tensor, k: Tensor, lse_cmp: Tensor, block_size: int, scale: float,
                     chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> KeyMass:
    """Mass of the compressed blocks: q [T, HQ, D], k [T, HKV, D], lse_cmp [T, HQ] -> KeyMass [HQ, NB]."""
    seq_len, heads_q, dim = q.shape
    heads_kv = k.shape[1]
    group = heads_q // heads_kv
    k_cmp = compress_blocks(k, block_size)  # [NB, HKV, D]
    n_blocks = k_cmp.shape[0]
    mass = torch.zeros(heads_kv, group, n_blocks, dtype=torch.float64, device=q.device)
    chunk = _chunk(heads_q * n_blocks, chunk_elements, seq_len)
    blocks = torch.arange(n_blocks, device=q.device)
    for start in range(0, seq_len, chunk):
        end = min(seq_len, start + chunk)
        pos = torch.arange(start, end, device=q.device)
        visible = blocks[None, :] < ((pos + 1) // block_size)[:, None]  # [C, NB]
        qg = q[start:end].view(end - start, heads_kv, group, dim)
        scores = scale * torch.einsum("cgsd,jgd->cgsj", qg, k_cmp)
        lse = lse_cmp[start:end].to(scores.dtype).view(end - start, heads_kv, group, 1)
        probs = torch.where(visible[:, None, None, :], torch.exp(scores - lse), torch.zeros_like(scores))
        mass += probs.sum(dim=0).double()
    # Block j is visible to the queries t >= (j + 1) * block_size - 1.
    audience = (seq_len - (blocks + 1) * block_size + 1).clamp_min(0).double()
    return KeyMass(mass.reshape(heads_q, n_blocks), audience.expand(heads_q, n_blocks).clone())


def selection_mass(q: Tensor, k: Tensor, block_indices: Tensor, block_size: int, scale: float,
                   chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> KeyMass:
    """Mass of the keys in the selected blocks: q [T, HQ, D], k [T, HKV, D], block_indices [T, HKV, S]."""
    seq_len, heads_q, dim = q.shape
    heads_kv = k.shape[1]
    group = heads_q // heads_kv
    slots = block_indices.shape[-1] * block_size
    mass = torch.zeros(heads_kv, group, seq_len, dtype=torch.float64, device=q.device)
    audience = torch.zeros(heads_kv, seq_len, dtype=torch.float64, device=q.device)
    chunk = _chunk(slots * (heads_q + heads_kv * dim), chunk_elements, seq_len)
    offsets = torch.arange(block_size, device=q.device)
    kv_head = torch.arange(heads_kv, device=q.device)[None, :, None]
    for start in range(0, seq_len, chunk):
        end = min(seq_len, start + chunk)
        pos = torch.arange(start, end, device=q.device)
        indices = block_indices[start:end].long()  # [C, HKV, S]
        key_pos = (indices.clamp_min(0)[..., None] * block_size + offsets).flatten(2)  # [C, HKV, S * b]
        allowed = (indices >= 0).repeat_interleave(block_size, dim=-1) & (key_pos <= pos[:, None, None])
        key_pos = key_pos.clamp_max(seq_len - 1)  # positions past the end are never allowed (they exceed t)
        keys = k[key_pos, kv_head]  # [C, HKV, S * b, D]
        qg = q[start:end].view(end - start, heads_kv, group, dim)
        scores = scale * torch.einsum("cgsd,cgkd->cgsk", qg, keys)
        probs = _masked_softmax(scores, allowed[:, :, None, :])  # [C, HKV, G, S * b]
        index = key_pos.permute(1, 0, 2).reshape(heads_kv, 1, -1).expand(heads_kv, group, -1)
        mass.scatter_add_(2, index, probs.permute(1, 2, 0, 3).reshape(heads_kv, group, -1).double())
        audience.scatter_add_(1, index[:, 0], allowed.permute(1, 0, 2).reshape(heads_kv, -1).double())
    audience = audience[:, None, :].expand(heads_kv, group, seq_len)
    return KeyMass(mass.reshape(heads_q, seq_len), audience.reshape(heads_q, seq_len).clone())


def window_mass(q: Tensor, k: Tensor, window_size: int, scale: float,
                chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> KeyMass:
    """Mass of the keys in the sliding windows: q [T, HQ, D], k [T, HKV, D] -> KeyMass [HQ, T]."""
    seq_len, heads_q, dim = q.shape
    heads_kv = k.shape[1]
    group = heads_q // heads_kv
    mass = torch.zeros(heads_q, seq_len, dtype=torch.float64, device=q.device)
    # A chunk of C queries sees C + window_size - 1 keys; size C so that C * (C + W) * HQ stays in budget.
    chunk = 1
    while chunk < seq_len and 2 * chunk * (2 * chunk + window_size) * heads_q <= chunk_elements:
        chunk *= 2
    for start in range(0, seq_len, chunk):
        end = min(seq_len, start + chunk)
        lo = max(0, start - window_size + 1)
        pos = torch.arange(start, end, device=q.device)
        key_pos = torch.arange(lo, end, device=q.device)
        in_window = (key_pos[None, :] <= pos[:, None]) & (key_pos[None, :] > pos[:, None] - window_size)
        qg = q[start:end].view(end - start, heads_kv, group, dim)
        scores = scale * torch.einsum("cgsd,kgd->cgsk", qg, k[lo:end])
        probs = _masked_softmax(scores, in_window[:, None, None, :])
        mass[:, lo:end] += probs.sum(dim=0).reshape(heads_q, end - lo).double()
    positions = torch.arange(seq_len, device=q.device)
    audience = (seq_len - positions).clamp_max(window_size).double()
    return KeyMass(mass, audience.expand(heads_q, seq_len).clone())


def _masked_softmax(scores: Tensor, allowed: Tensor) -> Tensor:
    """Softmax over the last dim restricted to `allowed`; rows with nothing allowed are all zero."""
    scores = scores.masked_fill(~allowed, -torch.inf)
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    return weights / weights.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)
