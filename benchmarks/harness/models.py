"""Qwen2.5-VL-7B-shaped models with random weights and video prompts, for the end-to-end benchmarks (no
checkpoint needed)."""

from __future__ import annotations

import torch

from harness.shapes import QWEN2_5_VL_7B_TEXT, QWEN2_5_VL_7B_VISION
from videonsa.models import VideoNSAConfig, VideoNSAModel
from videonsa.testing import TOKEN_IDS, tiny_vision_config_kwargs

VIDEO_TEXT = 64  # text tokens before and after the video in video_inputs
VIDEO_GRID = (16, 16)  # patches per frame: 8 x 8 merged tokens per temporal patch


def qwen7b_config(num_layers: int = 28, attention_mode: str = "nsa", vision: str = "tiny") -> VideoNSAConfig:
    """A VideoNSA config with Qwen2.5-VL-7B's language model (its first `num_layers` layers).

    vision="tiny": the test suite's tiny vision tower, for benchmarks that feed vision tokens as embeddings (the
    tower never runs; the GPU memory is left to the language model); vision="7b": Qwen2.5-VL-7B's own 32-block
    tower, for benchmarks that encode frames. Special token ids are `videonsa.testing`'s tiny tokenizer's.
    """
    ids = TOKEN_IDS
    text = {**QWEN2_5_VL_7B_TEXT, "num_hidden_layers": num_layers, "attention_mode": attention_mode,
            "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"]}
    if vision not in ("tiny", "7b"):
        raise ValueError(f"vision must be 'tiny' or '7b', got {vision!r}")
    tower = dict(QWEN2_5_VL_7B_VISION) if vision == "7b" else tiny_vision_config_kwargs(
        out_hidden_size=text["hidden_size"])
    config = VideoNSAConfig(
        text_config=text,
        vision_config=tower,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    return config


def random_model(config: VideoNSAConfig, device: str | torch.device = "cuda", dtype: torch.dtype = torch.bfloat16,
                 cls: type = VideoNSAModel):
    """`cls(config)` (VideoNSAModel, or VideoNSAForConditionalGeneration for generation) built directly on
    `device` in `dtype` with random weights, in eval mode."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def video_prompt(
    seq_len: int,
    text_before: int = 64,
    text_after: int = 64,
    hidden: int = 3584,
    device: str = "cuda",
    tokens_per_frame: tuple[int, int] = (8, 8),
    time_step: int = 2,
):
    """A prompt that is mostly video: [text_before text | video tokens | text_after text].

    Position ids are Qwen2.5-VL's M-RoPE ids of such a prompt: text counts up on all three axes; the video
    is a grid of temporal patches of `tokens_per_frame` (rows, columns) merged tokens, token (g, r, c) at
    (start + g * time_step, start + r, start + c) (time_step = tokens_per_second * seconds per patch); the text
    after it continues from the largest id + 1. The `official` mode tells vision from text by these ids.

    Returns (inputs_embeds [1, T, hidden] bf16, mm_token_type_ids [1, T], position_ids [3, 1, T]).
    """
    token_type = torch.zeros(1, seq_len, dtype=torch.long, device=device)
    token_type[:, text_before : seq_len - text_after] = 2
    embeds = torch.randn(1, seq_len, hidden, device=device, dtype=torch.bfloat16) * 0.02
    rows, cols = tokens_per_frame
    video = torch.arange(seq_len - text_before - text_after, device=device)
    grid = torch.stack((video // (rows * cols) * time_step, video // cols % rows, video % cols))
    video_ids = text_before + grid
    after_start = int(video_ids.max()) + 1 if video.numel() else text_before
    positions = torch.cat(
        (
            torch.arange(text_before, device=device).expand(3, text_before),
            video_ids,
            torch.arange(after_start, after_start + text_after, device=device).expand(3, text_after),
        ),
        dim=1,
    )
    return embeds, token_type, positions[:, None, :]


def video_inputs(seq_len: int, device: str = "cuda") -> dict[str, torch.Tensor]:
    """Model inputs (ids, mask, token types, pixels, grid) of a prompt of `seq_len` tokens: 64 text tokens,
    <|vision_start|>, T - 130 video tokens (8 x 8 merged tokens per temporal patch, 2 frames each, one second per
    temporal patch), <|vision_end|>, 64 text tokens; random pixels for the vision tower."""
    per_patch = VIDEO_GRID[0] * VIDEO_GRID[1] // 4
    patches = (seq_len - 2 * VIDEO_TEXT - 2) // per_patch
    video_tokens = patches * per_patch
    generator = torch.Generator(device="cpu").manual_seed(0)
    text = torch.randint(0, 256, (2 * VIDEO_TEXT,), generator=generator)
    ids = torch.cat([
        text[:VIDEO_TEXT], torch.tensor([TOKEN_IDS["<|vision_start|>"]]),
        torch.full((video_tokens,), TOKEN_IDS["<|video_pad|>"]), torch.tensor([TOKEN_IDS["<|vision_end|>"]]),
        text[VIDEO_TEXT:],
    ]).unsqueeze(0)
    pixels = torch.randn(patches * VIDEO_GRID[0] * VIDEO_GRID[1], 3 * 2 * 14 * 14, device=device, dtype=torch.bfloat16)
    return {
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids, device=device),
        "mm_token_type_ids": (2 * (ids == TOKEN_IDS["<|video_pad|>"]).long()).to(device),
        "pixel_values_videos": pixels,
        "video_grid_thw": torch.tensor([[patches, *VIDEO_GRID]], device=device),
        "second_per_grid_ts": torch.tensor([1.0], device=device),
    }
