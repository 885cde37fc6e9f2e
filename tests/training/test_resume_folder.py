"""`--resume DIR` on a folder that is not a complete checkpoint: one line saying what is wrong, before any model
is loaded."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from videonsa import cli
from videonsa.errors import UserError
from videonsa.training.checkpoint_dir import check_resume
from videonsa.training.trainer import COMPLETE_MARKER


def _complete_checkpoint(folder: Path, model: Path) -> Path:
    """The files a finished `checkpoint-N` holds (the tiny model's weights, small torch.save archives)."""
    folder.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(model / name, folder / name)
    state = {"global_step": 4, "max_steps": 8, "num_train_epochs": 1, "log_history": []}
    (folder / "trainer_state.json").write_text(json.dumps(state))
    torch.save({"state": {}, "param_groups": []}, folder / "optimizer.pt")
    torch.save({"last_epoch": 4}, folder / "scheduler.pt")
    torch.save({"python": 1}, folder / "rng_state.pth")
    (folder / COMPLETE_MARKER).write_text("complete\n")
    return folder


def _truncate(name: str) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        data = (folder / name).read_bytes()
        (folder / name).write_bytes(data[: len(data) // 2])

    return apply


def _remove(name: str) -> Callable[[Path], None]:
    return lambda folder: (folder / name).unlink()


BROKEN = {
    "no_marker": (_remove(COMPLETE_MARKER), r"incomplete checkpoint \(no videonsa-complete marker"),
    "no_trainer_state": (_remove("trainer_state.json"), r"not a training checkpoint \(no trainer_state\.json\)$"),
    "trainer_state_garbage": (_truncate("trainer_state.json"), r"trainer_state\.json is not readable JSON"),
    "trainer_state_without_max_steps": (
        lambda folder: (folder / "trainer_state.json").write_text('{"global_step": 4, "num_train_epochs": 1}'),
        r"trainer_state\.json has no valid max_steps \(got None\)",
    ),
    "no_weights": (_remove("model.safetensors"), r"no model weights"),
    "weights_truncated": (_truncate("model.safetensors"), r"model\.safetensors: not a readable safetensors file"),
    "no_optimizer": (_remove("optimizer.pt"), r"no optimizer state \(optimizer\.pt\)"),
    "optimizer_truncated": (_truncate("optimizer.pt"), r"optimizer\.pt is truncated or corrupt"),
    "rng_state_truncated": (_truncate("rng_state.pth"), r"rng_state\.pth is truncated or corrupt"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_checkpoint_folder_is_one_line(case, tmp_path, videonsa_checkpoint):
    folder = _complete_checkpoint(tmp_path / "run" / "checkpoint-4", videonsa_checkpoint)
    assert check_resume(str(folder)) == str(folder)
    change, message = BROKEN[case]
    change(folder)
    with pytest.raises(UserError, match=rf"^--resume {folder}: {message}") as raised:
        check_resume(str(folder))
    assert "\n" not in str(raised.value)


def test_the_run_folder_instead_of_a_checkpoint_names_the_newest(tmp_path, videonsa_checkpoint):
    for step in (2, 4, 10):
        _complete_checkpoint(tmp_path / "run" / f"checkpoint-{step}", videonsa_checkpoint)
    with pytest.raises(UserError, match=r"not a training checkpoint .*pass .*checkpoint-10, or --resume auto"):
        check_resume(str(tmp_path / "run"))


def test_missing_folder_or_a_file(tmp_path):
    with pytest.raises(UserError, match=r"no such folder"):
        check_resume(str(tmp_path / "nothing"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"is a file; pass a checkpoint-N folder"):
        check_resume(str(tmp_path / "file"))
    assert check_resume("auto") == "auto" and check_resume("never") == "never"


def test_train_cli_refuses_it_before_loading_anything(tmp_path, videonsa_checkpoint, colour_clips, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "model": {"path": str(videonsa_checkpoint)},
        "data": {"annotations": [str(colour_clips(1))]},
        "trainer": {"output_dir": str(tmp_path / "out")},
    }))
    folder = tmp_path / "half"
    folder.mkdir()
    (folder / "trainer_state.json").write_text('{"global_step": 3, "max_steps": 8, "num_train_epochs": 1}')
    assert cli.main(["train", str(config), "--resume", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"videonsa train: error: --resume {folder}: incomplete checkpoint (no {COMPLETE_MARKER} " \
        "marker: the run stopped while saving it); resume from an earlier checkpoint, or pass --resume auto to " \
        "take the newest complete one"
    assert not (tmp_path / "out").exists()
