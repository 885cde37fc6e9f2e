"""Tiny checkpoints (their gates spread out over heads, branches and tokens, as `videonsa.testing` makes them)
and short synthetic videos, made once per session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from analysis_helpers import released_like

from videonsa import testing
from videonsa.video import synthetic


@dataclass(frozen=True)
class AnalysisInputs:
    ours: Path  # this package's layout, attention_mode nsa recorded
    released: Path  # the released layout: legacy flat keys, no recorded mode (runs official by default)
    video: Path  # 16 frames at 4 fps
    short_video: Path  # 8 frames at 4 fps


@pytest.fixture(scope="session")
def analysis_inputs(tmp_path_factory) -> AnalysisInputs:
    folder = tmp_path_factory.mktemp("analysis")
    model = testing.tiny_model(seed=3)
    return AnalysisInputs(
        ours=testing.save_tiny_checkpoint(folder / "ours", model=model),
        released=released_like(folder / "released", model),
        video=synthetic.write_video(folder / "clip.mp4", frame_count=16, fps=4),
        short_video=synthetic.write_video(folder / "short.mp4", frame_count=8, fps=4),
    )
