"""Where a whole training step's time goes: one optimizer step under torch.profiler, per attention mode.

Same model, sample and recipe as `bench/bench_train.py` (its `build_trainer`): Qwen2.5-VL-7B shape, full vision
tower, `--layers` LM layers, random weights, bf16 autocast, gradient checkpointing, clipping, AdamW. After
`--warmup` steps one step runs under the profiler (CPU + CUDA activities).

    python benchmarks/probe/profile_train.py --layers 2 --seq-len 36864 [--trace trace.json]
    python benchmarks/probe/profile_train.py --shape tiny --device cpu --seq-len 2048   # smoke test

Per mode: wall ms of the profiled step (the profiler adds some), GPU ms (summed durations of kernels, copies and
sets), GPU busy ms (their union; wall - busy = GPU idle), kernel count; host and GPU ms per phase; the top kernels
by GPU time and the top CPU ops by self CPU time. Phases are profiler ranges opened by forward hooks (vision
tower, language model, lm_head), by the Trainer's loss, forward and training step, and by the optimizer
callbacks. GPU work counts in the phase during which the host launched it; "backward" is the training step after
its forward (checkpoint recompute included); "other" is the rest of the step (inputs to the device, gradient
norm and clipping, scheduler, zero_grad). Writes OUT/profile_train.md and .json; `--trace FILE` exports a chrome
trace per mode (FILE.<mode>.json).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # bench_train's model, data and Trainer
from bench_train import (  # noqa: E402
    SyntheticClipChat,
    add_step_arguments,
    build_trainer,
    check_device,
    frames_for,
    model_config,
)

from harness import Results, add_output_arguments, describe, environment, fmt, markdown_table  # noqa: E402
from videonsa.training.trainer import VideoNSATrainer  # noqa: E402

PREFIX = "phase: "
# Attribution order: the first phase whose host interval holds a launch wins (backward holds the recompute).
PHASES = ["backward", "optimizer step", "vision forward", "LM forward", "LM head", "loss", "forward, other", "other"]


class Ranges:
    """Profiler ranges opened and closed from hooks and callbacks (a stack per name, so nesting is harmless)."""

    def __init__(self) -> None:
        self.open: dict[str, list[record_function]] = defaultdict(list)

    def enter(self, name: str) -> None:
        self.open[name].append(record_function(PREFIX + name).__enter__())

    def exit(self, name: str) -> None:
        if self.open[name]:
            self.open[name].pop().__exit__(None, None, None)


RANGES = Ranges()


class ProfiledTrainer(VideoNSATrainer):
    """The benchmark's Trainer with profiler ranges around the training step, the forward and the loss."""

    def training_step(self, *args, **kwargs):
        with record_function(PREFIX + "training step"):
            return super().training_step(*args, **kwargs)

    def compute_loss(self, *args, **kwargs):
        with record_function(PREFIX + "forward"):
            return super().compute_loss(*args, **kwargs)

    def labelled_positions_loss(self, *args, **kwargs):
        with record_function(PREFIX + "loss"):
            return super().labelled_positions_loss(*args, **kwargs)


class ProfileOneStep(TrainerCallback):
    """Profiles the optimizer step that starts when `at` steps are done; ranges the optimizer step."""

    def __init__(self, at: int, device: str) -> None:
        self.at, self.device = at, device
        self.profiler: profile | None = None
        self.wall_ms = 0.0
        self._start = 0.0

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step != self.at:
            return
        self._sync()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device == "cuda" else [])
        self.profiler = profile(activities=activities)
        self.profiler.start()
        RANGES.enter("step")
        self._start = time.perf_counter()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        RANGES.enter("optimizer step")

    def on_optimizer_step(self, args, state, control, **kwargs):
        RANGES.exit("optimizer step")

    def on_step_end(self, args, state, control, **kwargs):
        if self.profiler is None or self.wall_ms:
            return
        self._sync()
        self.wall_ms = 1000 * (time.perf_counter() - self._start)
        RANGES.exit("step")
        self.profiler.stop()

    def abandon(self) -> None:
        """After a failed step (out of memory): stop the profiler and drop the ranges left open."""
        if self.profiler is not None and not self.wall_ms:
            self.profiler.stop()
        RANGES.open.clear()


def add_phase_hooks(model: torch.nn.Module) -> list:
    """Forward pre-hooks and hooks that range the vision tower, the language model and lm_head."""
    handles = []
    for module, name in ((model.model.visual, "vision forward"), (model.model.language_model, "LM forward"),
                         (model.lm_head, "LM head")):
        handles.append(module.register_forward_pre_hook(lambda *_, name=name: RANGES.enter(name)))
        handles.append(module.register_forward_hook(lambda *_, name=name: RANGES.exit(name)))
    return handles


def short(name: str, width: int = 90) -> str:
    """A kernel or op name for a table: no `void `, anonymous namespaces or trailing parameter list; a long one
    keeps its head and tail (where templated kernels name their functor)."""
    demangled = name.startswith("void ")  # a C++ signature; "Memcpy HtoD (Pageable -> Device)" keeps its brackets
    name = name.removeprefix("void ").replace("(anonymous namespace)::", "")
    depth = 0
    for i in range(len(name) - 1, -1, -1) if demangled and name.endswith(")") else ():
        depth += {")": 1, "(": -1}.get(name[i], 0)
        if depth == 0:
            name = name[:i]
            break
    half = (width - 4) // 2
    return name if len(name) <= width else f"{name[:half]} .. {name[-half:]}"


def phase_intervals(events) -> dict[str, list[tuple[float, float]]]:
    """Host intervals (profiler clock, us) of every phase; backward is a training step after its forward."""
    ranges = defaultdict(list)
    for e in events:
        if e.device_type.name == "CPU" and e.name.startswith(PREFIX):
            ranges[e.name.removeprefix(PREFIX)].append((e.time_range.start, e.time_range.end))
    for start, end in ranges.get("training step", []):
        forward_ends = [e for s, e in ranges.get("forward", []) if start <= s and e <= end]
        ranges["backward"].append((max(forward_ends, default=start), end))
    ranges["forward, other"] = ranges.pop("forward", [])
    return ranges


def phase_of(t: float, ranges: dict[str, list[tuple[float, float]]]) -> str:
    return next((p for p in PHASES[:-1] if any(s <= t < e for s, e in ranges.get(p, []))), "other")


def host_split(ranges: dict[str, list[tuple[float, float]]]) -> dict[str, float]:
    """Host ms per phase within the step: each stretch between consecutive range boundaries goes to one phase."""
    step_start, step_end = ranges["step"][0]
    cuts = sorted({step_start, step_end, *(t for p in PHASES for span in ranges.get(p, []) for t in span
                                           if step_start <= t <= step_end)})
    host = dict.fromkeys(PHASES, 0.0)
    for a, b in zip(cuts, cuts[1:]):
        host[phase_of((a + b) / 2, ranges)] += (b - a) / 1e3
    return host


def gpu_split(events, ranges: dict[str, list[tuple[float, float]]]) -> dict:
    """GPU work (kernels, copies, sets) of the profile: total and busy ms, kernels, and per phase and per kernel
    name ms and counts. An item belongs to the phase in which its launch call (the host runtime event of the same
    correlation id) began; items without one are placed by their GPU start."""
    gpu = sorted((e for e in events if e.device_type.name == "CUDA"
                  and not e.is_user_annotation),  # a profiler range's span on the GPU timeline, not work
                 key=lambda e: e.time_range.start)
    launch = {e.id: e.time_range.start for e in events if e.device_type.name == "CPU" and e.name.startswith("cu")}
    phases = {p: {"gpu_ms": 0.0, "kernels": 0} for p in PHASES}
    by_name = defaultdict(lambda: [0, 0.0])
    busy = unmatched = kernels = 0
    covered_to = float("-inf")
    for e in gpu:
        start, end = e.time_range.start, e.time_range.end
        busy += max(0.0, end - max(start, covered_to))  # the union of intervals, in start order
        covered_to = max(covered_to, end)
        unmatched += e.id not in launch
        is_kernel = not e.name.startswith(("Memcpy", "Memset"))
        kernels += is_kernel
        phase = phases[phase_of(launch.get(e.id, start), ranges)]
        phase["gpu_ms"] += (end - start) / 1e3
        phase["kernels"] += is_kernel
        by_name[e.name][0] += 1
        by_name[e.name][1] += (end - start) / 1e3
    return {"gpu_items": len(gpu), "kernels": kernels, "gpu_ms": sum(p["gpu_ms"] for p in phases.values()),
            "gpu_busy_ms": busy / 1e3, "launch_not_found": unmatched, "phases": phases, "by_name": by_name}


def summarize(prof: profile, wall_ms: float, top: int) -> dict:
    """Step totals, per-phase host and GPU time, top kernels and top CPU ops of one profiled step."""
    events = list(prof.events())
    ranges = phase_intervals(events)
    work = gpu_split(events, ranges)
    host = host_split(ranges)
    phases = {p: {"host_ms": host[p], **work["phases"][p]} for p in PHASES}
    by_name = work.pop("by_name")
    cpu_ops = sorted((a for a in prof.key_averages() if not a.key.startswith(PREFIX)),
                     key=lambda a: a.self_cpu_time_total, reverse=True)[:top]
    return {
        **work, "wall_ms": wall_ms, "host_step_ms": sum(host.values()), "gpu_idle_ms": wall_ms - work["gpu_busy_ms"],
        "phases": phases,
        "top_kernels": sorted(([short(name), n, ms] for name, (n, ms) in by_name.items()), key=lambda r: -r[2])[:top],
        "top_cpu_ops": [[short(a.key), a.count, a.self_cpu_time_total / 1e3] for a in cpu_ops],
    }


def profile_mode(args: argparse.Namespace, mode: str, frames: int) -> dict:
    """Warm up, profile one optimizer step in `mode`, summarise it (and export its trace with --trace)."""
    config = model_config(args.shape, args.layers, args.vision_layers, mode)
    dataset = SyntheticClipChat(config, frames, length=args.warmup + 1)
    row = {"mode": mode, "T": len(dataset[0]["input_ids"]), "frames": frames}
    probe = ProfileOneStep(at=args.warmup, device=args.device)
    trainer = handles = None
    try:
        with tempfile.TemporaryDirectory() as output_dir:
            trainer = build_trainer(config, dataset, output_dir, max_steps=args.warmup + 1, grad_accum=1,
                                    device=args.device, callbacks=[probe], trainer_class=ProfiledTrainer)
            handles = add_phase_hooks(trainer.model)
            trainer.train()
    except torch.cuda.OutOfMemoryError as error:
        row["error"] = f"out of memory: {str(error).splitlines()[0]}"
        probe.abandon()
    finally:
        for handle in handles or []:
            handle.remove()
        trainer = None  # noqa: F841 (release the model and optimizer before the next mode)
        gc.collect()
    if "error" in row or not probe.wall_ms:
        row.setdefault("error", "the profiled step did not run")
        return row
    row.update(summarize(probe.profiler, probe.wall_ms, args.top))
    if args.trace:
        path = args.trace.with_name(f"{args.trace.stem}.{mode}{args.trace.suffix or '.json'}")
        tmp = path.with_name(f".{path.name}.tmp")
        probe.profiler.export_chrome_trace(str(tmp))
        os.replace(tmp, path)
        row["trace"] = str(path)
    return row


def report(rows: list[dict], caption: str) -> str:
    """Markdown: step totals per mode, phases side by side, then each mode's top kernels and CPU ops.

    GPU columns show "-" where no GPU work was profiled (a CPU run)."""
    done = [r for r in rows if "error" not in r]

    def gpu(r: dict, value: float | int | None) -> str:
        return fmt(float(value), 0) if r.get("gpu_items") else "-"

    text = caption + "\n\n" + markdown_table(
        ["mode", "T", "wall ms", "GPU ms", "GPU busy ms", "GPU idle ms", "kernels"],
        [[r["mode"], r["T"], r.get("error") or fmt(r["wall_ms"], 0), gpu(r, r.get("gpu_ms")),
          gpu(r, r.get("gpu_busy_ms")), gpu(r, r.get("gpu_idle_ms")), gpu(r, r.get("kernels"))] for r in rows])
    if not done:
        return text
    headers = ["phase"] + [f"{r['mode']} {c}" for r in done for c in ("host ms", "GPU ms", "kernels")]
    lines = [[p] + [cell for r in done for phase in [r["phases"][p]]
                    for cell in (fmt(phase["host_ms"], 0), gpu(r, phase["gpu_ms"]), gpu(r, phase["kernels"]))]
             for p in PHASES]
    text += "\n\nPer phase (GPU work counts in the phase whose host code launched it):\n\n"
    text += markdown_table(headers, lines)
    for r in done:
        if r["launch_not_found"]:
            text += f"\n\n{r['mode']}: {r['launch_not_found']} GPU items without a launch event, placed by GPU start"
        if r["top_kernels"]:
            text += f"\n\n{r['mode']}: top kernels by GPU time\n\n" + markdown_table(
                ["kernel", "count", "GPU ms"], [[n, c, fmt(ms, 1)] for n, c, ms in r["top_kernels"]])
        text += f"\n\n{r['mode']}: top CPU ops by self CPU time\n\n" + markdown_table(
            ["op", "count", "self CPU ms"], [[n, c, fmt(ms, 1)] for n, c, ms in r["top_cpu_ops"]])
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_arguments(parser, layers=2)
    parser.add_argument("--warmup", type=int, default=2, help="unprofiled steps first (compilation, allocator)")
    parser.add_argument("--top", type=int, default=20, help="rows of the kernel and CPU-op tables")
    parser.add_argument("--trace", type=Path, default=None, help="export a chrome trace per mode (FILE.<mode>.json)")
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    check_device(args)
    frames = frames_for(args.seq_len)
    env = environment()
    results = Results("profile_train", args.out, env)
    for mode in args.modes:
        results.row(profile_mode(args, mode, frames), echo=False)
    results.write_json({"args": {k: str(v) for k, v in vars(args).items()}})
    caption = (f"Training step profile, Qwen2.5-VL-7B shape ({args.shape}, {args.layers} LM layers, "
               f"{args.vision_layers} vision blocks, random weights), {frames} frames x 64 tokens, batch 1, "
               f"recipe settings, step {args.warmup + 1} under torch.profiler; {describe(env)}")
    results.write_markdown(report(results.rows, caption))


if __name__ == "__main__":
    main()
