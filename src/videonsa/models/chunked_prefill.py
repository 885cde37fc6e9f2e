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
from videonsa.models.vision_attention import install_packed_attention

# Progress of a chunked prefill: (stage, done, total): stage "vision" counts the vision tokens the tower has
# produced so far (total None: the tower does not know the prompt), "text" the prompt tokens the language model
# has taken in, of `total`.
ChunkCallback = Callable[[str, int, int | None], None]

# The keyword of the KV cache in Qwen2.5-VL's forward: "cache" in newer transformers 5.x, "past_key_values" before.
CACHE_KWARG = "cache" if "cache" in inspect.signature(qwen.Qwen2_5_VLModel.forward).parameters else "past_key_values"


def passed_cache(arguments: dict[str, Any]) -> Any:
    """The KV cache among a forward's keyword `arguments`, under either name transformers 5.x has used (None if
    there is none)."""
    return arguments.get("cache", arguments.get("past_key_values"))


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
    """Within the block, `model`'s prefills longer than `chunk_size` tokens run in chunks, and its vision tower
    over pieces of about `chunk_size` output tokens (None: one pass, as without the block).

    Refused in attention_mode 'official', whose original computes the prefill in one pass.
    """
    if chunk_size is None:
        yield
        return
    chunking = PrefillChunking(chunk_size, on_step)
    refuse_official(model)
    tower = model.model.visual
    previous = model.prefill_chunking, getattr(tower, "chunk_tokens", None), getattr(tower, "on_piece", None)
    model.prefill_chunking = chunking
    if isinstance(tower, ChunkedVisionTower):
        tower.chunk_tokens, tower.on_piece = chunk_size, _VisionCounter(on_step)
    try:
        yield
    finally:
        model.prefill_chunking = previous[0]
        if isinstance(tower, ChunkedVisionTower):
            tower.chunk_tokens, tower.on_piece = previous[1], previous[2]


class _VisionCounter:
    """Adds up the vision tokens of the tower's pieces and reports ("vision", tokens so far, None)."""

    def __init__(self, on_step: ChunkCallback | None) -> None:
        self.on_step, self.done = on_step, 0

    def __call__(self, tokens: int) -> None:
        self.done += tokens
        if self.on_step is not None:
            self.on_step("vision", self.done, None)


def check_chunking_supported(model: Any, chunk_size: int | str | None) -> None:
    """UserError when an explicit `chunk_size` (a number of tokens) is asked of a model that cannot prefill in
    chunks: one without chunked prefill (not VideoNSA), or one in attention_mode 'official'. "auto" and None (one
    pass) suit every model. It reads the model alone, so a caller can refuse before any video is read."""
    if chunk_size is None or chunk_size == "auto":
        return
    if not hasattr(model, "prefill_chunking"):
        name = type(model).__name__
        raise UserError(f"prefill_chunk_size={chunk_size}: {name} has no chunked prefill (VideoNSA has)")
    refuse_official(model)


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
    cache = passed_cache(named)
    if cache is not None and cache.get_seq_length() > 0:
        return False
    return named["input_ids"].shape[1] > chunking.chunk_size


def chunked_forward(model: Any, named: dict[str, Any], chunking: PrefillChunking, one_pass: Callable) -> Any:
    """A prefill of `model` (VideoNSAForConditionalGeneration) in chunks; `named` holds the arguments of its
    forward. Returns what the one-pass forward returns (same output class, the filled cache), with the logits of
    the positions `logits_to_keep` asks for (the last N for an int N, all when 0, or a tensor of positions).

    `one_pass` is the stock forward, which runs the last chunk so that the output is transformers' own.
    """
    refuse_official(model)
    if model.model.language_model.sequence_parallel is not None:
        raise UserError("prefill_chunk_size: sequence parallelism (training only) has no KV cache; disable it first")
    if named.get("labels") is not None:
        raise UserError("prefill_chunk_size is for inference: a forward with labels runs in one pass")
    for flag in ("output_hidden_states", "output_attentions"):
        # The chunks' per-layer outputs are not kept: only the last chunk's would come back.
        if named.get(flag):
            raise UserError(f"prefill_chunk_size: {flag} needs the whole prompt in one forward; prefill in one pass")
    input_ids: Tensor = named["input_ids"]
    batch, seq_len = input_ids.shape
    cache = passed_cache(named)
    if cache is None:
        cache = DynamicCache(config=model.config.text_config)
    attention_mask = named.get("attention_mask")
    types = named.get("mm_token_type_ids")
    if types is None:
        types = placeholder_types(input_ids, model.config)
    position_ids = _prompt_positions(model, named, types)
    features = _vision_features(model, named, input_ids)
    keep = named.get("logits_to_keep", 0)
    # A tensor of positions (transformers' other form) indexes the whole prompt's logits, built chunk by chunk.
    positions, keep = (keep, 0) if isinstance(keep, Tensor) else (None, keep)
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
            output = one_pass(**step, logits_to_keep=keep)
            if keep == 0 and earlier_logits:
                output.logits = torch.cat([*earlier_logits, output.logits], dim=1)
        else:
            hidden = model.model(**step).last_hidden_state
            if keep == 0 or keep > seq_len - end:
                earlier_logits.append(model.lm_head(hidden))
        if chunking.on_step is not None:
            chunking.on_step("text", end, seq_len)
    if keep > seq_len - start:
        # More positions asked for than the last chunk holds: the earlier chunks' logits lead.
        output.logits = torch.cat([*earlier_logits, output.logits], dim=1)[:, -keep:]
    if positions is not None:
        output.logits = output.logits[:, positions.to(output.logits.device)]
    return output


def placeholder_types(input_ids: Tensor, config: Any) -> Tensor:
    """mm_token_type_ids from the placeholder ids: 1 at image tokens, 2 at video tokens, 0 elsewhere. [B, S]."""
    return (input_ids == config.image_token_id).long() + 2 * (input_ids == config.video_token_id).long()


def _prompt_positions(model: Any, named: dict[str, Any], types: Tensor) -> Tensor:
    """The rotary position ids of the whole prompt ([3 or 4, B, S]), those given if any; when the grids are at
    hand, also the rope deltas that decoding steps continue from, as a one-pass prefill records them."""
    input_ids = named["input_ids"]
    positions = named.get("position_ids")
    grids = {key: named.get(key) for key in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")}
    if grids["image_grid_thw"] is not None or grids["video_grid_thw"] is not None:
        computed, deltas = model.model.get_rope_index(
            input_ids, types, attention_mask=named.get("attention_mask"), **grids
        )
        model.model.rope_deltas = deltas
        return computed if positions is None else positions
    if positions is not None:
        return positions  # generate() computed them (and the deltas) before encoding the pixels
    if bool((types > 0).any()):
        raise UserError("a chunked prefill of a prompt with vision tokens needs its image/video grids or position ids")
    positions = _text_positions(named.get("attention_mask"), input_ids)
    model.model.rope_deltas = (positions.amax(dim=(0, 2)) + 1 - input_ids.shape[1]).view(-1, 1)
    return positions


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


def _vision_features(model: Any, named: dict[str, Any], input_ids: Tensor) -> _Features:
    """The prompt's image and video features: those generate() computed already (`mm_encoder_outputs`, newer
    transformers), else the vision tower's over the pixels, in pieces (`ChunkedVisionTower`)."""
    config = model.config
    encoded = named.get("mm_encoder_outputs") or {}
    starts, features = {}, {}
    for kind, token_id, pixels, grid in (
        ("image", config.image_token_id, named.get("pixel_values"), named.get("image_grid_thw")),
        ("video", config.video_token_id, named.get("pixel_values_videos"), named.get("video_grid_thw")),
    ):
        counts = (input_ids == token_id).sum(dim=1).tolist()
        starts[kind] = [sum(counts[:b]) for b in range(len(counts))]
        features[kind] = None
        if encoded.get(kind) is not None:
            features[kind] = torch.cat(list(encoded[kind].pooler_output))
        elif pixels is not None:
            features[kind] = merged_output(model.model.visual(pixels.type(model.model.visual.dtype), grid_thw=grid))
        elif sum(counts):
            raise UserError(f"the prompt has {sum(counts)} {kind} placeholder tokens but no {kind} pixels")
        if features[kind] is not None and features[kind].shape[0] != sum(counts):
            raise UserError(
                f"{kind} features and placeholder tokens do not match: {features[kind].shape[0]} features, "
                f"{sum(counts)} tokens"
            )
    return _Features(features["image"], features["video"], starts)


def merged_output(output: Any) -> Tensor:
    """The merged embeddings [N, hidden] of a vision tower's output (an output object in transformers 5.25, the
    tensor itself in 5.17)."""
    return output.pooler_output if hasattr(output, "pooler_output") else output


class ChunkedVisionTower(qwen.Qwen2_5_VisionTransformerPretrainedModel):
    """Qwen2.5-VL's vision tower that, while `chunk_tokens` is set, runs over at most ~`chunk_tokens` output
    tokens at a time (`on_piece` hears each piece's token count).

    The tower attends within each temporal patch (its windows and its full-attention blocks never cross one), and
    its window reordering goes temporal patch after temporal patch, so cutting the input between temporal patches
    and concatenating the pieces' outputs gives what one pass gives (both outputs), with one piece's activations
    in memory instead of the whole video's. Same parameters as the stock tower, so checkpoints load unchanged.

    Its blocks attend with `PackedVisionAttention` (one attention call per distinct window length instead of one
    per window; docs/vision-tower.md), whichever path (ask, eval, training, analyze) builds the model.
    """

    chunk_tokens: int | None = None
    on_piece: Callable[[int], None] | None = None

    def __init__(self, config: Any, *inputs: Any, **kwargs: Any) -> None:
        super().__init__(config, *inputs, **kwargs)
        self.chunk_layouts = install_packed_attention(self)

    def forward(self, hidden_states: Tensor, grid_thw: Tensor, **kwargs: Any) -> Any:
        """hidden_states [sum of t*h*w, patch_dim] patches, grid_thw long [items, 3] -> the stock output."""
        if self.chunk_tokens is None:
            return super().forward(hidden_states, grid_thw=grid_thw, **kwargs)
        outputs = [
            super(ChunkedVisionTower, self).forward(rows, grid_thw=grid, **kwargs)
            for rows, grid in self._pieces(hidden_states, grid_thw)
        ]
        if len(outputs) == 1 or not hasattr(outputs[0], "pooler_output"):
            return outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        return type(outputs[0])(
            last_hidden_state=torch.cat([output.last_hidden_state for output in outputs]),
            pooler_output=torch.cat([output.pooler_output for output in outputs]),
        )

    def _pieces(self, pixels: Tensor, grid_thw: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
        """(rows, grid) of each tower call: every item cut between temporal patches into pieces of at most
        `chunk_tokens` output tokens (one temporal patch at least), consecutive pieces grouped up to that size."""
        merge = self.spatial_merge_size**2
        pieces: list[tuple[int, int, list[int]]] = []  # (first row, rows, [t, h, w])
        row = 0
        for t, h, w in grid_thw.tolist():
            per_patch = h * w // merge
            patches_per_piece = max(1, self.chunk_tokens // per_patch)
            for first in range(0, t, patches_per_piece):
                count = min(patches_per_piece, t - first)
                pieces.append((row + first * h * w, count * h * w, [count, h, w]))
            row += t * h * w
        group: list[tuple[int, int, list[int]]] = []
        group_tokens = 0
        for piece in [*pieces, None]:
            tokens = 0 if piece is None else piece[1] // merge
            if group and (piece is None or group_tokens + tokens > self.chunk_tokens):
                rows = torch.cat([pixels[first : first + count] for first, count, _ in group])
                grid = torch.tensor([thw for *_, thw in group], dtype=grid_thw.dtype, device=grid_thw.device)
                yield rows, grid
                if self.on_piece is not None:
                    self.on_piece(group_tokens)
                group, group_tokens = [], 0
            if piece is not None:
                group.append(piece)
                group_tokens += tokens


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
