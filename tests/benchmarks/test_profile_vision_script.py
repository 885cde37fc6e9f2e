"""benchmarks/probe/profile_vision.py runs end to end on a CPU with the tiny tower (its smoke-test command)."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "probe" / "profile_vision.py"


def test_profile_vision_smoke_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts benchmarks/ on it
    argv = [str(SCRIPT), "--device", "cpu", "--tiny", "--frames", "3", "--size", "252", "--reps", "2",
            "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(SCRIPT), run_name="__main__")
    (row,) = json.loads((tmp_path / "profile_vision.json").read_text())["rows"]
    assert row["patches"] == 3 * 18 * 18  # 252 px = 18 patches a side: windows of 64, 16 and 4 patches
    assert row["stock_s"] > 0 and row["packed_s"] > 0 and row["reps"] == 2
    assert row["max_abs_diff"] < 1e-2 and row["input_grad_rel_error"] < 1e-2
    assert (tmp_path / "profile_vision.md").read_text().startswith("Vision tower training step")
    # Each step printed as it finished: the warm-ups, then the timed steps with the towers alternating.
    steps = [line.split(":")[0] for line in capsys.readouterr().out.splitlines() if line.endswith(" s")]
    assert steps == ["stock warm-up step", "packed warm-up step", "stock step 1/2", "packed step 1/2",
                     "stock step 2/2", "packed step 2/2"]


@pytest.mark.parametrize(("flags", "message"), [
    (["--size", "230"], "230 is not a positive multiple of 28"),
    (["--reps", "0"], "--reps must be at least 1"),
    (["--frames", "0"], "--frames must be at least 1"),
], ids=["size-off-the-merge-grid", "no-timed-steps", "no-frames"])
def test_bad_arguments_stop_before_any_file_is_written(flags, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "path", list(sys.path))
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--device", "cpu", "--tiny", *flags, "--out", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err.strip().splitlines()[-1] and "Traceback" not in err  # the usage, then one line
    assert not out.exists()  # not even the environment line of the JSON lines file


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a CUDA GPU")
def test_cuda_without_a_gpu_stops_before_any_file_is_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "path", list(sys.path))
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), "--device", "cuda", "--out", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    assert exit_info.value.code == 2 and "no CUDA GPU" in capsys.readouterr().err
    assert not out.exists()
