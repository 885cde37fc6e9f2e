"""Fixtures for the training tests: tiny checkpoints, a tokenizer, synthetic clip datasets written on the fly."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from training_helpers import write_colour_clips

from videonsa import testing


@pytest.fixture(autouse=True)
def one_thread():
    """The CI machine has 2 shared cores; one intra-op thread per test avoids thread thrashing (10x faster)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def videonsa_checkpoint(tmp_path_factory) -> Path:
    """A tiny random VideoNSA checkpoint with tokenizer and processor files."""
    return testing.save_tiny_checkpoint(tmp_path_factory.mktemp("videonsa") / "checkpoint", seed=0)


@pytest.fixture(scope="session")
def qwen_checkpoint(tmp_path_factory) -> Path:
    """A tiny random plain Qwen2.5-VL checkpoint (no gates)."""
    return testing.save_tiny_checkpoint(tmp_path_factory.mktemp("qwen") / "checkpoint", videonsa=False, seed=0)


@pytest.fixture(scope="session")
def tokenizer():
    return testing.tiny_tokenizer()


@pytest.fixture
def colour_clips(tmp_path) -> Callable[..., Path]:
    """Factory: `colour_clips(count, frames=4)` writes a colour dataset and returns its annotation file."""

    def make(count: int, frames: int = 4, seed: int = 0) -> Path:
        return write_colour_clips(tmp_path / "data", count, frames=frames, seed=seed)

    return make
