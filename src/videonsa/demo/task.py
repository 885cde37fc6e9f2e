"""The demo's task: needle-in-a-long-video questions a small model can learn from scratch in minutes on a CPU.

Videos come from the needle benchmark's generator (`make_needle_set`) on a generated haystack (muted, moving
scenes), with one of its two kinds made for this demo (docs/demo.md):

* ``colour`` (the default): the screen fills with one colour at a random time; "which colour fills the screen?"
* ``before-black``: the whole screen fills with one colour (red, green, blue or white), at least
  `far_seconds` later turns black, later still fills with another colour; "which colour filled the screen before
  it turned black?" The answer is far outside the sliding window of the black screen's video tokens: a model
  whose video tokens see only their window can tell which two colours were shown, not which came first.

The four colours are always offered in the same order, so the letter names the colour. The training set and the
held-out set are generated from different seeds, so no held-out video (nor its haystack) is ever seen in training.

Training samples are written as an annotation file in the LLaVA-Video layout for `videonsa train`'s data code; the
user turn is exactly the prompt `videonsa ask` builds for a multiple-choice question (the video, then the question,
the lettered options and the answer-with-a-letter instruction), and the reply is the correct letter.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from videonsa.evaluation.needles import NeedleSet, NeedleTiming, make_needle_set
from videonsa.evaluation.questions import QuestionSet
from videonsa.inference.prompt import label_options, question_text

TASK_KINDS = ("colour", "before-black")  # needle kinds the demo can be trained on (docs/demo.md)
ANNOTATIONS_FILE = "annotations.jsonl"


@dataclass(frozen=True)
class DemoTask:
    """How the demo's videos look: `seconds` long at `fps`, `size` pixels (the model sees them at 28 x 28), each
    colour shown for `fill_seconds`, the asked colour ending at least `far_seconds` before the black screen
    (``before-black``); `train_videos` / `heldout_videos` videos from seeds `seed` / `seed + 1`."""

    seconds: int = 120
    fps: int = 2
    size: tuple[int, int] = (56, 56)
    fill_seconds: int = 4
    train_videos: int = 512
    heldout_videos: int = 200
    seed: int = 0
    kind: str = "colour"  # the needle kind, one of TASK_KINDS
    far_seconds: int = 20

    @property
    def frames(self) -> int:
        return self.seconds * self.fps

    @property
    def chance(self) -> float:
        return 0.25

    def as_dict(self) -> dict:
        return asdict(self)


def make_videos(
    directory: str | os.PathLike, task: DemoTask, *, heldout: bool, progress: Callable[[int, int], None] | None = None
) -> NeedleSet:
    """Write (or complete) the training or held-out needle set in `directory`."""
    return make_needle_set(
        directory,
        count=task.heldout_videos if heldout else task.train_videos,
        lengths=[task.seconds],
        size=task.size,
        seed=task.seed + (1 if heldout else 0),
        fps=task.fps,
        kinds=[task.kind],
        timing=NeedleTiming(fill_seconds=task.fill_seconds, far_seconds=task.far_seconds),
        progress=progress,
    )


def training_record(question) -> dict:
    """One LLaVA-Video annotation record: the video, `ask`'s prompt for the question, the correct letter."""
    _, lines = label_options(list(question.options))
    prompt = question_text(question.question, lines)
    return {
        "id": question.id,
        "video": question.video,
        "conversations": [
            {"from": "human", "value": "<video>" + prompt},
            {"from": "gpt", "value": question.answer},
        ],
    }


def chat_texts(question) -> list[str]:
    """The chat texts a training sample about `question` renders to (one per option letter as the reply), with
    the chat template of `videonsa.testing`'s tokenizer: what the demo's tokenizer learns its merges from."""
    from videonsa import testing

    record = training_record(question)
    prompt = record["conversations"][0]["value"].removeprefix("<video>")
    tokenizer = testing.tiny_tokenizer()
    user = {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}
    return [tokenizer.apply_chat_template([user, {"role": "assistant", "content": letter}], tokenize=False)
            for letter in question.letters]


def write_annotations(questions: QuestionSet, path: str | os.PathLike) -> Path:
    """Write the training annotations for `questions` (videos relative to the question file's folder)."""
    from videonsa.files import atomic_write_text

    path = Path(path)
    lines = [json.dumps(training_record(question), ensure_ascii=False) for question in questions]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
