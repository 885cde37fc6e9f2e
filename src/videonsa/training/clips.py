"""Reading the chosen frames of a training clip: frame images with Pillow, video files through `videonsa.video`.

Both return uint8 frames [k, H, W, 3] already at the size the vision tower takes (`pixels.resized_frame_size`),
so the dataset never holds full-resolution frames: frame images are resized one by one as they are read, so a
550-frame 1080p sample peaks at one full-size image, not 550. Any failure (an image too large to decode safely
included) is raised as `ClipReadError`, which the dataset logs and skips; PyAV is imported only when a video
file is read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from videonsa.training.annotations import Sample
from videonsa.training.pixels import PixelRange, resize_frames, resized_frame_size
from videonsa.training.probe import ClipInfo, frames_at_rate


class ClipReadError(RuntimeError):
    """The frames of a clip could not be read (missing, truncated or corrupt file)."""


class ClipReader(Protocol):
    """Reads the frames at `positions` (indices among the clip's frames at `sample_fps`)."""

    def read(
        self, sample: Sample, clip: ClipInfo, positions: Sequence[int], sample_fps: float, pixels: PixelRange
    ) -> np.ndarray: ...


def frame_times(clip: ClipInfo, sample_fps: float, positions: Sequence[int], candidates: int) -> list[float]:
    """Seconds (from the clip's first frame) of the sampled frames at `positions`, `candidates` frames in all.

    The candidates divide the clip's duration into equal stretches and each is read at its stretch's start,
    which for a clip of duration d sampled at 4 fps is every 0.25 s.
    """
    duration = clip.duration if clip.duration else clip.num_frames / (clip.fps or sample_fps)
    return [clip.start_time + position * duration / candidates for position in positions]


class MediaReader:
    """The default `ClipReader`."""

    def read(
        self, sample: Sample, clip: ClipInfo, positions: Sequence[int], sample_fps: float, pixels: PixelRange
    ) -> np.ndarray:
        if sample.video is None:
            return self._read_images([sample.frames[position] for position in positions], pixels)
        return self._read_video(sample.video, clip, positions, sample_fps, pixels)

    @staticmethod
    def _read_images(paths: Sequence[str], pixels: PixelRange) -> np.ndarray:
        """Load and resize the images one at a time, so at most one is ever held at full resolution."""
        from PIL import Image

        frames: np.ndarray | None = None
        first_size = (0, 0)
        try:
            for index, path in enumerate(paths):
                with Image.open(path) as image:
                    if frames is None:
                        first_size = image.size
                        _check_source_size(path, *first_size)
                        frames = np.empty((len(paths), *resized_frame_size(image.height, image.width, pixels), 3),
                                          dtype=np.uint8)
                    elif image.size != first_size:
                        raise ClipReadError(f"frame {path} is {image.width}x{image.height} but the first is "
                                            f"{first_size[0]}x{first_size[1]}")
                    frames[index] = resize_frames([image], pixels)[0]
        except Image.DecompressionBombError as error:
            raise ClipReadError(f"frame image too large to decode safely ({error})") from None
        except (OSError, ValueError, SyntaxError) as error:
            raise ClipReadError(f"{type(error).__name__}: {error}") from None
        if frames is None:
            raise ClipReadError("no frames to read")
        return frames

    @staticmethod
    def _read_video(
        path: str, clip: ClipInfo, positions: Sequence[int], sample_fps: float, pixels: PixelRange
    ) -> np.ndarray:
        height, width = resized_frame_size(clip.height, clip.width, pixels)
        times = frame_times(clip, sample_fps, positions, frames_at_rate(clip, sample_fps))
        try:
            return _decode_video(path, clip, times, height, width)
        except Exception as error:  # decoding damaged files raises many error types; all mean "skip it"
            raise ClipReadError(f"{type(error).__name__}: {error}") from None


def _check_source_size(path: str, width: int, height: int) -> None:
    """Refuse frames larger than any sane video's before decoding them (the limit `videonsa ask` applies)."""
    from videonsa.video.limits import DEFAULT_MAX_SOURCE_PIXELS

    if width * height > DEFAULT_MAX_SOURCE_PIXELS:
        raise ClipReadError(f"frame {path} of {width}x{height} is too large (over {DEFAULT_MAX_SOURCE_PIXELS:,} "
                            "pixels)")


def _decode_video(path: str, clip: ClipInfo, times: Sequence[float], height: int, width: int) -> np.ndarray:
    """The frames showing at `times`, scaled to `height` x `width`, decoded by `videonsa.video`."""
    from pathlib import Path

    from videonsa.video import VideoInfo, VideoPlan, VisionGeometry, decode_video

    info = VideoInfo(
        name=path, backend="pyav", paths=(Path(path),), width=clip.width, height=clip.height,
        start_time=clip.start_time, duration=clip.duration or 0.0, frame_count=clip.num_frames,
        frame_count_is_exact=False, average_fps=clip.fps,
    )
    geometry = VisionGeometry()
    plan = VideoPlan(
        info=info, timestamps=tuple(times), frame_height=height, frame_width=width,
        tokens_per_patch=geometry.tokens_per_patch(height, width), text_tokens=0, budget_tokens=0,
        prefer="frames", geometry=geometry,
    )
    return decode_video(plan).frames
