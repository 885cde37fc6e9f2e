"""A tiny random-weight checkpoint and a small needle set (64x64, 2 fps, two videos of 40 and 44 s), made once."""

from __future__ import annotations

from pathlib import Path

import pytest

from videonsa import testing
from videonsa.evaluation.needles import make_needle_set

# Fast settings for asking the tiny model: few small frames.
FAST_FRAMES = {"fps": 1.0, "max_frames": 8, "budget_tokens": 4096}
FAST_FLAGS = ["--fps", "1", "--max-frames", "8", "--budget", "4096", "--device", "cpu"]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    return testing.save_tiny_checkpoint(tmp_path_factory.mktemp("evaluation") / "tiny-videonsa")


@pytest.fixture(scope="session")
def needle_set(tmp_path_factory):
    return make_needle_set(tmp_path_factory.mktemp("needles") / "set", count=1, lengths=[40, 44], size=(64, 64), seed=7)


@pytest.fixture(scope="session")
def loaded(checkpoint):
    import videonsa

    return videonsa.load(str(checkpoint), attention="nsa", device="cpu")
