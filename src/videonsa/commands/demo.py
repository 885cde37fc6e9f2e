"""`videonsa demo`: watch a small VideoNSA learn a needle-in-a-long-video task from scratch, on a CPU, with no
download (docs/demo.md). Heavy imports stay inside `run_demo_command` so that `videonsa --help` stays fast."""

from __future__ import annotations

import argparse

DEFAULT_OUT = "videonsa-demo"
DEFAULT_STEPS = 500  # the same as DemoTraining.steps (kept here so that --help does not import torch)
TASKS = ("colour", "before-black")  # videonsa.demo.task.TASK_KINDS, the first the default


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `demo` to the CLI."""
    parser = subparsers.add_parser(
        "demo",
        help="train a small VideoNSA from scratch on a generated long-video task and evaluate it (CPU, no download)",
        description="Generate needle-in-a-long-video questions (the screen turns red, green, blue or white for "
        "4 s somewhere in a 2-minute video: which colour?), build a small VideoNSA from scratch, train it with the "
        "videonsa train recipe, evaluate it on held-out videos with the videonsa eval runner and print its "
        "accuracy against chance. Rerunning the same command into the same --out resumes a stopped run.",
    )
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"run folder (default {DEFAULT_OUT})")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"training steps of 8 videos (default {DEFAULT_STEPS}: about 5 minutes on 2 cores; "
                        "videos and evaluation add about 2)")
    parser.add_argument("--minutes", type=float, default=None,
                        help="fit the step count to this training time instead (measured on this machine)")
    parser.add_argument("--task", default=TASKS[0], choices=TASKS,
                        help="colour (default): which colour fills the screen?; before-black (an experiment, not "
                        "yet learnt reliably): which colour filled the screen before it turned black, far outside "
                        "the black screen's sliding window? (docs/demo.md)")
    parser.add_argument("--attention", default="nsa", choices=("nsa", "dense"),
                        help="attention of the video tokens: NSA (default) or dense, for comparison")
    parser.add_argument("--ablation", default="none", choices=("none", "window-only"),
                        help="window-only: compression and selection gates fixed to 0 in training and evaluation")
    parser.add_argument("--seed", type=int, default=0, help="seed of the videos, the model and the training (0)")
    parser.add_argument("--train-videos", type=int, default=None, help="training videos (default 512)")
    parser.add_argument("--heldout-videos", type=int, default=None, help="held-out videos (default 200)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for PyTorch (default 1: this model's operations are too small to gain "
                        "from more, and on a shared machine extra threads mostly wait for each other)")
    parser.set_defaults(func=run_demo_command)


def run_demo_command(args: argparse.Namespace) -> int:
    """Build the settings from the flags and run the demo."""
    from videonsa.errors import UserError

    if args.minutes is not None and args.steps is not None:
        raise UserError("give --minutes or --steps, not both")
    if args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    for name in ("train_videos", "heldout_videos"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {value}")

    import logging
    from dataclasses import replace

    import torch

    from videonsa.demo import DemoSettings, DemoTask, DemoTraining, run_demo

    torch.set_num_threads(args.threads)
    task = DemoTask(seed=args.seed, kind=args.task)
    task = replace(task, train_videos=args.train_videos or task.train_videos,
                   heldout_videos=args.heldout_videos or task.heldout_videos)
    training = DemoTraining(seed=args.seed)
    if args.steps is not None:
        training = replace(training, steps=args.steps)
    minutes = args.minutes
    settings = DemoSettings(attention=args.attention, ablation=args.ablation, task=task, training=training,
                            minutes=minutes)
    logger = logging.getLogger("videonsa")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[videonsa] %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    result = run_demo(args.out, settings)
    print(result.describe())
    print(f"in {result.out_dir}: summary.json, loss.png, accuracy_by_position.png, the model in model/; ask it:")
    print(f"  {result.ask_command()}")
    return 0
