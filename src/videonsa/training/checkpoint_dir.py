"""Checking a `--resume DIR` folder before training starts, so a wrong or broken folder is one line, not a
torch traceback minutes later (docs/model-files.md, "Resuming").

A complete checkpoint folder, as the Trainer writes it and `finish_checkpoint` marks it, holds
trainer_state.json, the completion marker, the model weights (model.safetensors or shards; DeepSpeed and FSDP
keep theirs in global_stepN/ or pytorch_model_fsdp_N/) and the optimizer and scheduler state (optimizer.pt,
scheduler.pt; or in those folders). Only file structure is read here: safetensors headers and the zip directory
of the torch-saved files, never their pickled contents.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from pathlib import Path

from videonsa.errors import UserError

_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
# Folders in which DeepSpeed (global_stepN) and FSDP (pytorch_model_fsdp_N, optimizer_N) keep weights and
# optimizer state instead of model.safetensors and optimizer.pt.
_SHARDED_STATE = re.compile(r"^(global_step\d+|pytorch_model_fsdp_\d+|optimizer_\d+)$")
# Files torch.save writes (zip archives); their zip directory must be intact.
_TORCH_FILES = ("optimizer.pt", "scheduler.pt")
_RNG_FILES = "rng_state*.pth"


def check_resume(resume: str) -> str:
    """Return `resume` unchanged if it is "auto", "never" or a complete checkpoint folder; else raise
    `UserError` with one line saying what is wrong with the folder (and which folder to pass instead)."""
    if resume in ("auto", "never"):
        return resume
    check_checkpoint_folder(Path(resume).expanduser())
    return resume


def check_checkpoint_folder(folder: Path) -> None:
    """`UserError` unless `folder` is a complete training checkpoint (see the module docstring)."""
    where = f"--resume {folder}"
    if not folder.exists():
        raise UserError(f"{where}: no such folder")
    if not folder.is_dir():
        raise UserError(f"{where}: is a file; pass a checkpoint-N folder")
    if not (folder / "trainer_state.json").is_file():
        raise UserError(f"{where}: not a training checkpoint (no trainer_state.json){_newest_hint(folder)}")
    _check_trainer_state(folder / "trainer_state.json", where)
    from videonsa.training.trainer import COMPLETE_MARKER

    if not (folder / COMPLETE_MARKER).is_file():
        raise UserError(
            f"{where}: incomplete checkpoint (no {COMPLETE_MARKER} marker: the run stopped while saving it); "
            f"resume from an earlier checkpoint, or pass --resume auto to take the newest complete one"
        )
    sharded = any(_SHARDED_STATE.match(child.name) and child.is_dir() for child in folder.iterdir())
    _check_weights(folder, where, sharded)
    if not sharded and not (folder / "optimizer.pt").is_file():
        raise UserError(f"{where}: no optimizer state (optimizer.pt), so training cannot continue from it")
    for path in [*(folder / name for name in _TORCH_FILES), *sorted(folder.glob(_RNG_FILES))]:
        if path.is_file() and not _intact_zip(path):
            raise UserError(f"{where}: {path.name} is truncated or corrupt (not a complete torch.save archive)")


def _newest_hint(folder: Path) -> str:
    """"; pass .../checkpoint-N" when `folder` is a run's output folder holding checkpoints."""
    numbered = [(int(m.group(1)), child) for child in folder.iterdir() if (m := _CHECKPOINT_NAME.match(child.name))]
    if not numbered:
        return ""
    return f"; it holds checkpoints: pass {max(numbered)[1]}, or --resume auto to take the newest complete one"


def _check_trainer_state(path: Path, where: str) -> None:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise UserError(f"{where}: trainer_state.json is not readable JSON (truncated or corrupt)") from None
    if not isinstance(state, dict):
        raise UserError(f"{where}: trainer_state.json must hold a JSON object")
    # The Trainer writes all three; resuming reads them.
    for key, types in (("global_step", int), ("max_steps", int), ("num_train_epochs", (int, float))):
        value = state.get(key)
        if isinstance(value, bool) or not isinstance(value, types) or value < 0:
            raise UserError(f"{where}: trainer_state.json has no valid {key} (got {value!r})")


def _check_weights(folder: Path, where: str, sharded: bool) -> None:
    from videonsa.models.checkpoint_checks import INDEX_FILE, SINGLE_FILE, read_tensor_headers

    if (folder / INDEX_FILE).is_file() or (folder / SINGLE_FILE).is_file():
        try:
            read_tensor_headers(folder)
        except UserError as error:
            raise UserError(f"{where}: {str(error).replace(f'{folder}{os.sep}', '')}") from None
    elif not sharded:
        raise UserError(f"{where}: no model weights ({SINGLE_FILE} or {INDEX_FILE})")


def _intact_zip(path: Path) -> bool:
    """Whether `path` is a zip archive whose directory reads (torch.save's format); nothing is unpickled."""
    try:
        with zipfile.ZipFile(path) as archive:
            return bool(archive.namelist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return False
