"""Where results go and how they are written: JSON lines as rows arrive, a JSON summary and a markdown table.

Results stay out of git: by default under `benchmarks/results/` (ignored), or `$VIDEONSA_BENCH_DIR`, or the
script's `--out`. Every file is written to a temporary name and renamed, so a killed run leaves the previous
file or none, never half of one; the JSON lines file is appended and flushed row by row, so a run that dies
half-way keeps the rows it finished.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from harness.env import REPO, environment

RESULTS_ENV = "VIDEONSA_BENCH_DIR"


def results_root() -> Path:
    """`$VIDEONSA_BENCH_DIR` if set, else `benchmarks/results/` of this checkout (ignored by git)."""
    return Path(os.environ.get(RESULTS_ENV) or REPO / "benchmarks" / "results")


def add_output_arguments(parser: argparse.ArgumentParser, *, baseline: bool = False) -> None:
    """--out DIR (default: results_root()) and, for the scripts with a committed baseline, --compare-baseline."""
    parser.add_argument("--out", type=Path, default=None,
                        help=f"folder for the result files (default: ${RESULTS_ENV}, else benchmarks/results/)")
    if baseline:
        parser.add_argument("--compare-baseline", nargs="?", const="auto", default=None, metavar="FILE",
                            help="print each number's ratio to the committed baseline (default: "
                                 "benchmarks/baselines/<card>.json for the card that ran)")
        parser.add_argument("--write-baseline", nargs="?", const="auto", default=None, metavar="FILE",
                            help="put this run's numbers into the baseline file (same default), replacing the "
                                 "metrics of the same names and keeping the others")


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _plain(value: Any) -> Any:
    """JSON-safe copy: NaN and infinities become None (strict JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def write_json(path: Path | str, record: dict[str, Any]) -> Path:
    """Write `record` as indented JSON to `path` (atomically; NaN becomes null)."""
    path = Path(path)
    _atomic_write(path, json.dumps(_plain(record), indent=1) + "\n")
    return path


def default_file(out: Path | str | None, name: str) -> Path:
    """The result file of a script whose --out names a file: `out` itself, else results_root() / name."""
    return Path(out) if out is not None else results_root() / name


class Results:
    """One run's output files: OUT/NAME.jsonl (a line per row), OUT/NAME.json and OUT/NAME.md.

    The first line of the JSON lines file is the environment record ({"kind": "environment", ...}).
    """

    def __init__(self, name: str, out: Path | str | None, env: dict[str, Any]):
        self.directory = Path(out) if out is not None else results_root()
        self.name = name
        self.env = env
        self.rows: list[dict[str, Any]] = []
        self.directory.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.directory / f"{name}.jsonl"
        _atomic_write(self.jsonl, json.dumps({"kind": "environment", **_plain(env)}) + "\n")

    def row(self, record: dict[str, Any], *, echo: bool = True) -> dict[str, Any]:
        """Keep `record`, append it to the JSON lines file and print it as one JSON line."""
        self.rows.append(record)
        line = json.dumps(_plain(record))
        with open(self.jsonl, "a") as f:
            f.write(line + "\n")
        if echo:
            print(line, flush=True)
        return record

    def write_json(self, summary: dict[str, Any] | None = None) -> Path:
        """OUT/NAME.json: {"environment": ..., "rows": [...], **summary}."""
        return write_json(self.directory / f"{self.name}.json",
                          {"environment": self.env, "rows": self.rows, **(summary or {})})

    def write_markdown(self, text: str) -> Path:
        """OUT/NAME.md with `text` (a caption and table) and print it."""
        path = self.directory / f"{self.name}.md"
        _atomic_write(path, text.rstrip("\n") + "\n")
        print(text, flush=True)
        return path


def fmt(value: float | None, digits: int = 2) -> str:
    """A number for a table cell; "-" for missing or NaN."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table; cells are str()'d (format numbers with `fmt` first)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def open_run(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None, name: str | Callable[[argparse.Namespace], str],
    *, baseline: bool = False, needs_cuda: bool = False,
) -> tuple[argparse.Namespace, Results]:
    """The start of a script's main(): add the output options to `parser`, parse `argv` and open the run's
    result files (the environment recorded first). `name` names the files, or is a function of the parsed
    arguments that does (a probe named after its length or tag). `needs_cuda`: exit with one line, before any
    file is written, when there is no CUDA GPU."""
    add_output_arguments(parser, baseline=baseline)
    args = parser.parse_args(argv)
    if needs_cuda and not torch.cuda.is_available():
        raise SystemExit(f"{parser.prog} needs a CUDA GPU")
    return args, Results(name(args) if callable(name) else name, args.out, environment())
