"""The needle set generator: determinism, answers checked against the decoded frames, resuming, bad arguments."""

from __future__ import annotations

import json
import re

import av
import numpy as np
import pytest

from videonsa.errors import UserError
from videonsa.evaluation.drawing import NEEDLE_COLOURS, NEEDLE_SHAPES, card_box, colour_mask, render_card
from videonsa.evaluation.needles import NeedleTiming, length_label, make_needle_set, parse_duration
from videonsa.evaluation.questions import load_questions
from videonsa.video import synthetic

# A needle shape counts as shown when at least this many pixels have its colour (the smallest, a flashing
# star of radius 6 at 64x64, has about 35; a generated haystack has none, see drawing.py).
MIN_SHAPE_PIXELS = 8


def decoded_frames(path) -> list[tuple[float, np.ndarray]]:
    """Every frame of a video file as (time in seconds, RGB array), decoded with PyAV directly."""
    with av.open(str(path)) as container:
        return [(float(frame.time), frame.to_ndarray(format="rgb24")) for frame in container.decode(video=0)]


def shown_at(spans, time: float) -> bool:
    return any(start - 1e-6 <= time < end - 1e-6 for start, end in spans)


def card_error(frame: np.ndarray, text: str) -> float:
    """Mean absolute difference between a frame's card area and the card rendered with `text`."""
    height, width = frame.shape[:2]
    left, top, right, bottom = card_box(width, height)
    expected = render_card(text, width, height)[top:bottom, left:right].astype(np.float32)
    return float(np.abs(frame[top:bottom, left:right].astype(np.float32) - expected).mean())


def has_card(frame: np.ndarray) -> bool:
    height, width = frame.shape[:2]
    left, top, right, bottom = card_box(width, height)
    return float(np.median(frame[top:bottom, left:right])) > 235  # white card; haystack pixels stay <= 215


def runs(flags: list[bool]) -> int:
    """Number of separate stretches of True."""
    return sum(1 for index, flag in enumerate(flags) if flag and (index == 0 or not flags[index - 1]))


def named_colour(text: str) -> str:
    (colour,) = [name for name in NEEDLE_COLOURS if re.search(rf"\b{name}\b", text)]
    return colour


def check_retrieval(question, frames) -> None:
    for time, frame in frames:
        assert has_card(frame) == shown_at(question.needle_times, time), f"card at {time}s"
        if has_card(frame):
            errors = {option: card_error(frame, option) for option in question.options}
            assert min(errors, key=errors.get) == question.answer_text, errors


def check_counting(question, frames) -> None:
    colour = named_colour(question.question)
    assert any(shape in question.question for shape in NEEDLE_SHAPES)
    present = [int(colour_mask(frame, colour).sum()) >= MIN_SHAPE_PIXELS for _, frame in frames]
    expected = [shown_at(question.needle_times, time) for time, _ in frames]
    assert present == expected
    assert runs(present) == int(question.answer_text) == len(question.needle_times)


def check_order(question, frames) -> None:
    first_seen = {}
    for option in question.options:
        colour = named_colour(option)
        present = [int(colour_mask(frame, colour).sum()) >= MIN_SHAPE_PIXELS for _, frame in frames]
        assert runs(present) == 1, f"{option} should cross the screen once"
        shown = [time for (time, _), flag in zip(frames, present, strict=True) if flag]
        assert any(start <= shown[0] < end for start, end in question.needle_times)
        first_seen[option] = shown[0]
    assert min(first_seen, key=first_seen.get) == question.answer_text
    # Each stated span holds exactly one of the four shapes, and nothing else of theirs shows outside the spans.
    for time, frame in frames:
        visible = [o for o in question.options if int(colour_mask(frame, named_colour(o)).sum()) >= MIN_SHAPE_PIXELS]
        assert len(visible) == (1 if shown_at(question.needle_times, time) else 0), f"order shapes at {time}s"


def test_needles_are_where_the_questions_say(needle_set):
    checks = {"retrieval": check_retrieval, "counting": check_counting, "order": check_order}
    kinds_seen = set()
    for video in needle_set.videos:
        frames = decoded_frames(needle_set.directory / video.file)
        assert len(frames) == video.seconds * video.fps
        assert [time for time, _ in frames] == pytest.approx([i / video.fps for i in range(len(frames))])
        for question in (q for q in needle_set.questions if q.video == video.file):
            assert question.video_seconds == video.seconds and question.length_bin == length_label(video.seconds)
            checks[question.kind](question, frames)
            kinds_seen.add(question.kind)
    assert kinds_seen == {"retrieval", "counting", "order"}


def test_same_seed_same_files_other_seed_other_set(tmp_path):
    arguments = {"count": 1, "lengths": [40], "size": (64, 48), "seed": 11}
    first = make_needle_set(tmp_path / "a", **arguments)
    second = make_needle_set(tmp_path / "b", **arguments, workers=2)  # parallel encoding changes nothing
    assert first.questions_path.read_bytes() == second.questions_path.read_bytes()
    for video in first.videos:
        assert (first.directory / video.file).read_bytes() == (second.directory / video.file).read_bytes()
        frames_a = decoded_frames(first.directory / video.file)
        frames_b = decoded_frames(second.directory / video.file)
        assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(frames_a, frames_b, strict=True))
    other = make_needle_set(tmp_path / "c", **{**arguments, "seed": 12})
    assert other.questions_path.read_bytes() != first.questions_path.read_bytes()


def test_a_video_does_not_depend_on_the_count_or_other_lengths(tmp_path):
    small = make_needle_set(tmp_path / "small", count=1, lengths=[40], size=(48, 48), seed=5, kinds=["retrieval"])
    large = make_needle_set(tmp_path / "large", count=2, lengths=[42, 40], size=(48, 48), seed=5, kinds=["retrieval"])
    name = small.videos[0].file
    assert (small.directory / name).read_bytes() == (large.directory / name).read_bytes()
    assert {q.id for q in small.questions} < {q.id for q in large.questions}


def test_questions_are_well_formed_and_balanced(tmp_path):
    needle_set = make_needle_set(tmp_path / "set", count=12, lengths=[30], size=(48, 48), seed=1, kinds=["retrieval"])
    letters = [question.answer for question in needle_set.questions]
    assert len(set(letters)) >= 3  # the correct option's place is shuffled
    for question in needle_set.questions:
        assert len(question.options) == 4 and len(set(question.options)) == 4
        assert question.kind == "retrieval" and len(question.needle_times) == 1
    reread = load_questions(needle_set.directory)
    assert [q.to_json() for q in reread] == [q.to_json() for q in needle_set.questions]


def test_rerun_completes_an_interrupted_set(tmp_path):
    arguments = {"count": 2, "lengths": [30], "size": (48, 48), "seed": 2, "kinds": ["counting"]}
    needle_set = make_needle_set(tmp_path / "set", **arguments)
    victim = needle_set.directory / needle_set.videos[1].file
    original = victim.read_bytes()
    victim.unlink()
    needle_set.questions_path.unlink()
    written = []
    make_needle_set(tmp_path / "set", **arguments, progress=lambda done, total: written.append((done, total)))
    assert victim.read_bytes() == original
    assert written[-1] == (1, 1)  # only the missing video was written again
    assert needle_set.questions_path.is_file()


def test_footage_is_looped_as_haystack(tmp_path):
    footage = tmp_path / "footage"
    footage.mkdir()
    synthetic.write_video(footage / "clip.mp4", frame_count=50, fps=25, width=96, height=64)  # 2 s, looped
    needle_set = make_needle_set(
        tmp_path / "set", count=1, lengths=[30], size=(64, 48), seed=4, footage=footage, kinds=["retrieval"]
    )
    (question,) = needle_set.questions
    frames = decoded_frames(needle_set.directory / question.video)
    assert len(frames) == 60
    haystack = []
    for time, frame in frames:
        if shown_at(question.needle_times, time):
            errors = {option: card_error(frame, option) for option in question.options}
            assert min(errors, key=errors.get) == question.answer_text
        else:
            haystack.append(frame)
    # The footage's white frame-number cells: brighter than any generated scene may be.
    assert np.mean([frame.max() > 235 for frame in haystack]) > 0.5
    description = json.loads((needle_set.directory / "set.json").read_text())
    assert description["footage"]["files"] == [{"path": "clip.mp4", "bytes": (footage / "clip.mp4").stat().st_size}]


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"lengths": [20]}, r"--lengths 20: a video must last from \d+ s"),
        ({"size": (63, 64)}, r"--size 63x64: width and height must be even"),
        ({"count": 0}, r"--count must be at least 1"),
        ({"fps": 0}, r"--fps must be a whole number"),
        ({"kinds": ["smell"]}, r"--kinds: choose among retrieval, counting, order, colour, before-black, got smell"),
        ({"footage": "/no/such/folder"}, r"--footage /no/such/folder: no such folder"),
    ],
)
def test_bad_arguments_are_one_line(tmp_path, arguments, message):
    with pytest.raises(UserError, match=message) as caught:
        make_needle_set(tmp_path / "set", **{"count": 1, "lengths": [40], "size": (48, 48), **arguments})
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "set").exists()


def test_refuses_a_foreign_or_different_directory(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="exists and is not an empty directory"):
        make_needle_set(tmp_path / "busy", count=1, lengths=[30], size=(48, 48), kinds=["retrieval"])
    make_needle_set(tmp_path / "set", count=1, lengths=[30], size=(48, 48), kinds=["retrieval"])
    with pytest.raises(UserError, match=r"made with other settings \(seed\)"):
        make_needle_set(tmp_path / "set", count=1, lengths=[30], size=(48, 48), kinds=["retrieval"], seed=9)


def test_footage_folder_without_videos(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no video files"):
        make_needle_set(tmp_path / "set", count=1, lengths=[40], size=(48, 48), footage=tmp_path / "empty")


def test_durations_and_labels():
    assert [parse_duration(text) for text in ("90", "90s", "5m", "1h", "1h30m", "2h15m10s")] == [
        90, 90, 300, 3600, 5400, 8110,
    ]  # fmt: skip
    for bad in ("", "ten", "5x", "1.5h"):
        with pytest.raises(UserError, match="cannot read"):
            parse_duration(bad)
    assert [length_label(s) for s in (40, 60, 90, 300, 3600, 5400)] == ["40s", "1m", "1m30s", "5m", "1h", "1h30m"]
    assert NeedleTiming().seconds_needed(["retrieval", "counting", "order"]) == 4 + 9 + 12 + 2 * 7
