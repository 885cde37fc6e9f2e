"""`videonsa convert SOURCE DESTINATION`: a Qwen2.5-VL checkpoint folder -> a VideoNSA checkpoint folder."""

from __future__ import annotations

import argparse

from videonsa.errors import UserError
from videonsa.ops.config import NSAConfig  # torch-free: --help stays cheap
from videonsa.options import DEFAULT_GATE_TEMPERATURE


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `convert` to the CLI."""
    parser = subparsers.add_parser(
        "convert",
        help="turn a Qwen2.5-VL checkpoint into a VideoNSA checkpoint",
        description="Load SOURCE (a plain Qwen2.5-VL or a VideoNSA checkpoint folder, either key layout), add "
        "fresh gates where it has none (N(0, 0.02) weights, zero biases), record the sparse-attention settings "
        "and write DESTINATION with the tokenizer and processor files copied.",
    )
    parser.add_argument("source", help="checkpoint folder to read (with config.json)")
    parser.add_argument("destination", help="folder to write (must not exist or be empty)")
    parser.add_argument("--legacy-layout", action="store_true",
                        help="write the released Enxin/VideoNSA layout: flat keys (model.layers.*, visual.*, "
                        "lm_head.*) and model_type qwen2_5_vl")
    parser.add_argument("--dtype", default="auto", choices=("auto", "bfloat16", "float16", "float32"),
                        help="weight dtype to write (default: as stored)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the new gates' initialisation (default 0)")
    parser.add_argument("--fresh-gates", action="store_true",
                        help="accept a SOURCE that stores gates for some layers only, initialising the missing "
                        "ones fresh (without it such a checkpoint is refused, naming the layers)")
    budget = NSAConfig()
    parser.add_argument("--block-size", type=int, help=f"vision tokens per NSA block (default {budget.block_size})")
    parser.add_argument("--block-counts", type=int, help=f"blocks each query selects (default {budget.block_count})")
    parser.add_argument("--window-size", type=int,
                        help=f"sliding-window length in vision tokens (default {budget.window_size})")
    parser.add_argument("--init-blocks", type=int,
                        help=f"leading blocks always selected (default {budget.init_blocks})")
    parser.add_argument("--local-blocks", type=int,
                        help=f"blocks ending at the query always selected (default {budget.local_blocks})")
    parser.add_argument("--gate-temperature", type=float,
                        help=f"gate sigmoid temperature (default {DEFAULT_GATE_TEMPERATURE:g})")
    parser.add_argument("--attention-mode", choices=("nsa", "dense"), help="mode recorded in the config")
    parser.set_defaults(func=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    """Convert and print where the checkpoint went."""
    from videonsa.models.convert import convert_checkpoint

    names = ("block_size", "block_counts", "window_size", "init_blocks", "local_blocks", "gate_temperature",
             "attention_mode")
    settings = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.source == args.destination:
        raise UserError("source and destination must be different folders")
    destination = convert_checkpoint(
        args.source, args.destination, legacy_layout=args.legacy_layout, dtype=args.dtype, seed=args.seed,
        fresh_gates=args.fresh_gates,
        **settings,
    )
    layout = "legacy flat" if args.legacy_layout else "current transformers"
    print(f"wrote VideoNSA checkpoint ({layout} layout) to {destination}")
    return 0
