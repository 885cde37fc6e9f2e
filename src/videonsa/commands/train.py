"""`videonsa train CONFIG`: fine-tune with the paper's recipe (or any change of it) on the Hugging Face Trainer.

One process: `videonsa train CONFIG`. Several GPUs: `torchrun --nproc_per_node N -m videonsa.cli train CONFIG`
(with `strategy` set in the config) or `accelerate launch --config_file CONFIG.yaml -m videonsa.cli train CONFIG`.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from pathlib import Path

from videonsa.errors import UserError

SHIPPED_CONFIGS = (
    "recipe.yaml",
    "accelerate_zero2.yaml",
    "accelerate_zero3.yaml",
    "accelerate_fsdp2.yaml",
    "deepspeed_zero2.json",
    "deepspeed_zero3.json",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `train` to the CLI."""
    parser = subparsers.add_parser(
        "train",
        help="fine-tune VideoNSA (or dense Qwen2.5-VL) from a YAML/JSON config",
        description="Train on the Hugging Face Trainer. CONFIG (YAML or JSON) is applied on top of the paper's "
        "recipe (see --export-configs). Re-running the same command resumes from the last complete checkpoint.",
    )
    parser.add_argument("config", nargs="?", help="training config (.yaml, .yml or .json)")
    parser.add_argument("--output-dir", help="where checkpoints and the final model go (trainer.output_dir)")
    parser.add_argument("--resume", default="auto",
                        help="auto (last complete checkpoint in the output dir, if any), never, or a checkpoint "
                        "folder (default: auto)")
    parser.add_argument("--freeze", default="",
                        help="comma-separated parts not to train: vision_tower, projector, language_model, gates")
    parser.add_argument("--gates-only", action="store_true", help="train only the VideoNSA gates")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (trainer.max_steps)")
    parser.add_argument("--accept-config-changes", action="store_true",
                        help="resume even though the config differs from the one the checkpoint was trained with "
                        "(the differences are listed when refused; the original record is kept)")
    parser.add_argument("--report-to", metavar="NAME[,NAME]",
                        help="where metrics go besides the log lines: auto (TensorBoard if installed), none, "
                        "tensorboard, wandb, ... (trainer.report_to)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one setting, e.g. --set trainer.learning_rate=2e-6 (repeatable)")
    parser.add_argument("--print-config", action="store_true", help="print the merged config and exit")
    parser.add_argument("--export-configs", metavar="DIR",
                        help="copy the recipe and the accelerate/DeepSpeed configs into DIR and exit")
    parser.set_defaults(func=run_train)


def run_train(args: argparse.Namespace) -> int:
    """Build the config from the file and flags, then train (or print/export configs)."""
    if args.export_configs:
        export_configs(Path(args.export_configs))
        return 0
    if not args.config:
        raise UserError("give a CONFIG file (or --export-configs DIR to get the recipe to start from)")
    from videonsa.training.config import TRAINABLE_PARTS, load_config, parse_override

    overrides = dict(parse_override(text) for text in args.overrides)
    if args.output_dir:
        overrides["trainer.output_dir"] = args.output_dir
    if args.max_steps is not None:
        overrides["trainer.max_steps"] = args.max_steps
    if args.report_to:
        names = [name.strip() for name in args.report_to.split(",") if name.strip()]
        overrides["trainer.report_to"] = names[0] if len(names) == 1 else names
    for part in _parts(args.freeze, TRAINABLE_PARTS):
        overrides[f"trainable.{part}"] = False
    if args.gates_only:
        overrides.update({f"trainable.{part}": part == "gates" for part in TRAINABLE_PARTS})
    config = load_config(args.config, overrides)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0
    from videonsa.training.checkpoint_dir import check_resume
    from videonsa.training.trainer import run_training

    _show_progress_messages()
    outcome = run_training(config, resume=check_resume(args.resume), accept_config_changes=args.accept_config_changes)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(_summary(outcome))
    return 0


def _summary(outcome) -> str:
    """The last line of a run: steps, mean loss over the whole run, where the model is."""
    loss = f"mean loss {outcome.training_loss:.4f} over {outcome.global_step} steps"
    if outcome.already_finished:
        return (f"already finished: {loss}; model in {outcome.output_dir} "
                "(to train further raise --max-steps or num_train_epochs with --accept-config-changes; "
                "--resume never starts over)")
    resumed = f" (resumed from {outcome.resumed_from})" if outcome.resumed_from is not None else ""
    return f"trained {outcome.global_step} steps{resumed}, {loss}; model in {outcome.output_dir}"


def _show_progress_messages() -> None:
    """Print this package's training messages (parameter counts, resuming, skipped samples): all of them on the
    main process, warnings only on the others."""
    logger = logging.getLogger("videonsa")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[videonsa] %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING)


def _parts(text: str, known: tuple[str, ...]) -> list[str]:
    parts = [part.strip() for part in text.split(",") if part.strip()]
    for part in parts:
        if part not in known:
            raise UserError(f"--freeze: unknown part {part!r} (known: {', '.join(known)})")
    return parts


def export_configs(folder: Path) -> None:
    """Copy the shipped configs into `folder` (refusing to overwrite files there)."""
    from videonsa.training.config import config_file

    folder.mkdir(parents=True, exist_ok=True)
    clashes = [name for name in SHIPPED_CONFIGS if (folder / name).exists()]
    if clashes:
        raise UserError(f"{folder / clashes[0]} already exists; export into an empty folder")
    for name in SHIPPED_CONFIGS:
        shutil.copyfile(config_file(name), folder / name)
    print(f"wrote {', '.join(SHIPPED_CONFIGS)} to {folder}")
