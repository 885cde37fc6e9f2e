"""Synthetic videos shared by the video tests, written once per session with PyAV."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from videonsa.video import synthetic

# Times (s) at which the frames of the variable-frame-rate file start showing; it ends at VFR_END.
VFR_TIMES = (0.0, 0.1, 0.2, 0.5, 1.0, 1.5, 1.6, 1.7, 2.6, 2.7)
VFR_END = 3.0


@dataclass(frozen=True)
class Videos:
    short: Path  # 100 frames, 25 fps, 4 s, 112x112, keyframe every 25 frames (mp4)
    long: Path  # 1500 frames, 25 fps, 60 s, 112x112, keyframe every 25 frames (mp4)
    wide: Path  # 50 frames, 10 fps, 5 s, 224x112 (mkv)
    variable: Path  # frames at VFR_TIMES, ends at VFR_END (mkv)
    single_frame: Path  # 1 frame (mp4)
    audio_only: Path  # 1 s AAC, no video (m4a)
    frame_folder: Path  # 12 PNG frames, unpadded numbers
    short_mkv: Path  # like `short`, in Matroska (header first, so damaged copies still open)
    vfr_times: tuple[float, ...] = VFR_TIMES
    vfr_end: float = VFR_END


@pytest.fixture(scope="session")
def videos(tmp_path_factory) -> Videos:
    folder = tmp_path_factory.mktemp("videos")
    return Videos(
        short=synthetic.write_video(folder / "short.mp4", frame_count=100, fps=25),
        long=synthetic.write_video(folder / "long.mp4", frame_count=1500, fps=25, gop=25),
        wide=synthetic.write_video(folder / "wide.mkv", frame_count=50, fps=10, width=224, height=112),
        variable=synthetic.write_variable_frame_rate_video(folder / "vfr.mkv", VFR_TIMES, end_time=VFR_END),
        single_frame=synthetic.write_video(folder / "single.mp4", frame_count=1, fps=25),
        audio_only=synthetic.write_audio_only(folder / "tone.m4a", seconds=1.0),
        frame_folder=synthetic.write_image_folder(folder / "frames", frame_count=12),
        short_mkv=synthetic.write_video(folder / "short.mkv", frame_count=100, fps=25),
    )
