"""The needle generator's `colour` and `before-black` kinds (made for `videonsa demo`): offered by `make-needles
--kinds`, the screen filled with the named colours exactly while the question says, options in a fixed order."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest

from videonsa.cli import main
from videonsa.commands.eval import EXTRA_NEEDLE_KINDS
from videonsa.errors import UserError
from videonsa.evaluation.needles import (
    EXTRA_KINDS,
    FILL_COLOURS,
    FILL_PAINT,
    FILL_RGB,
    KNOWN_KINDS,
    MARKER,
    make_needle_set,
)


def decoded_frames(path) -> list[tuple[float, np.ndarray]]:
    with av.open(str(path)) as container:
        return [(float(frame.time), frame.to_ndarray(format="rgb24")) for frame in container.decode(video=0)]


def test_the_cli_offers_every_extra_kind_of_the_generator():
    assert EXTRA_NEEDLE_KINDS == EXTRA_KINDS == ("colour", "before-black")
    assert set(EXTRA_KINDS) <= set(KNOWN_KINDS)


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


def test_before_black_shows_the_asked_colour_far_before_the_black_and_another_after(tmp_path, capsys):
    out = tmp_path / "before-black"
    argv = ["eval", "make-needles", str(out), "--count", "6", "--lengths", "60", "--size", "48x48", "--seed", "2",
            "--kinds", "before-black", "--workers", "1"]
    assert main(argv) == 0
    capsys.readouterr()
    questions = [json.loads(line) for line in (out / "questions.jsonl").read_text().splitlines()]
    assert {q["kind"] for q in questions} == {"before-black"}
    assert json.loads((out / "set.json").read_text())["timing"]["far_seconds"] == 20
    paint = {name: np.asarray(rgb, dtype=np.int16) for name, rgb in FILL_PAINT.items()}
    for question in questions:
        assert question["options"] == list(FILL_COLOURS)
        asked_span, black_span, later_span = question["needle_times"]
        assert black_span[0] - asked_span[1] >= 20 and later_span[0] > black_span[1]
        shown = {}  # colour name -> times it filled the screen
        for time, frame in decoded_frames(out / question["video"]):
            for name, target in paint.items():
                if (np.abs(frame.astype(np.int16) - target).max(axis=-1) <= 40).mean() > 0.95:
                    shown.setdefault(name, []).append(time)
        asked = FILL_COLOURS["ABCD".index(question["answer"])]
        assert shown.pop(MARKER) == [black_span[0] + k / 2 for k in range(4)]  # 2 s at 2 fps
        assert shown.pop(asked) == [asked_span[0] + k / 2 for k in range(4)]
        ((later, times),) = shown.items()  # exactly one other colour, after the black
        assert later != asked and times == [later_span[0] + k / 2 for k in range(4)]


def test_colour_kinds_cannot_share_a_video(tmp_path):
    with pytest.raises(UserError, match="colour and before-black cannot share a video"):
        make_needle_set(tmp_path / "both", count=1, lengths=[60], size=(48, 48), kinds=["colour", "before-black"])
    assert not (tmp_path / "both").exists()
