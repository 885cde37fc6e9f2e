"""`videonsa analyze SUB --out DIR ...`: what the sparse attention learned and what it costs (docs/analysis.md).

    videonsa analyze gates   --out DIR --model M --video V [V ...]   gate values per layer, head and branch
    videonsa analyze sinks   --out DIR --model M --video V [V ...]   attention sinks per layer and branch
    videonsa analyze budget  --out DIR --model M --task T ...        accuracy and prefill time over budgets
    videonsa analyze context --out DIR --model M --task T ...        frames x tokens per frame at a fixed budget
    videonsa analyze latency --out DIR [--lengths N ...]             per-branch time against context length

Each subcommand lives in a module of `videonsa.analysis` exposing `HELP: str`, `add_arguments(parser)` and
`run(args) -> int`; a module serving several subcommands (sweeps: budget and context) instead exposes
`SUBCOMMANDS = {name: plugin}`, each plugin (any object: a class, a namespace) with those three attributes.
Each subcommand writes DIR/<sub>.json and DIR/<sub>_*.png, and regenerates DIR/report.html. Those modules
import nothing heavy at module level, so building this parser (for `videonsa --help`) loads no torch.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

from videonsa.errors import UserError

# Subcommand -> (module, whether it loads a model: --model and --attention).
ANALYSIS_MODULES: dict[str, tuple[str, bool]] = {
    "gates": ("videonsa.analysis.gates", True),
    "sinks": ("videonsa.analysis.sinks", True),
    "budget": ("videonsa.analysis.sweeps", True),
    "context": ("videonsa.analysis.sweeps", True),
    "latency": ("videonsa.analysis.latency", False),
}


# What a subcommand plugin exposes.
PLUGIN_PARTS = ("HELP", "add_arguments", "run")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `analyze` and its subcommands to the CLI."""
    from videonsa.analysis.common import add_common_arguments

    parser = subparsers.add_parser(
        "analyze",
        help="analyse a model's sparse attention: gates, sinks, budget and context sweeps, latency (with plots)",
        description="Analyses of VideoNSA's sparse attention. Each writes OUT/SUB.json with its numbers, "
        "OUT/SUB_*.png plots, and regenerates OUT/report.html gathering every analysis in OUT.",
    )
    commands = parser.add_subparsers(dest="analysis", metavar="ANALYSIS")
    for name, (module_name, needs_model) in ANALYSIS_MODULES.items():
        plugin = _plugin(module_name, name)
        if plugin is None:
            continue
        sub = commands.add_parser(name, help=plugin.HELP, description=plugin.HELP)
        add_common_arguments(sub, model=needs_model)
        plugin.add_arguments(sub)
        sub.set_defaults(func=plugin.run)
    parser.set_defaults(func=_no_analysis)


def _plugin(module_name: str, name: str) -> Any:
    """The object with HELP, add_arguments and run for subcommand `name`: `module.SUBCOMMANDS[name]` where the
    module has that table, else the module. None while the module does not exist yet (it is written apart)."""
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name == module_name:
            return None
        raise
    table = getattr(module, "SUBCOMMANDS", None)
    plugin = module if table is None else table.get(name)
    # A module still being written (no HELP / add_arguments / run yet) must not break the rest of the CLI.
    if plugin is None or not all(hasattr(plugin, part) for part in PLUGIN_PARTS):
        return None
    return plugin


def _no_analysis(args: argparse.Namespace) -> int:
    raise UserError(f"choose an analysis: {', '.join(ANALYSIS_MODULES)} (videonsa analyze --help)")
