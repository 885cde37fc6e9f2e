"""check_identical.py: verdicts per case as each finishes, --json rewritten after every case, a case that kills its
tree's process, a tree past --timeout, and a real run of the operator under the Triton interpreter.

Apart from the real run, the trees are small stand-in `videonsa` packages written here: their `nsa_attention` is a
cheap differentiable function that can also differ, wait, exit or hang on demand, which the real operator cannot.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "check" / "check_identical.py"
CASES = ["57-fp32-varlen", "40x2-fp16-batch"]  # the second is the batch case (q.shape[0] == 2)

STAND_IN = '''
import os
import time
from pathlib import Path

BEHAVIOUR, MARKER = {behaviour!r}, Path({marker!r})


def nsa_attention(q, k, v, g_cmp, g_slc, g_swa, block_size, block_count, window_size, cu_seqlens=None, backend=None):
    batch_case = q.shape[0] == 2
    if BEHAVIOUR == "exit once" and not MARKER.exists():  # the first process dies in its first case
        MARKER.touch()
        os._exit(3)
    if BEHAVIOUR == "hang on batch" and batch_case:
        time.sleep(600)
    if BEHAVIOUR == "wait on batch" and batch_case:  # until the test has looked at the first case's results
        while not MARKER.exists():
            time.sleep(0.05)
    group = q.shape[2] // k.shape[2]
    o = q * (g_cmp + g_slc + g_swa).unsqueeze(-1) + (k * v).repeat_interleave(group, dim=2)
    return o * 1.5 if BEHAVIOUR == "wait on batch" and batch_case else o
'''


def _tree(tmp_path: Path, name: str, behaviour: str = "same") -> str:
    """A src/ root holding a stand-in videonsa package; returns its path."""
    package = tmp_path / name / "videonsa"
    (package / "ops").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    marker = str(tmp_path / f"{name}.marker")
    (package / "ops" / "__init__.py").write_text(STAND_IN.format(behaviour=behaviour, marker=marker))
    return str(tmp_path / name)


def _command(old: str, new: str, *flags: str) -> list[str]:
    return [sys.executable, str(SCRIPT), "--old", old, "--new", new, "--device", "cpu", *flags]


def test_each_verdict_and_the_json_come_as_the_case_finishes(tmp_path):
    old, new = _tree(tmp_path, "old"), _tree(tmp_path, "new", "wait on batch")
    out = tmp_path / "result.json"
    proc = subprocess.Popen(_command(old, new, "--cases", *CASES, "--json", str(out)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    lines, go = [], tmp_path / "new.marker"
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if line.startswith("57-fp32-varlen ") and not go.exists():  # the first verdict; the second case waits
            partial = json.loads(out.read_text())
            assert partial["complete"] is False and partial["identical"] is True
            assert [row["case"] for row in partial["cases"]] == ["57-fp32-varlen"]
            assert lines[-2] == "57-fp32-varlen: running (1/2)"
            go.touch()
    assert proc.wait(timeout=120) == 1, proc.stderr.read()
    assert go.exists(), lines  # the first verdict was seen before the run ended
    first, second = lines.index("57-fp32-varlen: running (1/2)"), lines.index("40x2-fp16-batch: running (2/2)")
    assert second == first + 2 and lines[first + 1].split()[:5] == ["57-fp32-varlen", "identical", "max", "|diff|", "0"]
    assert lines[second + 1].split()[:2] == ["40x2-fp16-batch", "DIFFERENT"] and lines[second + 2].startswith("    o:")
    # Then the whole table again, and the verdict.
    assert lines[second + 1 :].count(lines[second + 1]) == 2 and lines[first + 1] in lines[second + 1 :]
    assert lines[-1] == "DIFFERENCES FOUND"
    final = json.loads(out.read_text())
    assert final["complete"] is True and final["identical"] is False
    assert [row["status"] for row in final["cases"]] == ["identical", "DIFFERENT"]
    assert final["cases"][1]["max_abs_diff"]["o"] > 0 and final["cases"][1]["max_abs_diff"]["dq"] > 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".result")) == []  # no temp file left


def test_a_case_that_kills_its_process_fails_there_and_the_next_case_runs(tmp_path):
    old, new = _tree(tmp_path, "old", "exit once"), _tree(tmp_path, "new")
    proc = subprocess.run(_command(old, new, "--cases", *CASES), capture_output=True, text=True, cwd=ROOT,
                          timeout=180)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.splitlines()
    first = lines[lines.index("57-fp32-varlen: running (1/2)") + 1]
    assert "old: failed: the process exited (code 3)" in first and "new: ok" in first
    assert lines[lines.index("40x2-fp16-batch: running (2/2)") + 1].split()[:2] == ["40x2-fp16-batch", "identical"]
    assert "old tree, case 57-fp32-varlen: the process exited (code 3)" in proc.stderr
    assert lines[-1] == "DIFFERENCES FOUND"


def test_a_tree_past_its_timeout_stops_the_run_and_keeps_the_finished_cases(tmp_path):
    old, new = _tree(tmp_path, "old"), _tree(tmp_path, "new", "hang on batch")
    out = tmp_path / "result.json"
    began = time.monotonic()
    proc = subprocess.run(_command(old, new, "--cases", *CASES, "--json", str(out), "--timeout", "12"),
                          capture_output=True, text=True, cwd=ROOT, timeout=180)
    assert time.monotonic() - began < 90  # the hung process was killed, not waited for
    assert proc.returncode == 1
    assert f"{new}: still running (case 40x2-fp16-batch) after --timeout 12 s" in proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[lines.index("57-fp32-varlen: running (1/2)") + 1].split()[:2] == ["57-fp32-varlen", "identical"]
    assert lines[-1] == "40x2-fp16-batch: running (2/2)"
    partial = json.loads(out.read_text())
    assert partial["complete"] is False and [row["case"] for row in partial["cases"]] == ["57-fp32-varlen"]


def test_a_json_path_in_a_missing_folder_is_refused_before_anything_runs(tmp_path):
    old = _tree(tmp_path, "old")
    proc = subprocess.run(_command(old, old, "--json", str(tmp_path / "absent" / "r.json")), capture_output=True,
                          text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2 and "the folder" in proc.stderr and "does not exist" in proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr


@pytest.mark.parametrize("case", ["57-fp32-varlen"])
def test_the_operator_against_itself_under_the_interpreter(case, tmp_path):
    out = tmp_path / "result.json"
    proc = subprocess.run(_command("src", "src", "--cases", case, "--json", str(out)), capture_output=True,
                          text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"old: videonsa from {ROOT / 'src' / 'videonsa' / '__init__.py'}"
    verdict = lines[lines.index(f"{case}: running (1/1)") + 1]
    assert verdict.split()[:5] == [case, "identical", "max", "|diff|", "0"] and "old" in verdict
    assert lines[-2:] == [verdict, "all identical"]
    result = json.loads(out.read_text())
    assert result["complete"] and result["identical"] and result["cases"][0]["status"] == "identical"
    assert set(result["cases"][0]["max_abs_diff"]) == {"o", "dq", "dk", "dv", "dg_cmp", "dg_slc", "dg_swa"}
