"""`videonsa eval` end to end: make-needles, a run with the tiny model, a killed run resumed, one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from eval_helpers import FAST_FLAGS

from videonsa.cli import main
from videonsa.evaluation.runner import ANSWERS_FILE, read_answers


def one_line_error(capsys, argv, message: str) -> str:
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("videonsa eval: error: ") and "\n" not in error, error
    assert message in error, error
    return error


def test_make_needles_then_eval_with_default_out(checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["eval", "make-needles", "set", "--count", "1", "--lengths", "40s", "1m", "--size", "64x48"]
    assert main([*argv, "--seed", "3", "--kinds", "retrieval", "order", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "2 videos" in out and "4 questions" in out
    lines = (tmp_path / "set" / "questions.jsonl").read_text().splitlines()
    assert [json.loads(line)["kind"] for line in lines] == ["retrieval", "order"] * 2

    assert main(["eval", "--model", str(checkpoint), "--task", "needles:set", *FAST_FLAGS]) == 0
    printed = capsys.readouterr().out
    results = tmp_path / "eval-results" / f"needles_set-{checkpoint.name}-nsa"
    relative = results.relative_to(tmp_path)
    assert "accuracy" in printed and f"wrote  {relative / 'summary.json'}" in printed
    summary = json.loads((results / "summary.json").read_text())
    assert summary["questions"] == 4 and set(summary["per_length"]) == {"40s", "1m"}
    assert summary["run"]["task"] == "needles:set" and summary["run"]["attention"] == "nsa"
    assert (results / "accuracy_by_length.png").is_file()

    # The same command with --attention dense and a sparse budget: one command per variant, its own directory.
    assert main(["eval", "--model", str(checkpoint), "--task", "needles:set", "--attention", "dense", *FAST_FLAGS]) == 0
    dense = tmp_path / "eval-results" / f"needles_set-{checkpoint.name}-dense"
    assert json.loads((dense / "summary.json").read_text())["run"]["attention"] == "dense"
    capsys.readouterr()


def test_a_killed_run_loses_nothing(checkpoint, tmp_path, capsys):
    assert (
        main(["eval", "make-needles", str(tmp_path / "set"), "--count", "3", "--lengths", "40", "--size", "64x48"]) == 0
    )
    out = tmp_path / "out"
    command = [sys.executable, "-m", "videonsa.cli", "eval", "--model", str(checkpoint), "--task",
               f"needles:{tmp_path / 'set'}", "--out", str(out), *FAST_FLAGS]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    answers = out / ANSWERS_FILE
    deadline = time.monotonic() + 300
    try:
        while not (answers.is_file() and answers.read_bytes().count(b"\n") >= 1):
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no answer within 300 s"
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL
    before = read_answers(answers)
    assert 1 <= len(before) < 9

    assert main(["eval", "--model", str(checkpoint), "--task", f"needles:{tmp_path / 'set'}", "--out", str(out),
                 *FAST_FLAGS]) == 0  # fmt: skip
    after = read_answers(answers)
    assert after[: len(before)] == before  # kept, not asked again
    assert len(after) == len({record["id"] for record in after}) == 9
    assert json.loads((out / "summary.json").read_text())["questions"] == 9
    capsys.readouterr()


def test_bad_input_is_one_line(needle_set, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(needle_set.directory, broken)
    (broken / needle_set.videos[1].file).unlink()
    # The task is checked before the model is even looked at: a missing model is not what is reported.
    error = one_line_error(capsys, ["eval", "--model", "/no/model", "--task", f"needles:{broken}"], "not found")
    assert f"{broken / 'questions.jsonl'}:4: video" in error

    (broken / "questions.jsonl").write_text('{"id": "a", "video": "x.mp4"}\n')
    one_line_error(
        capsys, ["eval", "--model", "/no/model", "--task", f"needles:{broken}"], "questions.jsonl:1: missing"
    )
    one_line_error(capsys, ["eval", "--model", "/no/model", "--task", "needles:"], "give the set's directory")
    one_line_error(capsys, ["eval", "--model", "/no/model", "--task", f"needles:{tmp_path / 'none'}"], "no such")
    one_line_error(capsys, ["eval", "--task", f"needles:{broken}"], "give --model and --task")
    one_line_error(capsys, ["eval", "--model", "m", "--task", str(broken)], f"write --task needles:{broken}")
    one_line_error(
        capsys, ["eval", "make-needles", str(tmp_path / "x"), "--size", "64"], "--size '64': give WIDTHxHEIGHT"
    )
    one_line_error(capsys, ["eval", "make-needles", str(tmp_path / "x"), "--lengths", "soon"], "--lengths: cannot read")
    one_line_error(capsys, ["eval", "make-needles", str(tmp_path / "x"), "--lengths", "5"], "--lengths 5: a video must")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("flag", ["--limit", "--block-counts", "--window"])
def test_counts_below_one_are_refused_before_the_model_is_looked_at(needle_set, flag, capsys):
    # A missing model is not what is reported: the weights of a real one would have loaded first.
    argv = ["eval", "--model", "/no/model", "--task", f"needles:{needle_set.directory}", flag, "0"]
    one_line_error(capsys, argv, f"{flag} must be at least 1, got 0")


def test_an_out_that_is_a_file_is_refused_before_loading(checkpoint, needle_set, tmp_path, capsys):
    (tmp_path / "taken").write_text("")
    argv = ["eval", "--model", str(checkpoint), "--task", f"needles:{needle_set.directory}", "--out",
            str(tmp_path / "taken")]
    one_line_error(capsys, argv, "is a file, not a folder")


def test_unknown_task_without_lmms_eval(monkeypatch, capsys):
    import videonsa.evaluation.lmms_run as lmms_run

    monkeypatch.setattr(lmms_run, "lmms_eval_available", lambda: False)
    error = one_line_error(capsys, ["eval", "--model", "m", "--task", "videomme"], "--task videomme: unknown task")
    assert "needles:DIR" in error and "pip install" in error


def test_run_flags_of_the_other_preset_are_refused(checkpoint, needle_set, capsys):
    task = f"needles:{needle_set.directory}"
    one_line_error(
        capsys, ["eval", "--model", str(checkpoint), "--task", task, "--preset", "paper", "--budget", "9"], "--budget"
    )
    one_line_error(capsys, ["eval", "--model", str(checkpoint), "--task", task, "--budget", "0"], "--budget")


def test_a_budget_no_question_fits_is_refused_before_the_weights_load(checkpoint, needle_set, tmp_path, capsys):
    argv = ["eval", "--model", str(checkpoint), "--task", f"needles:{needle_set.directory}", "--budget", "40",
            "--out", str(tmp_path / "out")]
    error = one_line_error(capsys, argv, "--budget=40 is too small")
    assert error.startswith(f"videonsa eval: error: question {needle_set.questions.questions[0].id}: "), error
    assert not (tmp_path / "out").exists()  # the runner makes it once the weights have loaded


@pytest.mark.parametrize("argv", [["eval", "--help"], ["eval", "make-needles", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 0
    assert "usage: videonsa eval" in capsys.readouterr().out


def test_fresh_gates_lets_a_partly_gated_checkpoint_run(needle_set, tmp_path, capsys):
    from videonsa import testing

    folder = testing.save_tiny_checkpoint(tmp_path / "partly-gated", seed=5)
    assert testing.drop_layer_gates(folder, layer=1) == 4
    argv = ["eval", "--model", str(folder), "--task", f"needles:{needle_set.directory}", "--out", str(tmp_path / "out"),
            "--limit", "1", *FAST_FLAGS]  # fmt: skip

    assert main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("videonsa eval: error: ") and "--fresh-gates" in error, error
    assert main([*argv, "--fresh-gates"]) == 0
    assert len(read_answers(tmp_path / "out" / ANSWERS_FILE)) == 1


def test_fresh_gates_is_refused_for_lmms_eval_tasks(capsys):
    one_line_error(capsys, ["eval", "--model", "m", "--task", "videomme", "--fresh-gates"],
                   "--fresh-gates applies to needles:DIR tasks")
