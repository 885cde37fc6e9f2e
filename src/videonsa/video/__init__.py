"""Video input for Qwen2.5-VL: decoding (PyAV, seek-based), frame sampling and token-budget planning.

>>> from videonsa.video import probe_video, plan_video, decode_video, SamplingSettings
>>> info = probe_video("movie.mp4")
>>> plan = plan_video(info, SamplingSettings(budget_tokens=65_536, prefer="frames"), text_tokens=200)
>>> print(plan.describe())
>>> video = decode_video(plan)

The paper preset (`videonsa.video.paper`) picks frames and sizes as the paper's evaluation did instead:
`plan_paper_video(info, PaperSettings())`, decoded with `decode_paper_video` (or `decode_planned_video`, either kind).
"""

from videonsa.video.decoding import (
    BACKENDS,
    DecodedVideo,
    VideoInput,
    decode_video,
    load_video,
    probe_video,
)
from videonsa.video.info import VideoInfo
from videonsa.video.limits import DEFAULT_MAX_SOURCE_PIXELS
from videonsa.video.paper import (
    PRESETS,
    PaperSettings,
    PaperVideoPlan,
    decode_paper_video,
    decode_planned_video,
    plan_paper_video,
)
from videonsa.video.patches import frames_to_patches, seconds_per_temporal_patch
from videonsa.video.planning import (
    DEFAULT_BUDGET_TOKENS,
    DEFAULT_FPS,
    DEFAULT_MIN_PIXELS_PER_FRAME,
    DEFAULT_PIXELS_PER_FRAME,
    PREFERENCES,
    SamplingSettings,
    VideoPlan,
    VisionGeometry,
    frame_size,
    plan_video,
)

__all__ = [
    "BACKENDS",
    "DEFAULT_BUDGET_TOKENS",
    "DEFAULT_FPS",
    "DEFAULT_MAX_SOURCE_PIXELS",
    "DEFAULT_MIN_PIXELS_PER_FRAME",
    "DEFAULT_PIXELS_PER_FRAME",
    "PREFERENCES",
    "PRESETS",
    "PaperSettings",
    "PaperVideoPlan",
    "DecodedVideo",
    "SamplingSettings",
    "VideoInfo",
    "VideoInput",
    "VideoPlan",
    "VisionGeometry",
    "decode_paper_video",
    "decode_planned_video",
    "decode_video",
    "frame_size",
    "frames_to_patches",
    "load_video",
    "plan_paper_video",
    "plan_video",
    "probe_video",
    "seconds_per_temporal_patch",
]
