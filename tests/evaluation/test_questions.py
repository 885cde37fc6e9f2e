"""The question JSONL format: round trip, path resolution, and one-line errors naming file and line."""

from __future__ import annotations

import json

import pytest

from videonsa.errors import UserError
from videonsa.evaluation.questions import Question, load_questions, write_questions


def record(**changes) -> dict:
    base = {
        "id": "q1",
        "video": "clip.mp4",
        "question": "Which word is on the card?",
        "options": ["MANGO", "TIGER", "LEMON", "RAVEN"],
        "answer": "C",
        "kind": "retrieval",
        "video_seconds": 60.0,
        "needle_times": [[12.0, 16.0]],
        "length_bin": "1m",
    }
    base.update(changes)
    return {key: value for key, value in base.items() if value is not None}


def write_lines(folder, *records_or_text) -> object:
    (folder / "clip.mp4").write_bytes(b"")
    path = folder / "questions.jsonl"
    lines = [item if isinstance(item, str) else json.dumps(item) for item in records_or_text]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_round_trip_and_paths(tmp_path):
    (tmp_path / "clip.mp4").write_bytes(b"")
    elsewhere = tmp_path / "other.mp4"
    elsewhere.write_bytes(b"")
    questions = [
        Question(**{**record(), "options": tuple(record()["options"]), "needle_times": ((12.0, 16.0),)}),
        Question(**{**record(id="q2", video=str(elsewhere), extra=None), "options": ("a", "b"), "answer": "B",
                    "needle_times": (), "extra": {"source": "mine"}}),
    ]  # fmt: skip
    path = write_questions(tmp_path / "questions.jsonl", questions)
    loaded = load_questions(tmp_path)  # a directory means its questions.jsonl
    assert [q.to_json() for q in loaded] == [q.to_json() for q in questions]
    first, second = loaded.questions
    assert first.video_path == tmp_path / "clip.mp4" and first.answer_text == "LEMON" and first.chance == 0.25
    assert second.video_path == elsewhere and second.extra == {"source": "mine"} and second.letters == "AB"
    assert load_questions(path).by_id()["q2"].answer_text == "b"


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"questions.jsonl:2: not valid JSON"),
        ("[1, 2]", r"questions.jsonl:2: expected a JSON object, got list"),
        (record(answer=None), r"questions.jsonl:2: missing field\(s\) answer"),
        (record(answer="E"), r"questions.jsonl:2: 'answer' must be one of the letters A, B, C, D, got 'E'"),
        (record(options="MANGO"), r"questions.jsonl:2: 'options' must be a list of 2 to 26 strings"),
        (record(options=["a", "a"], answer="A"), r"questions.jsonl:2: the options repeat one another"),
        (record(options=["a", ""], answer="A"), r"questions.jsonl:2: every option must be a non-empty string"),
        (record(video_seconds=-1), r"questions.jsonl:2: 'video_seconds' must be a positive number"),
        (record(needle_times=[[50, 70]]), r"questions.jsonl:2: needle time \[50, 70\] is not a span inside the video"),
        (record(needle_times=[[5]]), r"questions.jsonl:2: 'needle_times' entries must be \[start, end\] seconds"),
        (record(kind=""), r"questions.jsonl:2: 'kind' must be a non-empty string"),
        (record(id="q0"), r"questions.jsonl:2: id 'q0' already used on line 1"),
        (record(video="gone.mp4"), r"questions.jsonl:2: video .*gone.mp4 not found"),
    ],
)
def test_malformed_lines_are_named(tmp_path, line, message):
    path = write_lines(tmp_path, record(id="q0"), line)
    with pytest.raises(UserError, match=message) as caught:
        load_questions(path)
    assert "\n" not in str(caught.value)
    assert str(path) in str(caught.value)


def test_text_with_unicode_line_separators_is_one_line(tmp_path):
    # write_questions writes U+2028 and U+0085 unescaped inside strings; they are not line ends.
    (tmp_path / "clip.mp4").write_bytes(b"")
    question = record(question="Which word\u2028is on the\x85card?")
    path = tmp_path / "questions.jsonl"
    path.write_text(json.dumps(question, ensure_ascii=False) + "\n", encoding="utf-8")
    (loaded,) = load_questions(path)
    assert loaded.question == question["question"]


def test_a_line_nested_too_deeply_is_named(tmp_path):
    path = write_lines(tmp_path, json.dumps(record()), "[" * 100_000)
    with pytest.raises(UserError, match=rf"{path}:2: nested too deeply"):
        load_questions(path)


def test_missing_or_empty_files(tmp_path):
    with pytest.raises(UserError, match="no such question file"):
        load_questions(tmp_path / "nothing.jsonl")
    with pytest.raises(UserError, match="no such question file"):
        load_questions(tmp_path)  # a directory without questions.jsonl
    (tmp_path / "questions.jsonl").write_text("\n\n")
    with pytest.raises(UserError, match="holds no questions"):
        load_questions(tmp_path)


def test_videos_need_not_exist_when_not_checked(tmp_path):
    path = write_lines(tmp_path, record(video="later.mp4"))
    assert load_questions(path, check_videos=False).questions[0].video == "later.mp4"
