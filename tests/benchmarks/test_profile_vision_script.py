"""benchmarks/probe/profile_vision.py runs end to end on a CPU with the tiny tower (its smoke-test command)."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "probe" / "profile_vision.py"


def test_profile_vision_smoke_run(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts benchmarks/ on it
    argv = [str(SCRIPT), "--device", "cpu", "--tiny", "--frames", "3", "--size", "252", "--reps", "1",
            "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(SCRIPT), run_name="__main__")
    (row,) = json.loads((tmp_path / "profile_vision.json").read_text())["rows"]
    assert row["patches"] == 3 * 18 * 18  # 252 px = 18 patches a side: windows of 64, 16 and 4 patches
    assert row["stock_s"] > 0 and row["packed_s"] > 0
    assert row["max_abs_diff"] < 1e-2 and row["input_grad_rel_error"] < 1e-2
    assert (tmp_path / "profile_vision.md").read_text().startswith("Vision tower training step")
