"""The runner: scoring a known answers file, and end-to-end runs with a tiny model that resume after a kill."""

from __future__ import annotations

import json
import shutil

import pytest
from eval_helpers import FAST_FRAMES

from videonsa.errors import UserError
from videonsa.evaluation.questions import Question, load_questions
from videonsa.evaluation.report import PLOT_FILE, SUMMARY_FILE, summarize, wilson_interval
from videonsa.evaluation.runner import ANSWERS_FILE, EvalSettings, read_answers, run_eval
from videonsa.video import SamplingSettings


def question(identifier: str, kind: str, seconds: float, answer: str, options: int = 4) -> Question:
    return Question(
        id=identifier,
        video="v.mp4",
        question="?",
        options=tuple(f"option {k}" for k in range(options)),
        answer=answer,
        kind=kind,
        video_seconds=seconds,
        needle_times=(),
        length_bin=f"{seconds:g}s",
    )


def test_scoring_a_known_answers_file():
    questions = [
        question("a", "retrieval", 600, "A"),
        question("b", "retrieval", 60, "B"),
        question("c", "counting", 60, "C"),
        question("d", "counting", 600, "D", options=2 + 2),
        question("e", "order", 60, "B", options=2),
    ]
    # `correct` lies on purpose: the score comes from the question file's answers.
    answers = [
        {"id": "a", "choice": "A", "correct": False, "frames": 10, "prompt_tokens": 100, "video_tokens": 80,
         "prefill_seconds": 1.0, "seconds": 2.0},
        {"id": "b", "choice": "A", "correct": True, "frames": 20, "prompt_tokens": 300, "video_tokens": 280,
         "prefill_seconds": 3.0, "seconds": 4.0},
        {"id": "c", "choice": "C", "frames": 30, "prompt_tokens": 200, "video_tokens": 180, "prefill_seconds": 2.0,
         "seconds": 6.0},
        {"id": "e", "choice": None, "frames": 40, "prompt_tokens": 400, "video_tokens": 380, "prefill_seconds": 2.0,
         "seconds": 6.0},
        {"id": "zzz", "choice": "A", "seconds": 100.0},  # not in the set: ignored
    ]  # fmt: skip
    summary = summarize(questions, answers, {"model": "m"})
    assert (summary.correct, summary.questions, summary.total_questions, summary.complete) == (2, 4, 5, False)
    assert summary.accuracy == 0.5
    assert summary.chance == pytest.approx((0.25 * 3 + 0.5) / 4)
    assert {name: (g.correct, g.questions) for name, g in summary.per_kind.items()} == {
        "counting": (1, 1), "order": (0, 1), "retrieval": (1, 2),
    }  # fmt: skip
    assert list(summary.per_length) == ["60s", "600s"]  # ordered by length
    assert summary.per_length["60s"].accuracy == pytest.approx(1 / 3) and summary.per_length["600s"].accuracy == 1.0
    assert summary.per_length_kind["60s"]["retrieval"].accuracy == 0.0
    assert summary.frames_per_question == 25 and summary.prompt_tokens_per_question == 250
    assert summary.prefill_seconds == 2.0
    assert summary.questions_per_hour == pytest.approx(3600 * 4 / 18)
    low, high = summary.accuracy_interval
    assert low < 0.5 < high and (low, high) == wilson_interval(2, 4)
    record = summary.to_json()
    assert {"accuracy", "chance", "questions", "per_kind", "per_length"} <= set(record)
    json.dumps(record)


def test_a_repeated_answer_counts_once_the_last_one():
    questions = [question("a", "retrieval", 60, "A"), question("b", "retrieval", 60, "B")]
    # As two runs without the lock, or a hand edit, leave them: "a" answered wrong, then again, right.
    costs = {"frames": 8, "prompt_tokens": 300, "video_tokens": 200, "prefill_seconds": 0.5,
             "video_decode_seconds": 0.1, "seconds": 1.0}
    answers = [{"id": "a", "choice": "C", **costs}, {"id": "b", "choice": "B", **costs},
               {"id": "a", "choice": "A", **costs}]
    summary = summarize(questions, answers)
    assert (summary.correct, summary.questions, summary.complete) == (2, 2, True)
    assert summary.duplicate_answers == 1 and summary.to_json()["duplicate_answers"] == 1
    assert "1 earlier answer(s) of a repeated id ignored" in summary.describe()


def test_answers_without_cost_fields_are_described():
    """Answers written by hand or by an older version may carry only id and choice: their costs are unknown."""
    questions = [question("a", "retrieval", 60, "A"), question("b", "retrieval", 60, "B")]
    summary = summarize(questions, [{"id": "a", "choice": "A"}, {"id": "b", "choice": "C", "frames": 8}])
    assert summary.frames_per_question == 8 and summary.prefill_seconds is None
    text = summary.describe()
    assert "accuracy 50.0% (1/2" in text
    assert "cost        8 frames, n/a tokens (n/a video) per question; prefill n/a, frame decoding n/a; " \
        "n/a questions/hour" in text


def test_wilson_interval_known_values():
    assert wilson_interval(0, 0) is None
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(0.4038, abs=1e-4) and high == pytest.approx(0.5962, abs=1e-4)
    assert wilson_interval(10, 10)[1] == 1.0


def test_read_answers_repairs_a_cut_line_and_names_a_bad_one(tmp_path):
    path = tmp_path / ANSWERS_FILE
    path.write_text('{"id": "a", "choice": "A"}\n{"id": "b", "cho')
    assert [r["id"] for r in read_answers(path)] == ["a"]
    assert path.read_text().endswith('"cho')  # only reading: left alone
    assert [r["id"] for r in read_answers(path, repair=True)] == ["a"]
    assert path.read_text() == '{"id": "a", "choice": "A"}\n'
    path.write_text('{"id": "a"}\nnot json\n{"id": "c"}\n')
    with pytest.raises(UserError, match=rf"{path}:2: not valid JSON"):
        read_answers(path)


def test_read_answers_takes_a_path_given_as_a_string(tmp_path):
    # docs/evaluation.md: `summarize(questions, read_answers(path))` scores any answers file
    path = tmp_path / ANSWERS_FILE
    path.write_text('{"id": "a", "choice": "A"}\n')
    assert [r["id"] for r in read_answers(str(path))] == ["a"]
    assert read_answers(str(tmp_path / "missing.jsonl")) == []


def test_read_answers_keeps_unicode_line_separators_inside_a_line(tmp_path):
    path = tmp_path / ANSWERS_FILE
    path.write_text(json.dumps({"id": "a\u2028b", "kind": "x\x85y"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert [(r["id"], r["kind"]) for r in read_answers(path, repair=True)] == [("a\u2028b", "x\x85y")]


def test_read_answers_names_a_line_nested_too_deeply(tmp_path):
    path = tmp_path / ANSWERS_FILE
    path.write_text('{"id": "a"}\n' + "[" * 100_000 + "\n")
    with pytest.raises(UserError, match=rf"{path}:2: nested too deeply"):
        read_answers(path)


class Stop(Exception):
    pass


def stop_after(count: int, seen: list):
    def on_answer(record):
        seen.append(record["id"])
        if len(seen) == count:
            raise Stop

    return on_answer


def test_resume_after_a_kill_gives_the_uninterrupted_result(loaded, needle_set, tmp_path):
    settings = EvalSettings(preset="planner", frames=SamplingSettings(**FAST_FRAMES), model="tiny")
    questions = needle_set.questions
    whole = run_eval(loaded, questions, tmp_path / "whole", settings, progress=False)
    assert whole.complete and whole.questions == len(questions) == 6

    first_ids: list[str] = []
    with pytest.raises(Stop):
        run_eval(loaded, questions, tmp_path / "resumed", settings, progress=False, on_answer=stop_after(2, first_ids))
    answers = tmp_path / "resumed" / ANSWERS_FILE
    assert [r["id"] for r in read_answers(answers)] == first_ids  # on disk before the interruption
    assert not (tmp_path / "resumed" / SUMMARY_FILE).exists()
    with answers.open("a") as handle:  # what a kill in the middle of a write leaves
        handle.write('{"id": "' + questions.questions[2].id + '", "choice": "A", "fr')

    later_ids: list[str] = []
    resumed = run_eval(
        loaded, questions, tmp_path / "resumed", settings, progress=False, on_answer=lambda r: later_ids.append(r["id"])
    )
    assert later_ids == [q.id for q in questions][2:]  # nothing asked twice; the cut line's question asked again
    records = read_answers(answers)
    assert sorted(r["id"] for r in records) == sorted(q.id for q in questions)
    choices = {r["id"]: r["choice"] for r in records}
    assert choices == {r["id"]: r["choice"] for r in read_answers(tmp_path / "whole" / ANSWERS_FILE)}
    assert resumed.accuracy == whole.accuracy and resumed.per_length == whole.per_length

    summary = json.loads((tmp_path / "resumed" / SUMMARY_FILE).read_text())
    assert summary["questions"] == 6 and summary["accuracy"] == whole.accuracy
    assert set(summary["per_kind"]) == {"retrieval", "counting", "order"} and set(summary["per_length"]) == {
        "40s",
        "44s",
    }
    assert summary["run"]["model"] == "tiny" and summary["run"]["frames"]["max_frames"] == 8
    assert (tmp_path / "resumed" / PLOT_FILE).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = records[0]
    assert record["frames"] == 8 and record["video_tokens"] > 0 and record["prefill_seconds"] > 0
    assert record["correct"] == (record["choice"] == questions.by_id()[record["id"]].answer)

    moved = tmp_path / "moved"  # the set in another folder: still the same questions
    shutil.copytree(needle_set.directory, moved)
    again: list[str] = []
    rescored = run_eval(
        loaded,
        load_questions(moved),
        tmp_path / "resumed",
        settings,
        progress=False,
        on_answer=lambda r: again.append(r),
    )
    assert again == [] and rescored.accuracy == whole.accuracy  # a finished run only rescores


def test_other_settings_in_the_same_directory_are_refused(loaded, needle_set, tmp_path):
    settings = EvalSettings(preset="planner", frames=SamplingSettings(**FAST_FRAMES))
    run_eval(loaded, needle_set.questions, tmp_path, settings, progress=False, limit=1)
    other = EvalSettings(preset="planner", frames=SamplingSettings(**{**FAST_FRAMES, "budget_tokens": 2048}))
    with pytest.raises(UserError, match=r"holds answers of a run with other settings \(frames differ\)"):
        run_eval(loaded, needle_set.questions, tmp_path, other, progress=False)
    sparse = EvalSettings(preset="planner", frames=SamplingSettings(**FAST_FRAMES), block_counts=1)
    try:
        with pytest.raises(UserError, match=r"sparsity differ"):
            run_eval(loaded, needle_set.questions, tmp_path, sparse, progress=False)
    finally:
        loaded.model.set_sparsity(block_counts=2)  # the tiny checkpoint's own budget, for the other tests
    with pytest.raises(UserError, match="--limit must be at least 1"):
        run_eval(loaded, needle_set.questions, tmp_path, settings, progress=False, limit=0)


def test_limit_asks_only_the_first_questions(loaded, needle_set, tmp_path):
    settings = EvalSettings(preset="planner", frames=SamplingSettings(**FAST_FRAMES))
    summary = run_eval(loaded, needle_set.questions, tmp_path, settings, progress=False, limit=2)
    assert summary.questions == summary.total_questions == 2 and summary.complete
    assert [r["id"] for r in read_answers(tmp_path / ANSWERS_FILE)] == [q.id for q in needle_set.questions][:2]
