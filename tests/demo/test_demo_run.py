"""A short `videonsa demo` in CI: a small VideoNSA trained from scratch with the recipe must answer held-out
before-black questions far above chance, and the stages must hand over real artefacts (a checkpoint `videonsa
ask` answers with, the eval's answers.jsonl, the plots, summary.json); a rerun resumes instead of redoing the
work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from videonsa import testing
from videonsa.cli import main
from videonsa.demo import DemoSettings, DemoTask, DemoTraining, run_demo
from videonsa.demo.run import eval_settings, load_trained
from videonsa.demo.task import make_videos
from videonsa.errors import UserError
from videonsa.evaluation import run_eval

# The default colour task on 60 s videos (60 video tokens), 128 training and 40 held-out videos, 200 steps:
# about 80 s on 2 cores.
SMALL_TASK = DemoTask(seconds=60, train_videos=128, heldout_videos=40, seed=3, kind="colour")
SMALL_TRAINING = DemoTraining(steps=200, save_steps=50, seed=3)


@pytest.fixture(scope="module")
def one_thread():
    """The demo's ops are tiny: one thread is faster than two that wait for each other (as the command does)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("demo") / "run"
    settings = DemoSettings(task=SMALL_TASK, training=SMALL_TRAINING, minutes=None)
    lines: list[str] = []
    result = run_demo(out, settings, echo=lines.append, progress=False)
    return out, settings, result, lines


def test_held_out_accuracy_is_far_above_chance(demo_run):
    _, _, result, _ = demo_run
    summary = result.summary
    assert summary["questions"] == SMALL_TASK.heldout_videos
    assert summary["chance"] == pytest.approx(0.25)
    # 4-way questions: chance is 25%; a model that had not found the needle could not pass 50% on any colour
    # split (one that has found it but still confuses a pair of colours scores ~75%). 60% leaves room for
    # numeric differences between machines.
    assert summary["accuracy"] >= 0.6, summary
    interval = summary["accuracy_interval"]
    assert interval[0] > summary["chance"]
    assert summary["steps"] == SMALL_TRAINING.steps
    assert summary["train_seconds"] > 0
    assert summary["attention"] == "nsa" and summary["ablation"] == "none"


def test_needles_early_in_the_video_are_answered(demo_run):
    """The first tenth of the video is where the sliding window of the last video tokens never reaches."""
    out, _, result, _ = demo_run
    bins = result.summary["accuracy_by_position"]
    early = [b for b in bins if b["end"] <= 0.3 and b["questions"]]
    assert early and sum(b["correct"] for b in early) / sum(b["questions"] for b in early) >= 0.5
    assert sum(b["questions"] for b in bins) == SMALL_TASK.heldout_videos


def test_stages_hand_over_real_artefacts(demo_run):
    out, _, result, _ = demo_run
    answers = [json.loads(line) for line in (out / "eval" / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == SMALL_TASK.heldout_videos
    assert all(answer["frames"] == SMALL_TASK.frames and answer["video_tokens"] == SMALL_TASK.frames // 2
               for answer in answers)
    for name in ("loss.png", "accuracy_by_position.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["accuracy"] == result.summary["accuracy"]
    annotations = (out / "train.annotations.jsonl").read_text().splitlines()
    assert len(annotations) == SMALL_TASK.train_videos


def test_videonsa_ask_answers_with_the_trained_checkpoint(demo_run, capsys):
    out, _, _, _ = demo_run
    questions = [json.loads(line) for line in (out / "videos/heldout/questions.jsonl").read_text().splitlines()]
    question = questions[0]
    code = main(["ask", "--model", str(out / "model"), "--video", str(out / "videos/heldout" / question["video"]),
                 "--fps", "2", "--pixels", "784", "--min-pixels", "784", question["question"],
                 "--options", *question["options"]])
    assert code == 0
    printed = capsys.readouterr().out.strip()
    assert printed and printed[0] in "ABCD"
    answers = {json.loads(line)["id"]: json.loads(line)["choice"]
               for line in (out / "eval/answers.jsonl").read_text().splitlines()}
    assert printed[0] == answers[question["id"]]  # the same model, the same frames, the same prompt


def test_rerun_resumes_without_redoing_work(demo_run):
    out, settings, result, _ = demo_run
    timings = json.loads((out / "timings.json").read_text())
    lines: list[str] = []
    again = run_demo(out, settings, echo=lines.append, progress=False)
    assert any("already written" in line for line in lines)
    assert again.summary["accuracy"] == result.summary["accuracy"]
    assert json.loads((out / "timings.json").read_text())["train"] == timings["train"]  # nothing trained


def test_rerun_with_other_settings_is_refused(demo_run):
    out, settings, _, _ = demo_run
    with pytest.raises(UserError, match="attention"):
        run_demo(out, DemoSettings(attention="dense", task=settings.task, training=settings.training, minutes=None))


def test_unknown_task_is_refused_with_one_line(tmp_path):
    settings = DemoSettings(task=DemoTask(kind="shapes"))
    with pytest.raises(UserError, match="--task must be one of colour, before-black, got 'shapes'"):
        run_demo(tmp_path / "run", settings)
    assert not (tmp_path / "run").exists()


def test_a_negative_seed_is_refused_before_the_run_folder_is_made(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "run"), "--seed", "-1", "--steps", "1"]) == 2
    error = capsys.readouterr().err.strip()
    assert error == "videonsa demo: error: --seed must be 0 or more, got -1"
    assert not (tmp_path / "run").exists()


def test_an_out_folder_that_cannot_be_made_is_one_line(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    assert main(["demo", "--out", str(tmp_path / "a-file" / "run"), "--steps", "1"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "a-file/run: cannot create the run folder (Not a directory)" in error


def test_the_held_out_answers_resume_through_another_path_to_the_run(tmp_path, monkeypatch):
    """A run killed during its evaluation, rerun with --out spelt otherwise (absolute, from another folder): the
    answers already given are kept, not refused as another model's."""
    task = DemoTask(seconds=12, train_videos=1, heldout_videos=1)
    held_out = make_videos(tmp_path / "run" / "videos" / "heldout", task, heldout=True)
    testing.save_tiny_checkpoint(tmp_path / "run" / "model")
    monkeypatch.chdir(tmp_path)
    model = load_trained(Path("run") / "model", DemoSettings(task=task))
    first = run_eval(model, held_out.questions, Path("run") / "eval", eval_settings(task), progress=False)
    again = run_eval(model, held_out.questions, tmp_path / "run" / "eval", eval_settings(task), progress=False)
    assert first.questions == again.questions == 1


def test_the_command_line_states_the_library_defaults():
    # `videonsa demo` restates them so that its --help does not import torch: the two must agree.
    from videonsa.commands.demo import DEFAULT_STEPS, TASKS
    from videonsa.demo.task import TASK_KINDS

    assert DemoTraining().steps == DEFAULT_STEPS
    assert TASKS == TASK_KINDS
    assert DemoTask().kind == TASKS[0]
