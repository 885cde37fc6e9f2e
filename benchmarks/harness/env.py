"""What ran: card, library versions and git commit, recorded with every result."""

from __future__ import annotations

import datetime
import importlib.metadata
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit(repo: Path = REPO) -> str | None:
    """The checkout's commit, with "+dirty" when tracked files differ from it; None outside a git checkout."""
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def environment() -> dict[str, Any]:
    """Card name and count, torch / triton / transformers / fla-core / CUDA / cuDNN versions, commit, time."""
    info: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "gpus": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "fla-core": _version("fla-core"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "commit": git_commit(),
        "utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    return info


def describe(info: dict[str, Any]) -> str:
    """One line for a table's caption: card, versions, commit."""
    parts = [info["device"]] + [f"{name} {info[name]}" for name in ("torch", "triton", "transformers", "fla-core")
                                if info.get(name)]
    if info.get("commit"):
        parts.append(f"commit {info['commit']}")
    return ", ".join(parts)
