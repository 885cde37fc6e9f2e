"""End-to-end training on the tiny VideoNSA model: the loss falls, a crashed run resumes to the same result, two
processes (gloo) train together and match one process with the same global batch."""

from __future__ import annotations

import dataclasses
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
    assert (tmp_path / "run" / COMPLETE_MARKER).is_file()
    # ... and the inference API takes the trained model as it is.
    import videonsa

    assert videonsa.load(str(tmp_path / "run"), device="cpu") is not None


def test_video_files_train_as_videos(videonsa_checkpoint, tmp_path):
    from videonsa.video.synthetic import write_video

    lines = []
    for index in range(2):
        write_video(tmp_path / f"v{index}.mp4", frame_count=30, fps=10, width=56, height=56)  # 3 s: 12 frames
        lines.append(json.dumps({"id": f"v{index}", "video": f"v{index}.mp4", "conversations": [
            {"from": "human", "value": "<image>\nWhat moves?"}, {"from": "gpt", "value": "A square."}]}))
    annotations = tmp_path / "videos.jsonl"
    annotations.write_text("\n".join(lines) + "\n")
    manifest = tmp_path / "videos.manifest.jsonl"
    prepare_manifest(annotations, manifest, clip_filter=ClipFilter(min_frames=8, max_frames=16), workers=0,
                     progress=False)
    overrides = train_overrides(videonsa_checkpoint, annotations, tmp_path / "run", max_steps=2)
    overrides.pop("data.annotations")
    overrides.update({"data.manifest": [str(manifest)], "data.frames_as": "video"})
    outcome = run_training(load_config(None, overrides), resume="never")
    assert outcome.global_step == 2
    assert outcome.data_totals["frames_kept"] == 2 * 12


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
    straight_outcome = run_training(straight, resume="never")

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
    # The data counters continue from the checkpoint instead of restarting.
    assert outcome.data_totals == straight_outcome.data_totals == {
        "samples_skipped": 0, "samples_trimmed": 0, "frames_dropped": 0, "frames_kept": 6 * 2 * 3}


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


def test_the_trainer_loss_on_kept_logits_equals_the_models_full_loss(videonsa_checkpoint, colour_clips, tmp_path):
    from videonsa.training.annotations import Turn
    from videonsa.training.collator import VideoChatCollator
    from videonsa.training.model_setup import load_model, load_tokenizer
    from videonsa.training.pixels import patchify_frames
    from videonsa.training.trainer import VideoNSATrainer, build_dataset, training_arguments

    config = load_config(None, train_overrides(videonsa_checkpoint, colour_clips(3, frames=2), tmp_path / "o"))
    tokenizer = load_tokenizer(str(videonsa_checkpoint))
    dataset = build_dataset(config, tokenizer)
    second = dataset.entries[1]  # made longer, with two replies, so the batch needs padding
    more_turns = (*second.turns, Turn("user", "Sure?"), Turn("assistant", "yes"))
    dataset.entries[1] = dataclasses.replace(second, turns=more_turns)
    model = load_model(config.model)
    trainer = VideoNSATrainer(model=model, args=training_arguments(config), train_dataset=dataset)
    batch = VideoChatCollator(tokenizer.pad_token_id)([dataset[0], dataset[1]])

    reference = {key: value for key, value in batch.items() if key not in ("vision_frames", "data_stats")}
    reference["pixel_values"] = torch.cat([patchify_frames(clip, as_video=False)[0] for clip in batch["vision_frames"]])
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    with torch.no_grad():
        mean_loss = model(**reference).loss
        summed_loss = model(**reference, num_items_in_batch=torch.tensor(7)).loss
        loss, outputs = trainer.compute_loss(model, dict(batch), return_outputs=True)
        loss_over_7 = trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(7))
    torch.testing.assert_close(loss, mean_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_over_7, summed_loss, rtol=1e-5, atol=1e-6)
    # Logits exist only where a reply token follows, not for the whole prompt.
    assert outputs.logits.shape[1] < batch["input_ids"].shape[1] // 2
    assert outputs.logits.shape[1] >= labelled // 2
