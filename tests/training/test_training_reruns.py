"""Rerunning and resuming `videonsa train`: a finished run is recognised and left alone, a resumed run's mean loss
covers the whole run, and a resume whose config differs from the run's record is refused (or, when the
differences are accepted, recorded beside the original record, which is never overwritten)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from training_helpers import train_overrides
from transformers import TrainerCallback

from videonsa.cli import main
from videonsa.errors import UserError
from videonsa.training.config import load_config
from videonsa.training.trainer import CONFIG_COPY, run_training


class CrashAtStep(TrainerCallback):
    """Stands in for a kill: raises in the middle of the run, after a checkpoint was written."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError("simulated crash")


class CrashAfterSaving(TrainerCallback):
    """A kill right after the checkpoint of `step` is complete, before the final model is written."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError("simulated crash")


def weight_bytes(folder: Path) -> bytes:
    return (folder / "model.safetensors").read_bytes()


def config_file(path: Path, overrides: dict) -> Path:
    nested: dict = {}
    for dotted, value in overrides.items():
        section, key = dotted.split(".", 1)
        nested.setdefault(section, {})[key] = value
    path.write_text(yaml.safe_dump(nested))
    return path


@pytest.mark.parametrize("bound", ["max_steps", "epochs", "half_epoch"])
def test_a_finished_run_is_recognised_and_left_alone(videonsa_checkpoint, colour_clips, tmp_path, bound):
    # 3 steps each: 3 samples, 1 epoch of them, or half an epoch of 6 (the Trainer records that as 1 epoch).
    limit = {"max_steps": {"max_steps": 3}, "epochs": {"num_train_epochs": 1},
             "half_epoch": {"num_train_epochs": 0.5}}[bound]
    clips = colour_clips(6 if bound == "half_epoch" else 3, frames=2)
    config = load_config(None, train_overrides(videonsa_checkpoint, clips, tmp_path / "run", save_steps=2, **limit))
    first = run_training(config, resume="auto")
    assert first.global_step == 3 and not first.already_finished
    trained = weight_bytes(tmp_path / "run")
    for _ in range(2):
        again = run_training(config, resume="auto")
        assert again.already_finished and again.global_step == 3
        assert again.training_loss == pytest.approx(first.training_loss, rel=1e-9) and again.training_loss > 0
        assert weight_bytes(tmp_path / "run") == trained
    assert not (tmp_path / "run" / "checkpoint-4").exists()


def test_the_cli_says_a_run_is_finished(videonsa_checkpoint, colour_clips, tmp_path, capsys):
    overrides = train_overrides(videonsa_checkpoint, colour_clips(2, frames=2), tmp_path / "run", max_steps=2)
    path = config_file(tmp_path / "train.yaml", overrides)
    assert main(["train", str(path)]) == 0
    first = capsys.readouterr().out
    assert "trained 2 steps" in first
    assert main(["train", str(path)]) == 0
    again = capsys.readouterr().out
    assert "already finished" in again and "2 steps" in again and "0.0000" not in again


def test_a_run_killed_after_its_last_checkpoint_is_finished_without_training_more(
    videonsa_checkpoint, colour_clips, tmp_path
):
    """The last checkpoint is at the final step but the final model was never written (killed while saving):
    the rerun writes the final model from that checkpoint instead of training a step more."""
    config = load_config(None, train_overrides(videonsa_checkpoint, colour_clips(3, frames=2), tmp_path / "run",
                                               max_steps=3, save_steps=1))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_training(config, resume="auto", callbacks=[CrashAfterSaving(3)])
    assert (tmp_path / "run" / "checkpoint-3").is_dir() and not (tmp_path / "run" / "model.safetensors").exists()
    outcome = run_training(config, resume="auto")
    assert outcome.global_step == 3 and outcome.already_finished
    assert weight_bytes(tmp_path / "run") == weight_bytes(tmp_path / "run" / "checkpoint-3")
    assert not (tmp_path / "run" / "checkpoint-4").exists()


def test_a_resumed_runs_mean_loss_covers_the_whole_run(videonsa_checkpoint, colour_clips, tmp_path):
    annotations = colour_clips(6, frames=2)
    settings = dict(max_steps=5, save_steps=2, logging_steps=3)  # logs and checkpoints out of step
    straight = run_training(load_config(None, train_overrides(videonsa_checkpoint, annotations, tmp_path / "a",
                                                              **settings)), resume="never")
    config = load_config(None, train_overrides(videonsa_checkpoint, annotations, tmp_path / "b", **settings))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_training(config, resume="auto", callbacks=[CrashAtStep(3)])
    resumed = run_training(config, resume="auto")
    assert resumed.resumed_from == tmp_path / "b" / "checkpoint-2"
    assert resumed.global_step == straight.global_step == 5
    assert resumed.training_loss == pytest.approx(straight.training_loss, rel=1e-5)


@pytest.fixture
def interrupted_run(videonsa_checkpoint, colour_clips, tmp_path):
    """A 4-step run stopped after its checkpoint at step 2; returns its overrides."""
    overrides = train_overrides(videonsa_checkpoint, colour_clips(4, frames=2), tmp_path / "run", max_steps=4,
                                save_steps=2, lr_scheduler_type="linear", warmup_steps=0)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_training(load_config(None, overrides), resume="auto", callbacks=[CrashAtStep(3)])
    return overrides


def test_resuming_with_a_changed_config_is_refused_and_the_record_kept(interrupted_run, tmp_path):
    record = tmp_path / "run" / CONFIG_COPY
    original = record.read_text()
    changed = {**interrupted_run, "trainer.learning_rate": 1e-3, "data.max_tokens": 2048}
    with pytest.raises(UserError) as caught:
        run_training(load_config(None, changed), resume="auto")
    message = str(caught.value)
    assert "\n" not in message
    assert "trainer.learning_rate" in message and "0.003 -> 0.001" in message and "data.max_tokens" in message
    assert "--accept-config-changes" in message
    assert record.read_text() == original

    # Accepted: training goes on with the new learning rate (not the one in the saved scheduler)...
    outcome = run_training(load_config(None, changed), resume="auto", accept_config_changes=True)
    assert outcome.global_step == 4
    state = json.loads((tmp_path / "run" / "checkpoint-4" / "trainer_state.json").read_text())
    learning_rates = {entry["step"]: entry["learning_rate"] for entry in state["log_history"] if "loss" in entry}
    assert learning_rates[3] == pytest.approx(1e-3 * 2 / 4)  # linear decay from the new rate, step 3 of 4
    # ... and the original record stays; the accepted config is recorded beside it.
    assert record.read_text() == original
    accepted = json.loads((tmp_path / "run" / "videonsa-train-config.step-2.json").read_text())
    assert accepted["trainer"]["learning_rate"] == 1e-3


def test_harmless_changes_resume_without_asking(interrupted_run, tmp_path):
    changed = {**interrupted_run, "trainer.logging_steps": 2, "trainer.save_total_limit": 3,
               "trainer.dataloader_num_workers": 1, "model.fresh_gates": True}
    outcome = run_training(load_config(None, changed), resume="auto")
    assert outcome.resumed_from == tmp_path / "run" / "checkpoint-2" and outcome.global_step == 4


def test_changed_trainable_parts_are_refused_even_when_accepted(interrupted_run, tmp_path):
    changed = {**interrupted_run, "trainable.vision_tower": False}
    with pytest.raises(UserError, match=r"trainable\.vision_tower.*optimizer state"):
        run_training(load_config(None, changed), resume="auto", accept_config_changes=True)


def test_a_finished_run_trains_further_only_when_the_longer_run_is_accepted(videonsa_checkpoint, colour_clips,
                                                                            tmp_path):
    overrides = train_overrides(videonsa_checkpoint, colour_clips(3, frames=2), tmp_path / "run", max_steps=2,
                                save_steps=2)
    run_training(load_config(None, overrides), resume="auto")
    longer = load_config(None, {**overrides, "trainer.max_steps": 3})
    with pytest.raises(UserError, match=r"trainer\.max_steps 2 -> 3.*--accept-config-changes"):
        run_training(longer, resume="auto")
    outcome = run_training(longer, resume="auto", accept_config_changes=True)
    assert not outcome.already_finished and outcome.global_step == 3
    assert outcome.resumed_from == tmp_path / "run" / "checkpoint-2"
    assert run_training(longer, resume="auto").already_finished


def test_a_longer_fraction_of_an_epoch_trains_further_when_accepted(videonsa_checkpoint, colour_clips, tmp_path):
    # 0.5 and 0.8 of an epoch are both recorded by the Trainer as 1 epoch: the step target tells them apart.
    overrides = train_overrides(videonsa_checkpoint, colour_clips(6, frames=2), tmp_path / "run",
                                num_train_epochs=0.5, save_steps=3)
    assert run_training(load_config(None, overrides), resume="auto").global_step == 3
    longer = load_config(None, {**overrides, "trainer.num_train_epochs": 0.8})
    outcome = run_training(longer, resume="auto", accept_config_changes=True)
    assert not outcome.already_finished and outcome.global_step == 5


def test_a_config_with_bad_values_fails_in_one_line_before_loading_anything(tmp_path, capsys):
    path = config_file(tmp_path / "bad.yaml", {"model.path": str(tmp_path / "missing"), "data.manifest": "m.jsonl",
                                               "trainer.output_dir": "out", "trainer.num_train_epochs": -1,
                                               "trainer.per_device_train_batch_size": 0})
    assert main(["train", str(path)]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error and "Traceback" not in error
    assert "trainer.num_train_epochs" in error and "trainer.per_device_train_batch_size" in error
    assert not (tmp_path / "out").exists()


def test_unreadable_data_in_a_dataloader_worker_fails_in_one_line(videonsa_checkpoint, colour_clips, tmp_path,
                                                                  capsys):
    annotations = colour_clips(3)
    shutil.rmtree(annotations.parent / "clips")  # every sample's frames are gone
    overrides = train_overrides(videonsa_checkpoint, annotations, tmp_path / "run", dataloader_num_workers=1,
                                max_steps=1)
    path = config_file(tmp_path / "train.yaml", {**overrides, "data.max_consecutive_skips": 1})
    assert main(["train", str(path)]) == 2
    stderr = capsys.readouterr().err  # the progress messages come first
    assert "Caught UserError" not in stderr and "worker.py" not in stderr, stderr
    error = stderr.strip().splitlines()[-1]
    assert error.startswith("videonsa train: error: 2 samples in a row from position"), stderr


def test_an_output_dir_that_is_a_file_fails_in_one_line_before_loading_anything(tmp_path, capsys):
    (tmp_path / "taken").write_text("")
    path = config_file(tmp_path / "train.yaml", {"model.path": str(tmp_path / "missing"), "data.manifest": "m.jsonl",
                                                 "trainer.output_dir": str(tmp_path / "taken")})
    assert main(["train", str(path)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("videonsa train: error: trainer.output_dir") and "is a file" in error, error


def test_a_missing_model_path_is_named_in_one_line(colour_clips, tmp_path, capsys):
    # The annotations exist, so the first thing to fail is the model folder (the tokenizer loads from it).
    overrides = train_overrides(tmp_path / "missing", colour_clips(1), tmp_path / "run", max_steps=1)
    assert main(["train", str(config_file(tmp_path / "train.yaml", overrides))]) == 2
    error = capsys.readouterr().err.strip()
    assert error == f"videonsa train: error: model.path {tmp_path / 'missing'} does not exist", error


def test_a_run_started_over_never_resumes_from_the_old_runs_later_checkpoints(videonsa_checkpoint, colour_clips,
                                                                              tmp_path):
    overrides = train_overrides(videonsa_checkpoint, colour_clips(4, frames=2), tmp_path / "run", max_steps=4,
                                save_steps=2)
    run_training(load_config(None, overrides), resume="auto")  # leaves complete checkpoints 2 and 4
    with pytest.raises(RuntimeError, match="simulated crash"):  # started over, stopped after its checkpoint 2
        run_training(load_config(None, overrides), resume="never", callbacks=[CrashAtStep(3)])
    outcome = run_training(load_config(None, overrides), resume="auto")
    assert outcome.resumed_from == tmp_path / "run" / "checkpoint-2" and not outcome.already_finished
