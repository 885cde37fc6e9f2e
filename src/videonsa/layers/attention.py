"""VideoNSA attention over a split batch: NSA on the packed vision streams, dense causal attention for text.

Nothing here knows Qwen: the model file computes q, k, v (rotary positions applied) and the gates, and hands
over a function that runs dense attention through the model's own backend. What each query attends to:
docs/layer.md.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right

from videonsa.errors import UserError
from videonsa.layers.split import TokenSplit
from videonsa.ops import NSAConfig, nsa_attention
from videonsa.ops.official import check_topk_settings
from videonsa.options import DEFAULT_GATE_TEMPERATURE

# "nsa": vision tokens through NSA, text dense (the corrected function); "dense": every token dense causal;
# "official": the function the original VideoNSA code computes, quirks included (docs/official-mode.md).
ATTENTION_MODES = ("nsa", "dense", "official")

# A forward of at most this many new tokens after a KV cache is a decoding step (one token per sample; a few
# for speculative decoding), whose SDPA calls leave cuDNN out (`decoding_sdpa`).
DECODING_QUERIES = 16

# Dense attention of gathered text queries: q [B, HQ, L, D], k/v [B, HKV, T, D], and the split, whose
# text_attention_mask (bool [B, 1, L, T], True = may attend) says what each query sees -> [B, L, HQ, D].
# The split rather than the mask travels so that an attend can use masks derived from it once per forward
# pass (grouped_text_attention_mask) instead of rebuilding them in every layer.
DenseAttend = Callable[[Tensor, Tensor, Tensor, TokenSplit], Tensor]


@dataclass(frozen=True)
class SparseSettings:
    """How the vision path runs: the NSA budget, the gate temperature and the attention mode.

    mode "nsa" sends vision tokens through NSA; "dense" runs every token dense and causal (Dense-NSA);
    "official" runs the original VideoNSA code's function (docs/official-mode.md), which reads block_size,
    block_count, window_size and gate_temperature but has no forced blocks (init_blocks / local_blocks unused).
    """

    block_size: int = NSAConfig.block_size
    block_count: int = NSAConfig.block_count
    window_size: int = NSAConfig.window_size
    init_blocks: int = NSAConfig.init_blocks
    local_blocks: int = NSAConfig.local_blocks
    gate_temperature: float = DEFAULT_GATE_TEMPERATURE
    mode: str = "nsa"

    def __post_init__(self) -> None:
        if self.mode not in ATTENTION_MODES:
            raise UserError(f"attention_mode must be one of {ATTENTION_MODES}, got {self.mode!r}")
        for name in ("block_size", "block_count", "window_size", "init_blocks", "local_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise UserError(f"{name} must be an integer, got {value!r}")
        if not isinstance(self.gate_temperature, (int, float)) or not self.gate_temperature > 0:
            raise UserError(f"gate_temperature must be a positive number, got {self.gate_temperature!r}")
        try:
            NSAConfig(self.block_size, self.block_count, self.window_size, self.init_blocks, self.local_blocks)
        except ValueError as error:
            raise UserError(str(error).removeprefix("nsa_attention: ")) from None
        if self.mode == "official":
            # The original top-k: block_size a power of two, next_power_of_two(block_count) <= block_size.
            try:
                check_topk_settings(self.block_count, self.block_size)
            except ValueError as error:
                raise UserError(f"attention_mode 'official': {str(error).removeprefix('official top-k: ')}") from None

    def nsa_kwargs(self) -> dict[str, int]:
        """The budget as keyword arguments of `videonsa.ops.nsa_attention`."""
        settings = asdict(self)
        del settings["gate_temperature"], settings["mode"]
        return settings


def vision_nsa_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gates: tuple[Tensor, Tensor, Tensor],
    split: TokenSplit,
    settings: SparseSettings,
    scale: float | None = None,
) -> Tensor:
    """NSA over each sample's vision stream, the streams packed with `split.cu_seqlens`.

    After P cached tokens (chunked prefill, `split.past` > 0) k and v hold all P + T tokens and each sample's
    vision queries are the last ones of its key stream (`split.keys`), which the operator takes as queries that
    end a longer key sequence (`cu_seqlens_k`): the same rows as one pass over the whole sequence.

    Args:
        q: [B, T, HQ, D]; k, v: [B, P + T, HKV, D] (rotary positions already applied).
        gates: (g_cmp, g_slc, g_swa), each [1, N, HQ], for the packed vision tokens.

    Returns:
        [1, N, HQ, D], the vision tokens' attention outputs in packed order.
    """
    # Under autocast the rotary embedding promotes q and k to float32 while v stays in the autocast dtype
    # (a linear's output); attention runs in v's dtype, as autocast's own SDPA would.
    dtype = v.dtype
    if not split.has_vision:  # a text-only chunk: no vision queries
        return q.new_zeros(1, 0, q.shape[2], v.shape[-1], dtype=dtype)
    q_vis = split.gather_vision(q).to(dtype)
    k_vis, v_vis = (split.key_split.gather_vision(x).to(dtype) for x in (k, v))
    g_cmp, g_slc, g_swa = (g.to(dtype) for g in gates)
    return nsa_attention(
        q_vis, k_vis, v_vis, g_cmp, g_slc, g_swa,
        cu_seqlens=split.cu_seqlens, cu_seqlens_k=split.cu_seqlens_k, scale=scale, **settings.nsa_kwargs(),
    )


def dense_text_attention(q: Tensor, k: Tensor, v: Tensor, split: TokenSplit, attend: DenseAttend) -> Tensor:
    """Dense causal attention of each sample's text queries over all earlier real tokens, vision and text.

    Args:
        q: [B, T, HQ, D]; k, v: [B, P + T, HKV, D] (P = `split.past`, the cached tokens before these T).
        attend: runs the attention (see `DenseAttend`); `sdpa_attend` is a plain-PyTorch choice.

    Returns:
        [B, L, HQ, D] for the text slots of `split` (invalid slots hold values to be discarded).
    """
    q_text = split.gather_text(q).transpose(1, 2)
    return attend(q_text, k.transpose(1, 2), v.transpose(1, 2), split)


def grouped_text_sdpa(
    q: Tensor, k: Tensor, v: Tensor, split: TokenSplit, scale: float | None = None, dropout_p: float = 0.0
) -> Tensor:
    """Text attention with GQA on torch's scaled_dot_product_attention, without repeating K and V.

    One unpadded sample with at most one vision run (the usual prompt) needs no mask: its text is a prefix,
    causal over itself, and a suffix, causal over all T keys aligned to the bottom right (`causal_text_sdpa`).
    Otherwise the G = HQ / HKV query heads of a KV group become G L query rows of one head (row g L + l is
    slot l of head j G + g, the head that reads KV head j), masked by `split.grouped_text_attention_mask(G)`.
    Both equal SDPA over K and V repeated to HQ heads with `split.text_attention_mask` (what transformers does
    when a mask is given), up to the kernels' float rounding, without writing two [B, HQ, T, D] copies per
    layer: few text queries, many keys.

    Args:
        q: [B, HQ, L, D] text queries; k, v: [B, HKV, P + T, D] (P = `split.past`).

    Returns:
        [B, L, HQ, D].
    """
    if split.unpadded and split.spans is not None and len(split.spans) == 1:
        return causal_text_sdpa(q, k, v, split.spans[0][0], scale=scale, dropout_p=dropout_p, past=split.past)
    batch, heads_q, width, dim = q.shape
    heads_kv = k.shape[1]
    if heads_q % heads_kv:
        raise ValueError(f"{heads_q} query heads do not split into groups of the {heads_kv} key/value heads")
    groups = heads_q // heads_kv
    folded = q.reshape(batch, heads_kv, groups * width, dim)
    out = F.scaled_dot_product_attention(
        folded, k, v, attn_mask=split.grouped_text_attention_mask(groups), dropout_p=dropout_p, scale=scale
    )
    return out.reshape(batch, heads_q, width, out.shape[-1]).transpose(1, 2)


@contextlib.contextmanager
def decoding_sdpa() -> Iterator[None]:
    """Within: SDPA's cuDNN backend is off, the others as they were; for decoding steps.

    cuDNN's SDPA builds an execution plan for every new shape of its inputs (tens to hundreds of milliseconds),
    and a decoding step's key length is new at every step: with cuDNN preferred (torch 2.11 on Hopper), each step
    would pay one build. Flash attention needs no plan and splits the keys over the GPU for a single query. A
    prefill keeps cuDNN (faster there, its plan paid once per prompt length). Nothing changes when cuDNN is off
    already, or when no other CUDA backend is on.
    """
    flags = torch.backends.cuda  # global switches, read on every device
    others = flags.flash_sdp_enabled() or flags.mem_efficient_sdp_enabled() or flags.math_sdp_enabled()
    if not flags.cudnn_sdp_enabled() or not others:
        yield
        return
    flags.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        flags.enable_cudnn_sdp(True)


def causal_text_sdpa(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    vision_start: int,
    scale: float | None = None,
    dropout_p: float = 0.0,
    past: int = 0,
) -> Tensor:
    """Text attention of unpadded samples whose vision tokens are one run starting at `vision_start` (0 for a
    chunk or decoding step without vision tokens: causal over every key).

    After `past` cached tokens (chunked prefill) positions count from the chunk's start and every query also sees
    the P cached keys: the masks below are aligned to the bottom right of the keys they cover.
    Text slots [0, vision_start) are positions 0 .. vision_start - 1 and see the keys up to their own; the other
    L - vision_start slots are the last positions of the sequence and see every key up to theirs, the causal
    mask aligned to the bottom right. Neither needs a mask tensor, so SDPA can take its flash kernel, whose
    split-KV variant spreads the many keys over the GPU: 0.42 ms for 128 queries x 131072 keys (28/4 heads,
    bf16, H100, torch 2.11) against 3.0 ms for cuDNN's masked kernel with the folded mask.

    Args:
        q: [B, HQ, L, D] text queries; k, v: [B, HKV, P + T, D] (B > 1: unpadded samples of one layout).

    Returns:
        [B, L, HQ, D].
    """
    device_type = q.device.type
    if torch.is_autocast_enabled(device_type):
        # The bottom-right causal bias picks its kernel before autocast would cast the inputs (under autocast
        # q and k arrive in float32 from the rotary embedding): cast them as autocast's SDPA would.
        dtype = torch.get_autocast_dtype(device_type)
        q, k, v = (x.to(dtype) for x in (q, k, v))
    seq_len, width = k.shape[2], q.shape[2]
    parts = []
    if vision_start:
        # Without a past (keys == queries) the bottom-right bias is SDPA's plain is_causal=True call.
        keys = past + vision_start
        parts.append(F.scaled_dot_product_attention(
            q[:, :, :vision_start], k[:, :, :keys], v[:, :, :keys],
            attn_mask=causal_lower_right(vision_start, keys), dropout_p=dropout_p, scale=scale, enable_gqa=True,
        ))
    if width > vision_start:
        parts.append(F.scaled_dot_product_attention(
            q[:, :, vision_start:], k, v, attn_mask=causal_lower_right(width - vision_start, seq_len),
            dropout_p=dropout_p, scale=scale, enable_gqa=True,
        ))
    if not parts:  # every token is vision: no text queries
        return q.new_zeros(q.shape[0], 0, q.shape[1], v.shape[-1])
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
    return out.transpose(1, 2)


def sdpa_attend(scale: float | None = None) -> DenseAttend:
    """A `DenseAttend` on torch's scaled_dot_product_attention (`grouped_text_sdpa`, no dropout)."""

    def attend(q: Tensor, k: Tensor, v: Tensor, split: TokenSplit) -> Tensor:
        return grouped_text_sdpa(q, k, v, split, scale=scale)

    return attend


def videonsa_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gates: tuple[Tensor, Tensor, Tensor],
    split: TokenSplit,
    settings: SparseSettings,
    attend: DenseAttend,
    scale: float | None = None,
) -> Tensor:
    """The VideoNSA attention of a split batch: vision queries through NSA over their own stream, text queries
    dense and causal over everything before them, outputs merged back in place.

    Args:
        q: [B, T, HQ, D]; k, v: [B, P + T, HKV, D] (rotary positions already applied; P = `split.past`, the
            tokens already in the KV cache, 0 in one pass).
        gates: (g_cmp, g_slc, g_swa), each [1, N, HQ], for the packed vision tokens of `split`.

    Returns:
        [B, T, HQ, D].
    """
    if split.shape != tuple(q.shape[:2]):
        raise ValueError(f"token split is for {split.shape} tokens but q is {tuple(q.shape)}")
    if k.shape[1] != split.past + q.shape[1]:
        raise ValueError(f"token split follows {split.past} cached tokens but k holds {k.shape[1]} for {q.shape[1]}")
    vision_out = vision_nsa_attention(q, k, v, gates, split, settings, scale)
    text_out = dense_text_attention(q, k, v, split, attend)
    return split.merge(vision_out, text_out)

