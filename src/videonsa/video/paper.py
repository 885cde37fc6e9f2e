"""The paper preset: the frames and frame size the released VideoNSA checkpoint was evaluated with.

The paper's evaluation read each video with a fixed rule instead of our token-budget planner (see
`docs/official-mode.md`, "Paper preset"):

- Frame count: `total / video_fps * fps` frames, at least 4, at most `max_frames` rounded down to even and at
  most the video's frame count, then rounded down to even (`paper_frame_count`).
- Frame indices: `round(linspace(0, total - 1, count))` in float32 with round-half-to-even
  (`paper_frame_indices`).
- Frame size: Qwen2.5-VL's smart resize (sides multiples of 28; scaled down above a cap, else scaled UP below
  `min_pixels`), whose cap is `min(max_pixels, max(min(768 * 28 * 28, total_pixels / count * 2),
  int(min_pixels * 1.05)))` (`paper_max_pixels`, `paper_frame_size`). With `max_pixels` below `min_pixels` a
  frame that rounds to at most `max_pixels` is therefore scaled up to at least `min_pixels`.
- Pixels: each frame decoded at its own size, then resized with antialiased bicubic filtering in float32,
  clamped and rounded to uint8 (`resize_frames`).
- Time: every temporal patch is said to last 1.0 s (`second_per_grid_ts`), whatever the sampling rate.

The preset only decides frame indices and sizes: the frames are read by the same readers as the planner's plans
(PyAV, decord, frame folders) and patched by the same `frames_to_patches`, which never resizes.

    >>> info = probe_video("talk.mp4")
    >>> plan = plan_paper_video(info, PaperSettings(fps=4, max_frames=32))
    >>> video = decode_paper_video(plan)      # video.frames: uint8 [N, H, W, 3] at the preset's size
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from videonsa.errors import UserError
from videonsa.options import (  # the preset's defaults, kept where `--help` reads them cheaply
    DEFAULT_PAPER_FPS,
    DEFAULT_PAPER_MAX_FRAMES,
    DEFAULT_PAPER_MAX_PIXELS,
    DEFAULT_PAPER_MIN_PIXELS,
    DEFAULT_PAPER_TOTAL_PIXELS,
    PRESETS,
)
from videonsa.video.decoding import DecodedVideo, Progress, decode_video
from videonsa.video.info import VideoInfo
from videonsa.video.planning import VideoPlan, VisionGeometry, frame_size

# The system turn of the paper's evaluation prompt.
PAPER_SYSTEM_PROMPT = "You are a helpful assistant."
# Seconds per temporal patch the evaluation's processor reported for every video (its temporal patch size 2
# over its default 2.0 fps, because it was never told the real sampling rate).
PAPER_SECOND_PER_GRID_TS = 1.0

# The evaluation's video reader: one frame holds at most PER_FRAME_PIXEL_CAP pixels (the defaults, the total
# pixel allowance among them, are in `videonsa.options`, which the command line reads without this module).
PER_FRAME_PIXEL_CAP = 768 * 28 * 28  # 602,112
# The share of the total is per pair of frames, and the cap never goes below 1.05 x min_pixels.
TOTAL_PIXELS_FRAME_FACTOR = 2
MIN_PIXELS_CAP_FACTOR = 1.05
MIN_FRAMES = 4
FRAME_STEP = 2
MAX_ASPECT_RATIO = 200
# Native-size frames are decoded this many bytes at a time before they are resized.
DECODE_CHUNK_BYTES = 256 * 1024 * 1024


def _floor_to(value: float, step: int) -> int:
    return math.floor(value / step) * step


def _ceil_to(value: float, step: int) -> int:
    return math.ceil(value / step) * step


@dataclass(frozen=True)
class PaperSettings:
    """The paper preset's settings; `validate` names the first bad one.

    fps: frames sampled per second of video; max_frames: frame cap (rounded down to even);
    min_pixels / max_pixels: per-frame pixel bounds of the resize; total_pixels: the whole video's pixel
    allowance that also caps each frame (see `paper_max_pixels`). With max_pixels below min_pixels, frames
    that round to at most max_pixels are scaled UP to the min_pixels floor, as the paper's evaluation did.
    """

    fps: float = DEFAULT_PAPER_FPS
    max_frames: int = DEFAULT_PAPER_MAX_FRAMES
    min_pixels: int = DEFAULT_PAPER_MIN_PIXELS
    max_pixels: int = DEFAULT_PAPER_MAX_PIXELS
    total_pixels: int = DEFAULT_PAPER_TOTAL_PIXELS

    def validate(self) -> PaperSettings:
        """Return self, or raise `UserError` naming the first setting that cannot work."""
        if not (isinstance(self.fps, (int, float)) and math.isfinite(self.fps) and self.fps > 0):
            raise UserError(f"fps must be a positive number of frames per second, got {self.fps}")
        for name in ("max_frames", "min_pixels", "max_pixels", "total_pixels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise UserError(f"{name} must be a whole number, got {value!r}")
        if self.max_frames < FRAME_STEP:
            raise UserError(f"max_frames must be at least {FRAME_STEP} (one temporal patch), got {self.max_frames}")
        for name in ("min_pixels", "max_pixels", "total_pixels"):
            if getattr(self, name) < 1:
                raise UserError(f"{name} must be positive, got {getattr(self, name)}")
        return self


def paper_frame_count(total_frames: int, video_fps: float, fps: float, max_frames: int) -> int:
    """How many frames the paper preset samples from a video of `total_frames` frames at `video_fps`.

    `total_frames / video_fps * fps`, raised to 4, capped at `max_frames` rounded down to even and at
    `total_frames`, then rounded down to even. Raises `UserError` if that leaves fewer than 2 frames.
    """
    count = total_frames / video_fps * fps
    count = min(max(count, _ceil_to(MIN_FRAMES, FRAME_STEP)), _floor_to(max_frames, FRAME_STEP), total_frames)
    count = _floor_to(count, FRAME_STEP)
    if not FRAME_STEP <= count <= total_frames:
        raise UserError(
            f"the paper preset samples {count} frames from {total_frames} (fps {fps:g}, max_frames {max_frames}); "
            f"at least {FRAME_STEP} are needed"
        )
    return count


def paper_frame_indices(total_frames: int, count: int) -> tuple[int, ...]:
    """`count` frame indices spread over `total_frames`: float32 linspace(0, total - 1), rounded half to even.

    float32 and torch's linspace on purpose: the evaluation computed them so, and an index that lands on .5
    in float32 must round the same way.
    """
    spaced = torch.linspace(0, total_frames - 1, count, dtype=torch.float32)
    return tuple(int(index) for index in torch.round(spaced).to(torch.int64))


def paper_max_pixels(frame_count: int, settings: PaperSettings) -> float:
    """The per-frame pixel cap for `frame_count` frames.

    min(max_pixels, max(min(768 * 28 * 28, total_pixels / frame_count * 2), int(1.05 * min_pixels))):
    long videos get smaller frames so that the whole video stays within `total_pixels`, but the cap never
    drops below 1.05 x `min_pixels` however many frames there are. A float, as the evaluation computed it.
    """
    share = settings.total_pixels / frame_count * TOTAL_PIXELS_FRAME_FACTOR
    floor = int(settings.min_pixels * MIN_PIXELS_CAP_FACTOR)
    return min(settings.max_pixels, max(min(PER_FRAME_PIXEL_CAP, share), floor))


def paper_frame_size(
    height: int, width: int, frame_count: int, settings: PaperSettings, *, factor: int = 28
) -> tuple[int, int]:
    """(height, width) the paper preset resizes `height` x `width` frames to when `frame_count` are sampled.

    Qwen2.5-VL's smart resize (`videonsa.video.planning.frame_size`) between `settings.min_pixels` and
    `paper_max_pixels`: sides rounded to multiples of `factor`, scaled down (sides floored) if above the cap,
    else scaled up (sides ceiled) if below `min_pixels`. Raises `UserError` for an aspect ratio above 200.
    """
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise UserError(
            f"frames of {width}x{height} are too elongated for the paper preset (aspect ratio above {MAX_ASPECT_RATIO})"
        )
    cap = paper_max_pixels(frame_count, settings)
    return frame_size(height, width, max_pixels=cap, min_pixels=settings.min_pixels, factor=factor)


@dataclass(frozen=True)
class PaperVideoPlan(VideoPlan):
    """A `VideoPlan` made by the paper preset: which frames by index, at which size, with a fixed time step.

    `frame_indices` are indices into the video's `source_frames` frames (`source_fps` per second); the
    inherited `timestamps` are the middle of each picked frame's display interval, what the readers seek to.
    `max_pixels_used` is the per-frame cap the size came from. There is no token budget (`budget_tokens` 0).
    """

    frame_indices: tuple[int, ...] = ()
    source_frames: int = 0
    source_fps: float = 0.0
    settings: PaperSettings = field(default_factory=PaperSettings)
    max_pixels_used: float = 0.0

    def describe(self) -> str:
        """One line for people: frames picked, frame size, tokens, and the preset's settings."""
        settings = self.settings
        return (
            f"{self.frame_count} of {self.source_frames:,} frames (indices {_index_summary(self.frame_indices)}) at "
            f"{self.frame_width}x{self.frame_height} ({self.tokens_per_frame:g} tokens per frame) = "
            f"{self.video_tokens:,} video tokens + {self.text_tokens:,} text tokens = {self.total_tokens:,}; "
            f"fps {settings.fps:g}, max_frames {settings.max_frames}, min_pixels {settings.min_pixels:,}, "
            f"max_pixels {settings.max_pixels:,} (cap {int(self.max_pixels_used):,}), "
            f"{self.second_per_grid_ts:.1f} s per temporal patch"
        )


def _index_summary(indices: tuple[int, ...]) -> str:
    if len(indices) <= 6:
        return ", ".join(str(index) for index in indices)
    return f"{indices[0]}, {indices[1]}, {indices[2]}, ..., {indices[-1]}"


def _source_fps(info: VideoInfo) -> float:
    """The video's average frame rate (its header's), else frames over duration."""
    if info.average_fps:
        return info.average_fps
    if info.frame_count and info.duration > 0:
        return info.frame_count / info.duration
    raise UserError(f"{info.name}: cannot tell its frame rate, which the paper preset needs")


def count_video_frames(info: VideoInfo) -> int:
    """The number of frames in the video: exact from the header or the image count, else by demuxing.

    Demuxing reads every packet header of the video stream without decoding (what the evaluation's reader,
    decord, did when it opened a file); it is only needed for containers whose header lacks the count.
    """
    if info.frame_count is not None and info.frame_count_is_exact:
        return info.frame_count
    path = info.paths[0]
    try:
        import av
    except ImportError:
        raise UserError(f"{path}: counting its frames needs PyAV (pip install av)") from None
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            count = sum(1 for packet in container.demux(stream) if packet.size)
    except (av.FFmpegError, OSError, IndexError) as error:
        raise UserError(f"{path}: cannot count its frames ({error}); the file looks corrupt") from None
    if count < FRAME_STEP:
        raise UserError(f"{path}: has {count} frame(s); at least {FRAME_STEP} are needed (one temporal patch)")
    return count


def plan_paper_video(
    info: VideoInfo,
    settings: PaperSettings | None = None,
    *,
    text_tokens: int = 0,
    geometry: VisionGeometry | None = None,
) -> PaperVideoPlan:
    """Pick the frames of `info` and their size by the paper preset's rule; `text_tokens` is only reported.

    Raises `UserError` for bad settings, a video too short for one temporal patch, or elongated frames.
    """
    settings = (settings or PaperSettings()).validate()
    geometry = geometry or VisionGeometry()
    total = count_video_frames(info)
    source_fps = _source_fps(info)
    try:
        count = paper_frame_count(total, source_fps, settings.fps, settings.max_frames)
        height, width = paper_frame_size(
            info.height, info.width, count, settings, factor=geometry.pixels_per_token_side
        )
    except UserError as error:
        raise UserError(f"{info.name}: {error}") from None
    indices = paper_frame_indices(total, count)
    # Frame i shows from start + i / fps on (constant frame rate); its middle is robust to rounded timestamps.
    timestamps = tuple(info.start_time + (index + 0.5) / source_fps for index in indices)
    tokens_per_patch = geometry.tokens_per_patch(height, width)
    return PaperVideoPlan(
        info=info,
        timestamps=timestamps,
        frame_height=height,
        frame_width=width,
        tokens_per_patch=tokens_per_patch,
        text_tokens=text_tokens,
        budget_tokens=0,
        prefer="paper",
        geometry=geometry,
        wanted_frames=count,
        wanted_tokens_per_patch=tokens_per_patch,
        preset="paper",
        second_per_grid_ts=PAPER_SECOND_PER_GRID_TS,
        frame_indices=indices,
        source_frames=total,
        source_fps=source_fps,
        settings=settings,
        max_pixels_used=paper_max_pixels(count, settings),
    )


def resize_frames(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 RGB frames [N, H, W, 3] -> uint8 [N, height, width, 3], the paper preset's resampling.

    Antialiased bicubic interpolation in float32 (what torchvision's tensor resize does for uint8 input),
    clamped to [0, 255] and rounded. Frames already at the size are returned unchanged.
    """
    if frames.shape[1:3] == (height, width):
        return frames
    pixels = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).to(torch.float32)
    resized = torch.nn.functional.interpolate(
        pixels, size=(height, width), mode="bicubic", align_corners=False, antialias=True
    )
    resized = resized.clamp_(0, 255).round_().to(torch.uint8)
    return resized.permute(0, 2, 3, 1).contiguous().numpy()


def decode_paper_video(plan: PaperVideoPlan, *, progress: Progress | None = None) -> DecodedVideo:
    """Decode the frames `plan` picked at their own size with the usual readers, then resize them.

    Frames are read a chunk at a time (about 256 MiB of native-size frames) so that memory stays bounded.
    `progress(done, total)` follows each frame. Returns the frames at the plan's size.
    """
    info = plan.info
    native_bytes = info.height * info.width * 3
    chunk = max(1, DECODE_CHUNK_BYTES // native_bytes)
    count = plan.frame_count
    frames = np.empty((count, plan.frame_height, plan.frame_width, 3), dtype=np.uint8)
    timestamps: list[float] = []
    decoded, seeks = 0, 0
    started = time.perf_counter()
    for start in range(0, count, chunk):
        times = plan.timestamps[start : start + chunk]
        native_plan = dataclasses.replace(plan, timestamps=times, frame_height=info.height, frame_width=info.width)
        report = None if progress is None else (lambda done, _total, base=start: progress(base + done, count))
        part = decode_video(native_plan, progress=report)
        frames[start : start + len(times)] = resize_frames(part.frames, plan.frame_height, plan.frame_width)
        timestamps.extend(part.timestamps)
        decoded += part.frames_decoded
        seeks += part.seeks
    return DecodedVideo(
        frames=frames,
        timestamps=tuple(timestamps),
        plan=plan,
        frames_decoded=decoded,
        seeks=seeks,
        seconds=time.perf_counter() - started,
    )


def decode_planned_video(plan: VideoPlan, *, progress: Progress | None = None) -> DecodedVideo:
    """Decode a plan of either preset: `decode_paper_video` for paper plans, else `decode_video`."""
    if isinstance(plan, PaperVideoPlan):
        return decode_paper_video(plan, progress=progress)
    return decode_video(plan, progress=progress)


def resolve_preset(preset: str, attention: str) -> str:
    """ "paper" or "planner" for `preset`; "auto" is "paper" when the attention mode is "official", else planner.

    Raises `UserError` for a name that is not a preset.
    """
    if preset not in PRESETS:
        raise UserError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    if preset == "auto":
        return "paper" if attention == "official" else "planner"
    return preset
