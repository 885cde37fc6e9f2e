"""Frames to Qwen2.5-VL vision input, checked against transformers' own processors."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from transformers import Qwen2VLImageProcessor

from videonsa.video import VisionGeometry, frames_to_patches, seconds_per_temporal_patch
from videonsa.video.patches import CLIP_MEAN, CLIP_STD


def random_frames(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, height, width, 3), dtype=np.uint8)


@pytest.mark.parametrize(("height", "width"), [(56, 56), (84, 140), (112, 56)])
def test_a_still_frame_pair_matches_the_image_processor(height, width):
    """transformers turns an image into one temporal patch of the frame repeated: the same layout as ours."""
    frame = random_frames(1, height, width)[0]
    processor = Qwen2VLImageProcessor(size={"shortest_edge": 28 * 28, "longest_edge": 28 * 28 * 64})
    expected = processor(images=[frame], return_tensors="pt")
    pixels, grid = frames_to_patches(np.stack([frame, frame]))
    assert grid.tolist() == expected["image_grid_thw"].tolist() == [[1, height // 14, width // 14]]
    torch.testing.assert_close(pixels, expected["pixel_values"].to(torch.float32), atol=1e-5, rtol=1e-5)


def test_temporal_patches_hold_their_own_frames_in_order():
    frames = random_frames(4, 56, 84, seed=1)
    pixels, grid = frames_to_patches(frames)
    assert grid.tolist() == [[2, 4, 6]]
    assert pixels.shape == (2 * 4 * 6, 3 * 2 * 14 * 14)
    # Row 0 of patch 1 is the top-left 14x14 block of frames 2 and 3: [channel, time, y, x].
    block = pixels[4 * 6].view(3, 2, 14, 14)
    normalised = (torch.tensor(frames[2:4, :14, :14]).float() / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(block, normalised.permute(3, 0, 1, 2), atol=1e-5, rtol=1e-5)
    # Rows come in merge order: the 2x2 group of the top-left merged token first (row 1 = patch (y 0, x 1)).
    second = pixels[1].view(3, 2, 14, 14)[:, 0]
    expected = (torch.tensor(frames[0, :14, 14:28]).float() / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(second, expected.permute(2, 0, 1), atol=1e-5, rtol=1e-5)


def test_shapes_that_do_not_fit_the_encoder_are_refused():
    with pytest.raises(ValueError, match="multiple of 2"):
        frames_to_patches(random_frames(3, 56, 56))
    with pytest.raises(ValueError, match="multiples of 28"):
        frames_to_patches(random_frames(2, 56, 70))
    with pytest.raises(ValueError):
        frames_to_patches(random_frames(2, 56, 56), VisionGeometry(temporal_patch_size=4))


@pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is None, reason="transformers' video processor needs torchvision"
)
def test_matches_transformers_video_processor_where_it_runs():
    from transformers import Qwen2VLVideoProcessor

    frames = random_frames(6, 84, 112, seed=2)
    processor = Qwen2VLVideoProcessor(size={"shortest_edge": 84 * 112, "longest_edge": 84 * 112})
    expected = processor(videos=[frames], return_tensors="pt", do_sample_frames=False)
    pixels, grid = frames_to_patches(frames)
    assert grid.tolist() == expected["video_grid_thw"].tolist()
    torch.testing.assert_close(pixels, expected["pixel_values_videos"].to(torch.float32), atol=1e-5, rtol=1e-5)


def test_seconds_per_patch_from_real_timestamps():
    assert seconds_per_temporal_patch([0.0, 0.25, 0.5, 0.75]) == pytest.approx(0.5)
    assert seconds_per_temporal_patch([10.0, 11.0, 12.0, 13.0, 14.0, 15.0]) == pytest.approx(2.0)
    irregular = [0.0, 0.2, 0.5, 0.5, 1.0, 1.0, 1.5, 1.7]
    assert seconds_per_temporal_patch(irregular) == pytest.approx(2 * np.polyfit(range(8), irregular, 1)[0])
    assert seconds_per_temporal_patch([3.0, 3.0]) == 0.0
