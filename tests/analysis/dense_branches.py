"""The three NSA branches' probabilities as dense matrices, written out directly for short sequences.

Used by the sink tests as the reference for the chunked per-key mass: each branch is one softmax over a full
[T, HQ, K] score matrix under the branch's mask, with no chunking, no lse and no gathering.
"""

from __future__ import annotations

import torch


def dense_probabilities(q, k, block_indices, block_size, window_size, scale):
    """{branch: (probabilities [T, HQ, K], mask [T, HQ, K])} for q [T, HQ, D], k [T, HKV, D], block_indices
    [T, HKV, S]; K is the number of complete blocks for "cmp", T otherwise."""
    seq_len, heads_q, _ = q.shape
    group = heads_q // k.shape[1]
    k_heads = k.repeat_interleave(group, dim=1)  # [T, HQ, D]
    positions = torch.arange(seq_len)
    n_blocks = seq_len // block_size
    k_cmp = k_heads[: n_blocks * block_size].unflatten(0, (n_blocks, block_size)).mean(1)  # [NB, HQ, D]

    cmp_mask = (torch.arange(n_blocks)[None, :] + 1) * block_size <= positions[:, None] + 1  # [T, NB]
    cmp_mask = cmp_mask[:, None, :].expand(seq_len, heads_q, n_blocks)
    causal = positions[None, :] <= positions[:, None]  # [T, T]
    key_block = positions // block_size
    selected = torch.zeros(seq_len, k.shape[1], seq_len, dtype=torch.bool)
    for t in range(seq_len):
        for head in range(k.shape[1]):
            blocks = [int(b) for b in block_indices[t, head] if b >= 0]
            selected[t, head] = torch.isin(key_block, torch.tensor(blocks, dtype=torch.long))
    slc_mask = selected.repeat_interleave(group, dim=1) & causal[:, None, :]
    window = causal & (positions[None, :] > positions[:, None] - window_size)
    swa_mask = window[:, None, :].expand(seq_len, heads_q, seq_len)

    scores = scale * torch.einsum("thd,shd->ths", q, k_heads)
    cmp_scores = scale * torch.einsum("thd,jhd->thj", q, k_cmp)
    return {
        "cmp": (_softmax(cmp_scores, cmp_mask), cmp_mask),
        "slc": (_softmax(scores, slc_mask), slc_mask),
        "swa": (_softmax(scores, swa_mask), swa_mask),
    }


def _softmax(scores, mask):
    probs = torch.softmax(scores.masked_fill(~mask, -torch.inf), dim=-1)
    return torch.nan_to_num(probs, nan=0.0)  # rows with nothing visible


def compressed_values(v, block_size):
    n_blocks = v.shape[0] // block_size
    return v[: n_blocks * block_size].unflatten(0, (n_blocks, block_size)).mean(1)
