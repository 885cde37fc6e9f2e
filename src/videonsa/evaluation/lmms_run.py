"""Running an lmms-eval task on a videonsa model: `run_lmms_eval`, behind `videonsa eval --task NAME`.

lmms-eval runs as its own process (`python -m lmms_eval`, the same command a user types), so that its logging
set-up and global state stay out of ours and the run is exactly reproducible from the printed command line.
`install_needle_task` turns a needle set (`videonsa eval make-needles`) into an lmms-eval task folder.
Importing this module does not import lmms-eval (an optional dependency: `pip install 'videonsa[eval]'`).
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from videonsa.errors import UserError
from videonsa.evaluation.lmms_tasks import NEEDLE_TASK_DIR, NEEDLE_TASK_NAME
from videonsa.files import atomic_write_text

LMMS_MODEL_NAME = "videonsa"
QUESTIONS_FILE = "questions.jsonl"
_NEEDLE_YAML = f"{NEEDLE_TASK_NAME}.yaml"


@dataclass(frozen=True)
class LmmsRun:
    """A finished lmms-eval run: the command it ran and the results file it wrote."""

    command: tuple[str, ...]
    output_dir: Path
    results_file: Path

    def describe(self) -> str:
        """The command line, for people to rerun it."""
        return shlex.join(self.command)


def lmms_eval_available() -> bool:
    """Whether lmms-eval can be imported here."""
    return importlib.util.find_spec("lmms_eval") is not None


def format_model_args(model_args: Mapping[str, Any]) -> str:
    """`{"pretrained": "d", "fps": 4}` -> "pretrained=d,fps=4" (lmms-eval's --model_args syntax).

    Raises `UserError` for a value lmms-eval's comma-separated syntax cannot carry (a comma or "=").
    """
    if "pretrained" not in model_args:
        raise UserError("videonsa model_args: pretrained=DIR_OR_HUB_ID is required")
    parts = []
    for name, value in model_args.items():
        if value is None:
            continue
        text = str(value)
        if "," in text or "=" in text:
            raise UserError(f"videonsa model_args: {name}={text!r} holds ',' or '=', which --model_args cannot carry")
        parts.append(f"{name}={text}")
    return ",".join(parts)


def _questions_file(questions: str | os.PathLike) -> Path:
    path = Path(questions).expanduser()
    if path.is_dir():
        path = path / QUESTIONS_FILE
    if not path.is_file():
        raise UserError(f"{path}: no such needle question file (make one with `videonsa eval make-needles`)")
    return path.resolve()


def _needle_yaml(questions_file: Path) -> str:
    """The shipped task YAML with `data_files` pointing at `questions_file` (absolute)."""
    text = (NEEDLE_TASK_DIR / _NEEDLE_YAML).read_text()
    marker = f"test: {QUESTIONS_FILE}"
    if marker not in text:
        raise RuntimeError(f"{NEEDLE_TASK_DIR / _NEEDLE_YAML} no longer holds '{marker}'")
    return text.replace(marker, f"test: {_yaml_string(str(questions_file))}")


def _needle_utils(set_dir: Path) -> str:
    """The shipped task `utils.py` with NEEDLE_SET_DIR fixed to `set_dir`."""
    text = (NEEDLE_TASK_DIR / "utils.py").read_text()
    marker = "NEEDLE_SET_DIR = Path(__file__).parent"
    if marker not in text:
        raise RuntimeError(f"{NEEDLE_TASK_DIR / 'utils.py'} no longer holds '{marker}'")
    return text.replace(marker, f"NEEDLE_SET_DIR = Path({str(set_dir)!r})")


def _yaml_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _write_atomically(path: Path, text: str) -> None:
    atomic_write_text(path, text)


def install_needle_task(questions: str | os.PathLike, task_dir: str | os.PathLike) -> Path:
    """Write the `videonsa_needles` task for a needle set into `task_dir` and return `task_dir`.

    `questions` is the set's folder or its questions.jsonl; videos are resolved against the file's folder.
    Pass `task_dir` to lmms-eval as `--include_path`; `task_dir` may be the needle set's own folder.
    """
    questions_file = _questions_file(questions)
    task_dir = Path(task_dir).expanduser()
    task_dir.mkdir(parents=True, exist_ok=True)
    if task_dir.resolve() == questions_file.parent and questions_file.name == QUESTIONS_FILE:
        # Inside the set itself the shipped files work as they are, and the folder stays movable.
        yaml_text = (NEEDLE_TASK_DIR / _NEEDLE_YAML).read_text()
        utils_text = (NEEDLE_TASK_DIR / "utils.py").read_text()
    else:
        yaml_text, utils_text = _needle_yaml(questions_file), _needle_utils(questions_file.parent)
    _write_atomically(task_dir / _NEEDLE_YAML, yaml_text)
    _write_atomically(task_dir / "utils.py", utils_text)
    return task_dir


def _results_files(output_dir: Path) -> set[Path]:
    return set(output_dir.rglob("*_results.json")) if output_dir.exists() else set()


def lmms_eval_command(
    model_args: Mapping[str, Any],
    tasks: Sequence[str],
    output_dir: Path,
    *,
    include_paths: Sequence[Path] = (),
    limit: int | None = None,
    log_samples: bool = True,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The `python -m lmms_eval ...` command line for the videonsa model on `tasks`."""
    if not tasks:
        raise UserError("no lmms-eval task given")
    command = [sys.executable, "-m", "lmms_eval", "--model", LMMS_MODEL_NAME]
    command += ["--model_args", format_model_args(model_args), "--tasks", ",".join(tasks)]
    command += ["--batch_size", "1", "--output_path", str(output_dir)]
    if len(include_paths) > 1:
        # lmms-eval's --include_path holds one folder: given twice, the last wins and the other's tasks vanish.
        raise UserError(
            f"lmms-eval takes one task folder (--include_path), got {len(include_paths)}: "
            f"{', '.join(str(path) for path in include_paths)}; put the tasks under one folder"
        )
    for include in include_paths:
        command += ["--include_path", str(include)]
    if limit is not None:
        command += ["--limit", str(limit)]
    if log_samples:
        command.append("--log_samples")
    return command + list(extra_args)


def run_lmms_eval(
    model_args: Mapping[str, Any],
    tasks: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    questions: str | os.PathLike | None = None,
    include_paths: Sequence[str | os.PathLike] = (),
    limit: int | None = None,
    log_samples: bool = True,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> LmmsRun:
    """Run lmms-eval's CLI on `tasks` with the videonsa model; its output goes to this process's terminal.

    model_args: `--model_args` of the videonsa model (docs/lmms-eval.md), `pretrained` required.
    questions: a needle set (folder or questions.jsonl) for the `videonsa_needles` task, whose task folder
        is written under `out_dir/lmms_tasks`. include_paths: a task folder (at most one in all, the needle
        task's counting: lmms-eval's CLI reads one `--include_path`). limit: documents per task.
    Results land under `out_dir` as lmms-eval writes them (`<model>/<time>_results.json`, and samples with
    `log_samples`). Raises `UserError` when lmms-eval is missing, when `videonsa_needles` is asked for without
    `questions`, for more than one task folder, or when lmms-eval fails (naming its exit status).
    """
    if not lmms_eval_available():
        raise UserError("lmms-eval is not installed; install it with: pip install 'videonsa[eval]'")
    output_dir = Path(out_dir).expanduser().resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    includes = [Path(path).expanduser().resolve() for path in include_paths]
    if NEEDLE_TASK_NAME in tasks:
        if questions is None:
            raise UserError(f"task {NEEDLE_TASK_NAME} needs a needle set: give its folder or questions.jsonl")
        includes.append(install_needle_task(questions, output_dir / "lmms_tasks"))
    elif questions is not None:
        raise UserError(f"a needle set was given but the tasks ({', '.join(tasks)}) do not include {NEEDLE_TASK_NAME}")
    command = lmms_eval_command(
        model_args,
        tasks,
        output_dir,
        include_paths=includes,
        limit=limit,
        log_samples=log_samples,
        extra_args=extra_args,
    )
    before = _results_files(output_dir)
    completed = subprocess.run(command, env=None if env is None else {**os.environ, **env}, check=False)
    if completed.returncode != 0:
        raise UserError(f"lmms-eval exited with status {completed.returncode}: {shlex.join(command)}")
    written = sorted(_results_files(output_dir) - before, key=lambda path: path.stat().st_mtime)
    if not written:
        raise UserError(f"lmms-eval wrote no results file under {output_dir}: {shlex.join(command)}")
    return LmmsRun(command=tuple(command), output_dir=output_dir, results_file=written[-1])
