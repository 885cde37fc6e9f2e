"""probe_saved_tensors.py on a tiny layer under the Triton interpreter: what nsa keeps beyond dense."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "probe" / "probe_saved_tensors.py"


def test_nsa_keeps_the_operators_tensors_but_not_the_gate_activations(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, str(SCRIPT), "--shape", "tiny", "--device", "cpu", "--seq-len", "256",
               "--rows", "100", "--out", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (tmp_path / "probe_saved_tensors_256.jsonl").read_text().splitlines()]
    (row,) = [row for row in rows if row.get("kind") != "environment"]
    report = (tmp_path / "probe_saved_tensors_256.md").read_text()
    nsa, dense = report.split("## dense")
    # The operator saves its own inputs and the selection output; the gate MLP recomputes its activations.
    assert "triton_nsa.py" in nsa and "gates.py" not in nsa
    assert row["nsa_saved_mib"] > row["dense_saved_mib"] > 0
