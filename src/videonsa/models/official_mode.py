"""The model side of attention_mode "official" (docs/official-mode.md): which tokens the original VideoNSA code
treats as vision, its gate logits, and the inputs on which its function is defined.

The original code does not read the placeholder token ids: a token is vision unless its three M-RoPE position ids
(temporal, height, width) are equal. Text tokens get equal ids, so does a decoding step; a video token at temporal
group g, row r, column c gets (start + g * interval, start + r, start + c), so the few video tokens whose ids happen
to be equal (r == c == g * interval, always including the first one) count as text too. Position ids that are
missing or one row (plain 1-D positions) make every token text.

The function is defined for what the original evaluation ran: one unpadded sample per batch, a prefill that
holds the whole video with an empty KV cache, no training. Anything else is refused with a `UserError`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from videonsa.errors import UserError

# The original pads the query heads to this many, [q, q, zeros], to fit its kernels.
PADDED_HEADS = 64


def rotary_position_rows(position_ids: Tensor | None) -> Tensor | None:
    """The M-RoPE ids that Qwen2.5-VL's text model hands to its rotary embedding, from the `position_ids` the
    text model receives.

    transformers 5.17 and 5.25 treat them alike: [4, B, T] (what `generate` builds: row 0 the 1-D text positions
    for the attention mask, rows 1-3 temporal/height/width) -> rows 1-3; [3, B, T] (what `get_rope_index`
    returns) -> as given; [1, B, T] (decoding steps of `generate` in 5.25) and [B, T] -> broadcast to three
    equal rows; None -> arange positions, three equal rows. Returns [3, B, T], or None where the three rows are
    equal by construction (every token text).
    """
    if position_ids is None or position_ids.dim() != 3:
        return None
    rows = position_ids[1:] if position_ids.shape[0] == 4 else position_ids
    return rows if rows.shape[0] == 3 else None


def vision_from_positions(position_ids: Tensor | None, batch: int, seq_len: int, device: torch.device) -> Tensor:
    """The original code's vision/text classification of a chunk: bool [B, T], True = vision.

    A token is text iff its temporal, height and width ids are equal (see the module docstring), so this is the
    classification of exactly the ids that rotate q and k. position_ids: what the text model receives (see
    `rotary_position_rows`).
    """
    rows = rotary_position_rows(position_ids)
    if rows is None:
        return torch.zeros(batch, seq_len, dtype=torch.bool, device=device)
    temporal, height, width = rows.to(device)
    return ~((temporal == height) & (height == width)).expand(batch, seq_len)


@dataclass(frozen=True)
class OfficialTokens:
    """The token types of one forward pass in official mode, found once by the text model for all its layers.

    is_vision: bool [B, T] (`vision_from_positions`); has_vision: whether any token is vision (read once, so
    the layers need not ask the device again).
    """

    is_vision: Tensor
    has_vision: bool


def classify_tokens(
    position_ids: Tensor | None, attention_mask: Tensor | None, batch: int, seq_len: int, device: torch.device
) -> OfficialTokens:
    """The token types of a forward pass (see `vision_from_positions`); refuses a padded batch with vision
    tokens (`refuse_padding`). A chunk without vision runs the stock dense attention, padded or not."""
    is_vision = vision_from_positions(position_ids, batch, seq_len, device)
    has_vision = bool(is_vision.any())
    if has_vision:
        refuse_padding(attention_mask)
    return OfficialTokens(is_vision, has_vision)


def official_gate_logits(x: Tensor, proj_1: nn.Linear, proj_2: nn.Linear, num_heads: int) -> Tensor:
    """The gate MLP's logits before the temperature: x [B, T, hidden] -> [B, T, HQ, 3] (cmp, slc, swa)."""
    return proj_2(F.gelu(proj_1(x))).unflatten(-1, (num_heads, 3))


def check_official_heads(num_heads: int, num_kv_heads: int) -> None:
    """The original pads HQ query heads to 64 as [q, q, zeros] and groups them by 64 / HKV: it needs
    2 HQ <= 64 and HKV dividing 64 (Qwen2.5-VL-7B: 28 and 4)."""
    if 2 * num_heads > PADDED_HEADS or PADDED_HEADS % num_kv_heads:
        raise UserError(
            f"attention_mode 'official' needs 2 * num_attention_heads <= {PADDED_HEADS} and num_key_value_heads "
            f"dividing {PADDED_HEADS} (the original pads the heads to {PADDED_HEADS}); this model has "
            f"{num_heads} and {num_kv_heads}"
        )


def refuse_training(module: nn.Module) -> None:
    """Official mode reproduces an inference function: refuse a forward pass that would train through it."""
    if module.training and torch.is_grad_enabled():
        raise UserError(
            "attention_mode 'official' reproduces the original code's inference function and cannot be trained: "
            "train with attention_mode 'nsa' (or 'dense'), or run inference under model.eval() / torch.no_grad()"
        )


def refuse_padding(attention_mask: Tensor | None) -> None:
    """The original evaluation ran one sample per batch, never padded: refuse a [B, T] mask with zeros."""
    if isinstance(attention_mask, Tensor) and attention_mask.dim() == 2 and not bool(attention_mask.bool().all()):
        raise UserError(
            "attention_mode 'official' takes no padded batches (the original evaluation ran one sample per batch): "
            "the attention_mask has padding; run the samples one at a time, or use attention_mode 'nsa'"
        )


def refuse_cached_vision(cached_tokens: int) -> None:
    """Vision tokens after a non-empty KV cache break the original function (it masks keys with the chunk's
    types); refuse them with a clear message rather than the original's shape error."""
    if cached_tokens:
        raise UserError(
            f"vision tokens arrived while the KV cache already holds {cached_tokens} tokens; attention_mode "
            "'official' needs all of a conversation's images and videos in its first forward pass (start a new "
            "cache and pass the whole conversation)"
        )
