"""Chunked prefill: the prompt goes through the model a chunk of tokens at a time, with the KV cache.

A one-pass prefill runs every layer over the whole prompt at once, so its activations grow with the prompt and a
7B prefill past ~128K tokens does not fit on one 80 GB GPU. Here the vision tower runs over the frames a few
temporal patches at a time, and the language model over `chunk_size` tokens at a time: each chunk's keys and values
join the cache, and its queries read the whole cache (text queries densely, vision queries through NSA over their
vision stream rebuilt from the cache, `layers/split.py`), so the result equals the one-pass prefill. Peak memory is
then the cache plus one chunk's activations. What it computes and the memory model: docs/long-videos.md.

`VideoNSAForConditionalGeneration.forward` calls `chunked_forward` when chunking is on (`prefill_in_chunks`) and
its input is a prefill longer than one chunk, so `generate()` (sampling, streaming, stopping) is unchanged.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen

from videonsa.errors import UserError

# Progress of a chunked prefill: (stage, done, total): stage "vision" counts the vision tokens the tower has
# produced (of all the prompt's), "text" the prompt tokens the language model has taken in (of the prompt's).
ChunkCallback = Callable[[str, int, int], None]

# The keyword of the KV cache in Qwen2.5-VL's forward: "cache" in newer transformers 5.x, "past_key_values" before.
CACHE_KWARG = "cache" if "cache" in inspect.signature(qwen.Qwen2_5_VLModel.forward).parameters else "past_key_values"


@dataclass(frozen=True)
class PrefillChunking:
    """Chunked prefill settings: `chunk_size` tokens per language-model forward (the vision tower's pieces hold
    about as many output tokens); `on_step` hears the progress."""

    chunk_size: int
    on_step: ChunkCallback | None = None

    def __post_init__(self) -> None:
        if isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise UserError(f"prefill_chunk_size must be a positive integer, got {self.chunk_size!r}")


@contextlib.contextmanager
def prefill_in_chunks(model: Any, chunk_size: int | None, on_step: ChunkCallback | None = None) -> Iterator[None]:
    """Within the block, `model`'s prefills longer than `chunk_size` tokens run in chunks (None: one pass).

    Refused in attention_mode 'official', whose original computes the prefill in one pass.
    """
    if chunk_size is None:
        yield
        return
    chunking = PrefillChunking(chunk_size, on_step)
    refuse_official(model)
    previous = model.prefill_chunking
    model.prefill_chunking = chunking
    try:
        yield
    finally:
        model.prefill_chunking = previous


def refuse_official(model: Any) -> None:
    """UserError when `model` runs attention_mode 'official' (its original prefills in one pass)."""
    if model.sparse_settings.mode == "official":
        raise UserError(
            "prefill_chunk_size: attention_mode 'official' prefills in one pass, as the original code does; "
            "use attention_mode 'nsa' or 'dense' for a chunked prefill"
        )


def wants_chunks(chunking: PrefillChunking | None, named: dict[str, Any]) -> bool:
    """Whether a forward with these arguments is a prefill that chunking applies to: input_ids given (not
    embeddings), an empty or absent cache, more tokens than one chunk."""
    if chunking is None or named.get("input_ids") is None or named.get("inputs_embeds") is not None:
        return False
    cache = named.get("cache", named.get("past_key_values"))
    if cache is not None and cache.get_seq_length() > 0:
        return False
    return named["input_ids"].shape[1] > chunking.chunk_size


def chunked_forward(model: Any, named: dict[str, Any], chunking: PrefillChunking, one_pass: Callable) -> Any:
    """A prefill of `model` (VideoNSAForConditionalGeneration) in chunks; `named` holds the arguments of its
    forward. Returns what the one-pass forward returns (same output class, the filled cache), with the logits of
    the positions `logits_to_keep` asks for (all positions when 0, built chunk by chunk).

    `one_pass` is the stock forward, which runs the last chunk so that the output is transformers' own.
    """
    refuse_official(model)
    if named.get("labels") is not None:
        raise UserError("prefill_chunk_size is for inference: a forward with labels runs in one pass")
    input_ids: Tensor = named["input_ids"]
    batch, seq_len = input_ids.shape
    cache = named.get("cache", named.get("past_key_values"))
    if cache is None:
        cache = DynamicCache(config=model.config.text_config)
    attention_mask = named.get("attention_mask")
    types = named.get("mm_token_type_ids")
    if types is None:
        types = placeholder_types(input_ids, model.config)
    position_ids = _prompt_positions(model, named, types)
    features = _vision_features(model, named, input_ids, chunking)
    keep = named.get("logits_to_keep", 0)
    chunk = chunking.chunk_size
    earlier_logits = []
    for start in range(0, seq_len, chunk):
        end = min(start + chunk, seq_len)
        step = {
            "inputs_embeds": _chunk_embeddings(model, input_ids, features, start, end),
            "attention_mask": None if attention_mask is None else attention_mask[:, :end],
            "position_ids": position_ids[..., start:end],
            "mm_token_type_ids": types[:, start:end],
            CACHE_KWARG: cache,
            "use_cache": True,
        }
        if end == seq_len:
            output = one_pass(**step, logits_to_keep=keep if isinstance(keep, int) and keep else 0)
            if isinstance(keep, int) and keep == 0 and earlier_logits:
                output.logits = torch.cat([*earlier_logits, output.logits], dim=1)
        else:
            hidden = model.model(**step).last_hidden_state
            if isinstance(keep, int) and (keep == 0 or keep > seq_len - end):
                earlier_logits.append(model.lm_head(hidden))
        if chunking.on_step is not None:
            chunking.on_step("text", end, seq_len)
    if isinstance(keep, int) and keep > seq_len - start:
        # More positions asked for than the last chunk holds: the earlier chunks' logits lead.
        output.logits = torch.cat([*earlier_logits, output.logits], dim=1)[:, -keep:]
    return output


def placeholder_types(input_ids: Tensor, config: Any) -> Tensor:
    """mm_token_type_ids from the placeholder ids: 1 at image tokens, 2 at video tokens, 0 elsewhere. [B, S]."""
    return (input_ids == config.image_token_id).long() + 2 * (input_ids == config.video_token_id).long()


def _prompt_positions(model: Any, named: dict[str, Any], types: Tensor) -> Tensor:
    """The rotary position ids of the whole prompt ([3 or 4, B, S]) and, as a one-pass prefill does, the
    rope deltas that decoding steps continue from."""
    input_ids = named["input_ids"]
    grids = {key: named.get(key) for key in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")}
    if grids["image_grid_thw"] is None and grids["video_grid_thw"] is None:
        positions = named.get("position_ids")
        if positions is None:
            positions = _text_positions(named.get("attention_mask"), input_ids)
        model.model.rope_deltas = (positions.amax(dim=(0, 2)) + 1 - input_ids.shape[1]).view(-1, 1)
        return positions
    computed, deltas = model.model.get_rope_index(
        input_ids, types, attention_mask=named.get("attention_mask"), **grids
    )
    model.model.rope_deltas = deltas
    positions = named.get("position_ids")
    return computed if positions is None else positions


def _text_positions(attention_mask: Tensor | None, input_ids: Tensor) -> Tensor:
    """Three equal rows of consecutive positions over the real tokens (a text-only prompt): [3, B, S]."""
    if attention_mask is None:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    else:
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    return positions.unsqueeze(0).expand(3, -1, -1)


@dataclass
class _Features:
    """The vision tower's outputs of a prompt, by placeholder kind: image and video [N, hidden] (or None),
    with each sample's first row in them (`starts`, per kind)."""

    image: Tensor | None
    video: Tensor | None
    starts: dict[str, list[int]]


class _VisionProgress:
    """Counts the vision tokens the tower has produced over all its calls and reports them."""

    def __init__(self, on_step: ChunkCallback | None, total: int) -> None:
        self.on_step, self.total, self.done = on_step, total, 0

    def __call__(self, tokens: int) -> None:
        self.done += tokens
        if self.on_step is not None:
            self.on_step("vision", self.done, self.total)


def _vision_features(model: Any, named: dict[str, Any], input_ids: Tensor, chunking: PrefillChunking) -> _Features:
    config = model.config
    starts, features = {}, {}
    placeholders = torch.tensor([config.image_token_id, config.video_token_id], device=input_ids.device)
    progress = _VisionProgress(chunking.on_step, int(torch.isin(input_ids, placeholders).sum()))
    for kind, token_id, pixels, grid in (
        ("image", config.image_token_id, named.get("pixel_values"), named.get("image_grid_thw")),
        ("video", config.video_token_id, named.get("pixel_values_videos"), named.get("video_grid_thw")),
    ):
        counts = (input_ids == token_id).sum(dim=1).tolist()
        starts[kind] = [sum(counts[:b]) for b in range(len(counts))]
        features[kind] = None
        if pixels is None:
            if sum(counts):
                raise UserError(f"the prompt has {sum(counts)} {kind} placeholder tokens but no {kind} pixels")
            continue
        features[kind] = vision_tower_in_chunks(model.model.visual, pixels, grid, chunking.chunk_size, progress)
        if features[kind].shape[0] != sum(counts):
            raise UserError(
                f"{kind} features and placeholder tokens do not match: {features[kind].shape[0]} features, "
                f"{sum(counts)} tokens"
            )
    return _Features(features["image"], features["video"], starts)


def vision_tower_in_chunks(
    visual: Any,
    pixels: Tensor,
    grid_thw: Tensor,
    chunk_tokens: int,
    on_piece: Callable[[int], None] | None = None,
) -> Tensor:
    """Qwen2.5-VL's vision tower over at most ~`chunk_tokens` output tokens at a time.

    The tower attends within each temporal patch (its windows and its full-attention blocks never cross one), so
    cutting a video between temporal patches and concatenating the merged outputs gives what one pass gives.

    Args:
        visual: the vision tower (`model.model.visual`).
        pixels: [sum over items of t*h*w, patch_dim] patches; grid_thw: long [items, 3] (t, h, w in patches).
        on_piece: called with the number of output tokens after each tower call.

    Returns:
        [sum over items of t*h*w / merge^2, hidden], the merged embeddings, in the order of one pass.
    """
    merge = visual.spatial_merge_size**2
    pixels = pixels.type(visual.dtype)
    pieces: list[tuple[int, int, list[int]]] = []  # (first row, rows, [t, h, w]) per piece
    row = 0
    for t, h, w in grid_thw.tolist():
        per_patch = h * w // merge
        patches_per_piece = max(1, chunk_tokens // per_patch)
        for first in range(0, t, patches_per_piece):
            count = min(patches_per_piece, t - first)
            pieces.append((row + first * h * w, count * h * w, [count, h, w]))
        row += t * h * w
    outputs, group, group_tokens = [], [], 0
    for piece in pieces:
        tokens = piece[1] // merge
        if group and group_tokens + tokens > chunk_tokens:
            outputs.append(_run_tower(visual, pixels, group, on_piece))
            group, group_tokens = [], 0
        group.append(piece)
        group_tokens += tokens
    if group:
        outputs.append(_run_tower(visual, pixels, group, on_piece))
    return torch.cat(outputs) if outputs else pixels.new_zeros(0, visual.merger.mlp[-1].out_features)


def _run_tower(
    visual: Any, pixels: Tensor, group: list[tuple[int, int, list[int]]], on_piece: Callable[[int], None] | None
) -> Tensor:
    rows = torch.cat([pixels[first : first + count] for first, count, _ in group])
    grid = torch.tensor([thw for *_, thw in group], dtype=torch.long, device=pixels.device)
    output = visual(rows, grid_thw=grid)
    merged = output.pooler_output if hasattr(output, "pooler_output") else output  # transformers 5.25 vs 5.17
    if on_piece is not None:
        on_piece(merged.shape[0])
    return merged


def _chunk_embeddings(model: Any, input_ids: Tensor, features: _Features, start: int, end: int) -> Tensor:
    """Token embeddings of positions [start, end) of every sample, placeholders replaced by their vision
    features as the one-pass forward places them: [B, end - start, hidden]."""
    ids = input_ids[:, start:end]
    embeds = model.model.get_input_embeddings()(ids)
    config = model.config
    for kind, token_id in (("image", config.image_token_id), ("video", config.video_token_id)):
        rows = getattr(features, kind)
        if rows is None:
            continue
        before = (input_ids[:, :start] == token_id).sum(dim=1).tolist()
        here = ids == token_id
        for b, count in enumerate(here.sum(dim=1).tolist()):
            if count:
                first = features.starts[kind][b] + before[b]
                embeds[b, here[b]] = rows[first : first + count].to(embeds.dtype)
    return embeds
