"""Frame sampling and token-budget planning for Qwen2.5-VL video input.

Qwen2.5-VL cuts a video into temporal patches of 2 consecutive frames and each patch into 28 x 28 pixel
areas (14-pixel patches merged 2 x 2); every area becomes one token. So a frame size must be a multiple of 28
on both sides, a frame count must be even, and n frames of h x w cost (n / 2) * (h / 28) * (w / 28) tokens.

The plan starts from the paper's sampling, `fps` frames per second (4) at `pixels_per_frame` pixels (50,176 =
224 x 224). When that does not fit the token budget left after the text, `prefer` decides what gives way:
"frames" keeps every frame and lowers the resolution, "detail" keeps the resolution and drops frames, and
"balanced" lowers both by the same factor. Sampled frames are spread evenly over the whole video.

Two promises hold whatever the rounding to 28-pixel sides does: no plan has fewer than `min_pixels_per_frame`
pixels per frame (the floor's size is the smallest of the video's shape at or above it, which may exceed
`pixels_per_frame` by part of a token row when the two are close), and a "balanced" plan is never strictly
worse than the "frames" plan (fewer frames at no more detail): tokens its rounding leaves unused go to frames.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Literal

from videonsa.errors import UserError
from videonsa.video.info import VideoInfo

Preference = Literal["frames", "detail", "balanced"]
PREFERENCES: tuple[str, ...] = ("frames", "detail", "balanced")
DEFAULT_BUDGET_TOKENS = 128 * 1024
DEFAULT_FPS = 4.0
DEFAULT_PIXELS_PER_FRAME = 224 * 224
DEFAULT_MIN_PIXELS_PER_FRAME = 112 * 112


@dataclass(frozen=True)
class VisionGeometry:
    """How the vision encoder turns pixels into tokens (Qwen2.5-VL: 14-pixel patches, 2x2 merge, 2 frames)."""

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 2

    @property
    def pixels_per_token_side(self) -> int:
        """Side in pixels of the square area that becomes one language-model token (28 for Qwen2.5-VL)."""
        return self.patch_size * self.merge_size

    def tokens_per_patch(self, height: int, width: int) -> int:
        """Tokens of one temporal patch (`temporal_patch_size` frames) of `height` x `width` frames."""
        side = self.pixels_per_token_side
        return (height // side) * (width // side)


@dataclass(frozen=True)
class SamplingSettings:
    """What the user asks of the sampler and planner; `validate` names the first bad setting."""

    fps: float = DEFAULT_FPS
    max_frames: int | None = None
    pixels_per_frame: int = DEFAULT_PIXELS_PER_FRAME
    min_pixels_per_frame: int = DEFAULT_MIN_PIXELS_PER_FRAME
    budget_tokens: int = DEFAULT_BUDGET_TOKENS
    prefer: Preference = "balanced"

    def validate(self) -> SamplingSettings:
        """Return self, or raise `UserError` naming the first setting that cannot work."""
        # Types first: from Python a float frame cap or a None budget would otherwise fail deep in the planner.
        if not (is_real(self.fps) and math.isfinite(self.fps) and self.fps > 0):
            raise UserError(f"fps must be a positive number of frames per second, got {self.fps}")
        for name in ("max_frames", "pixels_per_frame", "min_pixels_per_frame", "budget_tokens"):
            value = getattr(self, name)
            if not (is_whole(value) or (name == "max_frames" and value is None)):
                raise UserError(f"{name} must be a whole number, got {value!r}")
        if self.max_frames is not None and self.max_frames < 2:
            raise UserError(f"max_frames must be at least 2 (one temporal patch), got {self.max_frames}")
        if self.min_pixels_per_frame < 1:
            raise UserError(f"min_pixels_per_frame must be positive, got {self.min_pixels_per_frame}")
        if self.pixels_per_frame < self.min_pixels_per_frame:
            raise UserError(
                f"pixels_per_frame ({self.pixels_per_frame}) is below min_pixels_per_frame "
                f"({self.min_pixels_per_frame})"
            )
        if self.budget_tokens < 1:
            raise UserError(f"budget_tokens must be positive, got {self.budget_tokens}")
        if self.prefer not in PREFERENCES:
            raise UserError(f"prefer must be one of {', '.join(PREFERENCES)}, got {self.prefer!r}")
        return self


def is_whole(value: object) -> bool:
    """Whether `value` is an integer (numpy's too), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """Whether `value` is a real number (int, float, numpy's), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class VideoPlan:
    """Which frames to sample, at which size, and what they cost in tokens.

    `preset` names the rule that made the plan ("planner" here; `videonsa.video.paper` makes "paper" plans).
    `second_per_grid_ts`, when set, is the seconds per temporal patch the model is told whatever the frames'
    real timestamps (the paper preset fixes it); None lets the decoded timestamps decide.
    """

    info: VideoInfo
    timestamps: tuple[float, ...]
    frame_height: int
    frame_width: int
    tokens_per_patch: int
    text_tokens: int
    budget_tokens: int
    prefer: str
    geometry: VisionGeometry = field(default_factory=VisionGeometry)
    wanted_frames: int = 0
    wanted_tokens_per_patch: int = 0
    preset: str = "planner"
    second_per_grid_ts: float | None = None

    @property
    def frame_count(self) -> int:
        """Number of frames to sample (even)."""
        return len(self.timestamps)

    @property
    def temporal_patches(self) -> int:
        """Number of temporal patches (frame pairs)."""
        return self.frame_count // self.geometry.temporal_patch_size

    @property
    def video_tokens(self) -> int:
        """Tokens the video occupies in the prompt."""
        return self.temporal_patches * self.tokens_per_patch

    @property
    def total_tokens(self) -> int:
        """Video tokens plus the reserved text tokens (prompt and answer)."""
        return self.video_tokens + self.text_tokens

    @property
    def tokens_per_frame(self) -> float:
        """Video tokens per sampled frame (a patch's tokens shared by its frames)."""
        return self.tokens_per_patch / self.geometry.temporal_patch_size

    @property
    def seconds_between_frames(self) -> float:
        """Planned spacing of the sampled frames in seconds."""
        if self.frame_count < 2:
            return 0.0
        return (self.timestamps[-1] - self.timestamps[0]) / (self.frame_count - 1)

    def describe(self) -> str:
        """One line for people: frames, frame size, tokens per frame and totals against the budget."""
        trimmed = ""
        if self.frame_count < self.wanted_frames or self.tokens_per_patch < self.wanted_tokens_per_patch:
            trimmed = f", trimmed to fit (prefer {self.prefer})"
        return (
            f"{self.frame_count} frames every {self.seconds_between_frames:.2f}s at "
            f"{self.frame_width}x{self.frame_height} ({self.tokens_per_frame:g} tokens per frame) = "
            f"{self.video_tokens:,} video tokens + {self.text_tokens:,} text tokens = "
            f"{self.total_tokens:,} of {self.budget_tokens:,}{trimmed}"
        )


def frame_size(height: int, width: int, *, max_pixels: int, min_pixels: int, factor: int = 28) -> tuple[int, int]:
    """Qwen2.5-VL's "smart resize": the (height, width) a `height` x `width` frame is scaled to.

    Both sides become multiples of `factor`, as close to the original as rounding allows; if that area is
    above `max_pixels` the frame is scaled down (sides rounded down) to fit, and if it is below `min_pixels`
    it is scaled up (sides rounded up). The aspect ratio is kept as far as the rounding allows.
    """
    rounded_height = max(factor, round(height / factor) * factor)
    rounded_width = max(factor, round(width / factor) * factor)
    if rounded_height * rounded_width > max_pixels:
        shrink = math.sqrt(height * width / max_pixels)
        rounded_height = max(factor, math.floor(height / shrink / factor) * factor)
        rounded_width = max(factor, math.floor(width / shrink / factor) * factor)
    elif rounded_height * rounded_width < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        rounded_height = math.ceil(height * grow / factor) * factor
        rounded_width = math.ceil(width * grow / factor) * factor
    return rounded_height, rounded_width


def wanted_frame_count(info: VideoInfo, settings: SamplingSettings, geometry: VisionGeometry) -> int:
    """Frames the settings ask for before the budget: duration x fps, capped, rounded down to a whole patch.

    Never more than the video has (when known), never fewer than one temporal patch.
    """
    step = geometry.temporal_patch_size
    count = math.floor(info.duration * settings.fps + 1e-9)
    if settings.max_frames is not None:
        count = min(count, settings.max_frames)
    if info.frame_count is not None:
        count = min(count, info.frame_count)
    return max(step, count - count % step)


def evenly_spaced_times(info: VideoInfo, count: int) -> tuple[float, ...]:
    """`count` times from the video's first frame on, one every duration / count seconds."""
    spacing = info.duration / count
    return tuple(info.start_time + index * spacing for index in range(count))


def _largest_size_within(
    info: VideoInfo, max_tokens: int, settings: SamplingSettings, geometry: VisionGeometry
) -> tuple[int, int]:
    """The largest rounded frame size with at most `max_tokens` tokens per patch and `pixels_per_frame`,
    never below the `min_pixels_per_frame` floor (the floor's size when nothing larger fits).

    Rounding is not monotonic (a lower pixel cap can round both sides down), so this lowers the cap one
    token's area at a time from the largest that could help and keeps the first size that fits.
    """
    side = geometry.pixels_per_token_side
    unit = side * side
    floor = settings.min_pixels_per_frame
    # Floor rounding loses at most one token row and column, so caps above 4x the target never fit better.
    max_pixels = min(settings.pixels_per_frame, 4 * (max_tokens + 1) * unit)
    # A cap below the floor scales frames below it too: stop there.
    while max_pixels >= max(floor, unit):
        height, width = frame_size(info.height, info.width, max_pixels=max_pixels, min_pixels=floor, factor=side)
        if height * width >= floor and geometry.tokens_per_patch(height, width) <= max_tokens:
            return height, width
        max_pixels -= unit
    return _smallest_size(info, settings, geometry)


def _smallest_size(info: VideoInfo, settings: SamplingSettings, geometry: VisionGeometry) -> tuple[int, int]:
    """The smallest frame size of the video's shape with at least `min_pixels_per_frame` pixels: the floor.

    Scaling to the floor and rounding each side to the nearest multiple of 28 (Qwen2.5-VL's smart resize) can
    land below it (1920x1080 at 12,544 pixels gives 140x84 = 11,760), so one side is the exact scaled side
    rounded down or up, and the other the smallest multiple of 28 that brings the area to the floor; of those
    (either side first), the smallest area wins, then the shape closest to the video's.
    """
    side = geometry.pixels_per_token_side
    floor = settings.min_pixels_per_frame
    scale = math.sqrt(floor / (info.height * info.width))
    candidates = []
    for first, other in ((info.height, info.width), (info.width, info.height)):
        for rounding in (math.floor, math.ceil):
            first_side = max(side, rounding(first * scale / side) * side)
            other_side = max(side, -(-floor // (first_side * side)) * side)  # ceil(floor / first_side) to 28s
            aspect_error = abs(math.log((first_side / other_side) / (first / other)))
            size = (first_side, other_side) if first is info.height else (other_side, first_side)
            candidates.append((first_side * other_side, aspect_error, size))
    return min(candidates)[2]


def _frames_and_tokens(
    wanted_frames: int,
    wanted_tokens: int,
    video_budget: int,
    min_tokens: int,
    prefer: str,
    step: int,
) -> tuple[int, int]:
    """Choose (frame count, max tokens per patch) within `video_budget` tokens for the given preference."""
    patches_at_floor = video_budget // min_tokens
    if prefer == "frames":
        frames = min(wanted_frames, patches_at_floor * step)
    elif prefer == "detail":
        frames = min(wanted_frames, max(1, video_budget // wanted_tokens) * step)
    else:
        shrink = math.sqrt(video_budget / ((wanted_frames // step) * wanted_tokens))
        frames = min(wanted_frames, patches_at_floor * step, max(step, math.floor(wanted_frames * shrink)))
    frames -= frames % step
    return frames, min(wanted_tokens, video_budget // (frames // step))


def _balanced_without_waste(
    info: VideoInfo,
    settings: SamplingSettings,
    geometry: VisionGeometry,
    frames: int,
    size: tuple[int, int],
    wanted_frames: int,
    video_budget: int,
) -> tuple[int, int, int]:
    """(frames, height, width) of a balanced plan with the tokens its rounding left unused spent on frames.

    Sides round down to multiples of 28, so the chosen size often costs fewer tokens per patch than the
    share it was given, and the frames it left out may fit at that same size: add them. Then the plan is
    never strictly worse than "frames" (as many frames and as much detail or more): when the "frames" plan
    keeps more frames at no less detail, it is the better balance and is taken.
    """
    step = geometry.temporal_patch_size
    tokens = geometry.tokens_per_patch(*size)
    frames = max(frames, min(wanted_frames, video_budget // tokens * step))
    frames -= frames % step
    # Re-size for the final count: the tokens per patch it allows may round to a larger size.
    resized = _largest_size_within(info, video_budget // (frames // step), settings, geometry)
    if geometry.tokens_per_patch(*resized) > tokens:
        size, tokens = resized, geometry.tokens_per_patch(*resized)
    min_tokens = geometry.tokens_per_patch(*_smallest_size(info, settings, geometry))
    frames_only = min(wanted_frames, video_budget // min_tokens * step)
    frames_only -= frames_only % step
    frames_size = _largest_size_within(info, video_budget // (frames_only // step), settings, geometry)
    if frames_only > frames and geometry.tokens_per_patch(*frames_size) >= tokens:
        return frames_only, *frames_size
    return frames, *size


def plan_video(
    info: VideoInfo,
    settings: SamplingSettings | None = None,
    *,
    text_tokens: int = 0,
    geometry: VisionGeometry | None = None,
) -> VideoPlan:
    """Plan which frames of `info` to sample and at which size so that video + `text_tokens` fit the budget.

    `text_tokens` is what the prompt and the answer (max new tokens) need besides the video. Raises
    `UserError` when even one temporal patch at `min_pixels_per_frame` does not fit.
    """
    settings = (settings or SamplingSettings()).validate()
    geometry = geometry or VisionGeometry()
    step = geometry.temporal_patch_size
    wanted_frames = wanted_frame_count(info, settings, geometry)
    wanted_height, wanted_width = _largest_size_within(info, 2**62, settings, geometry)
    wanted_tokens = geometry.tokens_per_patch(wanted_height, wanted_width)
    min_tokens = geometry.tokens_per_patch(*_smallest_size(info, settings, geometry))
    video_budget = settings.budget_tokens - text_tokens
    if video_budget < min_tokens:
        raise UserError(
            f"budget_tokens={settings.budget_tokens:,} is too small: the text needs {text_tokens:,} tokens "
            f"(prompt and max new tokens) and the smallest pair of frames "
            f"(min_pixels_per_frame={settings.min_pixels_per_frame:,}) needs {min_tokens:,} more"
        )
    if (wanted_frames // step) * wanted_tokens <= video_budget:
        frames, max_tokens = wanted_frames, wanted_tokens
    else:
        frames, max_tokens = _frames_and_tokens(
            wanted_frames, wanted_tokens, video_budget, min_tokens, settings.prefer, step
        )
    height, width = _largest_size_within(info, max_tokens, settings, geometry)
    if settings.prefer == "balanced" and frames < wanted_frames:
        frames, height, width = _balanced_without_waste(
            info, settings, geometry, frames, (height, width), wanted_frames, video_budget
        )
    return VideoPlan(
        info=info,
        timestamps=evenly_spaced_times(info, frames),
        frame_height=height,
        frame_width=width,
        tokens_per_patch=geometry.tokens_per_patch(height, width),
        text_tokens=text_tokens,
        budget_tokens=settings.budget_tokens,
        prefer=settings.prefer,
        geometry=geometry,
        wanted_frames=wanted_frames,
        wanted_tokens_per_patch=wanted_tokens,
    )
