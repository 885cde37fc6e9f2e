"""Video input for Qwen2.5-VL: decoding (PyAV, seek-based), frame sampling and token-budget planning.

>>> from videonsa.video import probe_video, plan_video, decode_video, SamplingSettings
>>> info = probe_video("movie.mp4")
>>> plan = plan_video(info, SamplingSettings(budget_tokens=65_536, prefer="frames"), text_tokens=200)
>>> print(plan.describe())
>>> video = decode_video(plan)

The paper preset (`videonsa.video.paper`) picks frames and sizes as the paper's evaluation did instead:
`plan_paper_video(info, PaperSettings())`, decoded with `decode_paper_video` (or `decode_planned_video`, either kind).
"""

from __future__ import annotations

import importlib
from typing import Any

# Name -> module. Loaded on first use: decoding needs PyAV, numpy and torch, while the planner and its
# defaults (read by the command line to build `--help`) need none of them.
_EXPORTS = {
    "BACKENDS": "videonsa.video.decoding",
    "DecodedVideo": "videonsa.video.decoding",
    "VideoInput": "videonsa.video.decoding",
    "decode_video": "videonsa.video.decoding",
    "load_video": "videonsa.video.decoding",
    "probe_video": "videonsa.video.decoding",
    "VideoInfo": "videonsa.video.info",
    "DEFAULT_MAX_SOURCE_PIXELS": "videonsa.video.limits",
    "PRESETS": "videonsa.video.paper",
    "PaperSettings": "videonsa.video.paper",
    "PaperVideoPlan": "videonsa.video.paper",
    "decode_paper_video": "videonsa.video.paper",
    "decode_planned_video": "videonsa.video.paper",
    "plan_paper_video": "videonsa.video.paper",
    "frames_to_patches": "videonsa.video.patches",
    "seconds_per_temporal_patch": "videonsa.video.patches",
    "DEFAULT_BUDGET_TOKENS": "videonsa.video.planning",
    "DEFAULT_FPS": "videonsa.video.planning",
    "DEFAULT_MIN_PIXELS_PER_FRAME": "videonsa.video.planning",
    "DEFAULT_PIXELS_PER_FRAME": "videonsa.video.planning",
    "PREFERENCES": "videonsa.video.planning",
    "SamplingSettings": "videonsa.video.planning",
    "VideoPlan": "videonsa.video.planning",
    "VisionGeometry": "videonsa.video.planning",
    "frame_size": "videonsa.video.planning",
    "plan_video": "videonsa.video.planning",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'videonsa.video' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


__all__ = sorted(_EXPORTS)
