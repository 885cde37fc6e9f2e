"""Frames to Qwen2.5-VL vision inputs (`pixel_values` + `grid_thw`), without transformers' image processors.

Qwen2.5-VL resizes a frame so both sides are multiples of 28 (patch 14 x merge 2) within a pixel range, normalises
it with the CLIP mean and standard deviation, and cuts it into 14 x 14 patches spanning 2 frames in time (a still
image is repeated to fill both). Patches are ordered so that each 2 x 2 group the merger fuses is contiguous.
One language-model token covers one such group: a 224 x 224 frame gives 16 x 16 patches, 64 tokens.

This is done here rather than through transformers' processors because their interface and their dependency on
torchvision change between the transformers versions this package supports; normalising and cutting patches is
`videonsa.video.patches.frames_to_patches`, shared with inference. The tests check this module against
transformers' own image processor wherever it can be built.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from videonsa.video.image_reader import rgb_image
from videonsa.video.patches import frames_to_patches
from videonsa.video.planning import frame_size

PATCH_SIZE = 14
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
SIZE_FACTOR = PATCH_SIZE * MERGE_SIZE


@dataclass(frozen=True)
class PixelRange:
    """Bounds on a frame's pixel count after resizing. The paper's recipe: at most 50,176 (224 x 224)."""

    min_pixels: int = 4 * SIZE_FACTOR**2
    max_pixels: int = 224 * 224

    def __post_init__(self) -> None:
        if not SIZE_FACTOR**2 <= self.min_pixels <= self.max_pixels:
            raise ValueError(f"pixel range [{self.min_pixels}, {self.max_pixels}] must be ordered and at least "
                             f"{SIZE_FACTOR**2} (one token)")


def resized_frame_size(height: int, width: int, pixels: PixelRange) -> tuple[int, int]:
    """(height, width) a frame is resized to: multiples of 28, aspect ratio kept as well as the rounding allows,
    area within the pixel range."""
    if min(height, width) <= 0 or max(height, width) / min(height, width) > 200:
        raise ValueError(f"frame of {width}x{height} pixels has an unusable aspect ratio")
    return frame_size(height, width, max_pixels=pixels.max_pixels, min_pixels=pixels.min_pixels, factor=SIZE_FACTOR)


def tokens_per_frame(height: int, width: int, pixels: PixelRange) -> int:
    """Language-model tokens of one image (or one 2-frame temporal patch of a video) of this size."""
    new_height, new_width = resized_frame_size(height, width, pixels)
    return (new_height // SIZE_FACTOR) * (new_width // SIZE_FACTOR)


def video_tokens(frame_count: int, height: int, width: int, pixels: PixelRange) -> int:
    """Tokens of `frame_count` frames fed as one video (pairs of frames share a temporal patch)."""
    return math.ceil(frame_count / TEMPORAL_PATCH_SIZE) * tokens_per_frame(height, width, pixels)


def frames_to_vision_inputs(
    frames: Sequence[np.ndarray | Image.Image], pixels: PixelRange, *, as_video: bool
) -> tuple[Tensor, Tensor]:
    """Resize, normalise and patchify frames: `resize_frames` then `patchify_frames`."""
    return patchify_frames(torch.from_numpy(resize_frames(frames, pixels)), as_video=as_video)


def resize_frames(frames: Sequence[np.ndarray | Image.Image], pixels: PixelRange) -> np.ndarray:
    """Frames (RGB uint8 [H, W, 3] arrays or PIL images, all of one size) resized for the vision tower.

    Returns uint8 [T, H', W', 3], H' and W' from `resized_frame_size`. Kept in uint8 so that a 550-frame clip
    crosses from dataloader workers to the trainer as 80 MB rather than 660 MB of float32 patches.
    """
    if not len(frames):
        raise ValueError("no frames to resize")
    height, width = np.asarray(frames[0]).shape[:2]
    new_height, new_width = resized_frame_size(height, width, pixels)
    out = np.empty((len(frames), new_height, new_width, 3), dtype=np.uint8)
    for index, frame in enumerate(frames):
        image = rgb_image(frame if isinstance(frame, Image.Image) else Image.fromarray(np.asarray(frame, np.uint8)))
        if image.size != (width, height):
            raise ValueError(f"frames differ in size: {image.size} vs {(width, height)}")
        if image.size != (new_width, new_height):
            image = image.resize((new_width, new_height), Image.Resampling.BICUBIC)
        out[index] = np.asarray(image)
    return out


def patchify_frames(frames: Tensor, *, as_video: bool) -> tuple[Tensor, Tensor]:
    """Normalise and patchify resized frames on whatever device they are on.

    frames: uint8 [T, H, W, 3] with H and W multiples of 28.
    Returns pixel_values float32 [patches, 3 * 2 * 14 * 14] and grid_thw int64 [items, 3] (in patches): one
    row per frame when `as_video` is False (each frame an image), else one row for the whole clip (an odd
    frame count repeats the last frame to fill the final temporal patch).
    """
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"expected frames [T, H, W, 3], got {tuple(frames.shape)}")
    if frames.shape[1] % SIZE_FACTOR or frames.shape[2] % SIZE_FACTOR:
        raise ValueError(f"frame size {tuple(frames.shape[1:3])} is not a multiple of {SIZE_FACTOR}")
    if as_video:
        missing = -frames.shape[0] % TEMPORAL_PATCH_SIZE
        if missing:
            frames = torch.cat([frames, frames[-1:].expand(missing, -1, -1, -1)])
        return frames_to_patches(frames)
    # A still image is a temporal patch of one repeated frame; the patches of N images are those of a video
    # of N repeated frames, with one grid row per image.
    patches, grid = frames_to_patches(frames.repeat_interleave(TEMPORAL_PATCH_SIZE, dim=0))
    count, grid_h, grid_w = grid[0].tolist()
    rows = torch.tensor([[1, grid_h, grid_w]] * count, dtype=torch.long, device=frames.device)
    return patches, rows
