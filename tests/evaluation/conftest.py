"""A tiny random-weight checkpoint and a small needle set (64x64, 2 fps, two videos of 40 and 44 s), made once."""

from __future__ import annotations

from pathlib import Path

import pytest

from videonsa import testing
from videonsa.evaluation.needles import make_needle_set


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
