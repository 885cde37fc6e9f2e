"""A training checkpoint's files get the permissions the umask allows, whatever mode the library wrote them
with."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_finished_checkpoint_is_readable_per_umask(tmp_path: Path) -> None:
    """save_pretrained writes model.safetensors 0600 (through safetensors); finishing the checkpoint fixes it."""
    import torch
    from safetensors.torch import save_file

    from videonsa.training.trainer import COMPLETE_MARKER, finish_checkpoint

    folder = tmp_path / "checkpoint-2"
    folder.mkdir()
    previous = os.umask(0o022)
    try:
        save_file({"w": torch.zeros(2)}, folder / "model.safetensors")
        assert _mode(folder / "model.safetensors") == 0o600  # what the library does
        finish_checkpoint(folder, tmp_path / "no-source")
    finally:
        os.umask(previous)
    assert {p.name: _mode(p) for p in folder.iterdir()} == {"model.safetensors": 0o644, COMPLETE_MARKER: 0o644}
