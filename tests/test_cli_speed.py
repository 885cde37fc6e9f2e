"""`videonsa --help`, `--version` and argument errors answer without importing the heavy libraries.

Parsing the command line must not import torch, transformers, PyAV or Triton: those take seconds to load, and
a user asking for help or mistyping a flag should get the answer at once. Each case runs in a fresh
interpreter (the test process has imported everything already) and reports which heavy modules parsing
loaded; no timing is asserted.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest

HEAVY_MODULES = ("torch", "transformers", "av", "triton", "decord", "datasets", "accelerate")

# Parse argv with the real entry point, then print the exit code and the heavy modules now loaded.
PROBE = """
import json, sys
from videonsa.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as stop:
    code = stop.code
heavy = sorted(name for name in {heavy!r} if name in sys.modules)
print(json.dumps({{"code": code, "heavy": heavy}}), file=sys.stderr)
"""


def _parse_in_fresh_interpreter(*argv: str) -> tuple[int, list[str], str]:
    """(exit code, heavy modules imported, stdout) of `videonsa ARGV` in a new Python process."""
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY_MODULES), *argv],
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = json.loads(result.stderr.strip().splitlines()[-1])
    return report["code"], report["heavy"], result.stdout


@pytest.mark.parametrize(
    ("argv", "expected_code"),
    [
        (("--help",), 0),
        (("--version",), 0),
        ((), 0),
        (("ask", "--help"), 0),
        (("train", "--help"), 0),
        (("data", "prepare", "--help"), 0),
        (("convert", "--help"), 0),
        (("eval", "--help"), 0),
        (("eval", "make-needles", "--help"), 0),
        (("ask", "--video", "v.mp4", "what?"), 2),  # --model missing: an argument error
        (("ask", "--model", "m", "--video", "v.mp4", "--budget", "many", "what?"), 2),
        (("no-such-command",), 2),
    ],
)
def test_parsing_imports_no_heavy_library(argv: tuple[str, ...], expected_code: int) -> None:
    code, heavy, _ = _parse_in_fresh_interpreter(*argv)
    assert code == expected_code
    assert heavy == [], f"`videonsa {' '.join(argv)}` imported {heavy} while parsing"


def test_help_lists_every_subcommand() -> None:
    code, _, stdout = _parse_in_fresh_interpreter("--help")
    assert code == 0
    for command in ("ask", "data", "train", "convert", "eval"):
        assert command in stdout


def test_version_prints_the_package_version() -> None:
    from videonsa import __version__

    code, heavy, stdout = _parse_in_fresh_interpreter("--version")
    assert (code, heavy, stdout.strip()) == (0, [], __version__)


def test_import_videonsa_stays_light_until_a_heavy_part_is_used() -> None:
    """`import videonsa` is cheap; `videonsa.models` / `videonsa.ops` load on first use and work as before."""
    script = (
        "import sys, videonsa\n"
        "before = 'torch' in sys.modules\n"
        "ops = videonsa.ops.nsa_attention\n"
        "assert videonsa.models.VideoNSAConfig  # first use registers the model with the Auto classes\n"
        "from transformers import AutoConfig\n"
        "config = AutoConfig.for_model('videonsa')\n"
        "print(before, callable(ops), type(config).__name__)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "True", "VideoNSAConfig"]


def _command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every subcommand path of `parser` (("ask",), ("data", "prepare"), ...), nested ones included."""
    paths = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                paths.append((*prefix, name))
                paths.extend(_command_paths(subparser, (*prefix, name)))
    return paths


# Ask for each command's help in turn in one interpreter; report the heavy modules loaded after each.
EVERY_HELP_PROBE = """
import json, sys
from videonsa.cli import main
for path in json.loads(sys.argv[1]):
    try:
        main([*path, "--help"])
    except SystemExit:
        pass
    heavy = sorted(name for name in {heavy!r} if name in sys.modules)
    print(json.dumps({{"path": path, "heavy": heavy}}), file=sys.stderr)
"""


def test_every_subcommand_help_imports_no_heavy_library() -> None:
    """Also commands added later: each registered command's --help, nested actions included."""
    from videonsa.cli import build_parser

    paths = _command_paths(build_parser())
    assert ("ask",) in paths and ("data", "prepare") in paths
    result = subprocess.run(
        [sys.executable, "-c", EVERY_HELP_PROBE.format(heavy=HEAVY_MODULES), json.dumps(paths)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    reports = [json.loads(line) for line in result.stderr.splitlines() if line.startswith('{"path"')]
    assert len(reports) == len(paths), result.stderr[-3000:]
    for report in reports:
        assert report["heavy"] == [], f"`videonsa {' '.join(report['path'])} --help` imported {report['heavy']}"
