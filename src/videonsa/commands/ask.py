"""`videonsa ask --model M --video V "question"`: answer a question about a video, streaming the answer.

Order of work, so that a mistake costs no waiting: settings, model files (config, tokenizer; no weights),
video probe and plan, frame decoding (progress bar), then the weights and generation. The answer goes to
stdout; the plan and the report go to stderr, so `videonsa ask ... > answer.txt` keeps only the answer.
"""

from __future__ import annotations

import argparse
import re
import sys

from videonsa.errors import UserError
from videonsa.video.planning import (
    DEFAULT_BUDGET_TOKENS,
    DEFAULT_FPS,
    DEFAULT_MIN_PIXELS_PER_FRAME,
    DEFAULT_PIXELS_PER_FRAME,
    PREFERENCES,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `ask` to the CLI."""
    parser = subparsers.add_parser(
        "ask",
        help="answer a question about a video",
        description="Answer a question about a video with VideoNSA (or any Qwen2.5-VL checkpoint). Frames are "
        "sampled at --fps and sized to fit --budget tokens; the plan is shown before the model runs.",
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
    budget = parser.add_argument_group("frames and token budget")
    budget.add_argument(
        "--budget",
        type=int,
        default=DEFAULT_BUDGET_TOKENS,
        help=f"total context in tokens: prompt + video + answer (default {DEFAULT_BUDGET_TOKENS})",
    )
    budget.add_argument(
        "--prefer",
        choices=PREFERENCES,
        default="balanced",
        help="what gives way when the video does not fit: frames keeps every frame at lower "
        "detail, detail keeps detail with fewer frames, balanced lowers both (default)",
    )
    budget.add_argument(
        "--fps", type=float, default=DEFAULT_FPS, help=f"frames sampled per second of video (default {DEFAULT_FPS:g})"
    )
    budget.add_argument("--max-frames", type=int, help="at most this many frames (default: no cap)")
    budget.add_argument(
        "--pixels",
        type=int,
        default=DEFAULT_PIXELS_PER_FRAME,
        help=f"pixels per frame when the budget allows (default {DEFAULT_PIXELS_PER_FRAME}, 224x224)",
    )
    budget.add_argument(
        "--min-pixels",
        type=int,
        default=DEFAULT_MIN_PIXELS_PER_FRAME,
        help=f"never fewer pixels per frame (default {DEFAULT_MIN_PIXELS_PER_FRAME}, 112x112)",
    )
    budget.add_argument(
        "--frames-fps",
        type=float,
        default=DEFAULT_FPS,
        help="for a folder of frame images: how many frames make one second (default 4)",
    )
    budget.add_argument(
        "--backend",
        choices=("pyav", "decord"),
        default="pyav",
        help="video decoder (default pyav; decord only if installed)",
    )
    model = parser.add_argument_group("model and generation")
    model.add_argument(
        "--attention",
        choices=("nsa", "dense"),
        default="nsa",
        help="nsa: sparse attention over video tokens (default); dense: full attention",
    )
    model.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens (default 256)")
    model.add_argument("--temperature", type=float, default=0.0, help="0 for greedy decoding (default), else sample")
    model.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1.0)")
    model.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (default 0: off)")
    model.add_argument("--seed", type=int, help="random seed for sampling")
    model.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    model.add_argument(
        "--dtype", default="auto", help="auto (default: bfloat16 on GPU, float32 on CPU), bfloat16, float16 or float32"
    )
    parser.set_defaults(func=run_ask)


def _question(args: argparse.Namespace) -> str:
    """The question from the positional argument or --question (exactly one of them)."""
    if args.question is not None and args.question_option is not None:
        raise UserError("give the question once: as the last argument or with --question, not both")
    question = args.question if args.question is not None else args.question_option
    if question is None:
        raise UserError("give the question: as the last argument (before --options) or with --question")
    return question


def _settings(args: argparse.Namespace):
    """(SamplingSettings, GenerationSettings) from the flags, validated; messages name the flag."""
    from videonsa.inference import GenerationSettings
    from videonsa.video import SamplingSettings

    sampling = SamplingSettings(
        fps=args.fps,
        max_frames=args.max_frames,
        pixels_per_frame=args.pixels,
        min_pixels_per_frame=args.min_pixels,
        budget_tokens=args.budget,
        prefer=args.prefer,
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
    try:
        return sampling.validate(), generation.validate()
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
}


def _flag_names(message: str) -> str:
    """A settings message (it names no file) with setting names replaced by the flags that set them."""
    pattern = re.compile(r"\b(" + "|".join(sorted(_FLAGS, key=len, reverse=True)) + r")\b")
    return pattern.sub(lambda match: _FLAGS[match.group(1)], message)


def _decode_with_progress(plan, console):
    """Decode the planned frames with a transient progress bar on stderr."""
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from videonsa.video import decode_video

    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task(f"decoding {escape(plan.info.name)}", total=plan.frame_count)
        return decode_video(plan, progress=lambda done, total: progress.update(task, completed=done))


def _print_choice(answer, console) -> None:
    if answer.choice is None:
        return
    shares = ", ".join(f"{letter} {share:.2f}" for letter, share in answer.choice_probabilities.items())
    console.print(f"choice {answer.choice} ({shares})", highlight=False, markup=False)


def run_ask(args: argparse.Namespace) -> int:
    """Check inputs, show the plan, decode, load the model, stream the answer, report."""
    from rich.console import Console
    from rich.markup import escape

    from videonsa.inference.generation import generate_answer
    from videonsa.inference.model_files import (
        check_attention,
        load_weights,
        open_model_files,
        resolve_device,
        resolve_dtype,
    )
    from videonsa.inference.prompt import build_prompt
    from videonsa.video import plan_video, probe_video

    question = _question(args)
    sampling, generation = _settings(args)
    check_attention(args.attention)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    files = open_model_files(args.model)
    prompt = build_prompt(files, question, args.options)
    info = probe_video(args.video, backend=args.backend, frames_fps=args.frames_fps)
    text_tokens = prompt.text_tokens + generation.answer_tokens(bool(prompt.letters))
    try:
        plan = plan_video(info, sampling, text_tokens=text_tokens, geometry=files.geometry)
    except UserError as error:
        raise UserError(_flag_names(str(error))) from None
    console = Console(stderr=True, soft_wrap=True)
    video = _decode_with_progress(plan, console)
    console.print(f"video  {info.describe()}", highlight=False, markup=False)
    console.print(f"plan   {plan.describe()}", highlight=False, markup=False)
    _quiet_transformers_loading()
    with console.status(f"loading {escape(args.model)} ({args.attention} attention, {device}, {str(dtype)[6:]})"):
        model = load_weights(files, attention=args.attention, device=device, dtype=dtype)
    answer = generate_answer(model, files, prompt, video, generation, on_text=_stream_to_stdout)
    sys.stdout.write("\n")
    sys.stdout.flush()
    _print_choice(answer, console)
    console.print(f"report {answer.report.describe()}", highlight=False, markup=False)
    return 0


def _stream_to_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _quiet_transformers_loading() -> None:
    """Hide transformers' per-tensor loading bar: the CLI shows its own status line while the model loads."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
