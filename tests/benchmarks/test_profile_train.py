"""benchmarks/probe/profile_train.py: phase attribution of GPU work and host time on hand-made profiler events,
kernel-name shortening, and a tiny CPU run of the whole script."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "probe" / "profile_train.py"


@pytest.fixture()
def probe(monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts benchmarks/ folders on it
    return SimpleNamespace(**runpy.run_path(str(SCRIPT)))


def event(name: str, start: float, end: float, *, device: str = "CPU", id: int = 0, annotation: bool = False):
    """A stand-in for torch.autograd.profiler_util.FunctionEvent with the fields the probe reads (times in us)."""
    return SimpleNamespace(name=name, id=id, device_type=SimpleNamespace(name=device),
                           time_range=SimpleNamespace(start=start, end=end), is_user_annotation=annotation)


def step_events(prefix: str) -> list:
    """One step: forward 2-40 (vision 3-10, LM 11-30, lm_head 31-32, loss 33-35), backward 40-80 with a vision
    range fired again by recompute at 55-58, optimizer 85-95; launches (id) and the GPU work they queued."""
    ranges = [("step", 0, 100), ("training step", 1, 80), ("forward", 2, 40), ("vision forward", 3, 10),
              ("LM forward", 11, 30), ("LM head", 31, 32), ("loss", 33, 35), ("vision forward", 55, 58),
              ("optimizer step", 85, 95)]
    events = [event(prefix + name, start, end) for name, start, end in ranges]
    launches = {1: 5, 2: 20, 3: 50, 4: 88, 5: 97, 6: 38, 8: 56}  # id -> host time of cudaLaunchKernel
    events += [event("cudaLaunchKernel", t, t + 0.5, id=i) for i, t in launches.items()]
    work = [("vision_gemm", 1, 6, 16), ("lm_attn", 2, 15, 25), ("grad_kernel", 3, 60, 80),
            ("Memset (Device)", 4, 89, 90), ("zero_kernel", 5, 98, 99), ("embed_kernel", 6, 39, 41),
            ("adam_kernel", 7, 86, 87), ("recompute_gemm", 8, 57, 59)]  # id 7 has no launch event
    events += [event(name, start, end, device="CUDA", id=i) for name, i, start, end in work]
    events.append(event(prefix + "step", 0, 100, device="CUDA", annotation=True))  # a span, not work
    return events


def test_gpu_work_goes_to_the_phase_that_launched_it(probe):
    events = step_events(probe.PREFIX)
    work = probe.gpu_split(events, probe.phase_intervals(events))
    got = {name: (round(p["gpu_ms"] * 1e3, 6), p["kernels"]) for name, p in work["phases"].items()}
    assert got == {
        "vision forward": (10, 1), "LM forward": (10, 1), "LM head": (0, 0), "loss": (0, 0),
        "forward, other": (2, 1),
        "backward": (22, 2),  # the recompute launched inside backward counts there, not as vision forward
        "optimizer step": (2, 1),  # the memset (not a kernel) and the item without launch, placed by GPU start
        "other": (1, 1),
    }
    assert work["gpu_items"] == 8 and work["kernels"] == 7 and work["launch_not_found"] == 1
    assert work["gpu_ms"] * 1e3 == pytest.approx(47)
    # the union of 6-16 and 15-25 (overlapping), 39-41, 57-59, 60-80, 86-87, 89-90, 98-99
    assert work["gpu_busy_ms"] * 1e3 == pytest.approx(19 + 2 + 2 + 20 + 1 + 1 + 1)


def test_host_time_of_every_phase_adds_up_to_the_step(probe):
    events = step_events(probe.PREFIX)
    host = probe.host_split(probe.phase_intervals(events))
    assert {name: round(ms * 1e3, 6) for name, ms in host.items()} == {
        "vision forward": 7, "LM forward": 19, "LM head": 1, "loss": 2, "forward, other": 9, "backward": 40,
        "optimizer step": 10, "other": 12,
    }
    assert sum(host.values()) * 1e3 == pytest.approx(100)


def test_short_names_drop_signatures_and_keep_head_and_tail(probe):
    assert probe.short("void at::native::(anonymous namespace)::softmax_fwd<float>(float*, int)") == (
        "at::native::softmax_fwd<float>")
    assert probe.short("Memcpy HtoD (Pageable -> Device)") == "Memcpy HtoD (Pageable -> Device)"
    long = "void k<" + "a" * 100 + "MulFunctor<float>>(int)"
    assert probe.short(long, width=40).endswith("MulFunctor<float>>") and len(probe.short(long, width=40)) <= 40


def test_cpu_run_profiles_one_step_of_each_phase(probe, tmp_path, capsys):
    probe.main(["--shape", "tiny", "--device", "cpu", "--seq-len", "512", "--modes", "dense", "--warmup", "1",
                "--top", "3", "--out", str(tmp_path)])
    row = json.loads((tmp_path / "profile_train.json").read_text())["rows"][0]
    assert "error" not in row and row["gpu_items"] == 0
    phases = row["phases"]
    for name in ("vision forward", "LM forward", "LM head", "loss", "backward", "optimizer step"):
        assert phases[name]["host_ms"] > 0, name
    assert sum(p["host_ms"] for p in phases.values()) == pytest.approx(row["wall_ms"], rel=0.05)
    assert len(row["top_cpu_ops"]) == 3
    assert "| backward |" in (tmp_path / "profile_train.md").read_text()
