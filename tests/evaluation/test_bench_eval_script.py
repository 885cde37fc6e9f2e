"""benchmarks/bench/bench_eval.py: its --tiny run end to end on the CPU (needle set, in-memory model, one `run_eval` per
mode and budget, the JSON and the tables), and the 7B-shaped config the GPU run builds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks" / "bench"


def test_tiny_run_writes_one_row_per_mode_and_budget(tmp_path):
    out, runs = tmp_path / "out.json", tmp_path / "runs"
    command = [
        sys.executable, str(BENCHMARKS / "bench_eval.py"), "--tiny", "--set-dir", str(tmp_path / "set"),
        "--budgets", "320", "1024", "--runs-dir", str(runs), "--workers", "2", "--out", str(out),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=BENCHMARKS.parents[1])
    assert result.returncode == 0, result.stderr[-3000:]

    record = json.loads(out.read_text())
    rows = record["rows"]
    assert [(row["mode"], row["budget_tokens"]) for row in rows] == [
        ("nsa", 320), ("dense", 320), ("nsa", 1024), ("dense", 1024),
    ]  # fmt: skip
    assert record["set"]["questions"] == 2 and record["frames"]["prefer"] == "frames"
    for row in rows:
        assert row["questions"] == 2 and list(row["per_length"]) == ["16s", "24s"]
        assert row["max_prompt_tokens"] < row["budget_tokens"]
        assert row["questions_per_hour"] > 0 and row["prefill_seconds"] > 0
        # The vision tower runs inside the prefill the runner times.
        assert 0 < row["vision_seconds"] <= row["prefill_seconds"] + 1e-3
        assert row["peak_gib"] is None  # CPU
        # The row is the runner's own summary of that run.
        summary = json.loads((Path(row["out_dir"]) / "summary.json").read_text())
        assert summary["questions_per_hour"] == pytest.approx(row["questions_per_hour"])
        assert summary["run"]["attention"] == row["mode"]
        assert summary["run"]["frames"]["budget_tokens"] == row["budget_tokens"]
    small, large = rows[0], rows[2]
    # prefer frames: the tight budget keeps every frame and lowers the detail.
    assert small["frames_per_question"] == large["frames_per_question"] == 40
    assert small["video_tokens_per_question"] < large["video_tokens_per_question"]

    table = result.stdout.rstrip().splitlines()
    assert table[-1].startswith("total ")
    assert table[-6].split()[:3] == ["mode", "budget", "questions/h"]
    assert [line.split()[:2] for line in table[-5:-1]] == [["nsa", "320"], ["dense", "320"], ["nsa", "1024"],
                                                          ["dense", "1024"]]


def test_the_gpu_model_has_qwen2_5_vl_7b_shape():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from bench_eval import qwen7b_vl_config
    finally:
        sys.path.remove(str(BENCHMARKS))
    from videonsa.models import VideoNSAForConditionalGeneration

    with torch.device("meta"):
        model = VideoNSAForConditionalGeneration(qwen7b_vl_config())
    plain = sum(p.numel() for name, p in model.named_parameters() if ".g_proj_" not in name)
    assert plain == 8_292_166_656  # Qwen2.5-VL-7B-Instruct's parameters; the rest are the VideoNSA gates
    visual = model.model.visual
    assert len(visual.blocks) == 32 and visual.fullatt_block_indexes == [7, 15, 23, 31]
    assert visual.blocks[0].attn.qkv.in_features == 1280 and visual.merger.mlp[-1].out_features == 3584
    assert model.model.language_model.embed_tokens.weight.shape == (152064, 3584)
