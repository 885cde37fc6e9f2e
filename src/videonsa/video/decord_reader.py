"""Frame reading with decord, used only when asked for (`backend="decord"`) and installed.

Probing stays with PyAV so that every backend reports bad files the same way; decord then reads the frames
showing at the planned times, resizing as it decodes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from videonsa.errors import UserError, first_line
from videonsa.video.info import VideoInfo

# A frame counts as showing at time t when its timestamp is at most t plus this (float rounding of t).
TIME_TOLERANCE = 1e-4
# Frames fetched per call, so the progress callback moves on long videos.
BATCH_FRAMES = 32

Progress = Callable[[int, int], None]


def import_decord():
    """The decord module, or `UserError` saying how to get it."""
    try:
        import decord
    except ImportError:
        raise UserError("backend 'decord' needs the decord package: pip install decord") from None
    return decord


def read_frames(
    info: VideoInfo,
    timestamps: Sequence[float],
    height: int,
    width: int,
    progress: Progress | None = None,
) -> tuple[np.ndarray, list[float], dict[str, int]]:
    """Decode the frames showing at `timestamps` with decord, scaled to `height` x `width` RGB.

    Returns (frames uint8 [N, height, width, 3], each frame's own timestamp in seconds, work counters).
    """
    decord = import_decord()
    path = info.paths[0]
    try:
        reader = decord.VideoReader(str(path), width=width, height=height)
        starts = reader.get_frame_timestamp(range(len(reader)))[:, 0]
    except decord.DECORDError as error:
        raise UserError(f"{path}: decord cannot read it ({first_line(error)})") from None
    indices = np.searchsorted(starts, np.asarray(timestamps) + TIME_TOLERANCE, side="right") - 1
    indices = np.clip(indices, 0, len(starts) - 1)
    frames = np.empty((len(timestamps), height, width, 3), dtype=np.uint8)
    for first in range(0, len(indices), BATCH_FRAMES):
        chunk = indices[first : first + BATCH_FRAMES].tolist()
        try:
            frames[first : first + len(chunk)] = reader.get_batch(chunk).asnumpy()
        except decord.DECORDError as error:
            raise UserError(f"{path}: decord failed to decode it ({first_line(error)})") from None
        if progress is not None:
            progress(first + len(chunk), len(indices))
    return frames, [float(starts[index]) for index in indices], {"frames_decoded": len(indices), "seeks": 0}
