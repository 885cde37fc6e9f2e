"""A deliberately naive, token-by-token NSA written straight from the operator's definition (docs/operator.md).

It exists only to check `videonsa.ops` against: loops over sequences, tokens and heads, builds every key
list in Python and runs a plain softmax over it, in float64, differentiable through autograd. Slow on
purpose; use tiny shapes. It shares no code with the package.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

OUTPUT_NAMES = ("o", "o_cmp", "o_slc", "o_swa", "lse_cmp")


@dataclass
class NaiveParts:
    """What the naive operator computes, all in float64 except the integer indices.

    o, o_cmp, o_slc, o_swa: [B, T, HQ, D].
    block_indices: int64 [B, T, HKV, block_count], ascending, -1 padded.
    lse_cmp: [B, T, HQ], -inf where no compressed block is visible.
    block_scores: [B, T, HKV, max_blocks], importance score of every visible block (detached), NaN where
        the block is not visible to the query; max_blocks is the most complete blocks of any sequence.
    """

    o: Tensor
    o_cmp: Tensor
    o_slc: Tensor
    o_swa: Tensor
    block_indices: Tensor
    lse_cmp: Tensor
    block_scores: Tensor


def sequence_spans(batch: int, seq_len: int, cu_seqlens: Tensor | None) -> list[tuple[int, int, int]]:
    """(batch row, start, end) of every independent sequence."""
    if cu_seqlens is None:
        return [(row, 0, seq_len) for row in range(batch)]
    offsets = [int(x) for x in cu_seqlens.tolist()]
    return [(0, offsets[n], offsets[n + 1]) for n in range(len(offsets) - 1)]


def attend(query: Tensor, keys: list[Tensor], values: list[Tensor], scale: float) -> tuple[Tensor, Tensor]:
    """Softmax attention of one query [D] over Python lists of key / value rows [D].

    Returns (output [D], log-sum-exp of the scaled scores []); (zeros, -inf) when the lists are empty.
    """
    if not keys:
        return torch.zeros_like(query), torch.tensor(-math.inf, dtype=query.dtype)
    logits = torch.stack([scale * torch.dot(query, key) for key in keys])
    weights = torch.softmax(logits, dim=0)
    output = sum(weights[i] * values[i] for i in range(len(values)))
    return output, torch.logsumexp(logits, dim=0)


def forced_blocks(current_block: int, init_blocks: int, local_blocks: int) -> set[int]:
    """Blocks taken regardless of score: the first `init_blocks` and the `local_blocks` ending at the current.

    Only blocks that exist for the query (0 <= j <= current block) count.
    """
    initial = {j for j in range(init_blocks) if j <= current_block}
    local = {j for j in range(current_block - local_blocks + 1, current_block + 1) if j >= 0}
    return initial | local


def choose_blocks(scores: dict[int, float], forced: set[int], block_count: int) -> list[int]:
    """Forced blocks plus the highest-scoring other visible blocks (ties to the earlier block), ascending."""
    candidates = sorted((j for j in scores if j not in forced), key=lambda j: (-scores[j], j))
    free_slots = block_count - len(forced)
    return sorted(forced | set(candidates[:free_slots]))


def naive_nsa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g_cmp: Tensor,
    g_slc: Tensor,
    g_swa: Tensor,
    *,
    block_size: int = 64,
    block_count: int = 32,
    window_size: int = 256,
    init_blocks: int = 0,
    local_blocks: int = 1,
    cu_seqlens: Tensor | None = None,
    scale: float | None = None,
    selection: Tensor | None = None,
) -> NaiveParts:
    """NSA by the letter of the design, one (sequence, token, head) at a time, in float64.

    Args:
        q: [B, T, HQ, D]; k, v: [B, T, HKV, D]; g_cmp, g_slc, g_swa: [B, T, HQ]. Any float dtype; they are
            upcast to float64 (gradients flow back to the given tensors).
        cu_seqlens: [N+1] offsets of packed sequences (B == 1); positions restart at every sequence.
        selection: optional [B, T, HKV, block_count] block indices (-1 padded) used instead of the naive
            top-k choice, to compare outputs where a lower-precision operator broke a near-tie the other
            way. Block scores are still computed and reported.

    Returns:
        NaiveParts (see its docstring).
    """
    q, k, v = q.double(), k.double(), v.double()
    g_cmp, g_slc, g_swa = g_cmp.double(), g_slc.double(), g_swa.double()
    batch, seq_len, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group_size = q_heads // kv_heads
    scale = head_dim**-0.5 if scale is None else scale
    spans = sequence_spans(batch, seq_len, cu_seqlens)
    max_blocks = max([(end - start) // block_size for _, start, end in spans] + [1])

    # out[name][row][position] collects one [D] tensor (a scalar for lse_cmp) per query head.
    out: dict[str, list[list[list[Tensor]]]] = {
        name: [[[] for _ in range(seq_len)] for _ in range(batch)] for name in OUTPUT_NAMES
    }
    block_indices = torch.full((batch, seq_len, kv_heads, block_count), -1, dtype=torch.long)
    block_scores = torch.full((batch, seq_len, kv_heads, max_blocks), math.nan, dtype=torch.float64)

    for row, start, end in spans:
        keys = k[row, start:end]
        values = v[row, start:end]
        complete_blocks = (end - start) // block_size
        # Compressed keys / values: the mean of each complete block, per KV head ([HKV, D] each).
        cmp_keys = [keys[j * block_size : (j + 1) * block_size].mean(dim=0) for j in range(complete_blocks)]
        cmp_values = [
            values[j * block_size : (j + 1) * block_size].mean(dim=0) for j in range(complete_blocks)
        ]

        for t in range(end - start):
            position = start + t
            visible = [j for j in range(complete_blocks) if (j + 1) * block_size <= t + 1]

            cmp_out, cmp_lse, cmp_probs = [], [], []
            for h in range(q_heads):
                g = h // group_size
                query = q[row, position, h]
                output, lse = attend(
                    query, [cmp_keys[j][g] for j in visible], [cmp_values[j][g] for j in visible], scale
                )
                cmp_out.append(output)
                cmp_lse.append(lse)
                # The choice of blocks is not differentiated: importance uses plain Python floats.
                plain_query, plain_lse = query.detach(), float(lse.detach())
                cmp_probs.append({
                    j: math.exp(scale * float(torch.dot(plain_query, cmp_keys[j][g].detach())) - plain_lse)
                    for j in visible
                })

            selected_per_group = []
            for g in range(kv_heads):
                group_heads = range(g * group_size, (g + 1) * group_size)
                scores = {j: sum(cmp_probs[h][j] for h in group_heads) for j in visible}
                for j, score in scores.items():
                    block_scores[row, position, g, j] = score
                if selection is None:
                    forced = forced_blocks(t // block_size, init_blocks, local_blocks)
                    chosen = choose_blocks(scores, forced, block_count)
                else:
                    chosen = [int(j) for j in selection[row, position, g].tolist() if j >= 0]
                block_indices[row, position, g, : len(chosen)] = torch.tensor(chosen, dtype=torch.long)
                selected_per_group.append(chosen)

            window = range(max(0, t - window_size + 1), t + 1)
            for h in range(q_heads):
                g = h // group_size
                query = q[row, position, h]
                slc_positions = [
                    i
                    for j in selected_per_group[g]
                    for i in range(j * block_size, (j + 1) * block_size)
                    if i <= t
                ]
                slc_out, _ = attend(
                    query, [keys[i, g] for i in slc_positions], [values[i, g] for i in slc_positions], scale
                )
                swa_out, _ = attend(
                    query, [keys[i, g] for i in window], [values[i, g] for i in window], scale
                )
                gated = (
                    g_cmp[row, position, h] * cmp_out[h]
                    + g_slc[row, position, h] * slc_out
                    + g_swa[row, position, h] * swa_out
                )
                for name, value in zip(
                    OUTPUT_NAMES, (gated, cmp_out[h], slc_out, swa_out, cmp_lse[h]), strict=True
                ):
                    out[name][row][position].append(value)

    def assemble(name: str) -> Tensor:
        return torch.stack([torch.stack([torch.stack(heads) for heads in tokens]) for tokens in out[name]])

    return NaiveParts(
        o=assemble("o"),
        o_cmp=assemble("o_cmp"),
        o_slc=assemble("o_slc"),
        o_swa=assemble("o_swa"),
        block_indices=block_indices,
        lse_cmp=assemble("lse_cmp"),
        block_scores=block_scores,
    )
