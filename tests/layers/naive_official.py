"""A deliberately naive second reading of the original VideoNSA evaluation attention (docs/official-mode.md).

This is the test oracle of `videonsa.layers.official.official_attention`, written from the written specification
of the original function, independently of the library's implementation, so that the tests compare two
readings of the same text. It favours plainness over speed: float64 on the CPU, loops over batch, token,
KV group and (inside the top-k) over the compare-and-swap steps of the sorting network. Shapes in the tests
are tiny.

The oracle itself was checked once against the original code, outside the repository (the original NSA
function with its fla Triton kernels under Triton 3.6's interpreter, flex attention run eagerly, the
flash-attn window as a banded SDPA; float32): `naive_nsa` agreed to 3e-6 on mixed layouts with 28 and 4
query heads, and `naive_topk` returned the original kernel's block ids, slot for slot, on rows full of
exact ties.

The function, in the order the code below follows it:

- path choice over the whole batch: no vision token -> dense causal attention; only vision tokens -> NSA on
  the unmasked q, k, v with sigmoid gates and no dense part; otherwise the mixed path;
- mixed path: q, k, v are zeroed (not removed) at text positions, the gate logits too (so text gets
  sigmoid(0) = 0.5), the query heads are padded to 64 as [q, q, zeros], and padded head h reads KV head
  h // (64 // HKV) in every branch;
- NSA: mean-pooled blocks (partial last block divided by its own length), anti-causal compression (query t
  sees its own block and all later ones) returning a float32 natural-log lse laid out [B, 64, T], the top-k
  that reads that lse as if it were [B, T, 64], scores the current block 1.0 per head, sums the importance
  over the padded heads of a KV group and sorts with a particular bitonic network, selection over the union
  of the chosen blocks (causal inside a block), a sliding window of `window_size` keys, the gated sum;
- the two head copies are averaged, and the mixed path adds dense causal attention of the text queries
  (vision queries zeroed) over the unmasked keys, with Qwen's grouping h // (HQ // HKV), at every position.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

PADDED_HEADS = 64

# One entry of the sorting network: (importance, block id + 1); id 0 marks an empty slot.
Pair = tuple[float, int]


# ----------------------------------------------------------------------------------------------------------
# The top-k's sorting network (fla's bitonic argsort, step by step)
# ----------------------------------------------------------------------------------------------------------


def compare_and_swap(pairs: list[Pair], stride: int, descending: list[bool]) -> list[Pair]:
    """One round of the network: position p (bit `stride` of p clear) is compared with p + stride.

    The pair is swapped when `(left > right) != descending[p]`. So an ascending pair swaps only when
    left > right, and a descending pair swaps whenever left <= right: equal values DO swap there, which is
    how the network (not the block order) decides ties. Pairs of one round are disjoint, so doing them one
    after the other equals doing them all at once.
    """
    out = list(pairs)
    for left_pos in range(len(out)):
        if left_pos & stride:
            continue
        right_pos = left_pos + stride
        left_value, right_value = out[left_pos][0], out[right_pos][0]
        if (left_value > right_value) != descending[left_pos]:
            out[left_pos], out[right_pos] = out[right_pos], out[left_pos]
    return out


def bitonic_merge(pairs: list[Pair], stage: int, order: str) -> list[Pair]:
    """`stage` rounds of compare-and-swap with strides 2^(stage-1), ..., 2, 1.

    order "alternating": the runs of 2^stage consecutive entries go ascending, descending, ascending, ...
    (entry p is descending when bit `stage` of p is set); "ascending" / "descending": the whole list one way.
    """
    if order == "alternating":
        descending = [bool((p >> stage) & 1) for p in range(len(pairs))]
    elif order in ("ascending", "descending"):
        descending = [order == "descending"] * len(pairs)
    else:
        raise ValueError(f"unknown order {order!r}")
    for step in range(stage):
        pairs = compare_and_swap(pairs, 1 << (stage - 1 - step), descending)
    return pairs


def presort_chunk(pairs: list[Pair]) -> list[Pair]:
    """The stages 1 .. log2(n) - 1 of the network, each with alternating directions: afterwards each half of
    the chunk is sorted (first half ascending, second descending), ready for the final merge."""
    n_dims = _log2_exact(len(pairs))
    for stage in range(1, n_dims):
        pairs = bitonic_merge(pairs, stage, "alternating")
    return pairs


def original_topk_row(importance: list[float], block_size: int, selected: int) -> list[int]:
    """The blocks one (token, KV group) selects, in the network's output order, -1 for an empty slot.

    importance: one value per block 0 .. current (the token's own block last). Blocks are taken in chunks of
    `block_size` (the network's width equals the block size), padded with (0.0, id 0). The first chunk is
    sorted descending. Every later chunk is sorted ascending, then the best half of the running result (its
    first half, descending) is glued in front of the best half of the new chunk (its second half, ascending),
    and these are merged descending. The answer is the first `selected` slots of the final list.
    """
    width = block_size
    n_dims = _log2_exact(width)
    current = len(importance) - 1
    best: list[Pair] = []
    for start in range(0, current + 1, width):
        chunk = [
            (importance[c], c + 1) if c <= current else (0.0, 0)
            for c in range(start, start + width)
        ]
        chunk = presort_chunk(chunk)
        if start == 0:
            best = bitonic_merge(chunk, n_dims, "descending")
        else:
            chunk = bitonic_merge(chunk, n_dims, "ascending")
            glued = best[: width // 2] + chunk[width // 2 :]
            best = bitonic_merge(glued, n_dims, "descending")
    if selected > width:
        raise ValueError(f"{selected} selected slots need a network at least as wide (block_size {block_size})")
    return [block_id - 1 for _, block_id in best[:selected]]


def next_power_of_two(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << (n - 1).bit_length()


def naive_topk(
    q: Tensor, k_cmp: Tensor, lse: Tensor, block_counts: int, block_size: int, scale: float,
    tokens: Iterable[int] | None = None,
) -> Tensor:
    """The original top-k, one (batch, token, KV group) at a time.

    q: [B, T, HP, D] padded queries; k_cmp: [B, NB, HKV, D]; lse: [B, HP, T] (the compression's, heads
    first). Returns int32 [B, T, HKV, S], S = next power of two >= block_counts. With `tokens`, only those
    rows are computed (the others stay -1).

    The normaliser of (token t, padded head h) is entry 64*t + h of the flattened per-sample lse, i.e. lse
    read as if it were [B, T, HP] (the original's layout bug): a value of another head and another token.
    Importance of an earlier block c: sum over the group's heads of exp(q_h * scale . k_cmp[c] - normaliser);
    the token's own block scores 1.0 per head; later blocks are not candidates.
    """
    batch, length, padded_heads, _ = q.shape
    kv_heads = k_cmp.shape[2]
    group = padded_heads // kv_heads
    selected = next_power_of_two(block_counts)
    lse_as_read = lse.reshape(batch, padded_heads * length).to(torch.float64)
    out = torch.full((batch, length, kv_heads, selected), -1, dtype=torch.int32)
    for b in range(batch):
        for t in range(length) if tokens is None else tokens:
            current = t // block_size
            for i in range(kv_heads):
                heads = list(range(i * group, (i + 1) * group))
                normaliser = lse_as_read[b, [t * padded_heads + h for h in heads]].tolist()  # [G]
                scores = ((q[b, t, heads].double() * scale) @ k_cmp[b, :current, i].double().T).tolist()
                # Plain Python exp and left-to-right sums: equal scores give bit-equal importance, so exact
                # ties stay exact (a vectorised reduction may round the columns of one tensor differently).
                importance = [
                    sum(math.exp(scores[g][c] - normaliser[g]) for g in range(group)) for c in range(current)
                ]
                importance.append(float(group))  # the token's own block: 1.0 per head
                out[b, t, i] = torch.tensor(original_topk_row(importance, block_size, selected))
    return out


# ----------------------------------------------------------------------------------------------------------
# The NSA branches
# ----------------------------------------------------------------------------------------------------------


def mean_pool(x: Tensor, block_size: int) -> Tensor:
    """[B, T, H, D] -> [B, ceil(T / block_size), H, D]: the mean of each block, the last one over its own
    (possibly shorter) length."""
    length = x.shape[1]
    blocks = [x[:, start : min(start + block_size, length)].mean(dim=1) for start in range(0, length, block_size)]
    return torch.stack(blocks, dim=1)


def _kv_of_padded_head(padded_heads: int, kv_heads: int) -> list[int]:
    """NSA's grouping of the padded heads: head h reads KV head h // (HP // HKV)."""
    return [h // (padded_heads // kv_heads) for h in range(padded_heads)]


def _attend(query: Tensor, keys: Tensor, values: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Softmax attention of one token over some keys, per head.

    query: [H, D]; keys, values: [N, H, D] (already one KV row per query head). Returns ([H, D], lse [H]).
    """
    scores = torch.einsum("hd,nhd->hn", query, keys) * scale
    weights = torch.softmax(scores, dim=-1)
    return torch.einsum("hn,nhd->hd", weights, values), torch.logsumexp(scores, dim=-1)


def naive_compression(
    q: Tensor, k_cmp: Tensor, v_cmp: Tensor, block_size: int, scale: float
) -> tuple[Tensor, Tensor]:
    """Anti-causal compression: token t attends to the pooled blocks t // block_size .. NB - 1.

    q: [B, T, HP, D]; k_cmp, v_cmp: [B, NB, HKV, D]. Returns (o [B, T, HP, D], lse [B, HP, T], natural log).
    The original's lse is float32 (its inputs were bf16); this oracle keeps it in float64, the exact function.
    """
    batch, length, padded_heads, _ = q.shape
    kv_of = _kv_of_padded_head(padded_heads, k_cmp.shape[2])
    out = torch.zeros_like(q)
    lse = torch.zeros(batch, padded_heads, length, dtype=torch.float64)
    for b in range(batch):
        for t in range(length):
            visible = slice(t // block_size, None)
            out[b, t], lse[b, :, t] = _attend(q[b, t], k_cmp[b, visible][:, kv_of], v_cmp[b, visible][:, kv_of], scale)
    return out, lse


def naive_selection(q: Tensor, k: Tensor, v: Tensor, block_ids: Tensor, block_size: int, scale: float) -> Tensor:
    """One softmax per (token, head) over the union of the group's selected blocks, keys <= t only.

    q: [B, T, HP, D]; k, v: [B, T, HKV, D]; block_ids: [B, T, HKV, S] (every slot used; -1 and blocks
    starting after t are skipped). Returns [B, T, HP, D].
    """
    batch, length, padded_heads, _ = q.shape
    kv_heads = k.shape[2]
    group = padded_heads // kv_heads
    out = torch.zeros_like(q)
    for b in range(batch):
        for t in range(length):
            for i in range(kv_heads):
                positions = []
                for block in block_ids[b, t, i].tolist():
                    if block < 0 or block * block_size > t:
                        continue
                    positions += [j for j in range(block * block_size, (block + 1) * block_size) if j <= t]
                heads = slice(i * group, (i + 1) * group)
                keys = k[b, positions, i][:, None].expand(-1, group, -1)
                values = v[b, positions, i][:, None].expand(-1, group, -1)
                out[b, t, heads] = _attend(q[b, t, heads], keys, values, scale)[0]
    return out


def naive_window(q: Tensor, k: Tensor, v: Tensor, window_size: int, scale: float) -> Tensor:
    """Sliding window: token t attends to keys t - window_size + 1 .. t. q [B, T, HP, D], k/v [B, T, HKV, D]."""
    batch, length, padded_heads, _ = q.shape
    kv_of = _kv_of_padded_head(padded_heads, k.shape[2])
    out = torch.zeros_like(q)
    for b in range(batch):
        for t in range(length):
            keys = slice(max(0, t - window_size + 1), t + 1)
            out[b, t] = _attend(q[b, t], k[b, keys][:, kv_of], v[b, keys][:, kv_of], scale)[0]
    return out


def naive_nsa(
    q: Tensor, k: Tensor, v: Tensor, gates: Tensor, *, block_size: int, block_counts: int, window_size: int,
    scale: float,
) -> Tensor:
    """The three gated branches on padded heads: q [B, T, HP, D], k/v [B, T, HKV, D], gates [B, T, HP, 3]
    (cmp, slc, swa) -> [B, T, HP, D]."""
    k_cmp, v_cmp = mean_pool(k, block_size), mean_pool(v, block_size)
    o_cmp, lse = naive_compression(q, k_cmp, v_cmp, block_size, scale)
    block_ids = naive_topk(q, k_cmp, lse, block_counts, block_size, scale)
    o_slc = naive_selection(q, k, v, block_ids, block_size, scale)
    o_swa = naive_window(q, k, v, window_size, scale)
    g_cmp, g_slc, g_swa = gates.unbind(-1)
    return o_cmp * g_cmp[..., None] + o_slc * g_slc[..., None] + o_swa * g_swa[..., None]


# ----------------------------------------------------------------------------------------------------------
# Dense parts and the whole layer
# ----------------------------------------------------------------------------------------------------------


def naive_dense(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Causal attention with Qwen's grouping (query head h reads KV head h // (HQ // HKV)), the last query
    aligned with the last key: q [B, M, HQ, D], k/v [B, N, HKV, D], N >= M -> [B, M, HQ, D]. With M == N this
    is ordinary causal attention; with M = 1 the new token sees every cached key."""
    batch, queries, query_heads, _ = q.shape
    keys_total, kv_heads = k.shape[1], k.shape[2]
    kv_of = [h // (query_heads // kv_heads) for h in range(query_heads)]
    out = torch.zeros_like(q)
    for b in range(batch):
        for t in range(queries):
            visible = slice(0, keys_total - queries + t + 1)
            out[b, t] = _attend(q[b, t], k[b, visible][:, kv_of], v[b, visible][:, kv_of], scale)[0]
    return out


def pad_heads(x: Tensor) -> Tensor:
    """[B, T, HQ, ...] -> [B, T, 64, ...] as [x, x, zeros]."""
    zeros = x.new_zeros(x.shape[0], x.shape[1], PADDED_HEADS - 2 * x.shape[2], *x.shape[3:])
    return torch.cat([x, x, zeros], dim=2)


def naive_official_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    is_vision: Tensor,
    gate_logits: Tensor,
    *,
    block_size: int = 64,
    block_counts: int = 32,
    window_size: int = 256,
    scale: float | None = None,
    gate_temperature: float = 0.3,
) -> Tensor:
    """The original evaluation attention of one prefill: q [B, T, HQ, D], k/v [B, T, HKV, D] after rotary
    embedding, is_vision bool [B, T], gate_logits [B, T, HQ, 3] before the temperature -> [B, T, HQ, D], what
    the original hands (flattened over heads) to o_proj. Computed in float64."""
    q, k, v, gate_logits = (x.to(torch.float64) for x in (q, k, v, gate_logits))
    query_heads, kv_heads, head_dim = q.shape[2], k.shape[2], q.shape[3]
    assert 2 * query_heads <= PADDED_HEADS and PADDED_HEADS % kv_heads == 0 and query_heads % kv_heads == 0
    scale = head_dim**-0.5 if scale is None else scale
    settings = dict(block_size=block_size, block_counts=block_counts, window_size=window_size, scale=scale)

    if not bool(is_vision.any()):
        return naive_dense(q, k, v, scale)
    if bool(is_vision.all()):
        gates = torch.sigmoid(gate_logits / gate_temperature)
        nsa = naive_nsa(pad_heads(q), k, v, pad_heads(gates), **settings)
        return (nsa[:, :, :query_heads] + nsa[:, :, query_heads : 2 * query_heads]) * 0.5

    vision = is_vision[:, :, None, None].to(torch.float64)  # [B, T, 1, 1]
    gates = torch.sigmoid(gate_logits / gate_temperature * vision)  # text tokens: sigmoid(0) = 0.5
    nsa = naive_nsa(pad_heads(q * vision), k * vision, v * vision, pad_heads(gates), **settings)
    nsa = (nsa[:, :, :query_heads] + nsa[:, :, query_heads : 2 * query_heads]) * 0.5
    dense = naive_dense(q * (1 - vision), k, v, scale)
    return nsa + dense


def mrope_is_vision(position_ids: Tensor) -> Tensor:
    """The original's token-type rule: with M-RoPE ids [3, B, T] (temporal, height, width), a token is text
    exactly when all three ids are equal, vision otherwise. Returns bool [B, T]."""
    temporal, height, width = position_ids
    return ~((temporal == height) & (height == width))


def _log2_exact(n: int) -> int:
    if n < 2 or n & (n - 1):
        raise ValueError(f"the sorting network needs a power-of-two width >= 2, got {n}")
    return n.bit_length() - 1


__all__ = [
    "PADDED_HEADS",
    "bitonic_merge",
    "compare_and_swap",
    "mean_pool",
    "mrope_is_vision",
    "naive_compression",
    "naive_dense",
    "naive_nsa",
    "naive_official_attention",
    "naive_selection",
    "naive_topk",
    "naive_window",
    "next_power_of_two",
    "original_topk_row",
    "pad_heads",
]
