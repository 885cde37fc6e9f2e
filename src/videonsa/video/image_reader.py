"""A folder of frame images, or a list of image files, read as a video shown at a given frame rate."""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from videonsa.errors import UserError
from videonsa.video.info import VideoInfo
from videonsa.video.limits import check_frame_dimensions

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})
# A frame counts as showing at time t when it starts at most this much after t (float rounding of t).
TIME_TOLERANCE = 1e-6

Progress = Callable[[int, int], None]


def natural_sort_key(path: Path) -> list:
    """Sort key that orders embedded numbers by value, so frame_2.png comes before frame_10.png."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


def frame_images_in(folder: Path) -> tuple[Path, ...]:
    """The image files directly inside `folder`, in natural order, hidden files left out; `UserError` if there are
    none.

    Hidden files are never frames: macOS writes a "._frame_1.png" metadata file beside each image it copies to a
    non-Mac drive, which sorts first and is not an image."""
    images = sorted(
        (
            path
            for path in folder.iterdir()
            if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES
        ),
        key=natural_sort_key,
    )
    if not images:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise UserError(f"{folder}: folder holds no frame images ({suffixes})")
    return tuple(images)


def _image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the image header, without decoding the pixels."""
    try:
        with warnings.catch_warnings():
            # Sizes are judged by `check_frame_dimensions`, with a message of ours.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return image.size
    except Image.DecompressionBombError as error:
        raise UserError(f"{path}: image is too large to decode safely ({error})") from None
    except (UnidentifiedImageError, OSError) as error:
        raise UserError(f"{path}: not a readable image ({error})") from None


def probe_images(name: str, paths: Sequence[Path], *, frames_fps: float, max_source_pixels: int) -> VideoInfo:
    """Describe `paths` as a video showing image i from i / frames_fps seconds (reads one image header)."""
    if not (math.isfinite(frames_fps) and frames_fps > 0):
        raise UserError(f"frames_fps must be a positive frame rate for image frames, got {frames_fps}")
    for path in paths:
        if not path.is_file():
            raise UserError(f"{path}: no such image file")
    if len(paths) < 2:
        raise UserError(f"{name}: has a single frame image; at least 2 are needed (one temporal patch)")
    width, height = _image_size(paths[0])
    check_frame_dimensions(str(paths[0]), width, height, max_source_pixels)
    return VideoInfo(
        name=name,
        backend="images",
        paths=tuple(paths),
        width=width,
        height=height,
        start_time=0.0,
        duration=len(paths) / frames_fps,
        frame_count=len(paths),
        frame_count_is_exact=True,
        average_fps=frames_fps,
    )


def rgb_image(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB. Integer grayscale of more than 8 bits (modes ``I;16*``, and ``I``, which Pillow also
    gives 16-bit PNGs and TIFFs) is scaled from 0-65535 to 0-255: Pillow's own conversion clips every value above
    255, so a 16-bit frame would come out almost white. Float grayscale (mode ``F``, 32-bit float TIFFs) is
    scaled from 0-1 (`float_image_as_gray`)."""
    if image.mode.startswith("I;16") or image.mode == "I":
        wide = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        image = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8))  # mode L
    elif image.mode == "F":
        image = float_image_as_gray(image)
    return image if image.mode == "RGB" else image.convert("RGB")


def float_image_as_gray(image: Image.Image) -> Image.Image:
    """A mode ``F`` image as 8-bit grayscale, its 0-1 range scaled to 0-255. Pillow's own conversion clips to
    0-255 instead, which turns a 0-1 frame black; and a float image has no agreed range, so values outside 0-1
    (or not finite) are a `UserError` rather than a guess that would change brightness from frame to frame."""
    values = np.asarray(image, dtype=np.float64)
    if not np.isfinite(values).all():
        raise UserError("float image holds NaN or infinite values; convert the frames to 8-bit images")
    low, high = float(values.min()), float(values.max())
    if low < 0 or high > 1:
        raise UserError(f"float image with values from {low:g} to {high:g}; float frames are read as 0-1 "
                        "(convert them to 8-bit images, or scale them to 0-1)")
    return Image.fromarray(np.round(values * 255).astype(np.uint8))  # mode L


def _load_frame(path: Path, expected_size: tuple[int, int], height: int, width: int) -> np.ndarray:
    """One image as uint8 RGB [height, width, 3], resized with bicubic filtering as soon as it is decoded, so only
    one image is ever held at full resolution."""
    try:
        with Image.open(path) as image:
            if image.size != expected_size:
                raise UserError(
                    f"{path}: is {image.size[0]}x{image.size[1]} but the first frame is "
                    f"{expected_size[0]}x{expected_size[1]}; all frames must have one size"
                )
            try:
                rgb = rgb_image(image)
            except UserError as error:
                raise UserError(f"{path}: {error}") from None
            if rgb.size != (width, height):
                rgb = rgb.resize((width, height), Image.Resampling.BICUBIC)
            return np.asarray(rgb, dtype=np.uint8)
    except Image.DecompressionBombError as error:
        raise UserError(f"{path}: image is too large to decode safely ({error})") from None
    except (UnidentifiedImageError, OSError) as error:
        raise UserError(f"{path}: not a readable image ({error})") from None


def read_frames(
    info: VideoInfo,
    timestamps: Sequence[float],
    height: int,
    width: int,
    progress: Progress | None = None,
) -> tuple[np.ndarray, list[float], dict[str, int]]:
    """Load the images showing at `timestamps`, scaled to `height` x `width`.

    Returns (frames uint8 [N, height, width, 3], each frame's own timestamp in seconds, work counters).
    """
    fps = info.average_fps
    frames = np.empty((len(timestamps), height, width, 3), dtype=np.uint8)
    times: list[float] = []
    for slot, time in enumerate(timestamps):
        index = min(len(info.paths) - 1, max(0, math.floor((time - info.start_time) * fps + TIME_TOLERANCE)))
        frames[slot] = _load_frame(info.paths[index], (info.width, info.height), height, width)
        times.append(info.start_time + index / fps)
        if progress is not None:
            progress(slot + 1, len(timestamps))
    return frames, times, {"frames_decoded": len(timestamps), "seeks": 0}
