"""The `videonsa` command line: one entry point, one module per subcommand.

Each subcommand module exposes `register(subparsers)`, which adds its parser and sets `func` to a callable
taking the parsed arguments and returning an exit code. User mistakes raise `UserError`, which is printed as
one line on stderr (no traceback) with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from videonsa.errors import UserError

# Modules that provide subcommands, in the order `--help` lists them. Imported lazily so that
# `videonsa --help` does not pay for importing transformers.
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "videonsa.commands.ask",
    "videonsa.commands.data",
    "videonsa.commands.train",
    "videonsa.commands.convert",
    "videonsa.commands.eval",
    "videonsa.commands.analyze",
    "videonsa.commands.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="videonsa",
        description="Long-video understanding with Qwen2.5-VL and Native Sparse Attention.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from videonsa import __version__

        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except UserError as error:
        print(f"videonsa {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("videonsa: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Whatever read stdout has gone (`videonsa ask ... | head -c 1`): stop quietly, as shell tools do. stdout
        # goes to /dev/null first, or Python's flush at exit would report the broken pipe once more.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE: what a shell reports for a tool the broken pipe stopped


if __name__ == "__main__":
    sys.exit(main())
