"""Frames to vision inputs: checked against transformers' image processor and `videonsa.video`'s patches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from videonsa.training.pixels import (
    PixelRange,
    frames_to_vision_inputs,
    patchify_frames,
    resize_frames,
    resized_frame_size,
    tokens_per_frame,
)


def random_frames(count: int, height: int, width: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (height, width, 3), dtype=np.uint8) for _ in range(count)]


@pytest.mark.parametrize(("height", "width"), [(90, 130), (224, 224), (60, 300)])
def test_images_match_transformers_image_processor(height, width):
    pil_processor = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    pixels = PixelRange(min_pixels=3136, max_pixels=112 * 112)
    frames = random_frames(3, height, width)
    values, grid = frames_to_vision_inputs(frames, pixels, as_video=False)
    processor = pil_processor.Qwen2VLImageProcessorPil(size={"shortest_edge": 3136, "longest_edge": 112 * 112})
    expected = processor(images=frames, return_tensors="pt")
    assert torch.equal(grid, expected["image_grid_thw"])
    torch.testing.assert_close(values, expected["pixel_values"].float(), atol=1e-5, rtol=0)


def test_video_patches_match_videonsa_video():
    from videonsa.video import frames_to_patches

    frames = np.stack(random_frames(6, 56, 84, seed=1))
    values, grid = patchify_frames(torch.from_numpy(frames), as_video=True)
    expected_values, expected_grid = frames_to_patches(frames)
    assert torch.equal(grid, expected_grid)
    torch.testing.assert_close(values, expected_values, atol=1e-6, rtol=0)


def test_odd_frame_count_repeats_the_last_frame():
    frames = torch.from_numpy(np.stack(random_frames(3, 28, 28, seed=2)))
    odd, grid = patchify_frames(frames, as_video=True)
    even, _ = patchify_frames(torch.cat([frames, frames[-1:]]), as_video=True)
    assert grid.tolist() == [[2, 2, 2]]
    assert torch.equal(odd, even)


def test_an_image_is_a_video_patch_of_one_repeated_frame():
    frames = torch.from_numpy(np.stack(random_frames(2, 56, 56, seed=3)))
    as_images, grid = patchify_frames(frames, as_video=False)
    doubled, _ = patchify_frames(frames.repeat_interleave(2, dim=0), as_video=True)
    assert grid.tolist() == [[1, 4, 4], [1, 4, 4]]
    assert torch.equal(as_images, doubled)


def test_frame_size_matches_videonsa_video_planning():
    from videonsa.video.planning import frame_size

    pixels = PixelRange(min_pixels=3136, max_pixels=50176)
    for height, width in [(360, 640), (1080, 1920), (50, 50), (224, 224), (100, 3000), (27, 29)]:
        expected = frame_size(height, width, max_pixels=50176, min_pixels=3136)
        assert resized_frame_size(height, width, pixels) == expected


def test_the_papers_frame_costs_64_tokens():
    assert tokens_per_frame(224, 224, PixelRange()) == 64
    assert tokens_per_frame(720, 1280, PixelRange()) <= 64


def test_resize_keeps_uint8_and_rejects_mixed_sizes():
    frames = random_frames(2, 100, 150)
    resized = resize_frames(frames, PixelRange(3136, 112 * 112))
    assert resized.dtype == np.uint8 and resized.shape[1] % 28 == 0 and resized.shape[2] % 28 == 0
    with pytest.raises(ValueError, match="differ in size"):
        resize_frames([frames[0], frames[1][:50]], PixelRange())


def test_sixteen_bit_grayscale_frames_are_scaled_not_clipped():
    from PIL import Image

    ramp = np.linspace(0, 65535, 56 * 56).round().astype(np.uint16).reshape(56, 56)
    image = Image.fromarray(ramp)
    assert image.mode == "I;16"
    resized = resize_frames([image], PixelRange(56 * 56, 56 * 56))[0]
    expected = np.round(ramp / 65535 * 255).astype(np.uint8)  # Pillow's own conversion made 255 of nearly all
    for channel in range(3):
        np.testing.assert_array_equal(resized[:, :, channel], expected)
