"""VideoNSA on Qwen2.5-VL: the transformers model classes with VideoNSA attention in every text layer.

Everything but the text attention is Qwen2.5-VL as transformers implements it (vision tower, M-RoPE, MLPs,
generation). `VideoNSAAttention` replaces `Qwen2_5_VLAttention`: q/k/v projections and rotary positions as
before, then

- vision tokens (image/video placeholders) attend through NSA over their own sample's vision stream,
- text tokens attend densely and causally to every earlier token of their sample, vision and text,

with the gates computed from the layer input. Which tokens are vision tokens comes from `mm_token_type_ids`
or the placeholder token ids, computed once per forward in `VideoNSAModel.forward` and handed to the layers.
docs/layer.md describes this layer in full, docs/attention-modes.md the three modes.

In `attention_mode="dense"`, and for chunks without vision tokens (text prompts, decoding steps), the layer
runs exactly the stock Qwen2.5-VL attention (decoding steps with SDPA's cuDNN backend left out: `decoding_sdpa`).

In `attention_mode="official"` a chunk with vision tokens runs the function the original VideoNSA code computes
(`videonsa.layers.official.official_attention`, docs/official-mode.md): vision tokens are told from text by the
M-RoPE position ids as the original does (`official_mode.vision_from_positions`, computed once per forward in
`VideoNSATextModel.forward` from the ids that rotate q and k), the gate logits come from the same gate MLP, and
the KV cache keeps the unmasked keys and values, over which decoding steps attend densely (the stock path).

Sequence parallelism (`enable_sequence_parallel`, training only) lives in `videonsa.parallel.sequence`: once it
is on, the text model and every attention layer hand their work to their `sequence_parallel` setting, which runs
the code above on a slice of the sequence or of the heads.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import inspect
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from transformers import initialization as hf_init
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen
from transformers.utils import logging

from videonsa.errors import UserError
from videonsa.layers import (
    GATE_INIT_STD,
    SparseSettings,
    TokenHistory,
    TokenSplit,
    branch_gates,
    build_token_split,
    empty_history,
    make_gate_projections,
    videonsa_attention,
)
from videonsa.layers.attention import DECODING_QUERIES, causal_text_sdpa, decoding_sdpa, grouped_text_sdpa
from videonsa.layers.official import official_attention
from videonsa.models.checkpoint_checks import (
    GateCoverage,
    check_checkpoint,
    describe_layers,
    gate_coverage,
    refuse_partial_gates,
)
from videonsa.models.checkpoints import LEGACY_KEY_MAPPING, checkpoint_attention_mode, checkpoint_tensor_names
from videonsa.models.chunked_prefill import (
    ChunkedVisionTower,
    PrefillChunking,
    chunked_forward,
    passed_cache,
    wants_chunks,
)
from videonsa.models.configuration_videonsa import NSA_CONFIG_DEFAULTS, VideoNSAConfig, record_sparse_settings
from videonsa.models.official_mode import (
    OfficialTokens,
    check_official_heads,
    classify_tokens,
    official_gate_logits,
    refuse_cached_vision,
    refuse_training,
)
from videonsa.models.rope_positions import multimodal_position_ids
from videonsa.parallel import (
    SequenceParallel,
    SequenceParallelModule,
    disable_sequence_parallel,
    enable_sequence_parallel,
)

logger = logging.get_logger(__name__)

# Keyword under which the token split travels from the text model to its attention layers.
SPLIT_KWARG = "videonsa_split"
# Keyword under which official mode's token types (an OfficialTokens, from the M-RoPE ids) travel to the layers.
OFFICIAL_TOKENS_KWARG = "videonsa_official_tokens"
# The split of the forward pass in progress, set by VideoNSAModel.forward for its text model. A context
# variable rather than a forward argument because Qwen2.5-VL passes its extra arguments to the vision tower too.
_CURRENT_SPLIT: contextvars.ContextVar[TokenSplit | None] = contextvars.ContextVar("videonsa_split", default=None)
# Attribute of a KV cache under which VideoNSA records its tokens' TokenHistory (see token_history).
_HISTORY_ATTRIBUTE = "videonsa_token_history"
# Attention backends that take a chunk or decoding step after cached tokens without a mask tensor (causal over every
# key: `causal_text_sdpa` for chunks, a single query sees every key).
MASKLESS_IMPLEMENTATIONS = ("sdpa", "flash_attention_2", "flash_attention_3")
_GATE_KEY_PATTERN = r"\.self_attn\.g_proj_[12]\.(weight|bias)$"
# set_sparsity's knobs: config names -> SparseSettings fields.
_KNOB_FIELDS = {
    "block_size": "block_size",
    "block_counts": "block_count",
    "window_size": "window_size",
    "init_blocks": "init_blocks",
    "local_blocks": "local_blocks",
    "gate_temperature": "gate_temperature",
}


def settings_from_text_config(text_config: Any) -> SparseSettings:
    """The sparse settings a text config records (defaults where it records none, e.g. plain Qwen2.5-VL)."""
    value = lambda key: getattr(text_config, key, NSA_CONFIG_DEFAULTS[key])  # noqa: E731
    return SparseSettings(
        block_size=value("block_size"),
        block_count=value("block_counts"),
        window_size=value("window_size"),
        init_blocks=value("init_blocks"),
        local_blocks=value("local_blocks"),
        gate_temperature=value("gate_temperature"),
        mode=value("attention_mode"),
    )


class VideoNSAAttention(SequenceParallelModule, qwen.Qwen2_5_VLAttention):
    """Qwen2.5-VL text attention with the VideoNSA vision path and gates (`g_proj_1`, `g_proj_2`).

    `settings` (a SparseSettings) holds the mode and budget; `set_attention_mode` / `set_sparsity` change it
    on a loaded model. When `sequence_parallel` is set, hidden_states hold this rank's slice of the sequence
    and the attention itself runs in `sequence_parallel.attention`.
    """

    def __init__(self, config: Any, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.g_proj_1, self.g_proj_2 = make_gate_projections(config.hidden_size, self.num_heads)
        self.settings = settings_from_text_config(config)

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values: Any = None,
        position_embeddings: tuple[Tensor, Tensor] | None = None,
        *,
        cache: Any = None,
        videonsa_split: TokenSplit | None = None,
        videonsa_official_tokens: OfficialTokens | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor | None]:
        """hidden_states [B, T, hidden] (after input_layernorm) -> ([B, T, hidden], attention weights or None).

        The KV cache arrives as `cache` (newer transformers 5.x) or `past_key_values` (older 5.x, e.g. 5.17).
        `videonsa_split` (nsa mode) and `videonsa_official_tokens` (official mode) come from
        `VideoNSATextModel.forward`.
        """
        cache = cache if cache is not None else past_key_values
        batch, seq_len, _ = hidden_states.shape
        shape = (batch, seq_len, -1, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        cos, sin = position_embeddings
        query, key = qwen.apply_rotary_pos_emb(query, key, cos, sin)

        if self.settings.mode == "official":
            refuse_training(self)
            if videonsa_official_tokens is None:
                raise UserError(
                    "VideoNSA attention in attention_mode 'official' got no token types: run it through "
                    "VideoNSAModel or VideoNSAForConditionalGeneration"
                )
            if self.sequence_parallel is not None:
                raise UserError("attention_mode 'official' does not run sequence-parallel: disable_sequence_parallel()")
            # A chunk without vision tokens (a text prompt, every decoding step) is plain dense causal attention
            # over the cache in the original too: the stock path below.
            if videonsa_official_tokens.has_vision:
                output = self._official_forward(
                    hidden_states, query, key, value, cache, videonsa_official_tokens.is_vision
                )
                return self.o_proj(output.reshape(batch, seq_len, -1)), None

        if self.sequence_parallel is not None:
            output = self.sequence_parallel.attention(self, hidden_states, query, key, value, cache, videonsa_split)
            return self.o_proj(output.reshape(batch, seq_len, -1)), None

        if self.settings.mode == "nsa":
            if videonsa_split is None:
                raise UserError(
                    "VideoNSA attention got no vision/text token split: run it through VideoNSAModel or "
                    "VideoNSAForConditionalGeneration, or switch to attention_mode='dense'"
                )
            if videonsa_split.has_vision:
                output = self._split_forward(hidden_states, query, key, value, cache, videonsa_split)
                return self.o_proj(output.reshape(batch, seq_len, -1)), None

        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)
        maskless = self.config._attn_implementation in MASKLESS_IMPLEMENTATIONS
        if attention_mask is None and 1 < seq_len < key.shape[2] and maskless:
            # A chunk after cached tokens whose mask VideoNSATextModel left out (unpadded): causal over every key,
            # aligned to the bottom right, without a [chunk, keys] mask tensor.
            dropout = 0.0 if not self.training else self.attention_dropout
            output = causal_text_sdpa(
                query, key, value, 0, scale=self.scaling, dropout_p=dropout, past=key.shape[2] - seq_len
            )
            return self.o_proj(output.reshape(batch, seq_len, -1)), None
        attention_interface = qwen.ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, qwen.eager_attention_forward
        )
        output, weights = attention_interface(
            self, query, key, value, attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            sliding_window=self.sliding_window,
            position_ids=position_ids,
            **kwargs,
        )
        return self.o_proj(output.reshape(batch, seq_len, -1).contiguous()), weights

    def _split_forward(
        self, hidden_states: Tensor, query: Tensor, key: Tensor, value: Tensor, cache: Any, split: TokenSplit
    ) -> Tensor:
        """VideoNSA attention of a chunk holding vision tokens; q [B, HQ, T, D], k/v [B, HKV, T, D] ->
        [B, T, HQ, D].

        After P cached tokens (chunked prefill) the split knows which of them were vision (`split.past == P`):
        the chunk's queries then read the whole cache, vision streams rebuilt from it (docs/layer.md)."""
        if cache is not None:
            cached = cache.get_seq_length(self.layer_idx)
            if cached != split.past:
                raise UserError(
                    f"vision tokens arrived while the KV cache already holds {cached} tokens that VideoNSA did not "
                    "see go in (no record of which were vision); prefill through this model from an empty cache, "
                    "or use attention_mode='dense'"
                )
            # Later chunks and decoding steps attend to these keys; this chunk's queries read all of them.
            key, value = cache.update(key, value, self.layer_idx)
        elif split.past:
            raise UserError(f"the token split follows {split.past} cached tokens but no KV cache was passed")
        return videonsa_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
            self.gates(split.gather_vision(hidden_states)), split, self.settings,
            attend=self.dense_attend, scale=self.scaling,
        )

    def _official_forward(
        self, hidden_states: Tensor, query: Tensor, key: Tensor, value: Tensor, cache: Any, is_vision: Tensor
    ) -> Tensor:
        """The original code's attention of a prefill chunk holding vision tokens: q [B, HQ, T, D],
        k/v [B, HKV, T, D], is_vision bool [B, T] -> [B, T, HQ, D] (the input of o_proj).

        The chunk must start the sequence (empty cache); the cache keeps the unmasked k and v, as the original's
        does, for the dense decoding steps."""
        check_official_heads(self.num_heads, self.num_key_value_heads)
        if cache is not None:
            refuse_cached_vision(cache.get_seq_length(self.layer_idx))
            cache.update(key, value, self.layer_idx)
        gate_logits = official_gate_logits(hidden_states, self.g_proj_1, self.g_proj_2, self.num_heads)
        # Under autocast the rotary embedding promotes q and k to float32 while v keeps the autocast dtype:
        # compute in v's dtype, as the vision path of nsa mode does.
        dtype = value.dtype
        settings = self.settings
        return official_attention(
            query.transpose(1, 2).to(dtype), key.transpose(1, 2).to(dtype), value.transpose(1, 2),
            is_vision, gate_logits.to(dtype),
            block_size=settings.block_size, block_counts=settings.block_count, window_size=settings.window_size,
            scale=self.scaling, gate_temperature=settings.gate_temperature,
        )

    def gates(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The branch gates (g_cmp, g_slc, g_swa) of layer inputs x [..., hidden], each [..., HQ] in [0, 1]. In
        training the gate MLP's activations are recomputed for the backward rather than kept (`branch_gates`)."""
        return branch_gates(
            x, self.g_proj_1, self.g_proj_2, self.num_heads, self.settings.gate_temperature, recompute=self.training
        )

    def dense_attend(self, query: Tensor, key: Tensor, value: Tensor, split: TokenSplit) -> Tensor:
        """Text queries through the model's attention backend with the split's text mask: q [B, HQ, L, D],
        k/v [B, HKV, P + T, D] (P = `split.past`, the cached tokens of a chunked prefill) -> [B, L, HQ, D].

        Eager materialises the weights as transformers does. Every other backend (flash attention included)
        runs `grouped_text_sdpa`: no mask at all for one unpadded sample with one vision run, else each KV
        group's query heads folded into query rows under the split's mask. transformers' SDPA path would
        repeat K and V to HQ heads whenever a mask is given, two [B, HQ, T, D] copies per layer for a few
        text queries."""
        dropout = 0.0 if not self.training else self.attention_dropout
        if self.config._attn_implementation != "eager":
            return grouped_text_sdpa(query, key, value, split, scale=self.scaling, dropout_p=dropout)
        mask = split.text_attention_mask
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~mask, torch.finfo(query.dtype).min
        )
        output, _ = qwen.eager_attention_forward(self, query, key, value, mask, dropout=dropout, scaling=self.scaling)
        return output


class _GateInitMixin:
    """Initialises new gates as N(0, GATE_INIT_STD) weights and zero biases, whatever initializer_range says."""

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, VideoNSAAttention):
            for proj in (module.g_proj_1, module.g_proj_2):
                hf_init.normal_(proj.weight, mean=0.0, std=GATE_INIT_STD)
                hf_init.zeros_(proj.bias)


class VideoNSATextModel(_GateInitMixin, SequenceParallelModule, qwen.Qwen2_5_VLTextModel):
    """The Qwen2.5-VL text model with VideoNSAAttention layers; it hands the token split to every layer.

    When `sequence_parallel` is set, `sequence_parallel.text_model_forward` runs it on this rank's slice of the
    sequence."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        for layer_idx, layer in enumerate(self.layers):
            layer.self_attn = VideoNSAAttention(config, layer_idx)
        # Initialises the new attention modules only: the others are marked initialised already.
        self.post_init()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault(SPLIT_KWARG, _CURRENT_SPLIT.get())
        if self.layers[0].self_attn.settings.mode == "official":
            kwargs.setdefault(OFFICIAL_TOKENS_KWARG, self._official_tokens(args, kwargs))
        if self.sequence_parallel is None:
            if not args and self._needs_no_mask(kwargs):
                # transformers would build a [B, 1, L, cached + L] mask here (8 GiB for a 16K chunk at 512K
                # tokens), and with any mask its SDPA path repeats k and v to every query head (two [B, HQ,
                # cached + L, D] copies per layer and decoding step); the layers align the causal mask themselves.
                kwargs["attention_mask"] = {"full_attention": None}
            with decoding_sdpa() if not args and self._is_decoding_step(kwargs) else contextlib.nullcontext():
                return super().forward(*args, **kwargs)
        if args:
            raise TypeError("with sequence parallelism on, pass the text model's inputs as keyword arguments")
        # The sequence-parallel layers mask with the split alone, never with the attention mask.
        _refuse_packed_sequences(kwargs.get("position_ids"), kwargs.get("attention_mask"))
        split = kwargs.pop(SPLIT_KWARG)
        return self.sequence_parallel.text_model_forward(self._forward_with_split, self.embed_tokens, split, **kwargs)

    def _needs_no_mask(self, kwargs: dict[str, Any]) -> bool:
        """Whether this forward continues a KV cache (a prefill chunk or a decoding step) of unpadded samples, whose
        causal mask the attention layers apply without a mask tensor: SDPA or flash attention, no sliding window.
        (Official mode's vision path never continues a cache; its text-only steps are the stock path's.)"""
        mask, cache, embeds = kwargs.get("attention_mask"), passed_cache(kwargs), kwargs.get("inputs_embeds")
        if cache is None or embeds is None or isinstance(mask, dict):
            return False
        if self.config._attn_implementation not in MASKLESS_IMPLEMENTATIONS:
            return False
        if getattr(self, "has_sliding_layers", False) or getattr(self.config, "use_sliding_window", False):
            return False  # sliding-window layers need their mask
        if cache.get_seq_length() == 0:
            return False
        split = kwargs.get(SPLIT_KWARG)
        if mask is None or (split is not None and split.unpadded):
            return True
        return bool(mask.all())

    @staticmethod
    def _is_decoding_step(kwargs: dict[str, Any]) -> bool:
        """Whether this forward is a decoding step: at most DECODING_QUERIES new tokens after a non-empty KV cache
        (its attention then leaves cuDNN out: `decoding_sdpa`)."""
        cache, tokens = passed_cache(kwargs), kwargs.get("inputs_embeds")
        tokens = tokens if tokens is not None else kwargs.get("input_ids")
        return (cache is not None and tokens is not None and tokens.shape[1] <= DECODING_QUERIES
                and cache.get_seq_length() > 0)

    def _forward_with_split(self, split: TokenSplit | None, **kwargs: Any) -> Any:
        """Qwen2.5-VL's text model forward with `split` handed to every layer (sequence parallelism's callback)."""
        return super().forward(**kwargs, **{SPLIT_KWARG: split})

    def _official_tokens(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> OfficialTokens:
        """Official mode's token types of this forward pass, from the position ids the rotary embedding will
        use (see `official_mode.vision_from_positions`); refuses padded batches with vision.

        `args` / `kwargs` are those of Qwen2_5_VLTextModel.forward (input_ids, attention_mask, position_ids, ...),
        whose handling of position_ids is the same in transformers 5.17 and 5.25."""
        named = dict(zip(("input_ids", "attention_mask", "position_ids"), args, strict=False)) | kwargs
        tokens = named.get("inputs_embeds")
        tokens = tokens if tokens is not None else named.get("input_ids")
        if tokens is None:
            raise UserError("VideoNSATextModel needs input_ids or inputs_embeds")
        return classify_tokens(
            named.get("position_ids"), named.get("attention_mask"), tokens.shape[0], tokens.shape[1], tokens.device
        )


class VideoNSAModel(_GateInitMixin, qwen.Qwen2_5_VLModel):
    """Qwen2.5-VL base model (vision tower + text model) with VideoNSA attention."""

    config_class = VideoNSAConfig

    def __init__(self, config: VideoNSAConfig) -> None:
        # Qwen2_5_VLModel.__init__ with the VideoNSA text model in place of the stock one.
        qwen.Qwen2_5_VLPreTrainedModel.__init__(self, config)
        self.visual = ChunkedVisionTower._from_config(config.vision_config)
        self.language_model = VideoNSATextModel._from_config(config.text_config)
        self.rope_deltas = None
        self.post_init()

    def get_rope_index(
        self,
        input_ids: Tensor,
        mm_token_type_ids: Tensor,
        image_grid_thw: Tensor | None = None,
        video_grid_thw: Tensor | None = None,
        second_per_grid_ts: Tensor | None = None,
        attention_mask: Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor]:
        """Qwen2.5-VL's 3D rotary positions computed by this package (`rope_positions`), not by transformers:
        the text after a video continues past the video's largest id and video time ids keep fractional seconds,
        on every transformers version (docs/layer.md, "Rotary positions")."""
        if image_grid_thw is None and video_grid_thw is None:
            return super().get_rope_index(
                input_ids, mm_token_type_ids, image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
                second_per_grid_ts=second_per_grid_ts, attention_mask=attention_mask, **kwargs,
            )
        return multimodal_position_ids(
            mm_token_type_ids, image_grid_thw, video_grid_thw, second_per_grid_ts, attention_mask,
            tokens_per_second=self.config.vision_config.tokens_per_second,
            spatial_merge_size=self.config.vision_config.spatial_merge_size,
        )

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        *args: Any,
        mm_token_type_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        """Qwen2_5_VLModel.forward, with the vision/text split of the tokens computed first (nsa mode)."""
        split = None
        mode = self.language_model.layers[0].self_attn.settings.mode
        if mode in ("nsa", "official"):
            _refuse_packed_sequences(position_ids, attention_mask, mode)
        cache = passed_cache(kwargs)
        history = token_history(cache) if mode == "nsa" else None
        if mode == "nsa":
            split = self.token_split(input_ids, mm_token_type_ids, attention_mask, inputs_embeds, history)
        with _current_split(split):
            output = super().forward(
                input_ids, attention_mask, position_ids, *args,
                mm_token_type_ids=mm_token_type_ids, inputs_embeds=inputs_embeds, **kwargs,
            )
        if history is not None and split is not None and cache.get_seq_length() == history.length + split.shape[1]:
            setattr(cache, _HISTORY_ATTRIBUTE, history.extended(split))
        return output

    def token_split(
        self,
        input_ids: Tensor | None,
        mm_token_type_ids: Tensor | None,
        attention_mask: Tensor | None,
        inputs_embeds: Tensor | None = None,
        history: TokenHistory | None = None,
    ) -> TokenSplit:
        """Split the tokens of a forward pass into vision and text (never from rotary positions).

        Vision tokens are those with `mm_token_type_ids` 1 (image) or 2 (video), or else those whose
        `input_ids` are the image/video placeholder ids. input_ids, mm_token_type_ids: [B, T];
        attention_mask: [B, T] or [B, P + T] padding mask. `history`: the P tokens already in the KV cache
        (chunked prefill), whose vision streams this forward's vision queries continue.
        """
        tokens = input_ids if input_ids is not None else inputs_embeds
        if mm_token_type_ids is not None:
            # Some transformers versions pass the whole sequence's types while decoding: keep this chunk's.
            seq_len = mm_token_type_ids.shape[1] if tokens is None else tokens.shape[1]
            if mm_token_type_ids.shape[1] < seq_len:
                raise UserError(
                    f"mm_token_type_ids covers {mm_token_type_ids.shape[1]} tokens but the input has {seq_len}"
                )
            vision_mask = mm_token_type_ids[:, mm_token_type_ids.shape[1] - seq_len :] > 0
        elif input_ids is not None:
            placeholders = torch.tensor(
                [self.config.image_token_id, self.config.video_token_id], device=input_ids.device
            )
            vision_mask = torch.isin(input_ids, placeholders)
        else:
            raise UserError(
                "VideoNSA needs input_ids or mm_token_type_ids to tell vision tokens from text "
                "(got only inputs_embeds); pass mm_token_type_ids"
            )
        return build_token_split(vision_mask, attention_mask, history)

    def enable_sequence_parallel(
        self, group: dist.ProcessGroup | None = None, *, gather_output: bool = True
    ) -> SequenceParallel:
        """Run the text model sequence-parallel over `group` (`videonsa.parallel.enable_sequence_parallel`)."""
        return enable_sequence_parallel(self, group, gather_output=gather_output)

    def disable_sequence_parallel(self) -> None:
        """Back to the single-process forward."""
        disable_sequence_parallel(self)


class VideoNSAForConditionalGeneration(_GateInitMixin, qwen.Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL for generation with VideoNSA attention (video tokens sparse, text dense).

    Example:
        >>> model = VideoNSAForConditionalGeneration.from_pretrained("Enxin/VideoNSA", dtype=torch.bfloat16)
        >>> model.set_attention_mode("dense")       # Dense-NSA, no reload
        >>> model.set_sparsity(block_counts=16)     # budget knobs, no reload
    """

    config_class = VideoNSAConfig
    _keys_to_ignore_on_load_missing = [_GATE_KEY_PATTERN]  # reported once, by from_pretrained, not per key

    def __init__(self, config: VideoNSAConfig) -> None:
        # Qwen2_5_VLForConditionalGeneration.__init__ with the VideoNSA base model.
        qwen.Qwen2_5_VLPreTrainedModel.__init__(self, config)
        self.model = VideoNSAModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        # Set by chunked_prefill.prefill_in_chunks: prefills longer than its chunk run chunk by chunk.
        self.prefill_chunking: PrefillChunking | None = None
        self.post_init()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Qwen2.5-VL's forward; a prefill longer than one chunk runs chunk by chunk while chunking is on
        (`prefill_in_chunks`, docs/long-videos.md), with the same result."""
        chunking = self.prefill_chunking
        if chunking is not None:
            named = inspect.signature(super().forward).bind_partial(*args, **kwargs).arguments
            named = {**named.pop("kwargs", {}), **named}
            if wants_chunks(chunking, named):
                return chunked_forward(self, named, chunking, super().forward)
        return super().forward(*args, **kwargs)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str | os.PathLike, *model_args: Any, **kwargs: Any
    ) -> Any:
        """Load a VideoNSA checkpoint (this package's layout or the released flat one) or a plain Qwen2.5-VL
        checkpoint (gates initialised fresh, with one warning).

        VideoNSA settings can be given as keyword arguments and override the checkpoint's: `attention_mode`,
        `block_size`, `block_counts`, `window_size`, `init_blocks`, `local_blocks`, `gate_temperature`.
        `fresh_gates=True` accepts a checkpoint whose gates are stored for some layers only, initialising the
        others fresh (with one warning naming them); without it such a checkpoint is a `UserError` naming the
        layers. Only safetensors weights are read (never pickle files). Everything else goes to transformers'
        `from_pretrained`.

        A local folder (without a `config` object) is checked before anything is built: config.json plausible and
        agreeing with the weights' shapes (`checkpoint_checks.check_checkpoint`, one `UserError` line).

        Without `attention_mode` (and without a `config` object) the checkpoint decides
        (`checkpoints.checkpoint_attention_mode`): the mode its config.json records; "official" for the released
        checkpoint as published (gates in the legacy flat layout, no recorded mode), said in one logged line;
        else "nsa".
        """
        settings = {key: kwargs.pop(key) for key in NSA_CONFIG_DEFAULTS if key in kwargs}
        fresh_gates = bool(kwargs.pop("fresh_gates", False))
        wants_info = kwargs.pop("output_loading_info", False)
        kwargs.setdefault("key_mapping", LEGACY_KEY_MAPPING)
        kwargs.setdefault("use_safetensors", True)  # pickle-format weights are never unpickled
        hub_kwargs = {k: kwargs[k] for k in ("cache_dir", "token", "revision", "local_files_only") if k in kwargs}
        subfolder = kwargs.get("subfolder", "")
        name = str(pretrained_model_name_or_path)
        local = Path(pretrained_model_name_or_path, subfolder)
        coverage = None
        if local.is_dir() and kwargs.get("config") is None:
            coverage = check_checkpoint(local).gates
            _check_gates(coverage, name, fresh_gates)
        model, info = super().from_pretrained(
            pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
        )
        if "attention_mode" not in settings and kwargs.get("config") is None:
            default = checkpoint_attention_mode(pretrained_model_name_or_path, subfolder, **hub_kwargs)
            if default.source == "released-layout":
                settings["attention_mode"] = default.mode
            if notice := default.notice(name):
                logger.warning(notice)
        if coverage is None:
            names = checkpoint_tensor_names(pretrained_model_name_or_path, subfolder, **hub_kwargs)
            if names is not None:
                coverage = gate_coverage(names, model.config.text_config.num_hidden_layers)
                _check_gates(coverage, name, fresh_gates)
        mode = settings.pop("attention_mode", None)
        if settings:
            model.set_sparsity(**settings)
        if mode is not None:
            model.set_attention_mode(mode)
        return (model, info) if wants_info else model

    def set_attention_mode(self, mode: str) -> None:
        """"nsa" (vision tokens sparse), "dense" (every token dense causal, gates unused) or "official" (the
        original code's function, inference only; docs/official-mode.md); no reload."""
        set_attention_mode(self, mode)

    def set_sparsity(self, **knobs: Any) -> None:
        """Change the budget on the loaded model: block_size, block_counts, window_size, init_blocks,
        local_blocks, gate_temperature."""
        set_sparsity(self, **knobs)

    def enable_sequence_parallel(
        self, group: dist.ProcessGroup | None = None, *, gather_output: bool = True
    ) -> SequenceParallel:
        """Run the text model sequence-parallel over `group` (`videonsa.parallel.enable_sequence_parallel`). With
        `gather_output=False`, logits are this rank's slice and the loss of `labels` is combined over the group."""
        return enable_sequence_parallel(self, group, gather_output=gather_output)

    def disable_sequence_parallel(self) -> None:
        """Back to the single-process forward."""
        disable_sequence_parallel(self)

    @property
    def loss_function(self) -> Callable[..., Tensor]:
        """transformers' causal LM loss; when sequence parallel without gathered outputs, the loss of the whole
        sequence from this rank's slice of the logits, summed over the group (`SequenceParallel.causal_lm_loss`)."""
        sp = self.model.language_model.sequence_parallel
        if sp is not None and not sp.gather_output:
            return sp.causal_lm_loss
        return super().loss_function

    @loss_function.setter
    def loss_function(self, value: Callable[..., Tensor]) -> None:
        self._loss_function = value

    @property
    def sparse_settings(self) -> SparseSettings:
        """The settings every VideoNSA layer runs with now."""
        return _attention_layers(self)[0].settings


# generate() checks its keyword arguments against forward's signature: show it Qwen2.5-VL's.
VideoNSAForConditionalGeneration.forward.__signature__ = inspect.signature(
    qwen.Qwen2_5_VLForConditionalGeneration.forward
)


def _check_gates(coverage: GateCoverage, name: str, fresh_gates: bool) -> None:
    """Refuse a partly gated checkpoint unless `fresh_gates`; say which layers get fresh gates."""
    if coverage.complete:
        return
    if not fresh_gates:
        refuse_partial_gates(coverage, name)
    fresh = "all" if not coverage.gated else f"layer(s) {describe_layers(coverage.missing)} of"
    logger.warning(
        f"{name} has no VideoNSA gates for {fresh} {coverage.layers} layers: initialised g_proj_1/g_proj_2 there "
        f"fresh (weights N(0, {GATE_INIT_STD}), biases 0); fine-tune before use"
    )


def set_attention_mode(model: nn.Module, mode: str) -> None:
    """Switch every VideoNSA layer of `model` to attention mode "nsa", "dense" or "official", and record it in
    the config."""
    _apply_settings(model, mode=mode)


def set_sparsity(model: nn.Module, **knobs: Any) -> None:
    """Change the sparse budget of every VideoNSA layer of `model` (block_size, block_counts, window_size,
    init_blocks, local_blocks, gate_temperature), and record it in the config."""
    unknown = sorted(set(knobs) - set(_KNOB_FIELDS))
    if unknown:
        raise UserError(f"unknown sparsity setting(s) {unknown}; known: {sorted(_KNOB_FIELDS)}")
    try:
        _apply_settings(model, **{_KNOB_FIELDS[name]: value for name, value in knobs.items()})
    except UserError as error:
        given = ", ".join(f"{name}={value!r}" for name, value in knobs.items())
        raise UserError(f"set_sparsity({given}): {error}") from None


def _apply_settings(model: nn.Module, **changes: Any) -> None:
    layers = _attention_layers(model)
    settings = dataclasses.replace(layers[0].settings, **changes)  # validates
    if settings.mode == "official":
        check_official_heads(layers[0].num_heads, layers[0].num_key_value_heads)
    for layer in layers:
        layer.settings = settings
    # The layers' text config is the one save_pretrained writes (model.config.text_config), also when `model` is
    # the text model or another part of the whole model, whose own config is not a VideoNSAConfig.
    configs = [layer.config for layer in layers]
    config = getattr(model, "config", None)
    if isinstance(config, VideoNSAConfig):
        configs.append(config.text_config)
    for text_config in {id(c): c for c in configs}.values():
        record_sparse_settings(text_config, settings)


def _attention_layers(model: nn.Module) -> list[VideoNSAAttention]:
    layers = [module for module in model.modules() if isinstance(module, VideoNSAAttention)]
    if not layers:
        raise UserError(f"{type(model).__name__} has no VideoNSA attention layers")
    return layers


def _refuse_packed_sequences(position_ids: Tensor | None, attention_mask: Tensor | None, mode: str = "nsa") -> None:
    """Qwen2.5-VL reads several sequences packed in one row from [4, B, T] position ids whose text positions
    restart, given without an attention mask. The NSA split (and official mode) treat a row as one sample, so
    refuse that."""
    if attention_mask is not None or position_ids is None or position_ids.dim() != 3 or position_ids.shape[0] != 4:
        return
    text_positions = position_ids[0]
    if bool((text_positions[:, 1:] < text_positions[:, :-1]).any()):
        raise UserError(
            "packed sequences (position ids that restart within a row) are not supported in attention_mode "
            f"'{mode}': pad the samples of a batch instead"
        )


def token_history(cache: Any) -> TokenHistory | None:
    """What VideoNSA recorded of the tokens in `cache` (which were vision, which real), or None when nothing can
    be recorded: no cache, or one that already held tokens when VideoNSA first saw it.

    The record lives on the cache object itself, so that it goes wherever the cache goes (generate(), the chunked
    prefill loop); an empty cache starts an empty record."""
    if cache is None:
        return None
    history = getattr(cache, _HISTORY_ATTRIBUTE, None)
    length = cache.get_seq_length()
    if history is not None and history.length == length:
        return history
    if history is not None:
        # The cache changed behind VideoNSA's back (cropped, or filled elsewhere): forget the record for good, so
        # that a cache regrown to the recorded length is not taken for the tokens the record describes.
        setattr(cache, _HISTORY_ATTRIBUTE, None)
    if length == 0:
        return empty_history(0, torch.device("cpu"))  # takes the batch of the first forward (TokenHistory.extended)
    return None


@contextlib.contextmanager
def _current_split(split: TokenSplit | None) -> Iterator[None]:
    token = _CURRENT_SPLIT.set(split)
    try:
        yield
    finally:
        _CURRENT_SPLIT.reset(token)
