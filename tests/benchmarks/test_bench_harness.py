"""benchmarks/harness: output files, baselines, error measure, shapes and inputs (the parts that need no GPU)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
from harness import baseline, inputs, output, shapes  # noqa: E402
from harness.compare import rel_error  # noqa: E402
from harness.env import describe, environment  # noqa: E402

sys.path.remove(str(BENCHMARKS))

ENV = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "triton": "3.6.0", "commit": "abc", "utc": "now"}


def test_results_write_rows_as_json_lines_then_json_and_markdown(tmp_path):
    results = output.Results("bench_x", tmp_path / "out", ENV)
    results.row({"T": 1024, "ms": 1.5}, echo=False)
    results.row({"T": 2048, "ms": float("nan"), "peak": float("inf")}, echo=False)
    lines = [json.loads(line) for line in (tmp_path / "out" / "bench_x.jsonl").read_text().splitlines()]
    assert lines[0] == {"kind": "environment", **ENV}
    assert lines[1:] == [{"T": 1024, "ms": 1.5}, {"T": 2048, "ms": None, "peak": None}]  # strict JSON

    results.write_json({"extra": 1})
    summary = json.loads((tmp_path / "out" / "bench_x.json").read_text())
    assert summary["environment"] == ENV and summary["extra"] == 1 and len(summary["rows"]) == 2
    results.write_markdown("caption\n\n" + output.markdown_table(["T", "ms"], [[1024, output.fmt(1.5)]]))
    assert (tmp_path / "out" / "bench_x.md").read_text() == "caption\n\n| T | ms |\n|---|---|\n| 1024 | 1.50 |\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bench_x.json", "bench_x.jsonl", "bench_x.md"]


def test_results_default_to_the_environment_folder_then_benchmarks_results(tmp_path, monkeypatch):
    monkeypatch.setenv(output.RESULTS_ENV, str(tmp_path / "elsewhere"))
    assert output.Results("r", None, ENV).jsonl == tmp_path / "elsewhere" / "r.jsonl"
    monkeypatch.delenv(output.RESULTS_ENV)
    assert output.results_root() == BENCHMARKS / "results"
    assert output.default_file(None, "x.json") == BENCHMARKS / "results" / "x.json"
    assert output.default_file(tmp_path / "y.json", "x.json") == tmp_path / "y.json"


def test_open_run_parses_the_output_options_and_names_the_files_from_the_arguments(tmp_path):
    parser = argparse.ArgumentParser()
    parser.add_argument("--tag", default="a")
    args, results = output.open_run(parser, ["--tag", "b", "--out", str(tmp_path)], lambda args: f"probe_{args.tag}")
    assert args.tag == "b" and args.out == tmp_path
    first = json.loads((tmp_path / "probe_b.jsonl").read_text().splitlines()[0])
    assert first["kind"] == "environment" and first["commit"] == results.env["commit"]

    parser = argparse.ArgumentParser()
    args, results = output.open_run(parser, ["--out", str(tmp_path), "--compare-baseline"], "fixed", baseline=True)
    assert results.jsonl == tmp_path / "fixed.jsonl" and args.compare_baseline == "auto"
    with pytest.raises(SystemExit):  # without baseline=True there is no --compare-baseline
        output.open_run(argparse.ArgumentParser(), ["--compare-baseline"], "x")


def test_open_run_with_needs_cuda_exits_before_writing_when_there_is_no_gpu(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="^bench_x.py needs a CUDA GPU$"):
        output.open_run(argparse.ArgumentParser(prog="bench_x.py"), ["--out", str(tmp_path)], "x", needs_cuda=True)
    assert not list(tmp_path.iterdir())
    args, results = output.open_run(argparse.ArgumentParser(), ["--out", str(tmp_path)], "x")  # no GPU needed
    assert results.jsonl == tmp_path / "x.jsonl"


def test_results_folder_is_ignored_by_git():
    ignored = (BENCHMARKS.parent / ".gitignore").read_text().splitlines()
    assert "/benchmarks/results/" in ignored


def test_fmt_marks_missing_values():
    assert output.fmt(None) == output.fmt(float("nan")) == "-"
    assert output.fmt(2.0, 1) == "2.0"


def test_baseline_report_gives_the_ratio_of_shared_metrics(tmp_path):
    path = tmp_path / "base.json"
    path.write_text(json.dumps({"card": "H100", "metrics": {"ops/a_ms": 2.0, "ops/b_ms": 4.0}}))
    assert baseline.compare({"ops/a_ms": 3.0, "ops/c_ms": 1.0}, {"ops/a_ms": 2.0}) == [("ops/a_ms", 3.0, 2.0, 1.5)]
    text = baseline.report({"ops/a_ms": 3.0, "ops/b_ms": 2.0}, "cpu", str(path))
    assert "| ops/a_ms | 3.00 | 2.00 | 1.500 |" in text and "| ops/b_ms | 2.00 | 4.00 | 0.500 |" in text
    assert "no metric of this run" in baseline.report({"ops/z_ms": 1.0}, "cpu", str(path))


def test_baseline_update_replaces_the_run_metrics_and_keeps_the_others(tmp_path):
    path = tmp_path / "h100.json"
    path.write_text(json.dumps({"card": "H100", "sources": {}, "metrics": {"ops/a_ms": 2.0, "ops/b_ms": 4.0}}))
    baseline.update({"ops/a_ms": 1.25, "e2e/c_ms": 7.0}, ENV, str(path), "bench_x")
    data = json.loads(path.read_text())
    assert data["metrics"] == {"e2e/c_ms": 7.0, "ops/a_ms": 1.25, "ops/b_ms": 4.0}
    assert data["sources"]["bench_x"].startswith("NVIDIA H100 80GB HBM3, torch 2.11.0")


def test_baseline_files_are_chosen_by_card_and_checked():
    assert baseline.baseline_path("NVIDIA H100 80GB HBM3") == BENCHMARKS / "baselines" / "h100.json"
    with pytest.raises(SystemExit, match="no committed baseline for 'NVIDIA A100'"):
        baseline.baseline_path("NVIDIA A100")
    with pytest.raises(SystemExit, match="does not exist"):
        baseline.load_baseline(Path("/nonexistent/base.json"))


def test_committed_h100_baseline_names_the_metrics_the_bench_scripts_write():
    data = baseline.load_baseline(BENCHMARKS / "baselines" / "h100.json")
    names = data["metrics"]
    assert data["card"] == "NVIDIA H100 80GB HBM3"
    for name in ("ops/randn/T131072/videonsa/fwd_ms", "ops/structured/T32768/videonsa/bwd_ms",
                 "ops/randn/T32768/fla/fwd_ms", "e2e/T131072/nsa_ms", "train/T36801/nsa/step_ms",
                 "official/layer/T32768/auto/official_ms"):
        assert name in names and names[name] > 0


def test_rel_error_ignores_matching_infinities_and_flags_mismatched_ones():
    ref = torch.tensor([1.0, 2.0, -math.inf])
    assert rel_error(ref.clone(), ref) == 0.0
    assert rel_error(torch.tensor([1.0, 2.0, 0.0]), ref) == math.inf
    assert rel_error(torch.tensor([1.0, 4.0, -math.inf]), ref) == pytest.approx(2.0 / math.sqrt(5.0))
    assert rel_error(torch.tensor([[9.0], [1.0]]), torch.tensor([[0.0], [1.0]]), rows=torch.tensor([1])) == 0.0


def test_nsa_flops_count_the_visible_keys_of_every_query():
    seq_len = 300
    flops = shapes.nsa_flops(seq_len)
    per_key = 2 * shapes.HQ * shapes.D
    visible = sum((t + 1) // shapes.BLOCK for t in range(seq_len))
    selected = sum(min(shapes.COUNT * shapes.BLOCK, t + 1) for t in range(seq_len))
    window = sum(min(shapes.WINDOW, t + 1) for t in range(seq_len))
    assert flops["compression"] == 2 * per_key * visible and flops["topk"] == per_key * visible
    assert flops["selection"] == 2 * per_key * selected and flops["window"] == 2 * per_key * window
    forward, backward = shapes.flop_floors_ms(seq_len, tflops=1.0)
    assert forward == pytest.approx(sum(flops[k] for k in ("compression", "topk", "selection", "window")) / 1e9)
    assert backward == pytest.approx(2.5 * sum(flops[k] for k in ("compression", "selection", "window")) / 1e9)


def test_operator_shape_is_the_7b_layer_with_the_default_budget():
    from videonsa.ops import NSAConfig

    assert (shapes.HQ, shapes.HKV, shapes.D) == (28, 4, 128)
    default = NSAConfig()
    budget = (shapes.BLOCK, shapes.COUNT, shapes.WINDOW, shapes.INIT, shapes.LOCAL)
    assert budget == (default.block_size, default.block_count, default.window_size, default.init_blocks,
                      default.local_blocks)
    # The keyword form the scripts pass to the operator: nsa_attention(**x, **BUDGET).
    keywords = dict(block_size=shapes.BLOCK, block_count=shapes.COUNT, window_size=shapes.WINDOW,
                    init_blocks=shapes.INIT, local_blocks=shapes.LOCAL)
    assert keywords == shapes.BUDGET


def test_make_inputs_are_seeded_bf16_of_the_operator_shape():
    a = inputs.make_inputs(256, seed=3, device="cpu")
    b = inputs.make_inputs(256, seed=3, device="cpu")
    assert a["q"].shape == (1, 256, 28, 128) and a["k"].shape == a["v"].shape == (1, 256, 4, 128)
    assert all(t.dtype == torch.bfloat16 for t in a.values())
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert float(a["g_cmp"].min()) >= 0 and float(a["g_cmp"].max()) <= 1
    structured = inputs.make_inputs(256, seed=3, structured=True, device="cpu")
    assert not torch.equal(structured["q"], a["q"]) and structured["q"].shape == a["q"].shape


def test_selection_sharing_counts_distinct_blocks_per_tile():
    seq_len, heads, count = 64, 2, 4
    same = torch.arange(count, dtype=torch.int32).expand(seq_len, heads, count).contiguous()
    shared = inputs.selection_sharing(same)
    assert shared["union_per_tile"] == count and shared["shared_with_next"] == 1.0
    distinct = torch.arange(seq_len * count, dtype=torch.int32).view(seq_len, 1, count).expand(seq_len, heads, count)
    apart = inputs.selection_sharing(distinct.contiguous())
    assert apart["union_per_tile"] == 8 * count and apart["shared_with_next"] == 0.0


def test_environment_names_the_versions_and_commit():
    env = environment()
    assert env["device"] == ("cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name())
    assert env["torch"] == torch.__version__ and env["commit"]
    assert describe(env).startswith(env["device"]) and f"torch {torch.__version__}" in describe(env)


@pytest.mark.gpu
def test_bench_times_a_cuda_call():
    from harness.timing import bench, peak_gib

    a = torch.randn(1024, 1024, device="cuda")
    assert bench(lambda: a @ a) > 0 and bench(lambda: a @ a, reps=2, flush_l2=True) > 0
    assert peak_gib(lambda: a @ a) == pytest.approx(4 / 1024**2, rel=0.5)
