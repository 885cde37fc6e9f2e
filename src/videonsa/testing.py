"""Tiny random-weight Qwen2.5-VL / VideoNSA models, a local tokenizer and processor, and checkpoints on disk.

Everything here is built offline in well under a second, so tests (and users without the 7B weights) can
run the whole pipeline: config -> model -> processor -> `save_pretrained` -> `from_pretrained`.

    >>> from videonsa import testing
    >>> model = testing.tiny_model()            # VideoNSAForConditionalGeneration, 2 layers, hidden 64
    >>> processor = testing.tiny_processor()    # Qwen2_5_VLProcessor with a byte-level tokenizer
    >>> path = testing.save_tiny_checkpoint(tmp_path / "ckpt")

The model is structurally a real Qwen2.5-VL (vision tower with patch 14, temporal patch 2, spatial merge 2,
window and full-attention blocks, M-RoPE), only small; its gates are spread out (TINY_GATE_HIDDEN_GAIN), not the
new gates near 0.5 that training starts from. Pixel budgets of the processors are small too (a few
tokens per frame), and can be changed with the `min_pixels` / `max_pixels` arguments.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from videonsa.ops.config import NSAConfig
from videonsa.options import DEFAULT_GATE_TEMPERATURE

if TYPE_CHECKING:
    from transformers import BaseImageProcessor, PreTrainedModel, PreTrainedTokenizerBase, ProcessorMixin
    from transformers.models.qwen2_5_vl import Qwen2_5_VLConfig

# Qwen2.5-VL's special tokens, in Qwen's order; in the tiny vocabulary they follow the 256 byte tokens.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
BYTE_VOCAB_SIZE = 256
TOKEN_IDS: dict[str, int] = {token: BYTE_VOCAB_SIZE + i for i, token in enumerate(SPECIAL_TOKENS)}
# Embedding rows of the tiny model: all tokenizer ids, rounded up to a multiple of 16 as real checkpoints do.
TINY_VOCAB_SIZE = 272

PATCH_SIZE = 14
TEMPORAL_PATCH_SIZE = 2
SPATIAL_MERGE_SIZE = 2
# One language-model token covers a (PATCH_SIZE * SPATIAL_MERGE_SIZE)^2 pixel area of a temporal patch.
PIXELS_PER_TOKEN = (PATCH_SIZE * SPATIAL_MERGE_SIZE) ** 2

# The gates of the tiny VideoNSA models (`tiny_model`, `save_tiny_checkpoint`). New gates as training starts them
# (layers/gates.py, GATE_INIT_STD) sit within a few hundredths of 0.5 for every head, branch and token, so a test
# on such a model hardly notices g_cmp used for g_slc, heads and branches confused, or one token's gates applied
# to another. The tiny models draw their gate MLPs wider instead (`spread_gates_`): g_proj_1 / g_proj_2 weights
# N(0, TINY_GATE_HIDDEN_GAIN / TINY_GATE_OUTPUT_GAIN / sqrt(hidden)) (g_proj_1's outputs of about unit scale
# before the gelu, g_proj_2's varying from token to token) and g_proj_2 biases N(0, TINY_GATE_BIAS_STD) (an offset
# per head and branch). With the temperature of 0.3 the gates then spread over most of (0, 1) (about 5% of them
# beyond 0.02 or 0.98) and differ between heads, branches and tokens (tests/test_testing.py checks how far). Only
# the tiny models: training and `videonsa convert` keep the new gates of GATE_INIT_STD, and so does the demo, which
# trains its model from scratch (`spread_gates=False`).
TINY_GATE_HIDDEN_GAIN = 1.0
TINY_GATE_OUTPUT_GAIN = 0.8
TINY_GATE_BIAS_STD = 0.3

# A Qwen-style chat template: a default system turn, <|vision_start|><|X_pad|><|vision_end|> for every image
# or video part (the processor expands the pad into one token per merged patch), and the assistant header on
# request.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] }}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}"
    "{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'video' -%}"
    "{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' -%}"
    "{{ part['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- endif -%}"
)


def tiny_text_config_kwargs(
    *,
    num_layers: int = 2,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = TINY_VOCAB_SIZE,
    max_position_embeddings: int = 8192,
) -> dict[str, Any]:
    """Keyword arguments of a tiny Qwen2.5-VL text config (head_dim = hidden_size / num_heads, even)."""
    head_dim = hidden_size // num_heads
    if head_dim * num_heads != hidden_size or head_dim % 2:
        raise ValueError(f"hidden_size={hidden_size} must be num_heads={num_heads} times an even head_dim")
    return dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 1_000_000.0,
            "mrope_section": _mrope_section(head_dim),
        },
        bos_token_id=TOKEN_IDS["<|endoftext|>"],
        eos_token_id=TOKEN_IDS["<|im_end|>"],
        pad_token_id=TOKEN_IDS["<|endoftext|>"],
        tie_word_embeddings=False,
    )


def _mrope_section(head_dim: int) -> list[int]:
    """Rotary frequency split (temporal, height, width) in Qwen2.5-VL's proportions: 128 -> [16, 24, 24]."""
    half = head_dim // 2
    temporal = max(1, half // 4)
    height = (half - temporal) // 2
    return [temporal, height, half - temporal - height]


def tiny_vision_config_kwargs(
    *, out_hidden_size: int = 64, depth: int = 2, hidden_size: int = 32
) -> dict[str, Any]:
    """Keyword arguments of a tiny Qwen2.5-VL vision tower: real patch/merge sizes, window and full blocks."""
    return dict(
        depth=depth,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_heads=2,
        out_hidden_size=out_hidden_size,
        patch_size=PATCH_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        spatial_merge_size=SPATIAL_MERGE_SIZE,
        tokens_per_second=2,
        window_size=112,
        # The last block attends over the whole image/video, the others within windows, as in the 7B tower.
        fullatt_block_indexes=[depth - 1],
    )


def tiny_qwen2_5_vl_config(attn_implementation: str = "sdpa", **text_kwargs: Any) -> Qwen2_5_VLConfig:
    """A tiny plain Qwen2.5-VL config; `text_kwargs` go to `tiny_text_config_kwargs` (num_layers, ...)."""
    from transformers import Qwen2_5_VLConfig

    text = tiny_text_config_kwargs(**text_kwargs)
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=tiny_vision_config_kwargs(out_hidden_size=text["hidden_size"]),
        image_token_id=TOKEN_IDS["<|image_pad|>"],
        video_token_id=TOKEN_IDS["<|video_pad|>"],
        vision_start_token_id=TOKEN_IDS["<|vision_start|>"],
        vision_end_token_id=TOKEN_IDS["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    config._attn_implementation = attn_implementation
    return config


def tiny_videonsa_config(
    attn_implementation: str = "sdpa",
    *,
    block_size: int = 4,
    block_counts: int = 2,
    window_size: int = 8,
    init_blocks: int = NSAConfig.init_blocks,
    local_blocks: int = NSAConfig.local_blocks,
    gate_temperature: float = DEFAULT_GATE_TEMPERATURE,
    attention_mode: str = "nsa",
    **text_kwargs: Any,
):
    """A tiny VideoNSAConfig. The sparse budget is scaled down with the model (blocks of 4 vision tokens, 2
    selected blocks, window 8) so that a few dozen vision tokens already exercise every NSA branch."""
    from videonsa.models import VideoNSAConfig

    base = tiny_qwen2_5_vl_config(attn_implementation, **text_kwargs)
    config = VideoNSAConfig.from_qwen2_5_vl(
        base,
        block_size=block_size,
        block_counts=block_counts,
        window_size=window_size,
        init_blocks=init_blocks,
        local_blocks=local_blocks,
        gate_temperature=gate_temperature,
        attention_mode=attention_mode,
    )
    config._attn_implementation = attn_implementation
    return config


def tiny_model(
    config=None, *, videonsa: bool = True, seed: int = 0, spread_gates: bool = True, **config_kwargs: Any
) -> PreTrainedModel:
    """A random-weight model in eval mode: VideoNSAForConditionalGeneration (default) or the stock
    Qwen2_5_VLForConditionalGeneration (`videonsa=False`). `config_kwargs` go to the tiny config builder.

    A VideoNSA model's gates are spread out (`spread_gates_`, see TINY_GATE_HIDDEN_GAIN) unless `spread_gates` is
    False, which keeps the new gates training starts from (every gate near 0.5)."""
    if config is None:
        builder = tiny_videonsa_config if videonsa else tiny_qwen2_5_vl_config
        config = builder(**config_kwargs)
    if videonsa:
        from videonsa.models import VideoNSAForConditionalGeneration as model_class
    else:
        from transformers import Qwen2_5_VLForConditionalGeneration as model_class
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    if videonsa and spread_gates:
        spread_gates_(model, seed)
    return model.eval()


def spread_gates_(model: torch.nn.Module, seed: int = 0) -> None:
    """Redraw the gate MLP of every VideoNSA attention layer of `model` in place, as the tiny models have it:
    g_proj_1 / g_proj_2 weights N(0, TINY_GATE_HIDDEN_GAIN / sqrt(hidden)) / N(0, TINY_GATE_OUTPUT_GAIN /
    sqrt(hidden)), g_proj_1 biases 0, g_proj_2 biases N(0, TINY_GATE_BIAS_STD); drawn from their own generator
    (seeded with `seed`), so the model's other weights are those of `seed` either way."""
    generator = torch.Generator().manual_seed(seed)
    normal = lambda tensor, std: torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype) * std  # noqa: E731
    with torch.no_grad():
        for module in model.modules():
            if not hasattr(module, "g_proj_1"):
                continue
            proj_1, proj_2 = module.g_proj_1, module.g_proj_2
            hidden = proj_1.in_features
            proj_1.weight.copy_(normal(proj_1.weight, TINY_GATE_HIDDEN_GAIN / hidden**0.5))
            proj_1.bias.zero_()
            proj_2.weight.copy_(normal(proj_2.weight, TINY_GATE_OUTPUT_GAIN / hidden**0.5))
            proj_2.bias.copy_(normal(proj_2.bias, TINY_GATE_BIAS_STD))


def tiny_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer (256 byte tokens, no merges) with Qwen2.5-VL's special tokens and a
    Qwen-style chat template.

    Built locally with the `tokenizers` library and wrapped as a transformers fast tokenizer: eos
    `<|im_end|>`, pad `<|endoftext|>`, `image_token` / `video_token` attributes as the Qwen2.5-VL processor
    expects.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(tok, special=True, normalized=False) for tok in SPECIAL_TOKENS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        model_max_length=1 << 17,
        padding_side="left",  # batched generation pads on the left
        chat_template=CHAT_TEMPLATE,
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )
    return tokenizer


def video_processor_available() -> bool:
    """Whether transformers' Qwen2-VL video processor can be built here (it needs torchvision)."""
    return importlib.util.find_spec("torchvision") is not None


def tiny_image_processor(
    *, min_pixels: int = 4 * PIXELS_PER_TOKEN, max_pixels: int = 16 * PIXELS_PER_TOKEN
) -> BaseImageProcessor:
    """Qwen2.5-VL's image processor with small pixel budgets (by default 4 to 16 tokens per image)."""
    from transformers import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor(
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
        patch_size=PATCH_SIZE,
        merge_size=SPATIAL_MERGE_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
    )


def tiny_processor(
    *, min_pixels: int = 4 * PIXELS_PER_TOKEN, max_pixels: int = 16 * PIXELS_PER_TOKEN
) -> ProcessorMixin:
    """Qwen2_5_VLProcessor over `tiny_tokenizer()` with small pixel budgets (4 to 16 tokens per image or frame
    pair).

    transformers' Qwen2.5-VL processor always holds a video processor, and video processors need torchvision:
    where it is missing this raises ImportError (`video_processor_available()` tells beforehand); the
    tokenizer and image processor alone (`tiny_tokenizer`, `tiny_image_processor`) work everywhere.
    """
    if not video_processor_available():
        raise ImportError("tiny_processor: transformers' Qwen2.5-VL processor needs torchvision")
    from transformers import Qwen2_5_VLProcessor, Qwen2VLVideoProcessor

    video_processor = Qwen2VLVideoProcessor(
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
        patch_size=PATCH_SIZE,
        merge_size=SPATIAL_MERGE_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
    )
    return Qwen2_5_VLProcessor(
        image_processor=tiny_image_processor(min_pixels=min_pixels, max_pixels=max_pixels),
        tokenizer=tiny_tokenizer(),
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def save_tiny_processor(path: str | os.PathLike) -> None:
    """Write the tiny processor's files: the whole Qwen2_5_VLProcessor where torchvision exists (then
    `AutoProcessor.from_pretrained(path)` works), else the tokenizer (with chat template) and image
    processor."""
    if video_processor_available():
        tiny_processor().save_pretrained(path)
    else:
        tiny_tokenizer().save_pretrained(path)
        tiny_image_processor().save_pretrained(path)


def save_tiny_checkpoint(
    path: str | os.PathLike,
    *,
    videonsa: bool = True,
    legacy_layout: bool = False,
    seed: int = 0,
    model: PreTrainedModel | None = None,
    spread_gates: bool = True,
    **config_kwargs: Any,
) -> Path:
    """Write a complete, offline-loadable checkpoint directory and return its path.

    Contents: config.json, model.safetensors, generation_config.json and the files of `save_tiny_processor`,
    so that `VideoNSAForConditionalGeneration.from_pretrained(path)`, `AutoTokenizer`, `AutoImageProcessor`
    and, where torchvision is installed, `AutoProcessor.from_pretrained(path)` work offline.

    Args:
        videonsa: a VideoNSA checkpoint (gates included) or, if False, a plain Qwen2.5-VL one.
        legacy_layout: write the weights with the flat key names of the released Enxin/VideoNSA checkpoint
            (`model.layers.*`, `visual.*`, `lm_head.*`) and its config (`model_type: qwen2_5_vl`).
        model: save this model instead of building a new one (its config is used as is).
        spread_gates: passed to `tiny_model`: spread-out gates (default) or new ones, all near 0.5.
        config_kwargs: passed to the tiny config builder (num_layers, num_heads, block_size, ...).
    """
    path = Path(path)
    if model is None:
        model = tiny_model(videonsa=videonsa, seed=seed, spread_gates=spread_gates, **config_kwargs)
    if legacy_layout:
        from videonsa.models.convert import save_legacy_layout

        save_legacy_layout(model, path)
    else:
        model.save_pretrained(path)
    save_tiny_processor(path)
    return path


def drop_layer_gates(path: str | os.PathLike, layer: int) -> int:
    """Remove decoder layer `layer`'s gate tensors (``g_proj_*``) from the checkpoint at `path` (its
    model.safetensors, current or legacy layout), making a partly gated checkpoint as a partial conversion leaves;
    returns how many tensors were removed (4 for a gated layer: two projections, weight and bias)."""
    from safetensors.torch import load_file, save_file

    weights = Path(path) / "model.safetensors"
    tensors = load_file(weights)
    gates = f".layers.{layer}.self_attn.g_proj_"
    kept = {name: tensor for name, tensor in tensors.items() if gates not in name}
    save_file(kept, weights, metadata={"format": "pt"})
    return len(tensors) - len(kept)


@dataclass
class TinyBatch:
    """Model inputs with video placeholders, built without a processor.

    input_ids, attention_mask, mm_token_type_ids: [B, T] (left padded); pixel_values_videos:
    [sum of t*h*w patches, 3 * 2 * 14 * 14]; video_grid_thw: [num_videos, 3] in patches.
    """

    input_ids: Tensor
    attention_mask: Tensor
    mm_token_type_ids: Tensor
    pixel_values_videos: Tensor
    video_grid_thw: Tensor

    def as_kwargs(self) -> dict[str, Tensor]:
        return dict(self.__dict__)


def enable_checkpointing(model: torch.nn.Module, settings: dict[str, Any]) -> None:
    """Gradient checkpointing on with `settings` (e.g. {"use_reentrant": False}): activation_checkpointing_enable in
    newer transformers, gradient_checkpointing_enable before the rename."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=settings)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=settings)


def tiny_video_batch(
    grids: Sequence[tuple[int, int, int]] = ((2, 4, 4),),
    *,
    text_before: Sequence[int] | int = 5,
    text_after: Sequence[int] | int = 4,
    seed: int = 0,
    vocab_size: int = BYTE_VOCAB_SIZE,
) -> TinyBatch:
    """One sample per video grid (t, h, w in patches; h and w even): random text tokens, then
    <|vision_start|> + t*h*w/4 <|video_pad|> + <|vision_end|>, then more random text; shorter samples are
    padded on the left. Text token ids are drawn from [0, vocab_size) (byte tokens by default)."""
    generator = torch.Generator().manual_seed(seed)
    count = len(grids)
    befores = [text_before] * count if isinstance(text_before, int) else list(text_before)
    afters = [text_after] * count if isinstance(text_after, int) else list(text_after)
    rows, types, pixels = [], [], []
    for (t, h, w), before, after in zip(grids, befores, afters, strict=True):
        if h % SPATIAL_MERGE_SIZE or w % SPATIAL_MERGE_SIZE:
            raise ValueError(f"grid {(t, h, w)}: h and w must be multiples of {SPATIAL_MERGE_SIZE}")
        vision_tokens = t * h * w // SPATIAL_MERGE_SIZE**2
        ids = torch.cat([
            torch.randint(0, vocab_size, (before,), generator=generator),
            torch.tensor([TOKEN_IDS["<|vision_start|>"]]),
            torch.full((vision_tokens,), TOKEN_IDS["<|video_pad|>"]),
            torch.tensor([TOKEN_IDS["<|vision_end|>"]]),
            torch.randint(0, vocab_size, (after,), generator=generator),
        ])
        rows.append(ids)
        types.append((ids == TOKEN_IDS["<|video_pad|>"]).long() * 2)
        patch_dim = 3 * TEMPORAL_PATCH_SIZE * PATCH_SIZE**2
        pixels.append(torch.randn(t * h * w, patch_dim, generator=generator))
    length = max(len(r) for r in rows)
    input_ids = torch.full((count, length), TOKEN_IDS["<|endoftext|>"])
    attention_mask = torch.zeros(count, length, dtype=torch.long)
    mm_token_type_ids = torch.zeros(count, length, dtype=torch.long)
    for i, (ids, kinds) in enumerate(zip(rows, types, strict=True)):
        input_ids[i, length - len(ids):] = ids
        attention_mask[i, length - len(ids):] = 1
        mm_token_type_ids[i, length - len(ids):] = kinds
    return TinyBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        mm_token_type_ids=mm_token_type_ids,
        pixel_values_videos=torch.cat(pixels),
        video_grid_thw=torch.tensor(list(grids), dtype=torch.long),
    )

