"""Scoring a run: the summary (accuracy overall, per question kind and per video length, cost per question) and
its files, `summary.json` and the accuracy-against-length plot, both written atomically.

Scores are recomputed from the question file's answers and the model's letters in `answers.jsonl`; the
`correct` field a line carries is not trusted.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from videonsa.evaluation.questions import Question
from videonsa.files import atomic_write

SUMMARY_FILE = "summary.json"
PLOT_FILE = "accuracy_by_length.png"


@dataclass(frozen=True)
class Group:
    """Accuracy of a group of answered questions (one kind, one length bin)."""

    accuracy: float | None
    correct: int
    questions: int
    chance: float | None
    video_seconds: float | None = None  # mean video length of the group


@dataclass(frozen=True)
class Summary:
    """A run's scores and costs. Means are per answered question; `questions_per_hour` counts the time spent
    answering (decoding frames, prefill, generation), not model loading."""

    accuracy: float | None
    accuracy_interval: tuple[float, float] | None  # Wilson 95% interval of `accuracy`
    chance: float | None
    questions: int
    correct: int
    total_questions: int
    complete: bool
    per_kind: dict[str, Group]
    per_length: dict[str, Group]  # ordered by video length
    per_length_kind: dict[str, dict[str, Group]]
    frames_per_question: float | None
    video_tokens_per_question: float | None
    prompt_tokens_per_question: float | None
    prefill_seconds: float | None
    video_decode_seconds: float | None
    seconds_per_question: float | None
    questions_per_hour: float | None
    duplicate_answers: int = 0  # earlier answers of a repeated id, left out (`latest_answers`)
    run: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        record = asdict(self)
        record["run"] = dict(self.run)
        return record

    def describe(self) -> str:
        """A few lines for people: accuracy with its interval and chance, per kind, per length, cost."""
        if self.accuracy is None:
            return f"0 of {self.total_questions} questions answered"
        low, high = self.accuracy_interval
        lines = [
            f"accuracy {self.accuracy:.1%} ({self.correct}/{self.questions}, 95% interval {low:.1%}-{high:.1%}; "
            f"chance {self.chance:.1%})" + ("" if self.complete else f" — {self.total_questions} in the set"),
            "per kind    " + ", ".join(f"{name} {_percent(group)}" for name, group in self.per_kind.items()),
            "per length  " + ", ".join(f"{name} {_percent(group)}" for name, group in self.per_length.items()),
            self._cost_line(),
        ]
        if self.duplicate_answers:
            lines.append(f"note        {self.duplicate_answers} earlier answer(s) of a repeated id ignored: the last "
                         "answer of each id counts")
        return "\n".join(lines)

    def _cost_line(self) -> str:
        """The costs per question; a cost the answers do not record (answers written by hand or by an older
        version) shows as n/a."""
        return (
            f"cost        {_shown(self.frames_per_question, '.0f')} frames, "
            f"{_shown(self.prompt_tokens_per_question, ',.0f')} tokens "
            f"({_shown(self.video_tokens_per_question, ',.0f')} video) per question; "
            f"prefill {_shown(self.prefill_seconds, '.2f', 's')}, "
            f"frame decoding {_shown(self.video_decode_seconds, '.2f', 's')}; "
            f"{_shown(self.questions_per_hour, ',.0f')} questions/hour"
        )


def _shown(value: float | None, spec: str, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{unit}"


def _percent(group: Group) -> str:
    return "n/a" if group.accuracy is None else f"{group.accuracy:.1%} (n={group.questions})"


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float] | None:
    """The Wilson score interval for a proportion `correct` / `total` (None when nothing was answered)."""
    if total == 0:
        return None
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    spread = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - spread), min(1.0, centre + spread)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _group(pairs: Sequence[tuple[Question, bool]]) -> Group:
    correct = sum(is_right for _, is_right in pairs)
    return Group(
        accuracy=correct / len(pairs) if pairs else None,
        correct=correct,
        questions=len(pairs),
        chance=_mean([question.chance for question, _ in pairs]),
        video_seconds=_mean([question.video_seconds for question, _ in pairs]),
    )


def _grouped(pairs: Sequence[tuple[Question, bool]], key) -> dict[str, list[tuple[Question, bool]]]:
    groups: dict[str, list[tuple[Question, bool]]] = {}
    for pair in pairs:
        groups.setdefault(key(pair[0]), []).append(pair)
    return groups


def latest_answers(answers: Iterable[Mapping[str, Any]]) -> tuple[list[Mapping[str, Any]], int]:
    """(the last answer of each id, in file order; how many earlier answers of a repeated id were left out).

    answers.jsonl is only ever appended to, so a repeated id (two runs writing without the lock, or lines pasted
    in by hand) is a later answer to the same question; counting both would score the question twice.
    """
    records = list(answers)
    last = {record.get("id"): index for index, record in enumerate(records)}
    kept = [record for index, record in enumerate(records) if last[record.get("id")] == index]
    return kept, len(records) - len(kept)


def summarize(
    questions: Sequence[Question], answers: Iterable[Mapping[str, Any]], run: Mapping[str, Any] | None = None
) -> Summary:
    """Score `answers` (records of answers.jsonl: id, choice, and the cost fields) against `questions`.

    Answers to ids not in `questions` are ignored; a missing choice counts as wrong; of a repeated id only the
    last answer counts (`duplicate_answers` says how many were left out).
    """
    by_id = {question.id: question for question in questions}
    records, duplicates = latest_answers(record for record in answers if record.get("id") in by_id)
    pairs = [(by_id[record["id"]], record.get("choice") == by_id[record["id"]].answer) for record in records]
    overall = _group(pairs)
    by_length = _grouped(pairs, lambda question: question.length_bin)
    length_order = sorted(by_length, key=lambda name: _mean([q.video_seconds for q, _ in by_length[name]]))
    by_kind = _grouped(pairs, lambda question: question.kind)
    total_seconds = sum(float(record.get("seconds", 0.0)) for record in records)

    def mean_of(name: str) -> float | None:
        return _mean([float(record[name]) for record in records if record.get(name) is not None])

    return Summary(
        accuracy=overall.accuracy,
        accuracy_interval=wilson_interval(overall.correct, overall.questions),
        chance=overall.chance if pairs else _mean([question.chance for question in questions]),
        questions=overall.questions,
        correct=overall.correct,
        total_questions=len(questions),
        complete=overall.questions == len(questions),
        per_kind={name: _group(by_kind[name]) for name in sorted(by_kind)},
        per_length={name: _group(by_length[name]) for name in length_order},
        per_length_kind={
            name: {kind: _group(group) for kind, group in sorted(_grouped(by_length[name], lambda q: q.kind).items())}
            for name in length_order
        },
        frames_per_question=mean_of("frames"),
        video_tokens_per_question=mean_of("video_tokens"),
        prompt_tokens_per_question=mean_of("prompt_tokens"),
        prefill_seconds=mean_of("prefill_seconds"),
        video_decode_seconds=mean_of("video_decode_seconds"),
        seconds_per_question=mean_of("seconds"),
        questions_per_hour=3600 * len(records) / total_seconds if total_seconds > 0 else None,
        duplicate_answers=duplicates,
        run=dict(run or {}),
    )


def _write_atomically(path: Path, data: bytes) -> None:
    atomic_write(path, lambda temporary: Path(temporary).write_bytes(data))


def write_summary(summary: Summary, out_dir: str | os.PathLike) -> Path:
    """Write `summary.json` in `out_dir` atomically."""
    path = Path(out_dir) / SUMMARY_FILE
    _write_atomically(path, (json.dumps(summary.to_json(), indent=2) + "\n").encode("utf-8"))
    return path


def plot_accuracy(summary: Summary, out_dir: str | os.PathLike, *, title: str | None = None) -> Path:
    """Write `accuracy_by_length.png` in `out_dir` atomically: accuracy (overall and per kind) against video
    length, with chance as a dashed line. Uses matplotlib's Agg canvas directly (no global pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(summary.per_length)
    seconds = [summary.per_length[name].video_seconds for name in names]
    figure = Figure(figsize=(6.4, 4.0), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if names:
        overall = [summary.per_length[name].accuracy for name in names]
        axes.plot(seconds, overall, marker="o", linewidth=2.5, color="black", label="all")
        kinds = sorted({kind for groups in summary.per_length_kind.values() for kind in groups})
        for kind in kinds:
            points = [
                (s, summary.per_length_kind[n][kind].accuracy)
                for s, n in zip(seconds, names, strict=True)
                if kind in summary.per_length_kind[n]
            ]
            axes.plot(*zip(*points, strict=True), marker=".", linewidth=1.2, alpha=0.8, label=kind)
        if len(set(seconds)) > 1 and max(seconds) / min(seconds) >= 4:
            axes.set_xscale("log")
        axes.set_xticks(seconds, names)
        axes.minorticks_off()
    if summary.chance is not None:
        axes.axhline(summary.chance, linestyle="--", color="grey", linewidth=1, label="chance")
    axes.set_ylim(0, 1.02)
    axes.set_xlabel("video length")
    axes.set_ylabel("accuracy")
    axes.set_title(title or _plot_title(summary), fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="best")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    path = Path(out_dir) / PLOT_FILE
    _write_atomically(path, buffer.getvalue())
    return path


def _plot_title(summary: Summary) -> str:
    run = summary.run
    parts = [str(run.get("model", "")), f"attention {run['attention']}" if run.get("attention") else ""]
    if summary.accuracy is not None:
        parts.append(f"{summary.accuracy:.1%} of {summary.questions}")
    return ", ".join(part for part in parts if part)


def write_report(summary: Summary, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """summary.json and accuracy_by_length.png in `out_dir`."""
    return write_summary(summary, out_dir), plot_accuracy(summary, out_dir)


__all__ = [
    "PLOT_FILE",
    "SUMMARY_FILE",
    "Group",
    "Summary",
    "plot_accuracy",
    "summarize",
    "wilson_interval",
    "write_report",
    "write_summary",
]
