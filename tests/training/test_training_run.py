"""End-to-end training on the tiny VideoNSA model: the loss falls, a crashed run resumes to the same result, two
processes (gloo) train together and match one process with the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from training_helpers import train_overrides
from transformers import TrainerCallback

from videonsa.training.config import load_config
from videonsa.training.prepare import ClipFilter, prepare_manifest
from videonsa.training.trainer import COMPLETE_MARKER, run_training


def step_losses(output_dir: Path) -> dict[int, float]:
    """Loss and learning rate logged at every step of the final trainer state."""
    state = json.loads((output_dir / "trainer_state.json").read_text()) if (output_dir / "trainer_state.json"
                                                                           ).is_file() else None
    if state is None:
        last = max(output_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
        state = json.loads((last / "trainer_state.json").read_text())
    return {entry["step"]: (entry["loss"], entry["learning_rate"]) for entry in state["log_history"]
            if "loss" in entry}


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def assert_same_weights(first: dict, second: dict, atol: float) -> None:
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], atol=atol, rtol=0, msg=name)


def test_loss_falls_on_a_learnable_task(videonsa_checkpoint, colour_clips, tmp_path):
    annotations = colour_clips(12)
    config = load_config(None, train_overrides(videonsa_checkpoint, annotations, tmp_path / "run",
                                               num_train_epochs=3, save_steps=18))
    outcome = run_training(config, resume="never")
    assert outcome.global_step == 36
    losses = [loss for _, (loss, _) in sorted(step_losses(tmp_path / "run" / "checkpoint-36").items())]
    first, last = sum(losses[:6]) / 6, sum(losses[-6:]) / 6
    assert last < 0.5 * first, (first, last)
    assert outcome.data_totals == {"samples_skipped": 0, "samples_trimmed": 0, "frames_dropped": 0,
                                   "frames_kept": 36 * 4}
    # Checkpoints and the final model are complete Hugging Face folders that load as VideoNSA.
    from videonsa.models import VideoNSAForConditionalGeneration

    for folder in (tmp_path / "run" / "checkpoint-18", tmp_path / "run"):
        assert (folder / "tokenizer.json").is_file() and (folder / "preprocessor_config.json").is_file()
        model = VideoNSAForConditionalGeneration.from_pretrained(folder)
        assert any(".g_proj_1." in name for name, _ in model.named_parameters())
    assert (tmp_path / "run" / "checkpoint-18" / COMPLETE_MARKER).is_file()


class CrashAtStep(TrainerCallback):
    """Stands in for a kill: raises in the middle of the run, after a checkpoint was written."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError("simulated crash")


def test_a_crashed_run_resumes_to_the_same_result(videonsa_checkpoint, colour_clips, tmp_path):
    annotations = colour_clips(12, frames=3)
    # Gradient accumulation and a dataloader worker, so both the optimizer state and the data order matter.
    settings = dict(max_steps=6, gradient_accumulation_steps=2, save_steps=2, dataloader_num_workers=1)
    straight = load_config(None, train_overrides(videonsa_checkpoint, annotations, tmp_path / "straight",
                                                 **settings))
    run_training(straight, resume="never")

    interrupted = load_config(None, train_overrides(videonsa_checkpoint, annotations, tmp_path / "crash",
                                                    **settings))
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_training(interrupted, resume="auto", callbacks=[CrashAtStep(5)])
    # A kill while saving leaves a checkpoint folder without the completion marker: it must be passed over.
    half_written = tmp_path / "crash" / "checkpoint-5"
    half_written.mkdir()
    (half_written / "trainer_state.json").write_text("{")
    outcome = run_training(interrupted, resume="auto")

    assert outcome.resumed_from == tmp_path / "crash" / "checkpoint-4"
    assert outcome.global_step == 6
    expected, resumed = step_losses(tmp_path / "straight"), step_losses(tmp_path / "crash")
    for step in (5, 6):
        assert resumed[step][0] == pytest.approx(expected[step][0], rel=1e-5)  # same samples, same weights
        assert resumed[step][1] == pytest.approx(expected[step][1], rel=1e-9)  # same schedule position
    assert_same_weights(weights(tmp_path / "straight"), weights(tmp_path / "crash"), atol=1e-6)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_together_and_match_one(videonsa_checkpoint, colour_clips, tmp_path):
    annotations = colour_clips(8)
    manifest = tmp_path / "train.jsonl"
    prepare_manifest(annotations, manifest, clip_filter=ClipFilter(min_frames=1, max_frames=None), workers=0,
                     progress=False)

    def config_file(name: str, accumulation: int, **distributed) -> Path:
        overrides = train_overrides(videonsa_checkpoint, annotations, tmp_path / name, max_steps=3,
                                    gradient_accumulation_steps=accumulation, **distributed)
        overrides.pop("data.annotations")
        overrides["data.manifest"] = [str(manifest)]
        nested: dict = {}
        for dotted, value in overrides.items():
            section, key = dotted.split(".", 1)
            nested.setdefault(section, {})[key] = value
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(nested))
        return path

    environment = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    two = subprocess.run([*launcher, "-m", "videonsa.cli", "train", str(config_file("two", 1, ddp_backend="gloo"))],
                         env=environment, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "trained 3 steps" in two.stdout

    # One process with the same global batch (2 samples per step, by accumulation) sees the same samples.
    one = subprocess.run([sys.executable, "-m", "videonsa.cli", "train", str(config_file("one", 2))],
                         env=environment, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    assert_same_weights(weights(tmp_path / "two"), weights(tmp_path / "one"), atol=2e-5)
    one_losses, two_losses = step_losses(tmp_path / "one"), step_losses(tmp_path / "two")
    for step in (1, 2, 3):
        assert two_losses[step][0] == pytest.approx(one_losses[step][0], rel=1e-4)
