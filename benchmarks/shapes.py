"""Qwen2.5-VL-7B shapes with random weights, for GPU benchmarks (no checkpoint needed)."""

from __future__ import annotations

import torch

from videonsa.models import VideoNSAConfig, VideoNSAModel
from videonsa.testing import TOKEN_IDS, tiny_vision_config_kwargs

# Qwen2.5-VL-7B-Instruct's language model.
QWEN2_5_VL_7B_TEXT = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    max_position_embeddings=262144,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
    tie_word_embeddings=False,
)


def qwen7b_config(num_layers: int = 28, attention_mode: str = "nsa") -> VideoNSAConfig:
    """A VideoNSA config with the 7B language model (first `num_layers` layers) and a tiny vision tower.

    Benchmarks feed vision tokens as embeddings, so the vision tower is never run; it is kept tiny to leave
    the GPU memory to the language model.
    """
    text = {**QWEN2_5_VL_7B_TEXT, "num_hidden_layers": num_layers, "attention_mode": attention_mode}
    config = VideoNSAConfig(
        text_config=text,
        vision_config=tiny_vision_config_kwargs(out_hidden_size=text["hidden_size"]),
        image_token_id=TOKEN_IDS["<|image_pad|>"],
        video_token_id=TOKEN_IDS["<|video_pad|>"],
        vision_start_token_id=TOKEN_IDS["<|vision_start|>"],
        vision_end_token_id=TOKEN_IDS["<|vision_end|>"],
    )
    config._attn_implementation = "sdpa"
    return config


def random_model(config: VideoNSAConfig, device: str = "cuda", dtype: torch.dtype = torch.bfloat16) -> VideoNSAModel:
    """VideoNSAModel built directly on `device` in `dtype` with random weights."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = VideoNSAModel(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def video_prompt(seq_len: int, text_before: int = 64, text_after: int = 64, hidden: int = 3584, device: str = "cuda"):
    """A prompt that is mostly video: [text_before text | video tokens | text_after text].

    Returns (inputs_embeds [1, T, hidden] bf16, mm_token_type_ids [1, T], position_ids [3, 1, T]).
    """
    token_type = torch.zeros(1, seq_len, dtype=torch.long, device=device)
    token_type[:, text_before : seq_len - text_after] = 2
    embeds = torch.randn(1, seq_len, hidden, device=device, dtype=torch.bfloat16) * 0.02
    positions = torch.arange(seq_len, device=device).expand(3, 1, seq_len)
    return embeds, token_type, positions
