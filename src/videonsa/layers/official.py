"""`official_attention`: the attention function the released VideoNSA checkpoint was evaluated with.

docs/official-mode.md describes the function step by step and how it differs from our `nsa` mode. In short, for
a mixed text/vision batch: q, k, v are zeroed at text positions, the query heads are padded to 64 ([q, q, 0]),
NSA runs over the whole sequence (anti-causal compression, the original top-k with its quirks, selection,
sliding window), the two head copies are averaged, and a dense causal attention of the text queries (zero at
vision positions, so a causal mean of v there) is added. Gates are sigmoid(logits / temperature), 0.5 at text.

Two implementations share this entry point: the plain-PyTorch blocks of `videonsa.ops.official` (any device and
dtype, float64 in float64; `padded_nsa`, `dense_text_part`) and, on CUDA, Triton kernels for every NSA branch
(`fast_official`): the compression kernel writes the gated compression output, which starts the gated sum, and
the selection and window kernels add their gated outputs into it in place. Inference only: nothing here is
differentiable by design.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from videonsa.ops.config import NSAConfig
from videonsa.ops.official import (
    PADDED_HEADS,
    anticausal_compression,
    causal_mean,
    check_topk_settings,
    dense_causal_attention_reference,
    mean_pool_blocks,
    original_topk_reference,
    selected_attention_reference,
    window_attention_reference,
)
from videonsa.options import DEFAULT_GATE_TEMPERATURE

if TYPE_CHECKING:
    from videonsa.ops.triton.official_compression import CompressionLaunch

BACKENDS = ("auto", "triton", "reference")
# What the Triton path computes in; float64 (and anything else) runs the reference.
FAST_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Elements of the boolean mask one dense text-attention call may build.
_TEXT_MASK_ELEMENTS = 1 << 26
# `FastPathSettings.selection_layout` -> the selection kernel's `by_block` switch.
SELECTION_LAYOUTS = {"auto": None, "by-block": True, "tiles": False}


@dataclass(frozen=True)
class FastPathSettings:
    """Tuning of the CUDA path; the result does not depend on it beyond float32 rounding.

    compression: launch settings of the compression kernel (None: its measured default).
    selection_layout: the selection kernel's work layout: "auto" (its planner's choice from the selected blocks),
        "by-block" (one program per key block and KV group) or "tiles" (one program per query tile and group).
    selection_tile_rows: with "tiles", the matrix rows per program (tokens x the 16 heads of a group: 16 is one
        token, 64 four); None lets the planner pick the height.
    """

    compression: CompressionLaunch | None = None
    selection_layout: str = "auto"
    selection_tile_rows: int | None = None

    def __post_init__(self) -> None:
        if self.selection_layout not in SELECTION_LAYOUTS:
            raise ValueError(f"FastPathSettings.selection_layout must be one of {tuple(SELECTION_LAYOUTS)}, got "
                             f"{self.selection_layout!r}")
        rows = self.selection_tile_rows
        if rows is not None and (self.selection_layout != "tiles" or rows < 16 or rows & (rows - 1)):
            raise ValueError(f"FastPathSettings.selection_tile_rows must be a power of two >= 16 and goes with "
                             f"selection_layout='tiles', got {rows} with {self.selection_layout!r}")

    def selection_switches(self) -> dict:
        """The keyword arguments of `selected_attention_fwd` that choose its layout."""
        if self.selection_tile_rows is not None:
            return {"tile_rows": self.selection_tile_rows}
        return {"by_block": SELECTION_LAYOUTS[self.selection_layout]}


DEFAULT_FAST_SETTINGS = FastPathSettings()


def official_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    is_vision: Tensor,
    gate_logits: Tensor,
    *,
    block_size: int = NSAConfig.block_size,
    block_counts: int = NSAConfig.block_count,
    window_size: int = NSAConfig.window_size,
    scale: float | None = None,
    gate_temperature: float = DEFAULT_GATE_TEMPERATURE,
    backend: str | None = None,
    fast_settings: FastPathSettings | None = None,
) -> Tensor:
    """The original VideoNSA prefill attention (see docs/official-mode.md).

    Args:
        q: [B, T, HQ, D]; k, v: [B, T, HKV, D], rotary positions applied. Needs 2 * HQ <= 64 and 64 % HKV == 0.
        is_vision: bool [B, T], True at vision tokens.
        gate_logits: [B, T, HQ, 3] gate projections before the temperature, branches (compression, selection,
            window) along the last axis; used in q's dtype.
        block_size, block_counts, window_size: the original's budget (default VideoNSA's, `NSAConfig`'s: 64, 32,
            256); block_size must be a power of two and next_power_of_two(block_counts) <= block_size.
        scale: softmax scale, default D ** -0.5.
        gate_temperature: logits are divided by it before the sigmoid (VideoNSA's 0.3 by default).
        backend: "auto" (Triton kernels for CUDA bf16/fp16/fp32 tensors, the PyTorch blocks otherwise), "triton"
            or "reference".
        fast_settings: tuning of the Triton path (`FastPathSettings`; default `DEFAULT_FAST_SETTINGS`).

    Returns:
        [B, T, HQ, D] in q's dtype: what the original feeds (flattened to [B, T, HQ * D]) to o_proj. A batch
        without vision tokens gets plain dense causal attention, an all-vision batch the NSA part alone with
        sigmoid gates everywhere (neither with the original's scrambled output layout).
    """
    _check_inputs(q, k, v, is_vision, gate_logits, block_size, block_counts, window_size, gate_temperature)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    fast = _use_fast_path(backend, q, block_size)
    budget = dict(block_size=block_size, block_counts=block_counts, window_size=window_size, scale=scale)
    gate_logits = gate_logits.to(q.dtype)
    if not bool(is_vision.any()):
        return dense_causal_attention(q, k, v, scale)
    if fast:
        return fast_official(q, k, v, is_vision, gate_logits, mixed=not bool(is_vision.all()),
                             gate_temperature=gate_temperature, settings=fast_settings or DEFAULT_FAST_SETTINGS,
                             **budget)
    if bool(is_vision.all()):
        gates = (gate_logits / gate_temperature).sigmoid()
        return padded_nsa(q, k, v, gates, **budget)
    # Mixed batch: text positions are zeroed (not removed) for NSA and get gate logits 0, i.e. gates 0.5.
    vision = is_vision[:, :, None, None]
    gates = ((gate_logits / gate_temperature) * vision).sigmoid()
    nsa = padded_nsa(q * vision, k * vision, v * vision, gates, **budget)
    return nsa + dense_text_part(q, k, v, is_vision, scale)


def _check_inputs(
    q: Tensor, k: Tensor, v: Tensor, is_vision: Tensor, gate_logits: Tensor,
    block_size: int, block_counts: int, window_size: int, gate_temperature: float,
) -> None:
    if q.dim() != 4:
        raise ValueError(f"official_attention: q must be [B, T, HQ, D], got shape {tuple(q.shape)}")
    batch, seq_len, heads_q, dim = q.shape
    for name, x in (("k", k), ("v", v)):
        if x.dim() != 4 or x.shape[:2] != q.shape[:2] or x.shape[3] != dim:
            raise ValueError(
                f"official_attention: {name} must be [B={batch}, T={seq_len}, HKV, D={dim}], got {tuple(x.shape)}"
            )
    if k.shape != v.shape:
        raise ValueError(f"official_attention: k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    heads_kv = k.shape[2]
    if heads_kv == 0 or heads_q % heads_kv:
        raise ValueError(f"official_attention: HQ={heads_q} is not a multiple of HKV={heads_kv}")
    if 2 * heads_q > PADDED_HEADS or PADDED_HEADS % heads_kv:
        raise ValueError(
            f"official_attention: the original pads the query heads to {PADDED_HEADS} as [q, q, zeros], which "
            f"needs 2 * HQ <= {PADDED_HEADS} and {PADDED_HEADS} % HKV == 0; got q {tuple(q.shape)}, k "
            f"{tuple(k.shape)}"
        )
    if tuple(is_vision.shape) != (batch, seq_len) or is_vision.dtype != torch.bool:
        raise ValueError(
            f"official_attention: is_vision must be bool [B, T] = [{batch}, {seq_len}], got {is_vision.dtype} "
            f"{tuple(is_vision.shape)}"
        )
    if tuple(gate_logits.shape) != (batch, seq_len, heads_q, 3):
        raise ValueError(
            f"official_attention: gate_logits must be [B, T, HQ, 3] = [{batch}, {seq_len}, {heads_q}, 3], got "
            f"{tuple(gate_logits.shape)}"
        )
    if not q.dtype.is_floating_point or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"official_attention: q, k, v must share a floating dtype, got {q.dtype}, {k.dtype}, "
                         f"{v.dtype}")
    for name, x in (("k", k), ("v", v), ("is_vision", is_vision), ("gate_logits", gate_logits)):
        if x.device != q.device:
            raise ValueError(f"official_attention: {name} is on {x.device} but q is on {q.device}")
    check_topk_settings(block_counts, block_size)
    if window_size < 1:
        raise ValueError(f"official_attention: window_size must be positive, got {window_size}")
    if not gate_temperature > 0:
        raise ValueError(f"official_attention: gate_temperature must be positive, got {gate_temperature}")


def _use_fast_path(backend: str | None, q: Tensor, block_size: int) -> bool:
    backend = backend or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"official_attention: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return False
    supported = q.dtype in FAST_DTYPES and block_size >= 16
    if backend == "triton":
        if not supported:
            raise ValueError(
                f"official_attention: the Triton path needs bf16/fp16/fp32 and block_size >= 16, got {q.dtype}, "
                f"block_size={block_size}"
            )
        return True
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    return supported and (q.is_cuda or interpret) and _triton_available()


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# ----------------------------------------------------------------------------------------------------------
# The NSA part over padded heads


def pad_heads(x: Tensor) -> Tensor:
    """[B, T, HQ, ...] -> [B, T, 64, ...]: heads [x, x, zeros], as the original pads queries and gates."""
    heads = x.shape[2]
    padded = x.new_zeros(*x.shape[:2], PADDED_HEADS, *x.shape[3:])
    padded[:, :, :heads] = x
    padded[:, :, heads : 2 * heads] = x
    return padded


def padded_nsa(
    q: Tensor, k: Tensor, v: Tensor, gates: Tensor, *,
    block_size: int, block_counts: int, window_size: int, scale: float,
) -> Tensor:
    """The NSA part: padded heads, three branches, gated sum, the two head copies averaged.

    Args:
        q: [B, T, HQ, D]; k, v: [B, T, HKV, D] (already zeroed at text positions in the mixed path).
        gates: [B, T, HQ, 3] in q's dtype, after the sigmoid.

    Returns:
        [B, T, HQ, D]: (o64[j] + o64[j + HQ]) * 0.5, rounded in q's dtype after each operation like the original.
    """
    heads = q.shape[2]
    q64 = pad_heads(q)
    k_cmp, v_cmp = mean_pool_blocks(k, block_size), mean_pool_blocks(v, block_size)
    # Padded heads 2 HQ .. 63 have zero gates and are dropped by the copy average: only 0 .. 2 HQ - 1 are summed.
    # One branch output is alive at a time; each sum is rounded in q's dtype, as the original's (a + b) + c.
    o64 = None
    outputs = reference_branches(q64, k, v, k_cmp, v_cmp, block_size, block_counts, window_size, scale)
    for out, gate in zip(outputs, gates.unbind(-1), strict=True):
        term = out[:, :, : 2 * heads] * torch.cat([gate, gate], dim=2)[..., None]
        del out
        o64 = term if o64 is None else o64.add_(term)
    return (o64[:, :, :heads] + o64[:, :, heads:]) * 0.5


def reference_branches(
    q64: Tensor, k: Tensor, v: Tensor, k_cmp: Tensor, v_cmp: Tensor,
    block_size: int, block_counts: int, window_size: int, scale: float,
) -> Iterator[Tensor]:
    """Yields the compression, selection and window outputs [B, T, 64, D] of the PyTorch blocks, in that order.

    q64: [B, T, 64, D]; k, v: [B, T, HKV, D]; k_cmp, v_cmp: [B, NB, HKV, D].
    """
    compressed = anticausal_compression(q64, k_cmp, v_cmp, block_size, scale)
    lse = compressed[1]
    yield compressed[0]
    del compressed
    indices = original_topk_reference(q64, k_cmp, lse, block_counts, block_size, scale)
    yield selected_attention_reference(q64, k, v, indices, block_size, scale)
    yield window_attention_reference(q64, k, v, window_size, scale)


# ----------------------------------------------------------------------------------------------------------
# Dense parts


def dense_causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Plain causal attention, GQA j -> j // (HQ / HKV): q [B, T, HQ, D], k/v [B, T, HKV, D] -> [B, T, HQ, D]."""
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale, enable_gqa=True
    )
    return out.transpose(1, 2)


def dense_text_part(q: Tensor, k: Tensor, v: Tensor, is_vision: Tensor, scale: float) -> Tensor:
    """The dense term the mixed path adds: causal attention of the text queries over every earlier key, text and
    vision, unmasked; at vision positions the query is zero, which gives the causal mean of v.

    Returns [B, T, HQ, D] in q's dtype.
    """
    batch, seq_len, heads, dim = q.shape
    group = heads // k.shape[2]
    out = causal_mean(v).repeat_interleave(group, dim=2)
    for b in range(batch):
        positions = torch.nonzero(~is_vision[b]).squeeze(1)
        if positions.numel() == 0:
            continue
        out[b, positions] = dense_causal_attention_reference(q[b, positions], positions, k[b], v[b], scale)
    return out


def _text_attention_sdpa(q: Tensor, positions: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Causal attention of the few text queries q [L, HQ, D] at `positions` over k, v [T, HKV, D] on SDPA.

    The G = HQ / HKV query heads of a KV head are folded into G * L rows of that head, so no key is repeated
    and one boolean mask row per (query, head) says which keys it sees. Chunked so the mask stays small.
    """
    count, heads, dim = q.shape
    heads_kv = k.shape[1]
    group = heads // heads_kv
    seq_len = int(positions.max()) + 1
    keys, values = k[:seq_len].transpose(0, 1)[None], v[:seq_len].transpose(0, 1)[None]  # [1, HKV, S, D]
    key_pos = torch.arange(seq_len, device=q.device)
    chunk = max(1, _TEXT_MASK_ELEMENTS // (group * seq_len))
    pieces = []
    for start in range(0, count, chunk):
        end = min(count, start + chunk)
        rows = q[start:end].view(end - start, heads_kv, group, dim).permute(1, 2, 0, 3)  # [HKV, G, L, D]
        rows = rows.reshape(1, heads_kv, group * (end - start), dim)
        mask = (key_pos[None, :] <= positions[start:end, None]).repeat(group, 1)  # row g * L + l
        out = F.scaled_dot_product_attention(rows, keys, values, attn_mask=mask[None, None], scale=scale)
        out = out.view(heads_kv, group, end - start, dim).permute(2, 0, 1, 3).reshape(end - start, heads, dim)
        pieces.append(out)
    return torch.cat(pieces)




# ----------------------------------------------------------------------------------------------------------
# The fast path (CUDA; also runs under TRITON_INTERPRET=1 on a CPU, which is how the tests check it)


def fast_official(
    q: Tensor, k: Tensor, v: Tensor, is_vision: Tensor, gate_logits: Tensor, *, mixed: bool,
    block_size: int, block_counts: int, window_size: int, scale: float, gate_temperature: float,
    settings: FastPathSettings = DEFAULT_FAST_SETTINGS,
) -> Tensor:
    """`official_attention` for a batch with vision tokens on the Triton kernels.

    mixed: True for the mixed path (text masked, dense part added), False for an all-vision batch (pure NSA).
    Other arguments as in `official_attention` (checked there). Returns [B, T, HQ, D] in q's dtype.

    Passes over the big [B, T, 64, D] tensors: one to build the padded queries, one per branch kernel (the
    compression writes the start of the gated sum, selection and window add into it), one for the copy average.
    """
    heads = q.shape[2]
    prepared = prepare_fast_inputs(q, k, v, is_vision if mixed else None, gate_logits, gate_temperature, block_size)
    o64 = gated_branch_sum(*prepared, block_size=block_size, block_counts=block_counts, window_size=window_size,
                           scale=scale, settings=settings)
    nsa_sum = o64[:, :, :heads] + o64[:, :, heads : 2 * heads]  # the original's in-place o[:HQ] += o[HQ:2HQ]
    del o64
    if not mixed:
        return nsa_sum.mul_(0.5)
    return add_dense_text_part(nsa_sum, q, k, v, is_vision, scale)


def prepare_fast_inputs(
    q: Tensor, k: Tensor, v: Tensor, is_vision: Tensor | None, gate_logits: Tensor, gate_temperature: float,
    block_size: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Everything the branch kernels read: (q64, k, v, gates64, k_cmp, v_cmp).

    q [B, T, HQ, D], k, v [B, T, HKV, D], gate_logits [B, T, HQ, 3] in q's dtype; is_vision bool [B, T] for the
    mixed path (text positions zeroed, gate logits there 0), None for an all-vision batch.

    Returns q64 [B, T, 64, D] (heads [q, q, 0], written in one pass), k, v (masked), gates64 [3, B * T, 64] in
    q's dtype (branch, token, padded head; zero for heads 2 HQ .. 63), k_cmp, v_cmp [B, NB, HKV, D].
    """
    batch, seq_len, heads, dim = q.shape
    logits = gate_logits / gate_temperature
    q64 = q.new_empty(batch, seq_len, PADDED_HEADS, dim)
    q64[:, :, 2 * heads :].zero_()
    copies = q64[:, :, : 2 * heads].unflatten(2, (2, heads))
    two_q = q.unsqueeze(2).expand(-1, -1, 2, -1, -1)
    if is_vision is None:
        copies.copy_(two_q)
    else:
        vision = is_vision[:, :, None, None]
        torch.mul(two_q, vision.unsqueeze(2), out=copies)  # q * vision as the original masks (NaN stays NaN)
        k, v, logits = k * vision, v * vision, logits * vision
    gates64 = q.new_zeros(3, batch, seq_len, PADDED_HEADS)
    gates64[..., : 2 * heads].unflatten(-1, (2, heads)).copy_(logits.sigmoid().permute(3, 0, 1, 2).unsqueeze(3))
    k_cmp, v_cmp = mean_pool_blocks(k, block_size), mean_pool_blocks(v, block_size)
    return q64, k, v, gates64.view(3, batch * seq_len, PADDED_HEADS), k_cmp, v_cmp


def gated_branch_sum(
    q64: Tensor, k: Tensor, v: Tensor, gates64: Tensor, k_cmp: Tensor, v_cmp: Tensor, *,
    block_size: int, block_counts: int, window_size: int, scale: float,
    settings: FastPathSettings = DEFAULT_FAST_SETTINGS,
) -> Tensor:
    """o64 = o_cmp * g_cmp + o_slc * g_slc + o_swa * g_swa over the 64 padded heads: [B, T, 64, D] in q's dtype.

    Inputs as `prepare_fast_inputs` returns them. The compression kernel stores round(round(o_cmp) * g_cmp) (the
    original's product, bit for bit); the selection and window kernels then add their gated outputs into that
    buffer in place, each sum formed in float32 and rounded once (docs/official-mode.md, section 7). The batch is
    packed as B sequences of T tokens for the selection and window kernels, which run on all 64 heads (the 8
    zero heads cost one eighth more rows but keep the group of 16 heads per KV head).
    """
    from videonsa.ops.triton.official_compression import DEFAULT_LAUNCH, anticausal_compression_triton
    from videonsa.ops.triton.selection import selected_attention_fwd
    from videonsa.ops.triton.window import window_attention_fwd

    batch, seq_len = q64.shape[:2]
    g_cmp, g_slc, g_swa = gates64.unbind(0)
    o64, lse = anticausal_compression_triton(q64, k_cmp, v_cmp, block_size, scale, gate=g_cmp.view(q64.shape[:3]),
                                             launch=settings.compression or DEFAULT_LAUNCH)
    indices = _topk_implementation()(q64, k_cmp, lse, block_counts, block_size, scale)
    del lse
    packed = lambda x: x.reshape(batch * seq_len, *x.shape[2:])  # noqa: E731
    cu_seqlens = torch.arange(0, (batch + 1) * seq_len, seq_len, dtype=torch.int32, device=q64.device)
    # The original's selection is one softmax over the union of the listed blocks, so their order is free;
    # the kernel wants them ascending with the empty slots last.
    ids = ascending_block_ids(packed(indices))
    del indices
    q_p, k_p, v_p, o_p = packed(q64), packed(k), packed(v), packed(o64)
    # The original's selection scores round(q * scale) . k (q * scale rounded to the input dtype), the kernel
    # scores fp32(q . k) * scale: hand it the rounded product and a scale of 1.
    q_scaled = q_p * scale
    selected_attention_fwd(q_scaled, k_p, v_p, ids, cu_seqlens, block_size, 1.0, fold_into=o_p, fold_scale=g_slc,
                           **settings.selection_switches())
    del ids, q_scaled
    window_attention_fwd(q_p, k_p, v_p, cu_seqlens, window_size, scale, fold_into=o_p, gate=g_swa)
    return o64


def add_dense_text_part(nsa_sum: Tensor, q: Tensor, k: Tensor, v: Tensor, is_vision: Tensor, scale: float) -> Tensor:
    """nsa_sum * 0.5 + the dense text part (`dense_text_part`), in place in nsa_sum [B, T, HQ, D].

    The causal mean of v is added to every position in one pass without repeating it over the query heads; the
    few text positions are then recomputed with their attention on SDPA. Rounding as the original: the halving
    is exact, the addition rounded once.
    """
    batch, seq_len, heads, dim = q.shape
    heads_kv = k.shape[2]
    text = [torch.nonzero(~is_vision[b]).squeeze(1) for b in range(batch)]
    halves = [nsa_sum[b, positions] * 0.5 for b, positions in enumerate(text)]
    grouped = nsa_sum.view(batch, seq_len, heads_kv, heads // heads_kv, dim)
    torch.add(causal_mean(v).unsqueeze(3), grouped, alpha=0.5, out=grouped)
    for b, (positions, half) in enumerate(zip(text, halves, strict=True)):
        if positions.numel():
            nsa_sum[b, positions] = half + _text_attention_sdpa(q[b, positions], positions, k[b], v[b], scale)
    return nsa_sum


@cache
def _topk_implementation() -> Callable[..., Tensor]:
    """The Triton version of the original top-k when its module exists, else the PyTorch emulation."""
    try:
        from videonsa.ops.triton.official_topk import original_topk_triton
    except ModuleNotFoundError as error:
        if error.name != "videonsa.ops.triton.official_topk":
            raise
        return original_topk_reference
    return original_topk_triton


def ascending_block_ids(indices: Tensor) -> Tensor:
    """int [..., S] block ids with -1 for empty slots -> int32, each row ascending with the -1 entries last."""
    largest = torch.iinfo(torch.int32).max
    keyed = torch.where(indices < 0, largest, indices.to(torch.int32))
    ordered = keyed.sort(dim=-1).values
    return torch.where(ordered == largest, -1, ordered).contiguous()
