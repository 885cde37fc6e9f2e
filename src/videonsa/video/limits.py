"""Limits on source frames: sizes no sane video has, checked before anything is decoded."""

from __future__ import annotations

from videonsa.errors import UserError

# 8192 x 8192: above 8K video. Decoding one such RGB frame takes 200 MB; larger frames are almost certainly
# a mistake (a panorama or a scan) and would be scaled down to a few hundred tokens anyway.
DEFAULT_MAX_SOURCE_PIXELS = 8192 * 8192
# Qwen2.5-VL's resizing refuses frames more elongated than this.
MAX_ASPECT_RATIO = 200


def check_frame_dimensions(name: str, width: int, height: int, max_source_pixels: int) -> None:
    """Raise `UserError` naming `name` if a `width` x `height` frame is empty, enormous or too elongated."""
    if width <= 0 or height <= 0:
        raise UserError(f"{name}: its video stream reports no frame size (corrupt header?)")
    if width * height > max_source_pixels:
        raise UserError(
            f"{name}: resolution {width}x{height} is enormous (more than {max_source_pixels:,} pixels per "
            f"frame); scale it down first, e.g. ffmpeg -i IN -vf scale=1920:-2 OUT.mp4"
        )
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise UserError(
            f"{name}: frames of {width}x{height} are more elongated than {MAX_ASPECT_RATIO}:1, "
            f"which Qwen2.5-VL cannot take"
        )
