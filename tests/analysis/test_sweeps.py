"""`videonsa analyze budget` / `context` on a tiny model and a one-video needle set: one line per grid point,
resuming without asking again, numbers equal to the points' own answers, heatmaps written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from videonsa import testing
from videonsa.analysis.common import AnalysisModel
from videonsa.analysis.sweeps import grid_points, summary_record
from videonsa.cli import main
from videonsa.evaluation.needles import make_needle_set
from videonsa.evaluation.runner import read_answers
from videonsa.inference.api import VideoQA

PNG = b"\x89PNG\r\n\x1a\n"
FAST = ["--device", "cpu", "--fps", "1", "--limit", "2", "--warmup", "0"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return testing.save_tiny_checkpoint(tmp_path_factory.mktemp("sweeps") / "tiny")


@pytest.fixture(scope="module")
def needle_set(tmp_path_factory):
    return make_needle_set(tmp_path_factory.mktemp("sweeps") / "set", count=1, lengths=[40], size=(64, 64), seed=3)


@pytest.fixture
def asked(monkeypatch) -> list[dict]:
    """Every question the model is asked, with the model's sparse budget at that moment."""
    calls: list[dict] = []
    original = VideoQA.ask

    def ask(self, video, question, **kwargs):
        settings = self.model.sparse_settings
        calls.append({"question": question, "block_count": settings.block_count, "window": settings.window_size,
                      "max_frames": kwargs["sampling"].max_frames if kwargs.get("sampling") else None})
        return original(self, video, question, **kwargs)

    monkeypatch.setattr(VideoQA, "ask", ask)
    return calls


@pytest.fixture
def loaded(monkeypatch) -> list[str]:
    """The models whose weights were loaded."""
    calls: list[str] = []
    original = AnalysisModel.load

    def load(self):
        calls.append(self.files.name)
        return original(self)

    monkeypatch.setattr(AnalysisModel, "load", load)
    return calls


def budget_args(checkpoint, needle_set, out, *extra) -> list[str]:
    return ["analyze", "budget", "--out", str(out), "--model", str(checkpoint), "--attention", "nsa",
            "--task", f"needles:{needle_set.directory}", "--block-counts", "1", "2", "--windows", "4", "8",
            "--max-frames", "8", "--budget", "4096", *FAST, *extra]


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_budget_sweep_one_line_per_point_resumes_and_matches_the_answers(checkpoint, needle_set, tmp_path, asked):
    out = tmp_path / "run"
    assert main(budget_args(checkpoint, needle_set, out)) == 0
    # 4 points x 2 questions, each asked with its own budget set on the model.
    assert len(asked) == 8
    assert [(c["block_count"], c["window"]) for c in asked[::2]] == [(1, 4), (1, 8), (2, 4), (2, 8)]
    records = lines(out / "budget.jsonl")
    assert [r["id"] for r in records] == ["b1-w4", "b1-w8", "b2-w4", "b2-w8"]
    questions = {q.id: q for q in needle_set.questions}
    for record in records:
        answers = read_answers(out / record["directory"] / "answers.jsonl")
        assert len(answers) == record["questions"] == 2
        correct = sum(a["choice"] == questions[a["id"]].answer for a in answers)
        assert record["correct"] == correct and record["accuracy"] == correct / 2
        assert record["prefill_seconds"] == pytest.approx(sum(a["prefill_seconds"] for a in answers) / 2)
        assert record["prefill_seconds"] > 0
        run = json.loads((out / record["directory"] / "run.json").read_text())
        assert (run["sparsity"]["block_count"], run["sparsity"]["window_size"]) == (
            record["block_count"], record["window"]
        )
    summary = json.loads((out / "budget.json").read_text())
    assert summary["analysis"] == "budget" and summary["complete"]
    assert summary["block_counts"] == [1, 2] and summary["windows"] == [4, 8]
    assert summary["accuracy"] == [[records[0]["accuracy"], records[1]["accuracy"]],
                                   [records[2]["accuracy"], records[3]["accuracy"]]]
    assert summary["prefill_seconds"][1][0] == records[2]["prefill_seconds"]
    assert [p["id"] for p in summary["points"]] == [r["id"] for r in records]
    assert summary["settings"]["limit"] == 2 and summary["best"]["id"] in {r["id"] for r in records}
    for name in ("budget_accuracy.png", "budget_prefill.png"):
        assert (out / name).read_bytes()[:8] == PNG
    assert (out / "report.html").is_file()

    # A rerun asks nothing and leaves the record as it was.
    before = (out / "budget.jsonl").read_text()
    assert main(budget_args(checkpoint, needle_set, out)) == 0
    assert len(asked) == 8 and (out / "budget.jsonl").read_text() == before

    # A kill while the last point's line was written: the cut line goes, the point's answers are on disk
    # (nothing asked again); a point whose line and answers are gone runs again, alone.
    kept = before.splitlines(keepends=True)
    (out / "budget.jsonl").write_text("".join(kept[:2]) + kept[3][:25])
    for name in ("answers.jsonl", "run.json", "summary.json"):
        (out / "budget" / "b2-w4" / name).unlink()
    assert main(budget_args(checkpoint, needle_set, out)) == 0
    assert len(asked) == 10 and {(c["block_count"], c["window"]) for c in asked[8:]} == {(2, 4)}
    assert sorted(r["id"] for r in lines(out / "budget.jsonl")) == ["b1-w4", "b1-w8", "b2-w4", "b2-w8"]


def test_budget_sweep_refuses_other_settings_and_bad_grids(checkpoint, needle_set, tmp_path, asked, capsys):
    out = tmp_path / "run"
    args = budget_args(checkpoint, needle_set, out)
    one_point = args[: args.index("--block-counts")] + ["--block-counts", "2", "--windows", "8"] + args[
        args.index("--max-frames"):]
    assert main(one_point) == 0 and len(asked) == 2
    capsys.readouterr()
    assert main([*one_point, "--min-pixels", "3136"]) == 2
    error = capsys.readouterr().err
    assert "budget.jsonl: holds points of a sweep with other settings (frames differ)" in error
    assert len(error.strip().splitlines()) == 1
    assert main([*one_point[:-len(FAST)], "--device", "cpu", "--block-counts", "0"]) == 2
    assert "--block-counts: values must be positive integers, got 0" in capsys.readouterr().err
    dense = [*one_point]
    dense[dense.index("nsa")] = "dense"
    assert main(dense) == 2
    assert "block counts and windows have no effect" in capsys.readouterr().err
    assert main([*one_point, "--task", "videomme"]) == 2
    assert "needle format" in capsys.readouterr().err
    assert len(asked) == 2  # nothing was asked by the refused runs


def test_context_sweep_plans_each_point_under_the_fixed_budget(checkpoint, needle_set, tmp_path, asked):
    out = tmp_path / "run"
    # 40 s at 1 fps: up to 40 frames wanted; a 300-token budget (prompt included) cannot hold 32 frames.
    argv = ["analyze", "context", "--out", str(out), "--model", str(checkpoint), "--attention", "nsa",
            "--task", f"needles:{needle_set.directory}", "--max-frames", "4", "32", "--pixels", "3136", "6272",
            "--min-pixels", "3136", "--budget", "300", "--prefer", "frames", *FAST]
    assert main(argv) == 0
    records = lines(out / "context.jsonl")
    assert [r["id"] for r in records] == ["f4-p3136", "f4-p6272", "f32-p3136", "f32-p6272"]
    assert [c["max_frames"] for c in asked[::2]] == [4, 4, 32, 32]
    for record in records:
        answers = read_answers(out / record["directory"] / "answers.jsonl")
        frames = [a["frames"] for a in answers]
        assert record["frames_per_question"] == sum(frames) / len(frames) <= record["max_frames"]
        assert all(a["prompt_tokens"] <= 300 for a in answers)  # the budget held at every point
        assert record["video_tokens_per_frame"] == pytest.approx(
            sum(a["video_tokens"] / a["frames"] for a in answers) / len(answers)
        )
    assert records[0]["frames_per_question"] == 4
    assert records[2]["frames_per_question"] < 32  # trimmed to the budget
    summary = json.loads((out / "context.json").read_text())
    assert summary["budget_tokens"] == 300 and summary["frame_counts"] == [4, 32]
    assert summary["frames_per_question"][1][0] == records[2]["frames_per_question"]
    for name in ("context_accuracy.png", "context_prefill.png"):
        assert (out / name).read_bytes()[:8] == PNG
    assert main(argv) == 0 and len(asked) == 8  # resumed: nothing asked again


def test_budget_sweep_on_the_released_layout_runs_official_attention(analysis_inputs, needle_set, tmp_path, asked):
    """The released checkpoint layout runs official attention by default, which reads the block count and window
    as well; the points set them on the model like on this package's checkpoints."""
    out = tmp_path / "run"
    argv = ["analyze", "budget", "--out", str(out), "--model", str(analysis_inputs.released),
            "--task", f"needles:{needle_set.directory}", "--block-counts", "1", "2", "--windows", "8",
            "--preset", "planner", "--max-frames", "4", "--budget", "4096", *FAST[:-4], "--limit", "1",
            "--warmup", "1"]
    assert main(argv) == 0
    records = lines(out / "budget.jsonl")
    assert [r["id"] for r in records] == ["b1-w8", "b2-w8"]
    assert all(r["settings"]["attention"] == "official" for r in records)
    # One warm-up and one timed question per point, each at the point's budget.
    assert [(c["block_count"], c["window"]) for c in asked] == [(1, 8), (1, 8), (2, 8), (2, 8)]
    run = json.loads((out / "budget" / "b2-w8" / "run.json").read_text())
    assert run["attention"] == "official" and run["sparsity"]["block_count"] == 2


def test_context_sweep_runs_dense_attention_but_not_with_a_sparse_budget(checkpoint, needle_set, tmp_path, capsys):
    argv = ["analyze", "context", "--out", str(tmp_path / "run"), "--model", str(checkpoint), "--attention",
            "dense", "--task", f"needles:{needle_set.directory}", "--max-frames", "4", "--pixels", "3136",
            "--min-pixels", "3136", "--budget", "300", *FAST[:-4], "--limit", "1", "--warmup", "0"]
    assert main(argv) == 0
    record = lines(tmp_path / "run" / "context.jsonl")[0]
    assert record["settings"]["attention"] == "dense" and record["frames_per_question"] == 4
    capsys.readouterr()
    assert main([*argv, "--block-counts", "2"]) == 2
    assert "block counts and windows have no effect" in capsys.readouterr().err


def test_the_best_point_of_a_tie_is_the_shorter_known_prefill():
    points = grid_points(("block_count", [1, 2]), ("window", [4]), ("b", "w"))
    # A point whose prefill was not measured is not the shortest: it must not win the tie at "0 s".
    records = {points[0].key: {"id": points[0].key, "block_count": 1, "window": 4, "accuracy": 0.5},
               points[1].key: {"id": points[1].key, "block_count": 2, "window": 4, "accuracy": 0.5,
                               "prefill_seconds": 0.2}}
    summary = summary_record("budget", {}, records, points, (2, 1), {})
    assert summary["best"]["id"] == points[1].key


@pytest.mark.parametrize("sweep", ["budget", "context"])
def test_settings_no_question_fits_are_refused_before_the_weights_load(
    analysis_inputs, checkpoint, needle_set, tmp_path, capsys, loaded, sweep
):
    """A --budget too small for the prompt, a block count the official top-k cannot take (at most the block size,
    4) or --out naming a file: one line, no weights read, no run folder left behind."""
    out = tmp_path / "run"
    base = ["analyze", sweep, "--out", str(out), "--model", str(checkpoint), "--attention", "nsa",
            "--task", f"needles:{needle_set.directory}", "--min-pixels", "3136", *FAST]
    grid = ["--block-counts", "1", "--windows", "4"] if sweep == "budget" else ["--max-frames", "4", "--pixels",
                                                                                 "3136"]
    assert main([*base, *grid, "--budget", "20"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "--budget=20 is too small" in error
    official = [*base, *grid[2:], "--block-counts", "8", "--budget", "4096"]
    official[official.index(str(checkpoint))] = str(analysis_inputs.released)
    official[official.index("nsa")] = "official"
    if sweep == "budget":
        official += ["--preset", "planner"]
    assert main(official) == 2
    assert "--block-counts 8" in capsys.readouterr().err
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    assert main([*base, *grid, "--budget", "4096", "--out", str(a_file)]) == 2
    assert "is a file" in capsys.readouterr().err
    assert not out.exists() and loaded == []
