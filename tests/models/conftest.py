"""Fixtures of the model tests: a tiny two-video batch and a log of transformers/videonsa messages."""

from __future__ import annotations

import logging

import pytest

from videonsa import testing


@pytest.fixture
def batch() -> testing.TinyBatch:
    """Two samples with videos of different sizes (32 and 8 vision tokens), the second left-padded."""
    return testing.tiny_video_batch(((2, 8, 8), (2, 4, 4)), text_before=[5, 7], text_after=[4, 9], seed=1)


class MessageLog(logging.Handler):
    """Collects the messages logged by transformers and videonsa (transformers' loggers do not propagate)."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def message_log():
    log = MessageLog()
    loggers = [logging.getLogger("transformers"), logging.getLogger("videonsa")]
    for logger in loggers:
        logger.addHandler(log)
    yield log
    for logger in loggers:
        logger.removeHandler(log)
