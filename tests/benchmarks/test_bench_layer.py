"""benchmarks/bench/bench_layer.py: its smoke run on a CPU with the tiny model, the overhead arithmetic, and the
call recorder it uses to capture what the layer hands its attention functions."""

from __future__ import annotations

import json
import runpy
import sys
import types
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench" / "bench_layer.py"


@pytest.fixture
def script(monkeypatch) -> dict:
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts benchmarks/ on it
    return runpy.run_path(str(SCRIPT))


def test_smoke_run_writes_the_table(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    argv = [str(SCRIPT), "--device", "cpu", "--tiny", "--lengths", "192", "--inner", "1", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(SCRIPT), run_name="__main__")
    (row,) = json.loads((tmp_path / "bench_layer.json").read_text())["rows"]
    assert row["T"] == 192 and row["video_tokens"] == 192 - 128
    # The recorded nsa_attention / text SDPA / backend calls rebuild the module's outputs exactly.
    assert row["nsa_recombined_rel_error"] < 1e-6 and row["dense_recombined_rel_error"] < 1e-6
    for piece in ("nsa_module", "nsa_operator", "text_attention", "qkv_proj", "o_proj", "rotary", "gates",
                  "split_build", "dense_module", "dense_sdpa"):
        assert row[f"{piece}_ms"] > 0 and row[f"{piece}_kernel_ms"] is None  # no GPU kernels on a CPU
    parts = row["nsa_attention_ms"] + row["projections_ms"] + row["rotary_ms"] + row["nsa_overhead_ms"]
    assert parts == pytest.approx(row["nsa_module_ms"])
    assert "nsa_overhead_kernel_pct" not in row
    table = (tmp_path / "bench_layer.md").read_text()
    assert table.startswith("Attention module of one tiny layer in prefill")
    assert "| 192 |" in table and "overhead / (a+b) (target <= 10%)" in table


@pytest.mark.gpu
def test_7b_layer_on_the_gpu(tmp_path, monkeypatch):
    """The 7B-shaped layer at a short length on CUDA: Triton operator, CUDA-event and kernel-time measures."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    argv = [str(SCRIPT), "--lengths", "4096", "--inner", "2", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    runpy.run_path(str(SCRIPT), run_name="__main__")
    (row,) = json.loads((tmp_path / "bench_layer.json").read_text())["rows"]
    assert row["nsa_recombined_rel_error"] < 1e-2 and row["dense_recombined_rel_error"] < 1e-2
    assert row["nsa_operator_kernel_ms"] > 0 and row["nsa_module_kernel_ms"] > row["nsa_operator_kernel_ms"]
    assert row["nsa_overhead_kernel_pct"] is not None and isinstance(row["target_met_kernel"], bool)


@pytest.mark.parametrize(("flags", "message"), [
    (["--device", "cpu"], "--device cpu needs --tiny"),
    (["--device", "cpu", "--tiny", "--inner", "0"], "--inner must be at least 1"),
    (["--device", "cpu", "--tiny", "--lengths", "256", "128"], "--lengths must exceed 128 tokens"),
], ids=["cpu-without-tiny", "no-inner-calls", "no-video-tokens"])
def test_bad_arguments_stop_before_any_file_is_written(flags, message, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "path", list(sys.path))
    out = tmp_path / "out"
    monkeypatch.setattr(sys, "argv", [str(SCRIPT), *flags, "--out", str(out)])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(SCRIPT), run_name="__main__")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()  # not even the environment line of the JSON lines file


def test_derive_splits_the_module_time(script):
    row = {"nsa_module_ms": 20.0, "nsa_operator_ms": 12.0, "text_attention_ms": 1.0, "qkv_proj_ms": 3.0,
           "o_proj_ms": 1.0, "rotary_ms": 0.5, "gates_ms": 1.5, "dense_module_ms": 30.0, "dense_sdpa_ms": 25.0}
    script["derive"](row, "_ms")
    assert row["nsa_attention_ms"] == 13.0 and row["projections_ms"] == 4.0
    assert row["nsa_overhead_ms"] == pytest.approx(2.5)  # 20 - 13 - 4 - 0.5
    assert row["nsa_overhead_pct"] == pytest.approx(100 * 2.5 / 13)
    assert row["nsa_glue_ms"] == pytest.approx(1.0)
    assert row["dense_overhead_ms"] == pytest.approx(0.5) and row["overhead_over_dense_ms"] == pytest.approx(2.0)
    assert row["target_met"] is False  # 19% > 10%
    row["nsa_module_ms"] = 18.6  # overhead 1.1 ms, 8.5%
    script["derive"](row, "_ms")
    assert row["target_met"] is True


def test_recording_keeps_calls_and_restores(script):
    namespace = types.SimpleNamespace(add=lambda a, b=0: a + b)
    original = namespace.add
    with pytest.raises(RuntimeError), script["recording"](namespace, "add") as calls:
        assert namespace.add(1, b=2) == 3
        raise RuntimeError("the forward failed")
    assert calls == [((1,), {"b": 2})] and namespace.add is original
    with pytest.raises(RuntimeError, match="expected one call of add"):
        script["only_call"](calls * 2, "add")
