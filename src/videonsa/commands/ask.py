"""`videonsa ask --model M --video V "question"`: answer a question about a video, streaming the answer.

Order of work, so that a mistake costs no waiting: settings, model files (config, tokenizer; no weights),
video probe and plan, frame decoding (progress bar), then the weights and generation. The answer goes to
stdout; the plan and the report go to stderr, so `videonsa ask ... > answer.txt` keeps only the answer.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import re
import sys
import time
from collections.abc import Callable, Iterator

# Only light modules here: `videonsa ask --help` and argument errors must not wait for torch (run_ask imports it).
from videonsa.errors import UserError
from videonsa.options import (
    ATTENTION_MODES,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_PAPER_FPS,
    DEFAULT_PAPER_MAX_FRAMES,
    DEFAULT_PAPER_MAX_PIXELS,
    DEFAULT_PAPER_MIN_PIXELS,
    DEFAULT_PAPER_TOTAL_PIXELS,
    GREEDY_GENERATION,
    PRESETS,
)
from videonsa.video.planning import (
    DEFAULT_BUDGET_TOKENS,
    DEFAULT_FPS,
    DEFAULT_MIN_PIXELS_PER_FRAME,
    DEFAULT_PIXELS_PER_FRAME,
    PREFERENCES,
)

PREFILL_CHUNK_HELP = (
    "prefill the prompt N tokens at a time (the KV cache grows chunk by chunk; same answer as one pass, far less "
    "memory for long videos); 0: one pass; auto (default): one pass when the prompt fits the device's free memory "
    "at once, else the largest chunks that fit (docs/long-videos.md)"
)

# Seconds between prefill progress lines when stderr is not a terminal (a live line is drawn on a terminal).
PREFILL_LOG_SECONDS = 30.0

# `--fresh-gates` of the commands that load a model (`ask`, `analyze`), as `videonsa convert` has it.
FRESH_GATES_HELP = (
    "accept a checkpoint whose VideoNSA gates are stored for some layers only, initialising the missing ones fresh "
    "(refused without it, naming the layers; a plain Qwen2.5-VL checkpoint gets fresh gates either way)"
)

# Flags that only one preset reads, and what the other preset takes instead.
PLANNER_ONLY_FLAGS = {
    "budget": ("--budget", "the paper preset has no token budget"),
    "prefer": ("--prefer", "the paper preset has no token budget"),
    "pixels": ("--pixels", "the paper preset takes --max-pixels and --min-pixels"),
}
PAPER_ONLY_FLAGS = {
    "max_pixels": ("--max-pixels", "the planner takes --pixels"),
    "total_pixels": ("--total-pixels", "the planner fits frames to --budget instead"),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `ask` to the CLI."""
    parser = subparsers.add_parser(
        "ask",
        help="answer a question about a video",
        description="Answer a question about a video with VideoNSA (or any Qwen2.5-VL checkpoint). The planner "
        "preset samples frames at --fps and sizes them to fit --budget tokens; the paper preset (the default for "
        "the released checkpoint) picks frames and sizes as the paper's evaluation did. The plan is shown before "
        "the model runs.",
    )
    parser.add_argument("question", nargs="?", help="the question about the video (or give it with --question)")
    parser.add_argument(
        "--question",
        dest="question_option",
        metavar="TEXT",
        help="the question, for when it would otherwise follow --options",
    )
    parser.add_argument("--model", required=True, help="model directory or Hugging Face Hub id (e.g. Enxin/VideoNSA)")
    parser.add_argument("--video", required=True, help="video file, or a folder of frame images")
    parser.add_argument(
        "--options",
        nargs="+",
        metavar="CHOICE",
        help="multiple-choice answers (labelled A, B, ... in order); prints the chosen letter",
    )
    parser.add_argument(
        "--preset",
        choices=PRESETS,
        default="auto",
        help="how frames are chosen and the prompt is laid out: planner fits frames to --budget (our default); "
        "paper reproduces the paper's evaluation (its frame indices and sizes, 1.0 s per temporal patch, its "
        "prompt, greedy decoding); auto (default) picks paper for official attention, else planner",
    )
    budget = parser.add_argument_group("frames (both presets)")
    budget.add_argument(
        "--fps",
        type=float,
        help=f"frames sampled per second of video (default {DEFAULT_FPS:g}; paper preset {DEFAULT_PAPER_FPS:g})",
    )
    budget.add_argument(
        "--max-frames",
        type=int,
        help=f"at most this many frames (default: no cap; paper preset {DEFAULT_PAPER_MAX_FRAMES}, rounded down to "
        "even)",
    )
    budget.add_argument(
        "--min-pixels",
        type=int,
        help=f"never fewer pixels per frame (default {DEFAULT_MIN_PIXELS_PER_FRAME}, 112x112; paper preset "
        f"{DEFAULT_PAPER_MIN_PIXELS}, 448x448: frames are scaled UP to it, even when --max-pixels is lower)",
    )
    planner = parser.add_argument_group("planner preset")
    planner.add_argument(
        "--budget",
        type=int,
        help="total context in tokens: prompt + video + answer (default: on a GPU what fits its free memory, "
        f"elsewhere {DEFAULT_BUDGET_TOKENS})",
    )
    planner.add_argument(
        "--prefer",
        choices=PREFERENCES,
        help="what gives way when the video does not fit: frames keeps every frame at lower "
        "detail, detail keeps detail with fewer frames, balanced lowers both (default)",
    )
    planner.add_argument(
        "--pixels",
        type=int,
        help=f"pixels per frame when the budget allows (default {DEFAULT_PIXELS_PER_FRAME}, 224x224)",
    )
    paper = parser.add_argument_group("paper preset")
    paper.add_argument(
        "--max-pixels",
        type=int,
        help=f"per-frame pixel cap (default {DEFAULT_PAPER_MAX_PIXELS}; the cap in force is at most 602112 and "
        "shrinks for long videos, never below 1.05 x --min-pixels). Below --min-pixels, frames that round to at "
        "most --max-pixels are scaled UP to the --min-pixels floor, as the paper's evaluation did",
    )
    paper.add_argument(
        "--total-pixels",
        type=int,
        help=f"pixel allowance of the whole video, which lowers the per-frame cap for many frames (default "
        f"{DEFAULT_PAPER_TOTAL_PIXELS}, the evaluation's VIDEO_MAX_PIXELS default)",
    )
    source = parser.add_argument_group("video input")
    source.add_argument(
        "--frames-fps",
        type=float,
        default=DEFAULT_FPS,
        help=f"for a folder of frame images: how many frames make one second (default {DEFAULT_FPS:g})",
    )
    source.add_argument(
        "--backend",
        choices=("pyav", "decord"),
        default="pyav",
        help="video decoder (default pyav; decord only if installed)",
    )
    model = parser.add_argument_group("model and generation")
    model.add_argument(
        "--attention",
        choices=ATTENTION_MODES,
        default="auto",
        help="auto (default): the checkpoint decides (official for the released Enxin/VideoNSA layout, else the "
        "mode its config records, else nsa); nsa: sparse attention over video tokens; dense: full attention; "
        "official: the function the released checkpoint was trained and evaluated with",
    )
    model.add_argument("--fresh-gates", action="store_true", help=FRESH_GATES_HELP)
    model.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                       help=f"longest answer in tokens (default {DEFAULT_MAX_NEW_TOKENS})")
    model.add_argument(
        "--temperature", type=float, default=GREEDY_GENERATION["temperature"],
        help="0 for greedy decoding (default; the paper preset's only choice)",
    )
    model.add_argument("--top-p", type=float, default=GREEDY_GENERATION["top_p"],
                       help=f"nucleus sampling threshold (default {GREEDY_GENERATION['top_p']})")
    model.add_argument("--top-k", type=int, default=GREEDY_GENERATION["top_k"],
                       help=f"sample among the k likeliest tokens (default {GREEDY_GENERATION['top_k']}: off)")
    model.add_argument("--seed", type=int, help="random seed for sampling")
    model.add_argument(
        "--prefill-chunk",
        type=prefill_chunk_arg,
        default="auto",
        metavar="N",
        help=PREFILL_CHUNK_HELP,
    )
    model.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    model.add_argument(
        "--dtype", default="auto", help="auto (default: bfloat16 on GPU, float32 on CPU), bfloat16, float16 or float32"
    )
    parser.set_defaults(func=run_ask)


def check_prefill_chunk_mode(prefill_chunk: int | str | None, mode: str) -> None:
    """Refuse an explicit chunk size (not "auto", not 0/None) for official mode, which prefills in one pass."""
    if prefill_chunk not in ("auto", None) and mode == "official":
        raise UserError(
            "--prefill-chunk: attention_mode 'official' prefills in one pass, as the original code does; pass "
            "--prefill-chunk 0, or --attention nsa or dense"
        )


def prefill_chunk_arg(text: str) -> int | str | None:
    """--prefill-chunk's value: "auto", 0 (one pass: None) or a positive number of tokens."""
    if text == "auto":
        return "auto"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected auto, 0 or a number of tokens, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected auto, 0 or a positive number of tokens, got {value}")
    return value or None


def _question(args: argparse.Namespace) -> str:
    """The question from the positional argument or --question (exactly one of them)."""
    if args.question is not None and args.question_option is not None:
        raise UserError("give the question once: as the last argument or with --question, not both")
    question = args.question if args.question is not None else args.question_option
    if question is None:
        raise UserError("give the question: as the last argument (before --options) or with --question")
    return question


def _refuse_other_preset_flags(args: argparse.Namespace, preset: str) -> None:
    """A flag only the other preset reads is a mistake: one line saying what this preset takes instead."""
    other = PAPER_ONLY_FLAGS if preset == "planner" else PLANNER_ONLY_FLAGS
    for name, (flag, instead) in other.items():
        if getattr(args, name) is not None:
            owner = "paper" if preset == "planner" else "planner"
            raise UserError(
                f"{flag} is a setting of the {owner} preset, but the {preset} preset runs ({instead}); "
                f"pass --preset {owner} to use it"
            )


def _or(value, default):
    return default if value is None else value


def _settings(args: argparse.Namespace, preset: str):
    """(SamplingSettings or PaperSettings, GenerationSettings) from the flags, validated; messages name the flag."""
    from videonsa.inference import GenerationSettings
    from videonsa.video import SamplingSettings
    from videonsa.video.paper import PaperSettings

    _refuse_other_preset_flags(args, preset)
    if preset == "paper":
        frames = PaperSettings(
            fps=_or(args.fps, DEFAULT_PAPER_FPS),
            max_frames=_or(args.max_frames, DEFAULT_PAPER_MAX_FRAMES),
            min_pixels=_or(args.min_pixels, DEFAULT_PAPER_MIN_PIXELS),
            max_pixels=_or(args.max_pixels, DEFAULT_PAPER_MAX_PIXELS),
            total_pixels=_or(args.total_pixels, DEFAULT_PAPER_TOTAL_PIXELS),
        )
    else:
        frames = SamplingSettings(
            fps=_or(args.fps, DEFAULT_FPS),
            max_frames=args.max_frames,
            pixels_per_frame=_or(args.pixels, DEFAULT_PIXELS_PER_FRAME),
            min_pixels_per_frame=_or(args.min_pixels, DEFAULT_MIN_PIXELS_PER_FRAME),
            budget_tokens=_or(args.budget, DEFAULT_BUDGET_TOKENS),
            prefer=_or(args.prefer, "balanced"),
        )
    generation = GenerationSettings(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    if not args.frames_fps > 0:
        raise UserError(f"--frames-fps must be a positive frame rate, got {args.frames_fps}")
    if preset == "paper" and args.temperature > 0:
        raise UserError(
            f"--temperature {args.temperature:g}: the paper preset decodes greedily, as the paper's evaluation "
            f"did; pass --preset planner to sample"
        )
    try:
        return frames.validate(), generation.validate()
    except UserError as error:
        raise UserError(_flag_names(str(error))) from None


# Settings names in messages -> the flags that set them.
_FLAGS = {
    "budget_tokens": "--budget",
    "min_pixels_per_frame": "--min-pixels",
    "pixels_per_frame": "--pixels",
    "max_frames": "--max-frames",
    "max_new_tokens": "--max-new-tokens",
    "temperature": "--temperature",
    "top_p": "--top-p",
    "top_k": "--top-k",
    "fps": "--fps",
    "min_pixels": "--min-pixels",
    "max_pixels": "--max-pixels",
    "total_pixels": "--total-pixels",
}


def _flag_names(message: str) -> str:
    """A settings message (it names no file) with setting names replaced by the flags that set them."""
    pattern = re.compile(r"\b(" + "|".join(sorted(_FLAGS, key=len, reverse=True)) + r")\b")
    return pattern.sub(lambda match: _FLAGS[match.group(1)], message)


def _plan_before_loading(files, questions, limit: int | None, every_settings) -> None:
    """Plan the questions a run will ask (the first `limit` of `questions`, a QuestionSet) under each of
    `every_settings` (`EvalSettings`: a sweep has one per point) from the model's small files, each video probed
    once, so that a setting some question cannot run with (a --budget below its text) is refused, naming its
    flag, before the weights load (`videonsa eval`, `videonsa analyze budget/context`)."""
    from videonsa.evaluation.runner import plan_questions

    probed: dict = {}
    selected = questions.questions[:limit]
    for settings in every_settings:
        try:
            plan_questions(files, selected, settings, probed)
        except UserError as error:
            raise UserError(_flag_names(str(error))) from None


def _decode_with_progress(plan, console):
    """Decode the planned frames (either preset) with a transient progress bar on stderr."""
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from videonsa.video.paper import decode_planned_video

    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task(f"decoding {escape(plan.info.name)}", total=plan.frame_count)
        return decode_planned_video(plan, progress=lambda done, total: progress.update(task, completed=done))


@contextlib.contextmanager
def prefill_display(console, *, log_every_seconds: float = PREFILL_LOG_SECONDS) -> Iterator[Callable]:
    """A callback for `PrefillProgress` reports: a live progress bar on a terminal (over the work of the layers of
    a one-pass prefill or of its chunks; gone once the prefill ends), else a plain line at most every
    `log_every_seconds` (for logs of long runs)."""
    if console.is_terminal:
        from rich.markup import escape
        from rich.progress import BarColumn, Progress, TextColumn

        columns = (BarColumn(), TextColumn("{task.description}"))
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task("prefill", total=1.0)
            live = [True]

            def show(progress) -> None:
                if progress.finished and live[0]:
                    bar.stop()  # the answer streams to stdout next: no live line under it
                    live[0] = False
                elif live[0]:
                    bar.update(task, completed=progress.work_done, description=escape(progress.describe()))

            yield show
        return
    last_line_at = [-math.inf]

    def log(progress) -> None:
        if not progress.finished and progress.seconds - last_line_at[0] >= log_every_seconds:
            last_line_at[0] = progress.seconds
            console.print(progress.describe(), highlight=False, markup=False)

    yield log


def _print_choice(answer, console) -> None:
    if answer.choice is None:
        return
    shares = ", ".join(f"{letter} {share:.2f}" for letter, share in answer.choice_probabilities.items())
    console.print(f"choice {answer.choice} ({shares})", highlight=False, markup=False)


def run_ask(args: argparse.Namespace) -> int:
    """Check inputs, show the plan, decode, load the model, stream the answer, report."""
    import torch
    from rich.console import Console
    from rich.markup import escape

    from videonsa.inference.generation import generate_answer
    from videonsa.inference.memory import planning_chunk
    from videonsa.inference.model_files import (
        check_attention,
        load_weights,
        open_model_files,
        resolve_attention,
        resolve_device,
        resolve_dtype,
    )
    from videonsa.inference.prompt import build_preset_prompt
    from videonsa.video import plan_video, probe_video
    from videonsa.video.paper import plan_paper_video, resolve_preset

    started = time.perf_counter()
    question = _question(args)
    attention = check_attention(args.attention)
    # Settings are checked before any file is read, unless the preset waits on the checkpoint's attention mode.
    early_preset = None if args.preset == "auto" and attention == "auto" else resolve_preset(args.preset, attention)
    if early_preset is not None:
        frames, generation = _settings(args, early_preset)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    files = open_model_files(args.model)
    choice = resolve_attention(files, attention)
    check_prefill_chunk_mode(args.prefill_chunk, choice.mode)  # before the video is read
    preset = resolve_preset(args.preset, choice.mode)
    if early_preset is None:
        frames, generation = _settings(args, preset)
    prompt = build_preset_prompt(files, question, args.options, preset=preset)
    info = probe_video(args.video, backend=args.backend, frames_fps=args.frames_fps)
    text_tokens = prompt.text_tokens + generation.answer_tokens(bool(prompt.letters))
    budget_note = None
    if preset == "planner" and args.budget is None:
        chunk = planning_chunk(args.prefill_chunk, choice.mode)
        frames, budget_note = _device_budget(frames, files, device, dtype, chunk=chunk)
    if preset == "paper":
        plan = plan_paper_video(info, frames, text_tokens=text_tokens, geometry=files.geometry)
    else:
        try:
            plan = plan_video(info, frames, text_tokens=text_tokens, geometry=files.geometry)
        except UserError as error:
            message = _flag_names(str(error))
            if budget_note:  # the budget came from the device's free memory, not from a --budget the user gave
                message = message.replace("--budget=", "the budget ", 1)
                message += f" (the budget is what fits {device}'s free memory: free some, or pass --budget)"
            raise UserError(message) from None
    console = Console(stderr=True, soft_wrap=True)
    # The plan first: a user who sees the wrong frame count or size can stop before decoding starts.
    console.print(f"video  {info.describe()}", highlight=False, markup=False)
    if budget_note:
        console.print(f"budget {budget_note}", highlight=False, markup=False)
    console.print(f"plan   {plan.describe()} [preset {plan.preset}]", highlight=False, markup=False)
    if choice.notice:
        console.print(f"note   {choice.notice}", highlight=False, markup=False)
    video = _decode_with_progress(plan, console)
    _quiet_transformers_loading()
    loading_started = time.perf_counter()
    with console.status(f"loading {escape(args.model)} ({choice.mode} attention, {device}, {str(dtype)[6:]})"):
        model = load_weights(
            files, attention=choice.mode, device=device, dtype=dtype, fresh_gates=args.fresh_gates
        )
    loading_seconds = time.perf_counter() - loading_started
    try:
        with prefill_display(console) as show_prefill:
            answer = generate_answer(
                model, files, prompt, video, generation, on_text=_stream_to_stdout, on_prefill=show_prefill,
                prefill_chunk_size=args.prefill_chunk,
            )
    except torch.OutOfMemoryError:
        # Settings asked for more than the device holds ("auto" chunking already retried in smaller chunks).
        raise UserError(
            f"{device} ran out of memory answering over {plan.describe()}: pass a smaller --budget (or fewer frames), "
            "or --prefill-chunk N to prefill in chunks of N tokens"
        ) from None
    sys.stdout.write("\n")
    sys.stdout.flush()
    _print_choice(answer, console)
    report = answer.report
    console.print(f"report {report.describe()}", highlight=False, markup=False)
    console.print(
        f"time   {time.perf_counter() - started:.1f}s in all: video {report.video_seconds:.1f}s, loading "
        f"{loading_seconds:.1f}s, prefill {report.prefill_seconds:.1f}s, answer {report.decode_seconds:.1f}s",
        highlight=False,
        markup=False,
    )
    return 0


def _device_budget(frames, files, device, dtype, *, chunk):
    """(planner settings with the budget of what fits the GPU for a prefill in chunks of `chunk` tokens (None: one
    pass), a line saying so), or (frames, None) off a GPU."""
    from videonsa.inference.memory import default_budget_tokens, free_memory

    budget = default_budget_tokens(files.config, device, dtype, chunk=chunk)
    if budget is None:
        return frames, None
    note = f"{budget:,} tokens: what fits {device}'s {free_memory(device) / 2**30:.1f} GiB free (--budget to change)"
    return dataclasses.replace(frames, budget_tokens=budget), note


def _stream_to_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _quiet_transformers_loading() -> None:
    """Hide transformers' per-tensor loading bar: the CLI shows its own status line while the model loads."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
