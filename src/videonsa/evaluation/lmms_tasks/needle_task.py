"""The `videonsa_needles` lmms-eval task's document functions (the YAML's `utils.py` delegates here).

A document is one line of a needle set's `questions.jsonl` (format: docs/evaluation.md) as lmms-eval's JSON
loader reads it. The prompt is the one `videonsa ask --options` and `videonsa eval` use (question, "Options:",
lettered options, the answer-with-a-letter instruction), so the three routes ask the same thing. A reply is
scored by the first option letter it contains as a word ("B", "B.", "(B)", "The answer is B").
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from videonsa.inference.prompt import label_options, question_text

NEEDLE_KINDS: tuple[str, ...] = ("retrieval", "counting", "order")


def doc_to_visual(doc: dict[str, Any], set_dir: Path) -> list[str]:
    """[the question's video file], its path resolved against the needle set's folder unless absolute."""
    path = Path(doc["video"]).expanduser()
    return [str(path if path.is_absolute() else Path(set_dir) / path)]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    """The question with its lettered options and the instruction to answer with a letter."""
    _letters, lines = label_options(doc["options"])
    return question_text(doc["question"], lines)


def parse_choice(reply: str, letters: str) -> str | None:
    """The first of `letters` that stands as a word in `reply` (None when there is none)."""
    match = re.search(rf"\b([{letters}])\b", reply)
    return match.group(1) if match else None


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, dict[str, Any]]:
    """One record per metric: overall accuracy, and the accuracy of the question's own kind."""
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[: len(doc["options"])]
    choice = parse_choice(results[0], letters)
    record = {
        "id": doc["id"],
        "kind": doc["kind"],
        "length_bin": doc.get("length_bin"),
        "answer": doc["answer"],
        "choice": choice,
        "score": float(choice == doc["answer"]),
    }
    metrics = {"accuracy": record}
    if doc["kind"] in NEEDLE_KINDS:
        metrics[f"accuracy_{doc['kind']}"] = record
    return metrics


def accuracy(records: list[dict[str, Any]]) -> float:
    """Fraction of the records answered correctly."""
    return sum(record["score"] for record in records) / len(records) if records else float("nan")
