"""The needle generator's `colour` kind (made for `videonsa demo`): offered by `make-needles --kinds`, the screen
filled with the named colour exactly while the question says, the options always in the same order."""

from __future__ import annotations

import json

import av
import numpy as np

from videonsa.cli import main
from videonsa.commands.eval import EXTRA_NEEDLE_KINDS
from videonsa.evaluation.needles import EXTRA_KINDS, FILL_COLOURS, FILL_RGB, KNOWN_KINDS


def decoded_frames(path) -> list[tuple[float, np.ndarray]]:
    with av.open(str(path)) as container:
        return [(float(frame.time), frame.to_ndarray(format="rgb24")) for frame in container.decode(video=0)]


def test_the_cli_offers_every_extra_kind_of_the_generator():
    assert EXTRA_NEEDLE_KINDS == EXTRA_KINDS and "colour" in KNOWN_KINDS


def test_fill_colours_differ_on_two_channels_and_in_brightness():
    """What the demo's colour set is chosen for: no single channel or brightness leaves two colours alike."""
    values = [np.asarray(FILL_RGB[name], dtype=np.int32) for name in FILL_COLOURS]
    for i, first in enumerate(values):
        for second in values[i + 1:]:
            assert int((np.abs(first - second) == 255).sum()) == 2
    luminance = [float(value @ np.array([0.299, 0.587, 0.114])) for value in values]
    assert min(abs(a - b) for i, a in enumerate(luminance) for b in luminance[i + 1:]) > 40


def test_make_needles_colour_kind_fills_the_screen_with_the_answer(tmp_path, capsys):
    out = tmp_path / "colours"
    argv = ["eval", "make-needles", str(out), "--count", "6", "--lengths", "20", "--size", "48x48", "--seed", "4",
            "--kinds", "colour", "--workers", "1"]
    assert main(argv) == 0
    assert "6 videos" in capsys.readouterr().out
    questions = [json.loads(line) for line in (out / "questions.jsonl").read_text().splitlines()]
    assert len(questions) == 6 and {q["kind"] for q in questions} == {"colour"}
    assert json.loads((out / "set.json").read_text())["kinds"] == ["colour"]
    for question in questions:
        assert question["options"] == list(FILL_COLOURS)  # fixed order: the letter names the colour
        colour = FILL_COLOURS["ABCD".index(question["answer"])]
        target = np.asarray(FILL_RGB[colour], dtype=np.int16)
        (start, end), = question["needle_times"]
        for time, frame in decoded_frames(out / question["video"]):
            filled = np.abs(frame.astype(np.int16) - target).max(axis=-1) <= 40
            if start - 1e-6 <= time < end - 1e-6:
                assert filled.mean() > 0.95, (question["id"], time)  # the whole screen, through the codec
            else:
                assert filled.mean() < 0.01, (question["id"], time)  # never in the haystack
