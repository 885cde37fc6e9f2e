"""`videonsa eval`: make an offline needle-in-a-haystack set, and run question sets with a model.

    videonsa eval make-needles OUT_DIR [--count N] [--lengths 1m 10m 1h] [--size 320x240] [--seed S] [--footage DIR]
    videonsa eval --model M --task needles:DIR [--out DIR] [--attention nsa|dense] [--budget N] ...

The second form runs every question of the set (a progress bar on a terminal), appends one line per answer
to OUT/answers.jsonl as it goes (a rerun resumes; a killed run loses nothing), and ends with the summary
(printed, and in OUT/summary.json and OUT/accuracy_by_length.png). A task that is not `needles:PATH` is an
lmms-eval task, run by lmms-eval when it is installed. See docs/evaluation.md.

Order of work, so that a mistake costs no waiting: the task (question file and every video checked), the
model's small files and settings, every question planned (prompt and video probe), then the weights.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

# Only light modules here and in the parser builders: `videonsa eval --help` must not wait for torch.
from videonsa.commands.ask import FRESH_GATES_HELP, PREFILL_CHUNK_HELP, check_prefill_chunk_mode, prefill_chunk_arg
from videonsa.errors import UserError
from videonsa.options import ATTENTION_MODES, DEFAULT_PAPER_FPS, DEFAULT_PAPER_MAX_FRAMES, GREEDY_GENERATION, PRESETS
from videonsa.video.planning import DEFAULT_BUDGET_TOKENS, DEFAULT_FPS, DEFAULT_PIXELS_PER_FRAME, PREFERENCES

NEEDLES_PREFIX = "needles:"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `eval` (and `eval make-needles`) to the CLI."""
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a model on a question set (needles:DIR or an lmms-eval task); make needle sets",
        description="Run a multiple-choice question set with a model: `videonsa eval --model M --task needles:DIR`. "
        "Answers go to OUT/answers.jsonl as they come (rerun to resume), then summary.json and "
        "accuracy_by_length.png. Make an offline long-video set with `videonsa eval make-needles OUT_DIR`.",
    )
    _add_run_arguments(parser)
    parser.set_defaults(func=run_evaluation)
    commands = parser.add_subparsers(dest="eval_command", metavar="make-needles")
    _add_make_needles(commands)


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="model directory or Hugging Face Hub id (e.g. Enxin/VideoNSA)")
    parser.add_argument(
        "--task",
        help="needles:DIR (a set from `videonsa eval make-needles`, or needles:FILE.jsonl in the same format), "
        "or an lmms-eval task name (needs lmms-eval installed)",
    )
    parser.add_argument(
        "--out",
        help="results directory (default eval-results/TASK-MODEL-ATTENTION, for an lmms-eval task "
        "eval-results/lmms-TASK-MODEL); rerunning a needles task into it resumes",
    )
    parser.add_argument("--limit", type=int, help="only the first N questions of the set (a quick look)")
    model = parser.add_argument_group("model")
    model.add_argument(
        "--attention",
        choices=ATTENTION_MODES,
        default="auto",
        help="auto (default: the checkpoint decides), nsa, dense or official; one command per mode gives a "
        "side-by-side comparison",
    )
    model.add_argument("--block-counts", type=int, help="NSA: blocks each query selects (default: the checkpoint's)")
    model.add_argument("--window", type=int, help="NSA: sliding-window size in tokens (default: the checkpoint's)")
    model.add_argument(
        "--prefill-chunk", type=prefill_chunk_arg, default="auto", metavar="N", help=PREFILL_CHUNK_HELP
    )
    model.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    model.add_argument("--dtype", default="auto", help="auto (default), bfloat16, float16 or float32")
    model.add_argument("--fresh-gates", action="store_true", help=FRESH_GATES_HELP)
    frames = parser.add_argument_group("frames and token budget (as in `videonsa ask`)")
    frames.add_argument("--preset", choices=PRESETS, default="auto", help="planner, paper, or auto (default)")
    frames.add_argument(
        "--fps",
        type=float,
        help=f"frames sampled per second of video (default {DEFAULT_FPS:g}; paper preset {DEFAULT_PAPER_FPS:g})",
    )
    frames.add_argument(
        "--max-frames", type=int, help=f"at most this many frames (default: none; paper {DEFAULT_PAPER_MAX_FRAMES})"
    )
    frames.add_argument("--min-pixels", type=int, help="never fewer pixels per frame")
    frames.add_argument(
        "--budget", type=int, help=f"planner: total tokens per question (default {DEFAULT_BUDGET_TOKENS})"
    )
    frames.add_argument("--prefer", choices=PREFERENCES, help="planner: frames, detail or balanced (default)")
    frames.add_argument("--pixels", type=int, help=f"planner: pixels per frame (default {DEFAULT_PIXELS_PER_FRAME})")
    frames.add_argument("--max-pixels", type=int, help="paper preset: per-frame pixel cap")
    frames.add_argument("--total-pixels", type=int, help="paper preset: pixel allowance of the whole video")
    frames.add_argument("--backend", choices=("pyav", "decord"), default="pyav", help="video decoder (default pyav)")
    # Multiple-choice answers are one greedy letter; `videonsa ask`'s settings helper reads these too.
    parser.set_defaults(**GREEDY_GENERATION, frames_fps=DEFAULT_FPS, eval_command=None)


# The needle generator's kinds made only on request (`videonsa.evaluation.needles.EXTRA_KINDS`), named here so
# that `--help` does not import the generator (it loads PyAV and torch); a test checks the two agree.
EXTRA_NEEDLE_KINDS: tuple[str, ...] = ("colour", "before-black")


def _add_make_needles(commands: argparse._SubParsersAction) -> None:
    from videonsa.evaluation.questions import NEEDLE_KINDS
    from videonsa.options import DEFAULT_NEEDLE_FPS as DEFAULT_FPS
    from videonsa.options import DEFAULT_NEEDLE_LENGTHS as DEFAULT_LENGTHS
    from videonsa.options import DEFAULT_NEEDLE_SIZE as DEFAULT_SIZE

    parser = commands.add_parser(
        "make-needles",
        help="write an offline needle-in-a-haystack question set",
        description="Write a deterministic needle-in-a-haystack set: COUNT videos per length, each with a word "
        "card, a flashing shape and four crossing shapes inserted at known times into a haystack (generated "
        "scenes, or --footage looped), and one multiple-choice question per needle kind (retrieval, counting, "
        "order) in OUT_DIR/questions.jsonl. Rerunning an interrupted command completes the set.",
    )
    parser.add_argument("out_dir", metavar="OUT_DIR", help="directory to create (or an unfinished set to complete)")
    parser.add_argument("--count", type=int, default=5, help="videos per length (default 5; 3 questions each)")
    default_lengths = [str(seconds) for seconds in DEFAULT_LENGTHS]
    parser.add_argument(
        "--lengths",
        nargs="+",
        metavar="SECONDS",
        default=default_lengths,
        help=f"video lengths: seconds, or like 90s, 5m, 1h, 1h30m (default {' '.join(default_lengths)})",
    )
    default_size = "x".join(map(str, DEFAULT_SIZE))
    parser.add_argument("--size", default=default_size, help=f"WxH frame size (default {default_size})")
    parser.add_argument("--seed", type=int, default=0, help="random seed: same seed, same files (default 0)")
    parser.add_argument("--footage", help="folder of videos to loop as haystack (default: generated scenes)")
    parser.add_argument("--fps", type=int, default=DEFAULT_FPS, help=f"frames per second (default {DEFAULT_FPS})")
    parser.add_argument(
        "--kinds",
        nargs="+",
        choices=NEEDLE_KINDS + EXTRA_NEEDLE_KINDS,
        default=list(NEEDLE_KINDS),
        help=f"question kinds (default {' '.join(NEEDLE_KINDS)}; made for tiny models trained from scratch as in "
        "videonsa demo, on request: colour, the screen turns red, green, blue or white for a moment, 'which "
        "colour?'; before-black, a colour, far later a black screen, then another colour, 'which colour came "
        "before the black?')",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=max(1, min(8, os.cpu_count() or 1)),
        help="videos encoded in parallel (default: CPU cores, at most 8)",
    )
    parser.set_defaults(func=run_make_needles)


def _size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if match is None:
        raise UserError(f"--size {text!r}: give WIDTHxHEIGHT, e.g. 320x240")
    return int(match.group(1)), int(match.group(2))


def _progress(description: str):
    """A rich progress bar on stderr (shown on a terminal) and its `update(done, total)` callback."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    columns = (TextColumn(description), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    progress = Progress(*columns, console=console, disable=not console.is_terminal)
    task = progress.add_task(description, total=None)
    return progress, lambda done, total: progress.update(task, completed=done, total=total)


def run_make_needles(args: argparse.Namespace) -> int:
    """Check the arguments, write the videos (progress bar), then the questions; print what was written."""
    from videonsa.evaluation.needles import make_needle_set, parse_duration

    lengths = [parse_duration(text) for text in args.lengths]
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1, got {args.workers}")
    progress, update = _progress("writing videos")
    with progress:
        needle_set = make_needle_set(
            args.out_dir,
            count=args.count,
            lengths=lengths,
            size=_size(args.size),
            seed=args.seed,
            footage=args.footage,
            fps=args.fps,
            kinds=args.kinds,
            workers=args.workers,
            progress=update,
        )
    hours = sum(video.seconds for video in needle_set.videos) / 3600
    megabytes = sum((needle_set.directory / video.file).stat().st_size for video in needle_set.videos) / 1e6
    print(
        f"{len(needle_set.videos)} videos ({hours:.2f} h, {megabytes:.1f} MB) and {len(needle_set.questions)} "
        f"questions in {needle_set.questions_path}"
    )
    print(f"run it: videonsa eval --model MODEL --task needles:{needle_set.directory}")
    return 0


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text.strip("/").split("/")[-1]) or "run"


def _task_questions(task: str):
    """The question set of a `needles:PATH` task."""
    from videonsa.evaluation.questions import load_questions

    path = task[len(NEEDLES_PREFIX) :]
    if not path:
        raise UserError("--task needles: give the set's directory, e.g. --task needles:my-needles")
    return load_questions(path)


def _run_lmms_task(args: argparse.Namespace) -> int:
    """Hand a non-needles task (or comma-separated tasks) to lmms-eval with the videonsa model."""
    from videonsa.evaluation.lmms_run import lmms_eval_available, run_lmms_eval

    if args.prefill_chunk != "auto":
        raise UserError(
            f"--prefill-chunk {args.prefill_chunk or 0}: lmms-eval tasks prefill with the automatic choice; "
            "--prefill-chunk applies to needles:DIR tasks"
        )
    if args.fresh_gates:
        raise UserError(
            "--fresh-gates applies to needles:DIR tasks; for an lmms-eval task, complete the checkpoint's gates "
            "first with `videonsa convert --fresh-gates`"
        )
    if Path(args.task).exists():
        raise UserError(
            f"--task {args.task}: a path, not a task name; for a needle set write --task needles:{args.task}"
        )
    if not lmms_eval_available():
        raise UserError(
            f"--task {args.task}: unknown task; use needles:DIR for a set made by `videonsa eval make-needles`, "
            "or install lmms-eval (pip install 'videonsa[eval]') to run its tasks"
        )
    model_args = {
        "pretrained": args.model,
        "attention": args.attention,
        "preset": args.preset,
        "device": args.device,
        "dtype": args.dtype,
        "fps": args.fps,
        "max_frames": args.max_frames,
        "min_pixels": args.min_pixels,
        "budget": args.budget,
        "prefer": args.prefer,
        "pixels": args.pixels,
        "max_pixels": args.max_pixels,
        "total_pixels": args.total_pixels,
        "block_counts": args.block_counts,
        "window_size": args.window,
        "backend": args.backend,
    }
    tasks = [task.strip() for task in args.task.split(",") if task.strip()]
    out = Path(args.out) if args.out else Path("eval-results") / f"lmms-{_slug(args.task)}-{_slug(args.model)}"
    run = run_lmms_eval(model_args, tasks, out, limit=args.limit)
    print(f"lmms-eval: {run.describe()}")
    print(f"wrote  {run.results_file}")
    return 0


def _check_counts(args: argparse.Namespace) -> None:
    """Refuse a --limit, --block-counts or --window below 1 now: the runner and `set_sparsity` would only find
    out after the weights have loaded (minutes for the 7B)."""
    for flag, value in (("--limit", args.limit), ("--block-counts", args.block_counts), ("--window", args.window)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}")


def run_evaluation(args: argparse.Namespace) -> int:
    """`videonsa eval --model M --task T`: load the set, the model, run, print the summary."""
    if args.model is None or args.task is None:
        raise UserError(
            "give --model and --task (e.g. --task needles:DIR), or make a set with `videonsa eval make-needles DIR`"
        )
    _check_counts(args)
    if not args.task.startswith(NEEDLES_PREFIX):
        return _run_lmms_task(args)
    from videonsa.commands.ask import _plan_before_loading, _settings
    from videonsa.evaluation.runner import EvalSettings
    from videonsa.inference.model_files import check_attention, open_model_files, resolve_attention
    from videonsa.video.paper import resolve_preset

    questions = _task_questions(args.task)
    files = open_model_files(args.model)
    attention = resolve_attention(files, check_attention(args.attention)).mode
    preset = resolve_preset(args.preset, attention)
    check_prefill_chunk_mode(args.prefill_chunk, attention)
    frames, generation = _settings(args, preset)
    out = Path(args.out) if args.out else Path("eval-results") / f"{_slug(args.task)}-{_slug(args.model)}-{attention}"
    if out.exists() and not out.is_dir():  # found now, not after the weights load
        raise UserError(f"--out {out}: is a file, not a folder")
    settings = EvalSettings(
        preset=preset,
        frames=frames,
        generation=generation,
        backend=args.backend,
        block_counts=args.block_counts,
        window_size=args.window,
        model=args.model,
        task=args.task,
    )
    _plan_before_loading(files, questions, args.limit, [settings])
    return _run_needles(args, questions, attention, settings, out)


def _run_needles(args, questions, attention, settings, out: Path) -> int:
    from rich.console import Console
    from rich.markup import escape

    import videonsa
    from videonsa.commands.ask import _quiet_transformers_loading
    from videonsa.evaluation.report import PLOT_FILE, SUMMARY_FILE
    from videonsa.evaluation.runner import ANSWERS_FILE, run_eval

    console = Console(stderr=True, soft_wrap=True)
    console.print(f"task   {len(questions)} questions from {questions.path}", highlight=False, markup=False)
    _quiet_transformers_loading()
    with console.status(f"loading {escape(args.model)} ({attention} attention)"):
        model = videonsa.load(
            args.model, attention=attention, device=args.device, dtype=args.dtype,
            prefill_chunk_size=args.prefill_chunk, fresh_gates=args.fresh_gates,
        )
    summary = run_eval(model, questions, out, settings, limit=args.limit)
    print(summary.describe())
    for name in (ANSWERS_FILE, SUMMARY_FILE, PLOT_FILE):
        print(f"wrote  {out / name}")
    return 0
