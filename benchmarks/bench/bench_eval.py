"""Throughput of `videonsa eval` (the library runner, `run_eval`) on a generated needle set: a Qwen2.5-VL-7B-shaped
VideoNSA with random weights (vision tower included), attention modes side by side, on one GPU.

    python benchmarks/bench/bench_eval.py --set-dir /tmp/needles-bench   # -> benchmarks/results/bench_eval.json
    python benchmarks/bench/bench_eval.py --modes nsa dense official --budgets 131072 --kinds retrieval counting order
    python benchmarks/bench/bench_eval.py --tiny --out /tmp/tiny.json     # tiny model, seconds-long videos, CPU, ~15 s

Random weights make the accuracy meaningless; the time and memory are real. What runs per question is exactly
what `videonsa eval --preset planner` runs: plan the frames within the token budget, decode them with PyAV, run
the vision tower and the language model's prefill, generate one option letter, append the answer to
answers.jsonl; each (mode, budget) pair is one `run_eval` call into a fresh directory, whose summary.json gives
the numbers. The model is built in memory, directly on the GPU (no 16 GB checkpoint is written), and wrapped
into the `VideoQA` object `videonsa.load` returns, with a tiny byte-level tokenizer (`videonsa.testing`; token
ids below 300 of the real 152,064-row embedding, which costs the same whatever the ids).

Frames: the planner preset for every mode, official included (its default, the paper preset, samples at most 32
frames, which measures nothing about long videos): `--fps` 4 at `--pixels` 224x224 per frame, `--prefer frames`
(every frame kept while the detail can still drop to `--min-pixels`, 112x112; below that, frames give way). The
needle videos are 2 fps at 320x240, so 4 fps takes every frame: a 60-minute video is 7,200 frames. Sparse
settings are the model's defaults (the paper's: blocks of 64, 32 selected blocks, window 256).

Set: `--count` videos per length (1), one question per kind in `--kinds` (default retrieval only: the kind
changes a question's text by a few dozen tokens, not its cost, and three kinds triple the time). The set is
generated once into `--set-dir` and reused by later runs with the same arguments.

Order: one warm-up question per mode (kernel compilation, first allocations; the set's first question at the
smallest budget) is not counted; then budget by budget, largest first, every mode back to back. `--stop-after S`
starts no run after S seconds, so a time limit still ends with the table; `--out` is rewritten after every run.
Printed last: one row per mode and budget (questions per hour, prefill and vision-tower seconds, tokens and
frames per question, peak GPU memory, wall time of the run); before it, per video length, frames, tokens and
prefill seconds. A question's prefill (the runner's: from the start of generation to the first token) includes
its vision tower; frame decoding and patching are outside it but inside questions per hour and wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
from harness.env import environment  # noqa: E402
from harness.models import qwen7b_config, random_model  # noqa: E402
from harness.output import default_file, write_json  # noqa: E402
from videonsa import testing  # noqa: E402
from videonsa.errors import UserError  # noqa: E402
from videonsa.evaluation import EvalSettings, load_questions, run_eval  # noqa: E402
from videonsa.evaluation.needles import NeedleTiming, make_needle_set, parse_duration  # noqa: E402
from videonsa.evaluation.questions import NEEDLE_KINDS, QuestionSet  # noqa: E402
from videonsa.evaluation.runner import ANSWERS_FILE, read_answers  # noqa: E402
from videonsa.inference import ModelFiles, VideoQA  # noqa: E402
from videonsa.video import DEFAULT_MIN_PIXELS_PER_FRAME, SamplingSettings, VisionGeometry  # noqa: E402
from videonsa.video.patches import CLIP_MEAN, CLIP_STD  # noqa: E402

DEFAULT_LENGTHS = ("5m", "15m", "30m", "1h")
# Largest first: the long-context rows matter most and come first if --stop-after cuts the run short.
DEFAULT_BUDGETS = (131072, 65536, 32768)
# --tiny: videos of a few seconds (needles shortened to fit), 64x64 frames at 2 fps planned at 56x56 (4 tokens per
# pair of frames, down to 28x28), budgets just above the byte-level prompt (~270 text tokens) so that the smaller
# one lowers the detail, as the real budgets do on long videos.
TINY_LENGTHS = ("16s", "24s")
TINY_BUDGETS = (1024, 320)
TINY_TIMING = NeedleTiming(card_seconds=2, flash_seconds=1, max_flashes=2, crossing_seconds=1, gap_seconds=1)
TINY_SIZE = (64, 64)
TINY_PIXELS = 56 * 56
TINY_MIN_PIXELS = 28 * 28
SET_SIZE = (320, 240)  # make_needle_set's default frame size


def qwen7b_vl_config(attention_mode: str = "nsa"):
    """A VideoNSAConfig of Qwen2.5-VL-7B's shape (28-layer language model, 32-block vision tower) whose special
    tokens are `videonsa.testing`'s tiny tokenizer's."""
    return qwen7b_config(28, attention_mode, vision="7b")


def random_generation_model(config, device: str | torch.device, dtype: torch.dtype):
    """VideoNSAForConditionalGeneration with random weights, built directly on `device` in `dtype`, eval mode."""
    from videonsa.models import VideoNSAForConditionalGeneration

    return random_model(config, device, dtype, cls=VideoNSAForConditionalGeneration)


def in_memory_model_files(model, directory: Path, name: str) -> ModelFiles:
    """The `ModelFiles` `open_model_files` would read for `model` with the tiny tokenizer: config, tokenizer, chat
    template, vision geometry, CLIP pixel statistics (the tiny processor's).

    Built from the objects in memory rather than by `open_model_files`, which checks the folder's weight files
    against the config and would need the 16 GB of weights on disk. The config and tokenizer files are still
    written to `directory`, so the record of the run points at a folder describing the model.
    """
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    tokenizer = testing.tiny_tokenizer()
    tokenizer.save_pretrained(directory)
    vision = model.config.vision_config
    return ModelFiles(
        name=name,
        directory=directory,
        hub_id=None,
        config=model.config.to_dict(),
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
        geometry=VisionGeometry(
            patch_size=vision.patch_size,
            merge_size=vision.spatial_merge_size,
            temporal_patch_size=vision.temporal_patch_size,
        ),
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
        tokens_per_second=float(vision.tokens_per_second),
    )


def build_model(tiny: bool, device: torch.device, directory: Path) -> tuple[VideoQA, str]:
    """(the wrapped model, a description of it)."""
    if tiny:
        model = testing.tiny_model(seed=0).to(device)
        description = "tiny random VideoNSA (2 layers, hidden 64; vision 2 blocks, hidden 32), float32"
    else:
        model = random_generation_model(qwen7b_vl_config(), device, torch.bfloat16)
        description = "Qwen2.5-VL-7B shape (28 layers, hidden 3584, vocab 152064; vision 32 blocks, hidden 1280), "
        description += "random weights, bfloat16"
    parameters = sum(parameter.numel() for parameter in model.parameters())
    description += f", {parameters / 1e9:.2f}B parameters" if parameters >= 1e9 else f", {parameters:,} parameters"
    files = in_memory_model_files(model, directory, "random-tiny" if tiny else "random-qwen2.5-vl-7b")
    return VideoQA(files, model), description


def build_needle_set(args: argparse.Namespace) -> QuestionSet:
    """Generate the set into --set-dir, or reuse it (make_needle_set writes only what is missing)."""
    started = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if total:
            print(f"needle set: {done}/{total} videos written", flush=True)

    make_needle_set(
        args.set_dir,
        count=args.count,
        lengths=args.lengths,
        size=TINY_SIZE if args.tiny else SET_SIZE,
        seed=args.seed,
        kinds=args.kinds,
        timing=TINY_TIMING if args.tiny else None,
        workers=args.workers,
        progress=progress,
    )
    questions = load_questions(args.set_dir)
    print(f"needle set {args.set_dir}: {len(questions)} questions ({time.perf_counter() - started:.1f} s)", flush=True)
    return questions


class VisionTimer:
    """Wall seconds spent in the vision tower (forward hooks; the GPU is synchronised at both ends so the time
    is the tower's own, not the launch queue's)."""

    def __init__(self, visual: torch.nn.Module, device: torch.device) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._started = 0.0
        self._device = device
        visual.register_forward_pre_hook(self._begin)
        visual.register_forward_hook(self._end)

    def _sync(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    def _begin(self, module, inputs) -> None:
        self._sync()
        self._started = time.perf_counter()

    def _end(self, module, inputs, output) -> None:
        self._sync()
        self.seconds += time.perf_counter() - self._started
        self.calls += 1

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def per_length(answers: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per video length bin: questions, mean frames, prompt tokens, prefill and whole-question seconds."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for answer in sorted(answers, key=lambda record: record["video_seconds"]):
        groups.setdefault(answer["length_bin"], []).append(answer)
    return {
        name: {
            "questions": len(group),
            "video_seconds": group[0]["video_seconds"],
            **{key: _mean([float(record[key]) for record in group]) for key in (
                "frames", "prompt_tokens", "video_tokens", "prefill_seconds", "video_decode_seconds", "seconds"
            )},
        }
        for name, group in groups.items()
    }


def settings_for(budget: int, args: argparse.Namespace) -> EvalSettings:
    frames = SamplingSettings(
        fps=args.fps,
        pixels_per_frame=args.pixels,
        min_pixels_per_frame=args.min_pixels,
        budget_tokens=budget,
        prefer=args.prefer,
    )
    return EvalSettings(preset="planner", frames=frames, model=args.model_name, task=f"needles:{args.set_dir}")


def _reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def warm_up(qa: VideoQA, questions: QuestionSet, mode: str, args: argparse.Namespace, runs_dir: Path) -> None:
    """One question in `mode` at the smallest budget (kernel compilation, first allocations), not counted."""
    qa.attention = mode
    started = time.perf_counter()
    out_dir = Path(tempfile.mkdtemp(prefix=f"warmup-{mode}-", dir=runs_dir))
    run_eval(qa, questions, out_dir, settings_for(min(args.budgets), args), progress=False, limit=1)
    print(f"warm-up {mode}: {time.perf_counter() - started:.1f} s", flush=True)


def measure(
    qa: VideoQA,
    questions: QuestionSet,
    mode: str,
    budget: int,
    args: argparse.Namespace,
    runs_dir: Path,
    vision: VisionTimer,
    device: torch.device,
) -> dict[str, Any]:
    """One `run_eval` over the whole set in `mode` at `budget` tokens, into a fresh directory; its row."""
    qa.attention = mode
    out_dir = Path(tempfile.mkdtemp(prefix=f"{mode}-{budget}-", dir=runs_dir))
    print(f"run {mode} budget {budget:,}: {len(questions)} questions -> {out_dir}", flush=True)

    def report(answer: dict[str, Any]) -> None:
        print(
            f"  {answer['id']}: {answer['frames']} frames {answer['frame_width']}x{answer['frame_height']}, "
            f"{answer['prompt_tokens']:,} tokens, decode {answer['video_decode_seconds']:.2f} s, prefill "
            f"{answer['prefill_seconds']:.2f} s, question {answer['seconds']:.2f} s",
            flush=True,
        )

    _reset_memory(device)
    vision.reset()
    started = time.perf_counter()
    summary = run_eval(qa, questions, out_dir, settings_for(budget, args), progress=False, on_answer=report)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall = time.perf_counter() - started
    answers = read_answers(out_dir / ANSWERS_FILE)
    row = {
        "mode": mode,
        "budget_tokens": budget,
        "questions": summary.questions,
        "questions_per_hour": summary.questions_per_hour,
        "seconds_per_question": summary.seconds_per_question,
        "prefill_seconds": summary.prefill_seconds,
        "vision_seconds": vision.seconds / max(1, vision.calls),
        "video_decode_seconds": summary.video_decode_seconds,
        "frames_per_question": summary.frames_per_question,
        "video_tokens_per_question": summary.video_tokens_per_question,
        "prompt_tokens_per_question": summary.prompt_tokens_per_question,
        "max_prompt_tokens": max(answer["prompt_tokens"] for answer in answers),
        "peak_gib": _peak_gib(device),
        "wall_seconds": wall,
        "accuracy": summary.accuracy,
        "per_length": per_length(answers),
        "out_dir": str(out_dir) if args.runs_dir else None,  # a temporary one is deleted at the end
    }
    print(
        f"done {mode} budget {budget:,}: {row['questions_per_hour']:,.0f} questions/hour, prefill "
        f"{row['prefill_seconds']:.2f} s, peak {_format(row['peak_gib'], '.1f')} GiB, wall {wall:.1f} s",
        flush=True,
    )
    return row


def _format(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def print_tables(rows: Sequence[dict[str, Any]], header: str) -> None:
    """The per-length table, then the main one; rows by budget (ascending), modes in run order."""
    rows = sorted(rows, key=lambda row: row["budget_tokens"])
    print("\nPer video length (mean per question)")
    print(f"{'mode':<9} {'budget':>7} {'length':>7} {'frames':>7} {'tokens':>8} {'prefill s':>10} {'question s':>11}")
    for row in rows:
        for name, group in row["per_length"].items():
            print(
                f"{row['mode']:<9} {row['budget_tokens']:>7} {name:>7} {group['frames']:>7.0f} "
                f"{group['prompt_tokens']:>8,.0f} {group['prefill_seconds']:>10.2f} {group['seconds']:>11.2f}"
            )
    print(f"\n{header}")
    print(
        f"{'mode':<9} {'budget':>7} {'questions/h':>12} {'prefill s':>10} {'vision s':>9} {'tokens/q':>9} "
        f"{'frames/q':>9} {'peak GiB':>9} {'wall s':>8}"
    )
    for row in rows:
        print(
            f"{row['mode']:<9} {row['budget_tokens']:>7} {row['questions_per_hour']:>12,.0f} "
            f"{row['prefill_seconds']:>10.2f} {row['vision_seconds']:>9.2f} {row['prompt_tokens_per_question']:>9,.0f} "
            f"{row['frames_per_question']:>9,.0f} {_format(row['peak_gib'], '.1f'):>9} {row['wall_seconds']:>8.1f}"
        )


def _versions() -> str:
    import transformers

    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    try:
        import triton

        versions += f", triton {triton.__version__}"
    except ImportError:
        pass
    try:
        import av

        versions += f", PyAV {av.__version__}"
    except ImportError:
        pass
    return versions


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model and seconds-long videos (CPU, seconds)")
    parser.add_argument("--set-dir", type=Path, default=None,
                        help="needle set directory, generated once and reused (default: under the temp directory)")
    parser.add_argument("--lengths", nargs="+", default=None,
                        help=f"video lengths (90, 5m, 1h; default {' '.join(DEFAULT_LENGTHS)})")
    parser.add_argument("--count", type=int, default=1, help="videos per length (default 1)")
    parser.add_argument("--kinds", nargs="+", default=["retrieval"], choices=NEEDLE_KINDS,
                        help="question kinds (one question per kind per video; default retrieval: the kind "
                             "changes a question's text by a few dozen tokens, not its cost)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="encoding processes")
    parser.add_argument("--budgets", type=int, nargs="+", default=None,
                        help=f"token budgets (default {' '.join(map(str, DEFAULT_BUDGETS))})")
    parser.add_argument("--modes", nargs="+", default=["nsa", "dense"], choices=["nsa", "dense", "official"])
    parser.add_argument("--fps", type=float, default=4.0)
    parser.add_argument("--pixels", type=int, default=None, help="pixels per frame before the budget (224x224)")
    parser.add_argument("--min-pixels", type=int, default=None,
                        help="the fewest pixels per frame the planner may shrink to (112x112)")
    parser.add_argument("--prefer", default="frames", choices=["frames", "detail", "balanced"])
    parser.add_argument("--device", default=None, help="default cuda:0 (cpu with --tiny)")
    parser.add_argument("--runs-dir", type=Path, default=None,
                        help="keep every run's directory (answers.jsonl, summary.json) here; default: deleted")
    parser.add_argument("--stop-after", type=float, default=0,
                        help="start no further run after this many seconds (the rows so far are kept); 0: no limit")
    parser.add_argument("--out", type=Path, default=None,
                        help="the JSON result file, rewritten after every run (default: bench_eval.json in "
                             "$VIDEONSA_BENCH_DIR, else benchmarks/results/)")
    args = parser.parse_args(argv)
    lengths = args.lengths or (TINY_LENGTHS if args.tiny else DEFAULT_LENGTHS)
    args.lengths = [parse_duration(str(text)) for text in lengths]
    args.budgets = list(args.budgets or (TINY_BUDGETS if args.tiny else DEFAULT_BUDGETS))
    args.pixels = args.pixels or (TINY_PIXELS if args.tiny else 224 * 224)
    floor = args.min_pixels or (TINY_MIN_PIXELS if args.tiny else DEFAULT_MIN_PIXELS_PER_FRAME)
    args.min_pixels = min(args.pixels, floor)
    args.device = torch.device(args.device or ("cpu" if args.tiny else "cuda:0"))
    suffix = "-tiny" if args.tiny else ""
    args.set_dir = args.set_dir or Path(tempfile.gettempdir()) / f"videonsa-bench-eval-needles{suffix}"
    args.model_name = "random-tiny" if args.tiny else "random-qwen2.5-vl-7b"
    return args


def missing_modules() -> list[str]:
    """Python packages `videonsa eval` needs here that are not installed (PyAV, rich, matplotlib)."""
    import importlib.util

    needed = {"av": "PyAV", "rich": "rich", "matplotlib": "matplotlib"}
    return [name for module, name in needed.items() if importlib.util.find_spec(module) is None]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    missing = missing_modules()
    if missing:
        print(f"error: {', '.join(missing)} not installed: videonsa eval needs them (install or carry their wheels)",
              file=sys.stderr)
        return 2
    if args.device.type == "cuda":
        torch.cuda.set_device(args.device)
    device_name = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "cpu"
    started = time.perf_counter()
    try:
        questions = build_needle_set(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = default_file(args.out, "bench_eval.json")
    runs_dir = args.runs_dir or Path(tempfile.mkdtemp(prefix="videonsa-bench-eval-"))
    runs_dir.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(prefix="videonsa-bench-model-") as files_dir:
            built = time.perf_counter()
            qa, description = build_model(args.tiny, args.device, Path(files_dir))
            print(f"model: {description} on {device_name} ({time.perf_counter() - built:.1f} s)", flush=True)
            vision = VisionTimer(qa.model.model.visual, args.device)
            for mode in args.modes:
                warm_up(qa, questions, mode, args, runs_dir)
            rows = []
            record = {
                "device": device_name,
                "versions": _versions(),
                "environment": environment(),
                "model": description,
                "set": {"dir": str(args.set_dir), "lengths": args.lengths, "count": args.count, "kinds": args.kinds,
                        "questions": len(questions)},
                "frames": {"preset": "planner", "fps": args.fps, "pixels_per_frame": args.pixels,
                           "min_pixels_per_frame": args.min_pixels, "prefer": args.prefer},
                "rows": rows,
            }
            # Budget-major order: the modes of one budget run back to back, so drift hits them alike.
            for budget in args.budgets:
                for mode in args.modes:
                    elapsed = time.perf_counter() - started
                    if args.stop_after and elapsed > args.stop_after:
                        print(f"skipped {mode} budget {budget:,}: {elapsed:.0f} s elapsed, past --stop-after "
                              f"{args.stop_after:g}", flush=True)
                        record.setdefault("skipped", []).append({"mode": mode, "budget_tokens": budget})
                        continue
                    rows.append(measure(qa, questions, mode, budget, args, runs_dir, vision, args.device))
                    print(json.dumps({key: value for key, value in rows[-1].items() if key != "per_length"}),
                          flush=True)
                    write_json(out, record)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        if args.runs_dir is None:
            shutil.rmtree(runs_dir, ignore_errors=True)
    record["total_seconds"] = time.perf_counter() - started
    write_json(out, record)
    header = (
        f"videonsa eval throughput: {description}; {device_name}; {record['versions']}; needle set "
        f"{len(questions)} questions ({', '.join(str(s) for s in args.lengths)} s videos), planner at "
        f"{args.fps:g} fps, {args.pixels:,} pixels per frame (at least {args.min_pixels:,}), prefer {args.prefer}; "
        "prefill s includes vision s"
    )
    if record.get("skipped"):
        skipped = ", ".join(f"{run['mode']} {run['budget_tokens']}" for run in record["skipped"])
        print(f"\nnot run (--stop-after {args.stop_after:g} s): {skipped}")
    print_tables(rows, header)
    print(f"total {record['total_seconds']:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
