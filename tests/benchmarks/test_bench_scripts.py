"""Every benchmark script's command line: `--help` runs (imports, harness path, argument parser) for each."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPTS = sorted(p.relative_to(BENCHMARKS).as_posix() for folder in ("bench", "tune", "probe", "check")
                 for p in (BENCHMARKS / folder).glob("*.py"))


def test_scripts_are_grouped_by_purpose():
    assert "bench/bench_ops.py" in SCRIPTS and "check/check_ops_gpu.py" in SCRIPTS
    assert not list(BENCHMARKS.glob("*.py")), "scripts belong in bench/, tune/, probe/ or check/"


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_runs(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "path", list(sys.path))  # scripts put benchmarks/ on it
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(BENCHMARKS / script), run_name="__main__")
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out
