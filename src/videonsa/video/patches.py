"""Decoded frames to Qwen2.5-VL's vision input: flattened patches, their grid, and seconds per temporal patch.

This is what transformers' Qwen2-VL video processor does after resizing (rescale to [0, 1], normalise,
cut into patches in the vision encoder's order). That processor needs torchvision, which has no build for
every torch this project runs on, so the few tensor reshapes live here and are checked in tests against
transformers' image processor (a still image is a video patch of one repeated frame).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from videonsa.errors import UserError
from videonsa.video.planning import VisionGeometry

# OpenAI CLIP's statistics, which Qwen2.5-VL's processors use unless their config says otherwise.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def frames_to_patches(
    frames: np.ndarray | torch.Tensor,
    geometry: VisionGeometry | None = None,
    *,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn uint8 RGB frames [N, H, W, 3] into (pixel_values_videos, video_grid_thw) for one video.

    N must be a multiple of the temporal patch size and H, W multiples of patch_size * merge_size.
    Returns float32 [T * h * w, 3 * temporal_patch_size * patch_size**2] with T = N / temporal_patch_size,
    h = H / patch_size, w = W / patch_size, rows in the order the vision encoder merges them, and
    int64 [1, 3] holding (T, h, w).
    """
    geometry = geometry or VisionGeometry()
    # Tensors stay on their device (training patchifies on the GPU); arrays become CPU tensors.
    video = frames if isinstance(frames, torch.Tensor) else torch.as_tensor(np.asarray(frames))
    count, height, width, channels = video.shape
    step, patch, merge = geometry.temporal_patch_size, geometry.patch_size, geometry.merge_size
    if count % step or height % (patch * merge) or width % (patch * merge) or channels != 3:
        raise ValueError(
            f"frames of shape {tuple(video.shape)} do not fit the vision encoder: need a multiple of {step} "
            f"RGB frames of sides that are multiples of {patch * merge}"
        )
    pixels = video.permute(0, 3, 1, 2).to(torch.float32) / 255.0
    statistic = lambda values: torch.tensor(values, device=video.device).view(1, 3, 1, 1)  # noqa: E731
    pixels = (pixels - statistic(mean)) / statistic(std)
    grid_t, grid_h, grid_w = count // step, height // patch, width // patch
    pixels = pixels.reshape(grid_t, step, 3, grid_h // merge, merge, patch, grid_w // merge, merge, patch)
    # -> [T, h/merge, w/merge, merge_h, merge_w, channel, time, patch_y, patch_x]
    pixels = pixels.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    flat = pixels.reshape(grid_t * grid_h * grid_w, 3 * step * patch * patch)
    return flat.contiguous(), torch.tensor([[grid_t, grid_h, grid_w]], dtype=torch.int64, device=video.device)


def seconds_per_temporal_patch(timestamps: Sequence[float], temporal_patch_size: int = 2) -> float:
    """Seconds from one temporal patch to the next, fitted to the frames' real timestamps.

    Qwen2.5-VL places patch k at time position k * seconds_per_patch * tokens_per_second, one spacing per
    video; the least-squares slope of timestamp against frame index keeps every patch as close as possible
    to when its frames really show, also for variable-frame-rate sources.
    """
    times = np.asarray(timestamps, dtype=np.float64)
    if times.size < 2:
        raise UserError("a video needs at least 2 frames (one temporal patch)")
    index = np.arange(times.size, dtype=np.float64)
    slope = float(np.polyfit(index, times, 1)[0])
    return max(slope, 0.0) * temporal_patch_size
