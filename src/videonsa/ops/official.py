"""Building blocks of the original VideoNSA attention ("official" mode) in plain PyTorch.

The released VideoNSA checkpoint was trained and evaluated with research code whose attention differs from the
NSA of `videonsa.ops.reference` (see docs/official-mode.md for the whole function, step by step). This module
holds its pieces, readable, on any device and dtype, with working memory linear in T (queries are processed in
chunks):

* `mean_pool_blocks`: block means of k and v, the partial last block divided by its own length.
* `anticausal_compression`: attention over the block means where query t sees blocks t // b, t // b + 1, ...
  (its own block and every later one), returning the natural-log lse heads first.
* `original_topk_reference`: the original top-k block choice, an exact emulation of its bitonic sorting network
  (ties, the running merge over chunks of candidates, the lse read with the wrong layout, the current block
  scored 1.0 per head).
* `selected_attention_reference`, `window_attention_reference`, `dense_causal_attention_reference`: softmax
  attention over given blocks, over a sliding window, and dense causal attention of chosen query rows.

Rounding follows the original kernels for bf16/fp16 inputs: scores and softmax statistics in float32, the
unnormalised probabilities rounded to the input dtype before they multiply the values, outputs rounded once.
float64 inputs compute in float64 throughout.

Padded heads: the original pads the query heads to `PADDED_HEADS` and maps padded head h to KV head
h // (PADDED_HEADS // HKV); every function here takes HP query heads and uses that mapping, h // (HP // HKV).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

PADDED_HEADS = 64

# Elements of scores / gathered keys one query chunk may hold; bounds the working memory of every function here.
_CHUNK_ELEMENTS = 1 << 24


def next_power_of_two(n: int) -> int:
    """Smallest power of two >= n (n >= 1)."""
    return 1 << max(0, int(n) - 1).bit_length()


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """What scores and statistics are computed in: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_len(per_query: int, total: int) -> int:
    """Queries per chunk so that one chunk holds about `_CHUNK_ELEMENTS` elements."""
    return max(1, min(total, _CHUNK_ELEMENTS // max(1, per_query)))


# ----------------------------------------------------------------------------------------------------------
# Softmax attention with the original kernels' rounding


def softmax_attend(scores: Tensor, allowed: Tensor, v: Tensor, value_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Softmax over the last dim of `scores` restricted to `allowed`, applied to `v`.

    scores [..., Q, K] in the compute dtype (already scaled); allowed bool broadcastable to it; v [..., K, D] in
    the compute dtype. The unnormalised probabilities exp(s - max) are rounded to `value_dtype` before the P.V
    product while the normaliser sums them unrounded, as flash-style kernels do.

    Returns o [..., Q, D] (compute dtype, not yet rounded) and lse [..., Q] (natural log; -inf and o = 0 for rows
    with nothing allowed).
    """
    scores = scores.masked_fill(~allowed, -math.inf)
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    probs = torch.exp(scores - row_max)
    total = probs.sum(dim=-1, keepdim=True)
    rounded = probs.to(value_dtype).to(probs.dtype)
    o = (rounded @ v) / total.clamp_min(torch.finfo(total.dtype).tiny)
    return o, (row_max + torch.log(total)).squeeze(-1)


def _grouped(x: Tensor, heads_kv: int) -> Tensor:
    """[C, H, D] -> [HKV, C * G, D]: the G = H // HKV query heads of each KV head as rows (token-major)."""
    chunk, heads, dim = x.shape
    group = heads // heads_kv
    return x.view(chunk, heads_kv, group, dim).permute(1, 0, 2, 3).reshape(heads_kv, chunk * group, dim)


def _ungrouped(x: Tensor, chunk: int) -> Tensor:
    """Inverse of `_grouped`: [HKV, C * G, D] -> [C, HKV * G, D]."""
    heads_kv, rows, dim = x.shape
    return x.view(heads_kv, chunk, rows // chunk, dim).permute(1, 0, 2, 3).reshape(chunk, -1, dim)


# ----------------------------------------------------------------------------------------------------------
# Compression


def mean_pool_blocks(x: Tensor, block_size: int) -> Tensor:
    """Mean of every block of `block_size` consecutive tokens: x [B, T, H, D] -> [B, NB, H, D], NB = ceil(T / b).

    The partial last block is divided by its own length. Sums in float32 (float64 for float64 input), stored in
    x's dtype.
    """
    batch, seq_len, heads, dim = x.shape
    n_blocks = -(-seq_len // block_size)
    acc = compute_dtype(x.dtype)
    padded = x.new_zeros(batch, n_blocks * block_size, heads, dim, dtype=acc)
    padded[:, :seq_len] = x
    sums = padded.view(batch, n_blocks, block_size, heads, dim).sum(dim=2)
    counts = (seq_len - torch.arange(n_blocks, device=x.device) * block_size).clamp(max=block_size)
    return (sums / counts.to(acc)[None, :, None, None]).to(x.dtype)


def anticausal_compression(
    q: Tensor, k_cmp: Tensor, v_cmp: Tensor, block_size: int, scale: float
) -> tuple[Tensor, Tensor]:
    """Attention of every query over the block means of its own block and all later blocks.

    Query t sees compressed block c iff c >= t // block_size (so never an empty row). Head h reads KV head
    h // (HP // HKV). Scores are fp32(q . k) * scale.

    Args:
        q: [B, T, HP, D]; k_cmp, v_cmp: [B, NB, HKV, D] with NB = ceil(T / block_size).

    Returns:
        o [B, T, HP, D] in q's dtype and lse [B, HP, T], natural log, contiguous, float32 (float64 for float64
        input).
    """
    batch, seq_len, heads, dim = q.shape
    n_blocks, heads_kv = k_cmp.shape[1], k_cmp.shape[2]
    work = compute_dtype(q.dtype)
    o = torch.empty_like(q)
    lse = torch.empty(batch, heads, seq_len, dtype=work, device=q.device)
    chunk = _chunk_len(heads * n_blocks, seq_len)
    blocks = torch.arange(n_blocks, device=q.device)
    for b in range(batch):
        keys = k_cmp[b].to(work).transpose(0, 1)  # [HKV, NB, D]
        values = v_cmp[b].to(work).transpose(0, 1)
        for start in range(0, seq_len, chunk):
            end = min(seq_len, start + chunk)
            first = start // block_size  # no query of this chunk sees blocks before this one
            group = heads // heads_kv
            rows = _grouped(q[b, start:end].to(work), heads_kv)  # [HKV, C*G, D]
            scores = (rows @ keys[:, first:].transpose(1, 2)) * scale  # [HKV, C*G, NB - first]
            current = (torch.arange(start, end, device=q.device) // block_size).repeat_interleave(group)
            allowed = blocks[None, first:] >= current[:, None]
            out, stat = softmax_attend(scores, allowed[None], values[:, first:], q.dtype)
            o[b, start:end] = _ungrouped(out, end - start).to(q.dtype)
            lse[b, :, start:end] = stat.view(heads_kv, end - start, group).permute(0, 2, 1).reshape(heads, -1)
    return o, lse


# ----------------------------------------------------------------------------------------------------------
# Top-k: the original's bitonic network


def _float_bits(x: Tensor) -> Tensor:
    return x.view(torch.int64 if x.dtype == torch.float64 else torch.int32)


def _compare_and_swap(x: Tensor, ids: Tensor, flip: Tensor | bool, distance: int) -> tuple[Tensor, Tensor]:
    """One compare-and-swap layer over rows x [R, W] (scores) and ids [R, W] (int32), pairs `distance` apart.

    Written as the original computes it: each pair's left and right values are formed as y0*1 + y1*0 and
    y0*0 + y1*1 (so an inf on one side turns the other into NaN, as on the GPU), the pair swaps where
    (left > right) != flip, and the swap is an XOR of bit patterns. With finite values this is a plain swap;
    equal values swap exactly where flip is set.
    """
    rows, width = x.shape
    shape = (rows, width // (2 * distance), 2, distance)
    pairs, id_pairs = x.view(shape), ids.view(shape)
    y0, y1 = pairs[:, :, 0], pairs[:, :, 1]
    left = y0 * 1 + y1 * 0
    right = y0 * 0 + y1 * 1
    swap = (left > right) != flip
    delta = torch.where(swap, _float_bits(left) ^ _float_bits(right), torch.zeros_like(_float_bits(left)))
    new_x = torch.stack([_float_bits(y0) ^ delta, _float_bits(y1) ^ delta], dim=2).view(x.dtype)
    i0, i1 = id_pairs[:, :, 0], id_pairs[:, :, 1]
    id_delta = torch.where(swap, i0 ^ i1, torch.zeros_like(i0))
    new_ids = torch.stack([i0 ^ id_delta, i1 ^ id_delta], dim=2)
    return new_x.reshape(rows, width), new_ids.reshape(rows, width)


def _bitonic_merge(x: Tensor, ids: Tensor, stage: int, order: int | bool) -> tuple[Tensor, Tensor]:
    """`stage` compare-and-swap layers, pair distances 2^(stage-1) .. 1.

    order 2: alternating directions, position p of the row sorting descending-ish where bit `stage` of p is set
    (the flip); order False / True: the whole row in one direction (True = descending: flip everywhere).
    """
    width = x.shape[1]
    for layer in range(stage):
        distance = 1 << (stage - layer - 1)
        if order == 2:
            left = torch.arange(width // (2 * distance), device=x.device)[:, None] * (2 * distance)
            flip: Tensor | bool = ((left >> stage) & 1).bool().expand(-1, distance)[None]
        else:
            flip = bool(order)
        x, ids = _compare_and_swap(x, ids, flip, distance)
    return x, ids


def _sort_chunk(x: Tensor, ids: Tensor, final_order: bool) -> tuple[Tensor, Tensor]:
    """The network on one chunk of candidates: stages 1 .. n-1 alternating, then one merge in `final_order`."""
    n_dims = x.shape[1].bit_length() - 1
    for stage in range(1, n_dims):
        x, ids = _bitonic_merge(x, ids, stage, 2)
    return _bitonic_merge(x, ids, n_dims, final_order)


def bitonic_block_order(importance: Tensor, current: Tensor, block_size: int) -> Tensor:
    """The order in which the original top-k network leaves the candidate blocks of each row.

    Args:
        importance: [R, W] float32/float64 scores of candidate blocks 0..W-1 per row, W a multiple of block_size
            (scores of blocks after a row's current block are the network's inputs too, usually 0).
        current: long [R], each row's current block t // block_size (< W).
        block_size: candidates per chunk of the network (a power of two).

    Returns:
        int32 [R, block_size]: candidate ids (block + 1; 0 = no block) of the final sorted chunk, best first.
        Chunk 0 (blocks 0..bs-1) is sorted descending; every later chunk k <= current // bs is sorted ascending,
        its better half glued after the better half of the running result, and the glued row re-merged
        descending. Rows only process chunks up to their current block.
    """
    rows, width = importance.shape
    if width % block_size:
        raise ValueError(f"bitonic_block_order: width {width} is not a multiple of block_size {block_size}")
    block = torch.arange(width, device=importance.device)
    ids_all = torch.where(block[None, :] <= current[:, None], block[None, :] + 1, 0).to(torch.int32)
    x, ids = _sort_chunk(importance[:, :block_size], ids_all[:, :block_size], True)
    keep_first = (torch.arange(block_size, device=importance.device) < block_size // 2)
    first_half = keep_first.to(importance.dtype)
    second_half = (1 - keep_first.to(torch.int32)).to(importance.dtype)
    for chunk in range(1, width // block_size):
        active = torch.nonzero(current >= chunk * block_size).squeeze(1)
        if active.numel() == 0:
            break
        cols = slice(chunk * block_size, (chunk + 1) * block_size)
        new_x, new_ids = _sort_chunk(importance[active, cols], ids_all[active, cols], False)
        prev_x, prev_ids = x[active], ids[active]
        # The running result keeps its best half, the new ascending chunk its best (last) half; written as the
        # original's arithmetic blend (prev * mask + new * (1 - mask)).
        glued_x = prev_x * first_half + new_x * second_half
        glued_ids = prev_ids * keep_first.to(torch.int32) + new_ids * (1 - keep_first.to(torch.int32))
        merged_x, merged_ids = _bitonic_merge(glued_x, glued_ids.to(torch.int32), block_size.bit_length() - 1, True)
        x, ids = x.index_copy(0, active, merged_x), ids.index_copy(0, active, merged_ids)
    return ids


def check_topk_settings(block_counts: int, block_size: int) -> int:
    """Validate the original top-k's settings and return S = next_power_of_two(block_counts)."""
    if block_size < 2 or block_size & (block_size - 1):
        raise ValueError(f"official top-k: block_size must be a power of two >= 2, got {block_size}")
    if block_counts < 1:
        raise ValueError(f"official top-k: block_counts must be positive, got {block_counts}")
    slots = next_power_of_two(block_counts)
    if slots > block_size:
        raise ValueError(
            f"official top-k: block_counts={block_counts} rounds up to {slots} slots, more than block_size="
            f"{block_size} (the original network keeps at most block_size candidates)"
        )
    return slots


def original_topk_reference(
    q: Tensor, k_cmp: Tensor, lse: Tensor, block_counts: int, block_size: int, scale: float
) -> Tensor:
    """The original top-k block choice, slot for slot.

    For token t (current block n = t // bs) and KV group i, with the G = HP // HKV heads h of the group:
    score s[h, c] = round(q_h * scale) . k_cmp[c, i] (fp32); p[h, c] = exp(s - L[t, h]) for c < n, 1 for c == n,
    0 after, where L = lse.reshape(B, T, HP) -- the heads-first lse read as if it were tokens-first, as the
    original does; importance[c] = sum over h of p[h, c]. The candidates are then ordered by the bitonic network
    (`bitonic_block_order`) and the first S kept.

    Args:
        q: [B, T, HP, D]; k_cmp: [B, NB, HKV, D]; lse: [B, HP, T] from `anticausal_compression`.
        block_counts: wanted blocks; S = next_power_of_two(block_counts) slots are returned (S <= block_size).
        block_size: tokens per block (a power of two).
        scale: the softmax scale.

    Returns:
        int32 [B, T, HKV, S]: block ids in the network's order, -1 for empty slots.
    """
    slots = check_topk_settings(block_counts, block_size)
    batch, seq_len, heads, dim = q.shape
    heads_kv = k_cmp.shape[2]
    group = heads // heads_kv
    work = compute_dtype(q.dtype)
    lse_used = lse.contiguous().reshape(batch, seq_len, heads).to(work)  # the original's layout mix-up
    q_scaled = (q * scale).to(q.dtype)  # rounded to the input dtype before the dot, as the kernel does
    out = torch.empty(batch, seq_len, heads_kv, slots, dtype=torch.int32, device=q.device)
    n_blocks = k_cmp.shape[1]
    width_all = -(-n_blocks // block_size) * block_size
    chunk = _chunk_len(heads * width_all, seq_len)
    for b in range(batch):
        keys = k_cmp[b].to(work)  # [NB, HKV, D]
        for start in range(0, seq_len, chunk):
            end = min(seq_len, start + chunk)
            current = torch.arange(start, end, device=q.device) // block_size  # [C]
            last = int(current[-1])
            width = (last // block_size + 1) * block_size
            rows = q_scaled[b, start:end].to(work).view(end - start, heads_kv, group, dim)
            scores = torch.einsum("cigd,nid->cign", rows, keys[: last + 1])
            scores = torch.nn.functional.pad(scores, (0, width - scores.shape[-1]))
            block = torch.arange(width, device=q.device)
            cur = current[:, None, None, None]
            masked = torch.where(block < cur, scores, -math.inf)
            norm = lse_used[b, start:end].view(end - start, heads_kv, group, 1)
            probs = torch.where(block == cur, torch.ones((), dtype=work, device=q.device), torch.exp(masked - norm))
            # Head by head in one fixed order, so that equal scores give bit-equal importance (exact ties stay
            # ties, as in the kernel's per-column sum); torch's reduction may order the columns' sums differently.
            importance = probs[:, :, 0]
            for g in range(1, group):
                importance = importance + probs[:, :, g]
            importance = importance.reshape(-1, width)  # [C * HKV, W]
            order = bitonic_block_order(importance, current.repeat_interleave(heads_kv), block_size)
            out[b, start:end] = (order[:, :slots] - 1).view(end - start, heads_kv, slots)
    return out


# ----------------------------------------------------------------------------------------------------------
# Selection, window, dense


def selected_attention_reference(
    q: Tensor, k: Tensor, v: Tensor, block_indices: Tensor, block_size: int, scale: float
) -> Tensor:
    """Attention of each query over the union of its group's listed blocks, causal inside them.

    Every slot is used (in any order); a slot is skipped unless 0 <= id and id * block_size <= t, and only keys
    j <= t count. Scores are round(q * scale) . k in fp32, one softmax over all kept keys.

    Args:
        q: [B, T, HP, D]; k, v: [B, T, HKV, D]; block_indices: int [B, T, HKV, S] (-1 = empty).

    Returns:
        [B, T, HP, D] in q's dtype.
    """
    batch, seq_len, heads, dim = q.shape
    heads_kv, slots = k.shape[2], block_indices.shape[-1]
    group = heads // heads_kv
    work = compute_dtype(q.dtype)
    n_blocks = -(-seq_len // block_size)
    q_scaled = (q * scale).to(q.dtype)
    o = torch.empty_like(q)
    chunk = _chunk_len(heads_kv * slots * block_size * (2 * dim + group), seq_len)
    kv_head = torch.arange(heads_kv, device=q.device)[None, :, None]
    offsets = torch.arange(block_size, device=q.device)
    for b in range(batch):
        k_blocks, v_blocks = (_blocked(x[b].to(work), n_blocks, block_size) for x in (k, v))
        for start in range(0, seq_len, chunk):
            end = min(seq_len, start + chunk)
            pos = torch.arange(start, end, device=q.device)[:, None, None]
            ids = block_indices[b, start:end].long()  # [C, HKV, S]
            usable = (ids >= 0) & (ids * block_size <= pos)
            safe = ids.clamp(0, n_blocks - 1)
            k_sel = k_blocks[safe, :, kv_head, :].flatten(2, 3)  # [C, HKV, S*b, D]
            v_sel = v_blocks[safe, :, kv_head, :].flatten(2, 3)
            key_pos = (safe[..., None] * block_size + offsets).flatten(2)
            allowed = usable.repeat_interleave(block_size, dim=-1) & (key_pos <= pos)  # [C, HKV, S*b]
            rows = q_scaled[b, start:end].to(work).view(end - start, heads_kv, group, dim)
            scores = rows @ k_sel.transpose(-1, -2)  # [C, HKV, G, S*b]
            out, _ = softmax_attend(scores, allowed[:, :, None, :], v_sel, q.dtype)
            o[b, start:end] = out.reshape(end - start, heads, dim).to(q.dtype)
    return o


def _blocked(x: Tensor, n_blocks: int, block_size: int) -> Tensor:
    """[T, H, D] zero-padded to whole blocks -> [NB, block_size, H, D]."""
    pad = n_blocks * block_size - x.shape[0]
    return torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)).view(n_blocks, block_size, *x.shape[1:])


def window_attention_reference(q: Tensor, k: Tensor, v: Tensor, window_size: int, scale: float) -> Tensor:
    """Causal sliding-window attention: query t sees keys t - window_size + 1 .. t.

    Scores are fp32(q . k) * scale. q: [B, T, HP, D]; k, v: [B, T, HKV, D]. Returns [B, T, HP, D] in q's dtype.
    """
    batch, seq_len, heads, dim = q.shape
    heads_kv = k.shape[2]
    group = heads // heads_kv
    work = compute_dtype(q.dtype)
    o = torch.empty_like(q)
    chunk = _chunk_len(heads * (window_size + 1) * 2, seq_len)
    for b in range(batch):
        for start in range(0, seq_len, chunk):
            end = min(seq_len, start + chunk)
            lo = max(0, start - window_size + 1)
            pos = torch.arange(start, end, device=q.device)
            key_pos = torch.arange(lo, end, device=q.device)
            allowed = (key_pos[None, :] <= pos[:, None]) & (key_pos[None, :] > pos[:, None] - window_size)
            rows = _grouped(q[b, start:end].to(work), heads_kv)
            keys = k[b, lo:end].to(work).transpose(0, 1)  # [HKV, K, D]
            scores = (rows @ keys.transpose(1, 2)) * scale
            allowed_rows = allowed.repeat_interleave(group, dim=0)[None]
            out, _ = softmax_attend(scores, allowed_rows, v[b, lo:end].to(work).transpose(0, 1), q.dtype)
            o[b, start:end] = _ungrouped(out, end - start).to(q.dtype)
    return o


def dense_causal_attention_reference(
    q: Tensor, positions: Tensor, k: Tensor, v: Tensor, scale: float
) -> Tensor:
    """Dense causal attention of chosen query rows of one sequence over all keys up to their position.

    Scores are fp32(q . k) * scale; query head j reads KV head j // (HQ // HKV).

    Args:
        q: [L, HQ, D] queries at `positions` (long [L]); k, v: [T, HKV, D].

    Returns:
        [L, HQ, D] in q's dtype.
    """
    count, heads, dim = q.shape
    heads_kv = k.shape[1]
    group = heads // heads_kv
    work = compute_dtype(q.dtype)
    o = torch.empty_like(q)
    if count == 0:
        return o
    seq_len = int(positions.max()) + 1
    keys = k[:seq_len].to(work).transpose(0, 1)
    values = v[:seq_len].to(work).transpose(0, 1)
    key_pos = torch.arange(seq_len, device=q.device)
    chunk = _chunk_len(heads * seq_len * 2, count)
    for start in range(0, count, chunk):
        end = min(count, start + chunk)
        rows = _grouped(q[start:end].to(work), heads_kv)
        scores = (rows @ keys.transpose(1, 2)) * scale
        allowed = (key_pos[None, :] <= positions[start:end, None]).repeat_interleave(group, dim=0)[None]
        out, _ = softmax_attend(scores, allowed, values, q.dtype)
        o[start:end] = _ungrouped(out, end - start).to(q.dtype)
    return o


def causal_mean(v: Tensor) -> Tensor:
    """Mean of v over positions 0..t for every t: v [B, T, H, D] -> [B, T, H, D] in v's dtype.

    What dense attention gives a zero query (uniform weights over every visible key). Accumulates in float32
    (float64 for float64 input).
    """
    work = compute_dtype(v.dtype)
    counts = torch.arange(1, v.shape[1] + 1, device=v.device, dtype=work)[None, :, None, None]
    sums = cumsum_over_tokens(v, work, innermost=v.is_cuda)
    return (sums / counts).to(v.dtype, memory_format=torch.contiguous_format)


def cumsum_over_tokens(x: Tensor, dtype: torch.dtype, *, innermost: bool) -> Tensor:
    """Running sums of x [B, T, H, D] over T, computed in `dtype`: [B, T, H, D].

    innermost=False scans dim 1 in place of the layout; innermost=True scans the last dim of a [B, H, D, T] copy
    and returns a permuted view. On CUDA torch's scan along an outer dim is very slow (12 ms for [1, 32K, 4, 128]
    on an H100) while the innermost scan is a fast kernel; the two agree to float32 rounding (different summation
    order). On the CPU both are sequential sums.
    """
    if not innermost:
        return x.to(dtype).cumsum(dim=1)
    tokens_last = x.permute(0, 2, 3, 1).to(dtype=dtype, memory_format=torch.contiguous_format)
    return tokens_last.cumsum(dim=-1).permute(0, 3, 1, 2)
