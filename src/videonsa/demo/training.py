"""Training the demo model with `videonsa train`'s own code: a `TrainConfig` made of the shipped recipe plus the
demo's overrides, handed to `run_training` (same dataset, collator, Trainer, checkpoints and resuming).

What the demo changes in the recipe, and why (docs/demo.md):

* data: the generated annotations, every frame at the videos' 2 fps, fed as one video (as `videonsa ask` feeds
  it) at 28 x 28 pixels, one token per temporal patch;
* optimisation: a model trained from scratch needs a learning rate near 1e-3 rather than the fine-tuning 1e-6,
  batches of 8 videos, a fixed number of steps; float32 (bf16 autocast is slow on most CPUs), no gradient
  checkpointing (nothing to save at this size);
* checkpoints: every `save_steps` steps, so a stopped run resumes close to where it stopped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from videonsa.demo.task import DemoTask

FRAME_PIXELS = 28 * 28  # one token per temporal patch


@dataclass(frozen=True)
class DemoTraining:
    """The optimisation settings the demo overrides in the recipe."""

    steps: int = 500
    batch_size: int = 8
    learning_rate: float = 1e-3
    warmup: float = 0.1  # fraction of the steps
    schedule: str = "cosine"  # transformers' lr_scheduler_type (the recipe's)
    decay: float = 0.2  # with schedule "warmup_stable_decay": the fraction of the steps spent decaying
    weight_decay: float = 0.01
    save_steps: int = 20
    seed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def training_overrides(
    checkpoint: Path, annotations: Path, media_root: Path, output_dir: Path, task: DemoTask, training: DemoTraining
) -> dict[str, Any]:
    """Dotted overrides of the shipped recipe (`load_config`'s second argument) for the demo run."""
    return {
        "model.path": str(checkpoint),
        "model.dtype": "float32",
        "data.annotations": [str(annotations)],
        "data.media_root": str(media_root),
        "data.sample_fps": float(task.fps),
        "data.frames_as": "video",
        "data.min_pixels": FRAME_PIXELS,
        "data.max_pixels": FRAME_PIXELS,
        "data.max_tokens": 4096,
        "trainer.output_dir": str(output_dir),
        "trainer.learning_rate": training.learning_rate,
        "trainer.warmup_steps": training.warmup,
        "trainer.lr_scheduler_type": training.schedule,
        **_schedule_arguments(training),
        "trainer.weight_decay": training.weight_decay,
        "trainer.per_device_train_batch_size": training.batch_size,
        "trainer.gradient_accumulation_steps": 1,
        "trainer.max_steps": training.steps,
        "trainer.bf16": False,
        "trainer.gradient_checkpointing": False,
        "trainer.save_steps": training.save_steps,
        "trainer.logging_steps": max(1, training.steps // 100),  # ~100 points for the loss curve
        "trainer.seed": training.seed,
        "trainer.report_to": "none",
        "trainer.dataloader_num_workers": 0,
        "trainer.dataloader_persistent_workers": False,
    }


def _schedule_arguments(training: DemoTraining) -> dict[str, Any]:
    """Extra scheduler settings: the decay length of a warm-up, stable, decay schedule (held at the peak rate
    until the last `decay` of the steps)."""
    if training.schedule != "warmup_stable_decay":
        return {}
    return {"trainer.lr_scheduler_kwargs": {"num_decay_steps": max(1, round(training.decay * training.steps))}}


def training_config(*args: Any, **kwargs: Any):
    """The demo's `TrainConfig` (arguments as `training_overrides`), checked like any `videonsa train` config."""
    from videonsa.training.config import load_config

    return load_config(None, training_overrides(*args, **kwargs))
