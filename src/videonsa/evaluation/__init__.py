"""Evaluation: the offline needle-in-a-haystack benchmark, the multiple-choice question format, the resumable
runner and its report. See docs/evaluation.md.

>>> from videonsa.evaluation import make_needle_set, load_questions, run_eval, EvalSettings
>>> needle_set = make_needle_set("needles", count=2, lengths=[60, 600], seed=0)
>>> summary = run_eval(videonsa.load("Enxin/VideoNSA"), load_questions("needles"), "results", EvalSettings())
>>> print(summary.describe())

Names are imported on first use, so `import videonsa.evaluation` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Question": "videonsa.evaluation.questions",
    "QuestionSet": "videonsa.evaluation.questions",
    "load_questions": "videonsa.evaluation.questions",
    "write_questions": "videonsa.evaluation.questions",
    "NeedleSet": "videonsa.evaluation.needles",
    "make_needle_set": "videonsa.evaluation.needles",
    "NeedleTiming": "videonsa.evaluation.needles",
    "EvalSettings": "videonsa.evaluation.runner",
    "run_eval": "videonsa.evaluation.runner",
    "read_answers": "videonsa.evaluation.runner",
    "Summary": "videonsa.evaluation.report",
    "summarize": "videonsa.evaluation.report",
    "write_report": "videonsa.evaluation.report",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'videonsa.evaluation' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


__all__ = sorted(_EXPORTS)
