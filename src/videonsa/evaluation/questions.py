"""The multiple-choice question file (JSONL) that `videonsa eval` reads and `make_needle_set` writes.

One JSON object per line (the format is documented in docs/evaluation.md):

    {"id": "00060s-000-retrieval", "video": "videos/00060s-000.mp4",
     "question": "At one point a word is shown ... Which word is it?",
     "options": ["PENGUIN", "VIOLIN", "CACTUS", "LANTERN"], "answer": "C", "kind": "retrieval",
     "video_seconds": 60.0, "needle_times": [[31.0, 35.0]], "length_bin": "1m"}

`video` is relative to the file's own directory (an absolute path also works). Other keys are kept in
`Question.extra` and written back unchanged. `load_questions` checks everything a run needs before any model
loads, and names the file and line of the first problem in one line.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from videonsa.errors import UserError
from videonsa.files import atomic_write_text, jsonl_lines

OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
NEEDLE_KINDS: tuple[str, ...] = ("retrieval", "counting", "order")
QUESTIONS_FILE = "questions.jsonl"
REQUIRED_FIELDS: tuple[str, ...] = (
    "id",
    "video",
    "question",
    "options",
    "answer",
    "kind",
    "video_seconds",
    "needle_times",
    "length_bin",
)


@dataclass(frozen=True)
class Question:
    """One multiple-choice question about one video.

    video: the path as written in the file (relative to `root`, the question file's directory, unless absolute).
    answer: the correct option's letter ("A" for options[0]).
    needle_times: the [start, end) seconds where the needle(s) the question is about are shown, in time order.
    length_bin: the label runs group accuracy by (e.g. "1m", "1h").
    """

    id: str
    video: str
    question: str
    options: tuple[str, ...]
    answer: str
    kind: str
    video_seconds: float
    needle_times: tuple[tuple[float, float], ...]
    length_bin: str
    root: Path = Path(".")
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def video_path(self) -> Path:
        """The video file: `video` resolved against the question file's directory."""
        path = Path(self.video).expanduser()
        return path if path.is_absolute() else self.root / path

    @property
    def letters(self) -> str:
        """The option letters in use: "ABCD" for four options."""
        return OPTION_LETTERS[: len(self.options)]

    @property
    def answer_text(self) -> str:
        """The correct option's text."""
        return self.options[OPTION_LETTERS.index(self.answer)]

    @property
    def chance(self) -> float:
        """Probability that a uniform guess is right."""
        return 1.0 / len(self.options)

    def to_json(self) -> dict[str, Any]:
        """The question as one line's JSON object (fields in the documented order, then the extra ones)."""
        record = {
            "id": self.id,
            "video": self.video,
            "question": self.question,
            "options": list(self.options),
            "answer": self.answer,
            "kind": self.kind,
            "video_seconds": self.video_seconds,
            "needle_times": [list(span) for span in self.needle_times],
            "length_bin": self.length_bin,
        }
        record.update(self.extra)
        return record


@dataclass(frozen=True)
class QuestionSet:
    """The questions of one file, in file order, and where the file is."""

    path: Path
    questions: tuple[Question, ...]

    def __len__(self) -> int:
        return len(self.questions)

    def __iter__(self) -> Iterator[Question]:
        return iter(self.questions)

    @property
    def root(self) -> Path:
        """The directory videos are resolved against."""
        return self.path.parent

    def by_id(self) -> dict[str, Question]:
        """Questions keyed by id."""
        return {question.id: question for question in self.questions}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _non_empty_string(record: Mapping[str, Any], key: str, where: str) -> str:
    value = record[key]
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: '{key}' must be a non-empty string, got {value!r}")
    return value


def _options(record: Mapping[str, Any], where: str) -> tuple[str, ...]:
    options = record["options"]
    if not isinstance(options, list) or not 2 <= len(options) <= len(OPTION_LETTERS):
        raise UserError(f"{where}: 'options' must be a list of 2 to {len(OPTION_LETTERS)} strings, got {options!r}")
    if not all(isinstance(option, str) and option.strip() for option in options):
        raise UserError(f"{where}: every option must be a non-empty string, got {options!r}")
    if len({option.strip() for option in options}) != len(options):
        raise UserError(f"{where}: the options repeat one another: {options!r}")
    return tuple(options)


def _needle_times(record: Mapping[str, Any], video_seconds: float, where: str) -> tuple[tuple[float, float], ...]:
    spans = record["needle_times"]
    if not isinstance(spans, list):
        raise UserError(f"{where}: 'needle_times' must be a list of [start, end] pairs, got {spans!r}")
    parsed = []
    for span in spans:
        if not (isinstance(span, list) and len(span) == 2 and all(_is_number(value) for value in span)):
            raise UserError(f"{where}: 'needle_times' entries must be [start, end] seconds, got {span!r}")
        start, end = float(span[0]), float(span[1])
        if not 0 <= start < end <= video_seconds + 1e-6:
            raise UserError(
                f"{where}: needle time [{start:g}, {end:g}] is not a span inside the video (0 to {video_seconds:g}s)"
            )
        parsed.append((start, end))
    return tuple(parsed)


def parse_question(record: Any, *, root: Path, where: str) -> Question:
    """Check one decoded JSON line and build its `Question`; `where` ("file:line") starts every message."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [key for key in REQUIRED_FIELDS if key not in record]
    if missing:
        raise UserError(f"{where}: missing field(s) {', '.join(missing)}")
    options = _options(record, where)
    answer = record["answer"]
    if not (isinstance(answer, str) and len(answer) == 1 and answer in OPTION_LETTERS[: len(options)]):
        raise UserError(
            f"{where}: 'answer' must be one of the letters {', '.join(OPTION_LETTERS[: len(options)])}, got {answer!r}"
        )
    video_seconds = record["video_seconds"]
    if not (_is_number(video_seconds) and video_seconds > 0):
        raise UserError(f"{where}: 'video_seconds' must be a positive number, got {video_seconds!r}")
    return Question(
        id=_non_empty_string(record, "id", where),
        video=_non_empty_string(record, "video", where),
        question=_non_empty_string(record, "question", where),
        options=options,
        answer=answer,
        kind=_non_empty_string(record, "kind", where),
        video_seconds=float(video_seconds),
        needle_times=_needle_times(record, float(video_seconds), where),
        length_bin=_non_empty_string(record, "length_bin", where),
        root=root,
        extra={key: value for key, value in record.items() if key not in REQUIRED_FIELDS},
    )


def question_file(path: str | os.PathLike) -> Path:
    """The question file a path names: the path itself, or `questions.jsonl` inside a directory."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / QUESTIONS_FILE
    if not path.is_file():
        raise UserError(f"{path}: no such question file")
    return path


def load_questions(path: str | os.PathLike, *, check_videos: bool = True) -> QuestionSet:
    """Read a question file (or a needle set directory holding `questions.jsonl`), checking every line.

    Raises `UserError` naming the file and line of the first malformed line, duplicate id or (with
    `check_videos`) missing video file.
    """
    path = question_file(path)
    root = path.parent
    questions: list[Question] = []
    seen: dict[str, int] = {}
    try:
        lines = jsonl_lines(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: cannot be read as UTF-8 text ({error})") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{where}: not valid JSON ({error.msg} at column {error.colno})") from None
        except RecursionError:
            raise UserError(f"{where}: nested too deeply to read as JSON") from None
        question = parse_question(record, root=root, where=where)
        if question.id in seen:
            raise UserError(f"{where}: id '{question.id}' already used on line {seen[question.id]}")
        if check_videos and not question.video_path.is_file():
            raise UserError(f"{where}: video {question.video_path} not found")
        seen[question.id] = number
        questions.append(question)
    if not questions:
        raise UserError(f"{path}: holds no questions")
    return QuestionSet(path=path, questions=tuple(questions))


def write_questions(path: str | os.PathLike, questions: Iterable[Question]) -> Path:
    """Write `questions` as JSONL, atomically (a temporary file renamed over `path`)."""
    path = Path(path)
    text = "".join(json.dumps(question.to_json(), ensure_ascii=False) + "\n" for question in questions)
    atomic_write_text(path, text)
    return path


__all__ = [
    "NEEDLE_KINDS",
    "OPTION_LETTERS",
    "QUESTIONS_FILE",
    "REQUIRED_FIELDS",
    "Question",
    "QuestionSet",
    "load_questions",
    "parse_question",
    "question_file",
    "write_questions",
]
