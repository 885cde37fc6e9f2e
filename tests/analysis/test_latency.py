"""`videonsa analyze latency`: the reference's branch steps compute the operator exactly, and a tiny CPU run
writes positive timings ordered by length, the documented JSON fields and the plots."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from videonsa.analysis import latency
from videonsa.analysis.latency import BRANCHES, LatencySettings, ReferenceBranches, measure_length
from videonsa.cli import main
from videonsa.ops import nsa_parts_reference
from videonsa.ops.common import NSAConfig

PNG = b"\x89PNG\r\n\x1a\n"
TINY = ["--heads", "4", "2", "--dim", "16", "--block-size", "16", "--block-count", "3", "--window", "24",
        "--repeats", "1"]


def random_inputs(length: int, heads_q: int = 6, heads_kv: int = 2, dim: int = 8, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(length, heads_q, dim, generator=generator, dtype=torch.float64)
    k, v = (torch.randn(length, heads_kv, dim, generator=generator, dtype=torch.float64) for _ in range(2))
    gates = [torch.rand(length, heads_q, generator=generator, dtype=torch.float64) for _ in range(3)]
    return q, k, v, gates


@pytest.mark.parametrize("chunk_elements", [1 << 25, 300])  # one chunk, and many (every step chunks queries)
def test_reference_branch_steps_give_the_operator_parts(chunk_elements):
    q, k, v, gates = random_inputs(77)  # not a whole number of blocks
    config = NSAConfig(block_size=8, block_count=3, window_size=13, init_blocks=1, local_blocks=1)
    parts = ReferenceBranches(config, 8**-0.5, chunk_elements).run_all(q, k, v, *gates)
    expected = nsa_parts_reference(q[None], k[None], v[None], *(g[None] for g in gates), block_size=8,
                                   block_count=3, window_size=13, init_blocks=1, local_blocks=1)
    for name in ("o", "o_cmp", "o_slc", "o_swa"):
        torch.testing.assert_close(parts[name], getattr(expected, name)[0], rtol=1e-10, atol=1e-12)
    assert torch.equal(parts["block_indices"].to(torch.int32), expected.block_indices[0])


def test_reference_branch_steps_give_the_operator_gradients():
    q, k, v, gates = random_inputs(45, seed=1)
    config = NSAConfig(block_size=8, block_count=2, window_size=10)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, *gates)]
    weight = torch.randn(45, 6, 8, dtype=torch.float64)
    (ReferenceBranches(config, 8**-0.5).run_all(*leaves)["o"] * weight).sum().backward()
    ours = [leaf.grad for leaf in leaves]
    leaves = [t.clone().requires_grad_() for t in (q, k, v, *gates)]
    out = nsa_parts_reference(*(t[None] for t in leaves), block_size=8, block_count=2, window_size=10).o[0]
    (out * weight).sum().backward()
    for got, want in zip(ours, (leaf.grad for leaf in leaves)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_latency_run_on_cpu_writes_ordered_positive_rows_and_plots(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["analyze", "latency", "--out", str(out), "--device", "cpu", "--lengths", "96", "32", "64",
                 "--backward", *TINY]) == 0
    data = json.loads((out / "latency.json").read_text())
    assert data["analysis"] == "latency" and data["complete"] and data["branches"] == list(BRANCHES)
    settings = data["settings"]
    assert (settings["heads_q"], settings["heads_kv"], settings["head_dim"]) == (4, 2, 16)
    assert settings["backend"] == "reference" and data["environment"]["device"] == "cpu"
    rows = data["rows"]
    assert [row["length"] for row in rows] == [32, 64, 96]
    for row in rows:
        assert set(row["forward_ms"]) == set(BRANCHES) and all(ms > 0 for ms in row["forward_ms"].values())
        assert set(row["backward_ms"]) == {"compression", "selection", "window", "gating"}
        assert all(ms > 0 for ms in row["backward_ms"].values())
        assert row["forward_branches_ms"] == pytest.approx(sum(row["forward_ms"].values()))
        for key in ("nsa_forward_ms", "nsa_backward_ms", "dense_forward_ms", "dense_backward_ms"):
            assert row[key] > 0
        assert 0 < row["compression_share"] < 1
    for name in ("latency_forward.png", "latency_backward.png"):
        assert (out / name).read_bytes()[:8] == PNG
    assert (out / "report.html").is_file()
    assert "96: forward compression" in capsys.readouterr().out


def test_latency_without_backward_or_dense_leaves_them_out(tmp_path):
    out = tmp_path / "run"
    assert main(["analyze", "latency", "--out", str(out), "--device", "cpu", "--lengths", "40", "--no-dense",
                 *TINY]) == 0
    row = json.loads((out / "latency.json").read_text())["rows"][0]
    assert "backward_ms" not in row and "dense_forward_ms" not in row and row["nsa_forward_ms"] > 0
    assert not (out / "latency_backward.png").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--heads", "5", "2"], "--heads 5 2: HQ must be a positive multiple of HKV"),
        (["--lengths", "0"], "--lengths: lengths must be positive"),
        (["--backend", "triton"], "--backend triton needs --device cuda"),
        (["--block-count", "0"], "--block-count must be positive"),
    ],
)
def test_latency_mistakes_are_one_line(tmp_path, capsys, flags, message):
    assert main(["analyze", "latency", "--out", str(tmp_path), "--device", "cpu", *flags]) == 2
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "latency.json").exists()


@pytest.mark.gpu
def test_latency_on_the_gpu_times_the_triton_branches():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from videonsa.analysis.latency import cuda_timer

    settings = LatencySettings(lengths=(2048,), heads_q=28, heads_kv=4, head_dim=128, backward=True,
                               backend="triton")
    row = measure_length(2048, settings, torch.device("cuda"), torch.bfloat16, cuda_timer())
    assert all(ms > 0 for ms in row["forward_ms"].values()) and row["nsa_backward_ms"] > 0
    assert row["dense_forward_ms"] > 0


def test_settings_default_lengths_follow_the_device():
    parser = argparse.ArgumentParser()
    latency.add_arguments(parser)
    args = parser.parse_args([])
    assert latency.settings_from_args(args, torch.device("cpu")).lengths == latency.CPU_LENGTHS


_TRITON_CHECK = """
import torch
from videonsa.analysis.latency import LatencySettings, make_inputs, triton_calls
from videonsa.ops import nsa_parts_reference

settings = LatencySettings(lengths=(80,), heads_q=4, heads_kv=2, head_dim=16, block_size=16, block_count=2,
                           window_size=24, backward=True, backend="triton")
x = make_inputs(80, settings, torch.device("cpu"), torch.float32, seed=5)
calls = triton_calls(x, settings)
want = nsa_parts_reference(**{n: t.double() for n, t in x.items()}, **settings.nsa_kwargs())
got = {"o_cmp": calls.forward["compression"]()[0], "o_slc": calls.forward["selection"]()[0],
       "o_swa": calls.forward["window"]()[0], "o": calls.forward["gating"]()}
for name, value in got.items():
    torch.testing.assert_close(value.double(), getattr(want, name)[0], rtol=2e-3, atol=2e-4)
assert torch.equal(calls.forward["topk"](), want.block_indices[0])
for name, call in calls.backward.items():
    call()
print("triton branches agree")
"""


def test_triton_branch_calls_compute_the_operator_parts_under_the_interpreter():
    """The GPU path's branch calls (Triton kernels) give the reference's parts; run under the Triton interpreter
    in a child process, since TRITON_INTERPRET must be set before Triton is first imported."""
    import os
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("the GPU test above runs the kernels directly")
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", _TRITON_CHECK], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "triton branches agree" in proc.stdout
