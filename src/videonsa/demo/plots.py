"""The demo's two pictures: the training loss curve and held-out accuracy by where the needle was in the video.

Both use matplotlib's Agg canvas directly (no pyplot state) and are written atomically.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from videonsa.evaluation.questions import Question

LOSS_PLOT = "loss.png"
POSITION_PLOT = "accuracy_by_position.png"
POSITION_BINS = 10  # tenths of the video


@dataclass(frozen=True)
class PositionBin:
    """Held-out questions whose needle starts in [start, end) of the video (fractions), and how many were right."""

    start: float
    end: float
    questions: int
    correct: int

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.questions if self.questions else None

    def to_json(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "questions": self.questions, "correct": self.correct,
                "accuracy": self.accuracy}


def needle_position(question: Question) -> float:
    """Where the needle starts, as a fraction of the video (0 = first frame)."""
    return question.needle_times[0][0] / question.video_seconds


def accuracy_by_position(
    questions: Sequence[Question], answers: Sequence[Mapping[str, Any]], bins: int = POSITION_BINS
) -> list[PositionBin]:
    """Accuracy per tenth (by default) of the video in which the needle starts. `answers`: answers.jsonl records;
    correctness is recomputed from the question's answer and the model's choice."""
    by_id = {question.id: question for question in questions}
    counts = [[0, 0] for _ in range(bins)]
    for answer in answers:
        question = by_id.get(answer["id"])
        if question is None:
            continue
        index = min(bins - 1, int(needle_position(question) * bins))
        counts[index][0] += 1
        counts[index][1] += answer.get("choice") == question.answer
    return [PositionBin(index / bins, (index + 1) / bins, total, right) for index, (total, right) in enumerate(counts)]


def _save(figure, path: Path) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_bytes(buffer.getvalue())
    os.replace(temporary, path)
    return path


def _figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.0), dpi=120)
    FigureCanvasAgg(figure)
    return figure


def plot_loss(steps: Sequence[int], losses: Sequence[float], chance_loss: float | None, path: str | os.PathLike,
              *, title: str) -> Path:
    """The training loss per logged step; `chance_loss` (a dashed line) is the loss of a uniform guess."""
    figure = _figure()
    axes = figure.add_subplot()
    axes.plot(steps, losses, linewidth=1.0, color="tab:blue", alpha=0.45, label="loss per step")
    if len(losses) >= 10:
        width = max(3, len(losses) // 15)
        smooth = [sum(losses[max(0, i - width + 1): i + 1]) / len(losses[max(0, i - width + 1): i + 1])
                  for i in range(len(losses))]
        axes.plot(steps, smooth, linewidth=2.0, color="tab:blue", label=f"mean of {width} steps")
    if chance_loss is not None:
        axes.axhline(chance_loss, linestyle="--", color="grey", linewidth=1, label="guessing (answer unknown)")
    axes.set_xlabel("training step")
    axes.set_ylabel("loss (mean over the answer's tokens)")
    axes.set_ylim(bottom=0)
    axes.set_title(title, fontsize=9)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="best")
    figure.tight_layout()
    return _save(figure, Path(path))


def plot_accuracy_by_position(bins: Sequence[PositionBin], chance: float, path: str | os.PathLike,
                              *, title: str) -> Path:
    """Held-out accuracy per tenth of the video where the needle starts, question counts on the bars."""
    figure = _figure()
    axes = figure.add_subplot()
    centres = [(b.start + b.end) / 2 for b in bins]
    heights = [b.accuracy or 0.0 for b in bins]
    bars = axes.bar(centres, heights, width=0.9 / len(bins), color="tab:green", alpha=0.8, label="held-out accuracy")
    for bar, b in zip(bars, bins, strict=True):
        axes.annotate(f"{b.correct}/{b.questions}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                      ha="center", va="bottom", fontsize=7)
    axes.axhline(chance, linestyle="--", color="grey", linewidth=1, label="chance")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.1)
    axes.set_xticks([b.start for b in bins] + [1.0], [f"{b.start:.0%}" for b in bins] + ["100%"], fontsize=7)
    axes.set_xlabel("where the needle starts in the video")
    axes.set_ylabel("accuracy")
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    return _save(figure, Path(path))
