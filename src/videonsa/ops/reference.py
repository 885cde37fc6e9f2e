"""Native Sparse Attention in plain PyTorch: the readable reference every fast kernel is checked against.

Runs on any device, is differentiable, and keeps memory linear in T: queries are processed in chunks, each chunk
only ever sees the compressed keys, the keys of its selected blocks and its sliding window, and under autograd
each chunk is recomputed in backward (activation checkpointing) instead of keeping its gathered keys alive.

The steps, per packed sequence (positions t counted from the sequence start), b = block_size, G = HQ // HKV:

1. compress:  K~_j = mean(k[j*b:(j+1)*b]) for complete blocks j; query t sees block j iff (j+1)*b <= t+1.
2. importance: the compression softmax p[t, h, j], summed over the G query heads of each KV group.
3. select:    forced blocks (init, and the local ones ending at t's block) plus the best-scoring visible ones,
              block_count in all; causal attention over their keys. The choice itself carries no gradient.
4. window:    causal attention over the last window_size keys.
5. o = g_cmp * o_cmp + g_slc * o_slc + g_swa * o_swa.

Queries may be the last part of a longer key sequence (k, v longer than q; `cu_seqlens_k` when packed): query i
of a sequence with len_q queries and len_k keys sits at key position t = len_k - len_q + i, and every step above
runs with that t over all len_k keys, so the result is those rows of the one-pass operator.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from videonsa.ops.common import NSAParts, check_inputs, empty_batch_parts, query_key_spans
from videonsa.ops.config import NSAConfig

# Elements of gathered keys/values/scores one query chunk may hold by default; bounds the reference's working
# memory (`nsa_parts_reference`'s chunk_elements).
CHUNK_ELEMENTS = 1 << 25


def nsa_attention_reference(
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
    cu_seqlens_k: Tensor | None = None,
) -> Tensor:
    """NSA over q [B, Tq, HQ, D], k/v [B, Tk, HKV, D] (Tk >= Tq) with gates [B, Tq, HQ]; returns o [B, Tq, HQ, D].

    With Tk > Tq the queries are the last Tq key positions (packed: cu_seqlens for the queries, cu_seqlens_k for
    the keys); see `nsa_parts_reference`."""
    return nsa_parts_reference(
        q, k, v, g_cmp, g_slc, g_swa,
        block_size=block_size, block_count=block_count, window_size=window_size,
        init_blocks=init_blocks, local_blocks=local_blocks, cu_seqlens=cu_seqlens, scale=scale,
        cu_seqlens_k=cu_seqlens_k,
    ).o


def nsa_parts_reference(
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
    block_indices: Tensor | None = None,
    chunk_elements: int = CHUNK_ELEMENTS,
    cu_seqlens_k: Tensor | None = None,
) -> NSAParts:
    """Like `nsa_attention_reference`, returning every part (see `NSAParts`).

    q [B, Tq, HQ, D], k/v [B, Tk, HKV, D] with Tk >= Tq, gates [B, Tq, HQ]: each sequence's queries are its last
    len_q key positions (dense batch: Tq of Tk; packed: cu_seqlens for the queries, cu_seqlens_k for the keys,
    None meaning the same offsets). The parts are [B, Tq, ...]: the rows of the one-pass call over the keys.

    block_indices: optional int [B, Tq, HKV, block_count] (-1 = unused) to use instead of the top-k choice;
        kernel tests use it to check the attention given the kernel's own selection.
    chunk_elements: elements of gathered keys, values and scores one chunk of queries may hold (the queries
        run in chunks that fit it, at least one query each); the result does not depend on it.
    """
    check_inputs(q, k, v, g_cmp, g_slc, g_swa)
    config = NSAConfig(block_size, block_count, window_size, init_blocks, local_blocks)
    batch, seq_len, heads_q, head_dim = q.shape
    heads_kv = k.shape[2]
    spans = query_key_spans(cu_seqlens, cu_seqlens_k, batch, seq_len, k.shape[1])
    if batch == 0:
        return empty_batch_parts(q, k, v, g_cmp, g_slc, g_swa, config.block_count)
    scale = head_dim**-0.5 if scale is None else float(scale)
    compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32

    indices = torch.full((batch, seq_len, heads_kv, config.block_count), -1, dtype=torch.int32, device=q.device)
    lse_cmp = torch.full((batch, seq_len, heads_q), -math.inf, dtype=torch.float32, device=q.device)
    # Branch outputs per sequence, joined afterwards so autograd sees plain concatenations.
    pieces: dict[str, list[Tensor]] = {"o_cmp": [], "o_slc": [], "o_swa": []}
    for span in spans:
        b, start, end = span.batch, span.q_start, span.q_end
        q_seq = q[b, start:end].to(compute_dtype)
        k_seq, v_seq = (x[b, span.k_start : span.k_end].to(compute_dtype) for x in (k, v))
        forced = None if block_indices is None else block_indices[b, start:end]
        parts = _sequence(q_seq, k_seq, v_seq, config, scale, forced, chunk_elements, span.first_position)
        for name, value in zip(pieces, parts[:3]):
            pieces[name].append(value)
        indices[b, start:end] = parts[3]
        lse_cmp[b, start:end] = parts[4].float()

    if cu_seqlens is None:
        o_cmp, o_slc, o_swa = (torch.stack(pieces[n]) for n in pieces)
    else:
        o_cmp, o_slc, o_swa = (torch.cat(pieces[n])[None] for n in pieces)
    gates = [g.to(compute_dtype).unsqueeze(-1) for g in (g_cmp, g_slc, g_swa)]
    o = gates[0] * o_cmp + gates[1] * o_slc + gates[2] * o_swa
    cast = lambda x: x.to(q.dtype)  # noqa: E731
    return NSAParts(cast(o), cast(o_cmp), cast(o_slc), cast(o_swa), indices, lse_cmp)


# ----------------------------------------------------------------------------------------------------------
# One sequence


def compress_blocks(x: Tensor, block_size: int) -> Tensor:
    """Mean of each complete block: x [L, H, D] -> [L // block_size, H, D]."""
    n_blocks = x.shape[0] // block_size
    return x[: n_blocks * block_size].unflatten(0, (n_blocks, block_size)).mean(dim=1)


def _sequence(
    q: Tensor, k: Tensor, v: Tensor, config: NSAConfig, scale: float, given_indices: Tensor | None,
    chunk_elements: int, first_position: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """NSA branches for one sequence: q [Lq, HQ, D] at key positions first_position.., k/v [Lk, HKV, D]
    (first_position = Lk - Lq), queries in chunks of about chunk_elements.

    Returns o_cmp, o_slc, o_swa [Lq, HQ, D], block indices int32 [Lq, HKV, block_count], lse_cmp [Lq, HQ].
    """
    seq_len, heads_q, head_dim = q.shape
    heads_kv = k.shape[1]
    if seq_len == 0:  # e.g. a batch without vision tokens: empty parts, still attached for autograd
        no_blocks = torch.empty(0, heads_kv, config.block_count, dtype=torch.int32, device=q.device)
        empty = q * 0 + (k.sum() + v.sum()) * 0  # keys of an earlier chunk get a zero gradient, not None
        return empty, empty, empty, no_blocks, q.detach().new_full((0, heads_q), -math.inf)
    k_cmp, v_cmp = compress_blocks(k, config.block_size), compress_blocks(v, config.block_size)
    per_query = heads_kv * config.block_count * config.block_size * (2 * head_dim + heads_q // heads_kv)
    per_query += heads_q * (config.window_size + k_cmp.shape[0])
    chunk = max(1, min(seq_len, chunk_elements // per_query))

    outputs = []
    for start in range(0, seq_len, chunk):
        end = min(seq_len, start + chunk)
        given = None if given_indices is None else given_indices[start:end]
        args = (q[start:end], k, v, k_cmp, v_cmp, first_position + start, config, scale, given)
        if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
            outputs.append(checkpoint(_query_chunk, *args, use_reentrant=False))
        else:
            outputs.append(_query_chunk(*args))
    return tuple(torch.cat(parts) for parts in zip(*outputs))  # type: ignore[return-value]


def _query_chunk(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cmp: Tensor,
    v_cmp: Tensor,
    start: int,
    config: NSAConfig,
    scale: float,
    given_indices: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The three branches for the queries at key positions start..start+C-1 of one sequence; q [C, HQ, D],
    k/v [L, HKV, D] the sequence's keys (start + C <= L)."""
    chunk, heads_q, head_dim = q.shape
    heads_kv = k.shape[1]
    group = heads_q // heads_kv
    pos = torch.arange(start, start + chunk, device=q.device)  # [C]
    qg = q.view(chunk, heads_kv, group, head_dim)  # query heads grouped by their KV head

    # 1-2. Compression and per-group importance.
    n_visible = (pos + 1) // config.block_size  # block j visible iff j < n_visible
    visible = torch.arange(k_cmp.shape[0], device=q.device) < n_visible[:, None]  # [C, NB]
    scores = scale * torch.einsum("cgsd,jgd->cgsj", qg, k_cmp)
    probs, lse = _masked_softmax(scores, visible[:, None, None, :])
    o_cmp = torch.einsum("cgsj,jgd->cgsd", probs, v_cmp)
    importance = probs.detach().sum(dim=2)  # [C, HKV, NB]

    # 3. Selection.
    if given_indices is None:
        indices = select_blocks(importance, pos, k.shape[0], config)
    else:
        indices = given_indices.to(torch.long)
    o_slc = _attend_selected(qg, k, v, indices, pos, config.block_size, scale)

    # 4. Sliding window over keys lo..start+C-1.
    lo = max(0, start - config.window_size + 1)
    key_pos = torch.arange(lo, start + chunk, device=q.device)
    in_window = (key_pos[None, :] <= pos[:, None]) & (key_pos[None, :] > pos[:, None] - config.window_size)
    window_scores = scale * torch.einsum("cgsd,kgd->cgsk", qg, k[lo : start + chunk])
    window_probs, _ = _masked_softmax(window_scores, in_window[:, None, None, :])
    o_swa = torch.einsum("cgsk,kgd->cgsd", window_probs, v[lo : start + chunk])

    flat = lambda x: x.reshape(chunk, heads_q, head_dim)  # noqa: E731
    return flat(o_cmp), flat(o_slc), flat(o_swa), indices.to(torch.int32), lse.reshape(chunk, heads_q)


def select_blocks(importance: Tensor, pos: Tensor, seq_len: int, config: NSAConfig) -> Tensor:
    """Top-k block choice with forced blocks.

    importance [C, HKV, NB] over the complete (visible-or-not) blocks; pos [C] query positions.
    Returns long [C, HKV, block_count]: chosen block ids ascending, -1 for unused slots. Ties between equal
    scores go to the earlier block.
    """
    chunk, heads_kv, n_complete = importance.shape
    n_blocks = -(-seq_len // config.block_size)  # the last, incomplete block counts for forcing
    block = torch.arange(n_blocks, device=pos.device)
    current = (pos // config.block_size)[:, None]  # [C, 1]
    visible = block[None, :] < ((pos + 1) // config.block_size)[:, None]  # [C, NBT]
    forced = (block[None, :] <= current) & (
        (block[None, :] < config.init_blocks) | (block[None, :] > current - config.local_blocks)
    )

    ranking = importance.new_full((chunk, heads_kv, n_blocks), -math.inf)
    ranking[..., :n_complete] = importance
    ranking = ranking.masked_fill(~visible[:, None, :], -math.inf)
    ranking = ranking.masked_fill(forced[:, None, :], math.inf)
    order = torch.sort(ranking, dim=-1, descending=True, stable=True)
    keep = min(config.block_count, n_blocks)
    chosen = torch.where(order.values[..., :keep] > -math.inf, order.indices[..., :keep], n_blocks)
    chosen = torch.sort(chosen, dim=-1).values  # ascending; unused slots (n_blocks) sort last
    chosen = torch.where(chosen == n_blocks, -1, chosen)
    if keep < config.block_count:
        chosen = F.pad(chosen, (0, config.block_count - keep), value=-1)
    return chosen


def _attend_selected(
    qg: Tensor, k: Tensor, v: Tensor, indices: Tensor, pos: Tensor, block_size: int, scale: float
) -> Tensor:
    """Causal attention of qg [C, HKV, G, D] over the keys of blocks indices [C, HKV, S] (-1 = none)."""
    seq_len, heads_kv, head_dim = k.shape
    n_blocks = -(-seq_len // block_size)
    pad = n_blocks * block_size - seq_len
    k_blocks = F.pad(k, (0, 0, 0, 0, 0, pad)).view(n_blocks, block_size, heads_kv, head_dim)
    v_blocks = F.pad(v, (0, 0, 0, 0, 0, pad)).view(n_blocks, block_size, heads_kv, head_dim)
    safe = indices.clamp(min=0)
    kv_head = torch.arange(heads_kv, device=k.device)[None, :, None]
    k_sel = k_blocks[safe, :, kv_head, :].flatten(2, 3)  # [C, HKV, S*b, D]
    v_sel = v_blocks[safe, :, kv_head, :].flatten(2, 3)
    key_pos = (safe[..., None] * block_size + torch.arange(block_size, device=k.device)).flatten(2)
    allowed = (indices >= 0).repeat_interleave(block_size, dim=-1) & (key_pos <= pos[:, None, None])
    scores = scale * torch.einsum("cgsd,cgkd->cgsk", qg, k_sel)
    probs, _ = _masked_softmax(scores, allowed[:, :, None, :])
    return torch.einsum("cgsk,cgkd->cgsd", probs, v_sel)


def _masked_softmax(scores: Tensor, allowed: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax over the last dim restricted to `allowed`; rows with nothing allowed give zeros and lse -inf.

    Written with a detached max shift instead of torch.logsumexp so that all-masked rows have finite
    gradients (zero) rather than NaN.
    """
    if scores.shape[-1] == 0:  # nothing to attend to at all, e.g. no complete block in a short sequence
        return scores.new_zeros(scores.shape), scores.new_full(scores.shape[:-1], -math.inf)
    scores = scores.masked_fill(~allowed, -math.inf)
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = torch.exp(scores - row_max)
    total = weights.sum(dim=-1, keepdim=True)
    probs = weights / total.clamp_min(torch.finfo(scores.dtype).tiny)
    lse = (row_max + torch.log(total)).squeeze(-1).detach()
    return probs, lse
