"""The video front door: probe what the user gave, plan the frames, decode them.

    >>> info = probe_video("talk.mp4")
    >>> plan = plan_video(info, SamplingSettings(budget_tokens=32_768), text_tokens=300)
    >>> video = decode_video(plan)          # video.frames: uint8 [N, H, W, 3]

A video is a file (PyAV by default, decord if asked), a folder of frame images, or a list of image paths.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from videonsa.errors import UserError
from videonsa.video import decord_reader, image_reader, pyav_reader
from videonsa.video.info import VideoInfo
from videonsa.video.limits import DEFAULT_MAX_SOURCE_PIXELS
from videonsa.video.patches import seconds_per_temporal_patch
from videonsa.video.planning import DEFAULT_FPS, SamplingSettings, VideoPlan, VisionGeometry, plan_video

VideoInput = str | os.PathLike | Sequence[str | os.PathLike]
Progress = Callable[[int, int], None]
BACKENDS: tuple[str, ...] = ("pyav", "decord")
_FILE_READERS = {"pyav": pyav_reader.read_frames, "decord": decord_reader.read_frames}


@dataclass(frozen=True)
class DecodedVideo:
    """Sampled frames ready for the model, with the times they really show at.

    frames: uint8 [N, H, W, 3] (N = plan.frame_count, H x W = the plan's frame size).
    timestamps: each frame's own presentation time in seconds (not the planned time it was picked for).
    """

    frames: np.ndarray
    timestamps: tuple[float, ...]
    plan: VideoPlan
    frames_decoded: int
    seeks: int
    seconds: float

    @property
    def seconds_per_patch(self) -> float:
        """Spacing of the temporal patches fitted to the real timestamps (Qwen2.5-VL's second_per_grid_ts)."""
        return seconds_per_temporal_patch(self.timestamps, self.plan.geometry.temporal_patch_size)


def _as_path_list(video: Sequence) -> list[Path]:
    if not video:
        raise UserError("the list of frame images is empty")
    if not all(isinstance(item, (str, os.PathLike)) for item in video):
        raise UserError("a video given as a list must list image file paths")
    return [Path(item).expanduser() for item in video]


def probe_video(
    video: VideoInput,
    *,
    backend: str = "pyav",
    frames_fps: float = DEFAULT_FPS,
    max_source_pixels: int = DEFAULT_MAX_SOURCE_PIXELS,
) -> VideoInfo:
    """Check that `video` is readable and describe it; decodes at most two frames.

    `video` is a video file, a folder of frame images or a list of image paths; images are taken to show
    `frames_fps` per second. `backend` ("pyav" or "decord") reads video files. Raises `UserError` naming the
    file for a missing, unreadable, corrupt, audio-only, single-frame or enormous input.
    """
    if backend not in BACKENDS:
        raise UserError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if not isinstance(video, (str, os.PathLike)):
        if isinstance(video, Sequence):
            paths = _as_path_list(video)
            name = f"{paths[0].parent / '*'} ({len(paths)} images)"
            return image_reader.probe_images(name, paths, frames_fps=frames_fps, max_source_pixels=max_source_pixels)
        raise UserError(f"a video must be a file path, a folder of frames or a list of image paths, got {video!r}")
    path = Path(video).expanduser()
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    if path.is_dir():
        paths = image_reader.frame_images_in(path)
        return image_reader.probe_images(str(path), paths, frames_fps=frames_fps, max_source_pixels=max_source_pixels)
    _require_regular_file(path)
    if backend == "decord":
        decord_reader.import_decord()
    info = pyav_reader.probe_file(path, max_source_pixels=max_source_pixels)
    return info if backend == "pyav" else _with_backend(info, backend)


def _require_regular_file(path: Path) -> None:
    """Refuse named pipes, sockets and devices: opening one for reading blocks until a writer appears (a FIFO)
    or never ends (/dev/zero), so `videonsa ask` would hang instead of saying what is wrong."""
    mode = path.stat().st_mode
    if stat.S_ISREG(mode):
        return
    kind = (
        "a named pipe (FIFO)" if stat.S_ISFIFO(mode)
        else "a socket" if stat.S_ISSOCK(mode)
        else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        else "a special file"
    )
    raise UserError(f"{path}: is {kind}, not a file; pass a video file or a folder of frames")


def _with_backend(info: VideoInfo, backend: str) -> VideoInfo:
    fields = {name: getattr(info, name) for name in info.__dataclass_fields__}
    return VideoInfo(**{**fields, "backend": backend})


def decode_video(plan: VideoPlan, *, progress: Progress | None = None) -> DecodedVideo:
    """Decode the frames `plan` picked, at the plan's size; `progress(done, total)` follows each frame."""
    info = plan.info
    read = image_reader.read_frames if info.backend == "images" else _FILE_READERS[info.backend]
    started = time.perf_counter()
    frames, timestamps, counters = read(info, plan.timestamps, plan.frame_height, plan.frame_width, progress)
    return DecodedVideo(
        frames=frames,
        timestamps=tuple(timestamps),
        plan=plan,
        frames_decoded=counters["frames_decoded"],
        seeks=counters["seeks"],
        seconds=time.perf_counter() - started,
    )


def load_video(
    video: VideoInput,
    settings: SamplingSettings | None = None,
    *,
    text_tokens: int = 0,
    geometry: VisionGeometry | None = None,
    backend: str = "pyav",
    frames_fps: float = DEFAULT_FPS,
    progress: Progress | None = None,
) -> DecodedVideo:
    """Probe, plan and decode `video` in one call (see `probe_video`, `plan_video`, `decode_video`)."""
    info = probe_video(video, backend=backend, frames_fps=frames_fps)
    plan = plan_video(info, settings, text_tokens=text_tokens, geometry=geometry)
    return decode_video(plan, progress=progress)
