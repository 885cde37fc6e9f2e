"""A tiny random-weight VideoNSA checkpoint and short synthetic videos, made once per session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from videonsa import testing
from videonsa.video import synthetic


@dataclass(frozen=True)
class Inputs:
    checkpoint: Path
    video: Path  # 60 frames at 25 fps: 2.4 s, 112x112
    slow_video: Path  # 8 frames at 2 fps: 4 s, 112x112


@pytest.fixture(scope="session")
def inputs(tmp_path_factory) -> Inputs:
    folder = tmp_path_factory.mktemp("inference")
    return Inputs(
        checkpoint=testing.save_tiny_checkpoint(folder / "tiny-videonsa"),
        video=synthetic.write_video(folder / "clip.mp4", frame_count=60, fps=25),
        slow_video=synthetic.write_video(folder / "slow.mp4", frame_count=8, fps=2),
    )


@pytest.fixture(scope="session")
def loaded(inputs):
    """The tiny checkpoint loaded through the public API, shared by the tests that only ask."""
    import videonsa.inference

    return videonsa.inference.load(str(inputs.checkpoint), device="cpu")
