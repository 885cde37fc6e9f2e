"""`videonsa train`: the Hugging Face Trainer, set up with the paper's recipe, checkpoints that survive a kill.

`run_training(config)` builds the dataset, model and `TrainingArguments` from a `TrainConfig` and trains. Every
checkpoint is a Hugging Face model folder (weights, config, tokenizer and processor files) plus the optimizer,
scheduler, RNG and trainer state; a ``videonsa-complete`` marker is written once all processes have finished
saving, and resuming picks the newest checkpoint with that marker. The final model is saved to the output folder
itself and marked the same way. The sampler is seeded and the Trainer skips
the batches already seen, so a resumed run sees the same samples in the same order with the same optimizer state.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from videonsa.errors import UserError
from videonsa.training.annotations import read_annotations
from videonsa.training.collator import VideoChatCollator
from videonsa.training.config import TrainConfig, config_file
from videonsa.training.conversation import IGNORE_INDEX
from videonsa.training.dataset import STAT_NAMES, VideoChatDataset
from videonsa.training.io import atomic_write_text
from videonsa.training.model_setup import load_model, load_tokenizer, set_trainable
from videonsa.training.pixels import patchify_frames
from videonsa.training.prepare import read_manifest

logger = logging.getLogger("videonsa.training")

COMPLETE_MARKER = "videonsa-complete"
CONFIG_COPY = "videonsa-train-config.json"
# Files a checkpoint folder needs besides what `save_pretrained` writes, so that it loads with a processor.
PROCESSOR_FILES = (
    "preprocessor_config.json",
    "video_preprocessor_config.json",
    "processor_config.json",
    "chat_template.json",
    "chat_template.jinja",
)
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] labels -> [B, T] targets: position t predicts label t + 1 (-100 after the last)."""
    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def labelled_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions (1-D, ascending) whose next token is labelled in at least one sample of the batch.

    Never empty: a batch without labels keeps its last position (whose target is -100), so the loss is 0.
    """
    positions = (next_token_targets(labels) != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    return positions if positions.numel() else positions.new_tensor([labels.shape[1] - 1])


class DataCounters(TrainerCallback):
    """Running totals of the dataset's counters (`STAT_NAMES`) on this process.

    On resume they continue from the last logged totals; those are sums over all processes already, so they are
    restored on the main process only and the others start from zero.
    """

    def __init__(self) -> None:
        self.totals = torch.zeros(len(STAT_NAMES), dtype=torch.long)

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        for entry in reversed(state.log_history):
            if all(f"data/{name}" in entry for name in STAT_NAMES):
                self.totals = torch.tensor([entry[f"data/{name}"] for name in STAT_NAMES], dtype=torch.long)
                return


class VideoNSATrainer(Trainer):
    """The stock Trainer plus three things:

    * frames arrive as uint8 and are patchified on the training device;
    * logits are computed only where a label follows (the assistant replies): at a 36K-token context the full
      [T, 152K] logits would cost 22 GB in fp32 and as many FLOPs as several decoder layers, for no gradient;
    * the dataset's counters (skipped samples, trimmed samples, dropped frames) are summed into the logs.

    The loss is the same as the model's own (sum of token cross-entropies over the whole accumulated batch,
    divided by its number of label tokens), so gradient accumulation and multi-process averaging are unchanged.
    """

    def __init__(self, *args: Any, frames_as_video: bool = False, **kwargs: Any) -> None:
        kwargs.setdefault("compute_loss_func", self.labelled_positions_loss)
        super().__init__(*args, **kwargs)
        self.frames_as_video = frames_as_video
        self.data_counters = DataCounters()
        self.add_callback(self.data_counters)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        stats = inputs.pop("data_stats", None)
        if stats is not None and model.training:
            self.data_counters.totals += stats.detach().cpu()
        frames = inputs.pop("vision_frames", None)
        if frames is not None:
            key = "pixel_values_videos" if self.frames_as_video else "pixel_values"
            inputs[key] = torch.cat([patchify_frames(clip, as_video=self.frames_as_video)[0] for clip in frames])
        if "labels" in inputs:
            inputs["logits_to_keep"] = labelled_positions(inputs["labels"])
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    def labelled_positions_loss(self, outputs, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        """Token cross-entropy of the logits kept by `compute_loss` against the tokens they predict.

        outputs.logits: [B, K, V] at the K positions of `labelled_positions(labels)`; labels: [B, T].
        Divided by `num_items_in_batch` (label tokens in the accumulated batch) as the model's own loss is.
        """
        targets = next_token_targets(labels)[:, labelled_positions(labels)]
        logits = outputs.logits.float()
        total = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1).to(logits.device),
            ignore_index=IGNORE_INDEX, reduction="sum",
        )
        if num_items_in_batch is None:  # the Trainer could not count: average here, accumulation included
            count = (targets != IGNORE_INDEX).sum().clamp(min=1).to(total.device)
            training = self.model.training and hasattr(self, "current_gradient_accumulation_steps")
            return total / count / (self.current_gradient_accumulation_steps if training else 1)
        if isinstance(num_items_in_batch, torch.Tensor):
            return total / num_items_in_batch.to(total.device).clamp(min=1)
        return total / max(num_items_in_batch, 1)

    def data_totals(self) -> dict[str, int]:
        """The counters summed over all processes (a collective call: every process must make it)."""
        totals = self.data_counters.totals.to(self.args.device)
        if self.args.world_size > 1:
            totals = self.accelerator.reduce(totals, reduction="sum")
        return dict(zip(STAT_NAMES, (int(value) for value in totals.tolist()), strict=True))

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs:  # a training-step log, reached by every process at the same step
            logs.update({f"data/{name}": value for name, value in self.data_totals().items()})
        super().log(logs, *args, **kwargs)


class CheckpointFinisher(TrainerCallback):
    """After each checkpoint is fully written by every process: add the processor files, mark it complete."""

    def __init__(self, model_source: Path) -> None:
        self.model_source = model_source

    def on_save(self, args, state, control, **kwargs):
        from accelerate import PartialState

        PartialState().wait_for_everyone()
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                finish_checkpoint(folder, self.model_source)
        PartialState().wait_for_everyone()


def finish_checkpoint(folder: Path, model_source: Path) -> None:
    """Copy processor files the model folder lacks from `model_source`, then write the completion marker."""
    copy_processor_files(folder, model_source)
    atomic_write_text(folder / COMPLETE_MARKER, "complete\n")


def copy_processor_files(folder: Path, model_source: Path) -> None:
    """Copy the image/video processor and chat template files of `model_source` that `folder` lacks."""
    for name in PROCESSOR_FILES:
        source = model_source / name
        if source.is_file() and not (folder / name).exists():
            shutil.copyfile(source, folder / name)


def last_complete_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest ``checkpoint-N`` folder under `output_dir` that carries the completion marker."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    found = []
    for child in output_dir.iterdir():
        match = _CHECKPOINT_NAME.match(child.name)
        if match and child.is_dir():
            if (child / COMPLETE_MARKER).is_file():
                found.append((int(match.group(1)), child))
            else:
                logger.warning("ignoring incomplete checkpoint %s (the run stopped while saving it)", child)
    return max(found)[1] if found else None


def training_arguments(config: TrainConfig) -> TrainingArguments:
    """`TrainingArguments` from `config.trainer` plus what this pipeline needs and the chosen strategy."""
    settings = dict(config.trainer)
    settings["remove_unused_columns"] = False  # the collator's keys are not the model's signature
    settings["label_names"] = ["labels"]
    settings.setdefault("gradient_checkpointing_kwargs", {"use_reentrant": False})
    _use_current_checkpointing_names(settings)
    if not settings.get("dataloader_num_workers"):
        settings["dataloader_persistent_workers"] = False
    if not torch.cuda.is_available() and not settings.get("use_cpu"):
        settings["use_cpu"] = True  # CPU runs (tests, trials) need this for bf16 autocast and gloo
    settings.update(_strategy_settings(config.strategy))
    try:
        return TrainingArguments(**settings)
    except (ValueError, TypeError, ImportError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"trainer settings in {config.source}: {message}") from None


def _use_current_checkpointing_names(settings: dict[str, Any]) -> None:
    """transformers renamed gradient_checkpointing* to activation_checkpointing* (old names still accepted, with a
    warning); use whichever the installed version calls its primary field."""
    fields = {field.name for field in dataclasses.fields(TrainingArguments)}
    if "activation_checkpointing" not in fields:
        return
    for old, new in (("gradient_checkpointing", "activation_checkpointing"),
                     ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")):
        if old in settings:
            settings.setdefault(new, settings.pop(old))


def _strategy_settings(strategy: str) -> dict[str, Any]:
    """TrainingArguments for a strategy: ``auto`` and ``ddp`` add nothing (what the launcher set up, or plain
    data parallelism), ``fsdp2`` shards every decoder layer and vision block, the rest name DeepSpeed configs."""
    if strategy in ("auto", "ddp"):
        return {}
    if strategy == "fsdp2":
        return {
            "fsdp": "full_shard auto_wrap",
            "fsdp_config": {"version": 2, "reshard_after_forward": True, "state_dict_type": "FULL_STATE_DICT",
                            "cpu_ram_efficient_loading": False},
        }
    if importlib.util.find_spec("deepspeed") is None:
        raise UserError(f"strategy {strategy} needs DeepSpeed: pip install 'videonsa[train]'")
    if strategy in ("zero2", "zero3"):
        return {"deepspeed": str(config_file(f"deepspeed_{strategy}.json"))}
    path = Path(strategy).expanduser()
    if not path.is_file():
        raise UserError(f"strategy: DeepSpeed config {path} does not exist")
    return {"deepspeed": str(path)}


@dataclass(frozen=True)
class TrainingOutcome:
    """What a finished run produced."""

    output_dir: Path
    global_step: int
    training_loss: float
    resumed_from: Path | None
    data_totals: dict[str, int]


def build_dataset(config: TrainConfig, tokenizer: Any) -> VideoChatDataset:
    """The training dataset from the manifest(s), or from raw annotations."""
    data = config.data
    if data.manifest:
        entries = [entry for path in data.manifest for entry in read_manifest(path)]
    else:
        annotation_set = read_annotations(data.annotations, data.media_root)
        for rejected in annotation_set.rejected:
            logger.warning("skipping record %s (%s): %s", rejected.id, rejected.origin, rejected.detail)
        entries = annotation_set.samples
    return VideoChatDataset(entries, tokenizer, data)


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """``auto``: the last complete checkpoint if any; ``never``: none; else the given checkpoint folder."""
    if resume == "never":
        return None
    if resume == "auto":
        return last_complete_checkpoint(output_dir)
    path = Path(resume).expanduser()
    if not (path / "trainer_state.json").is_file():
        raise UserError(f"--resume {path} is not a checkpoint folder (no trainer_state.json)")
    return path


def run_training(
    config: TrainConfig, *, resume: str = "auto", callbacks: list[TrainerCallback] | None = None
) -> TrainingOutcome:
    """Train as `config` says; `resume` is ``auto``, ``never`` or a checkpoint folder."""
    config.validate()
    # TrainingArguments first: with DeepSpeed ZeRO-3 it must exist before the model is built.
    args = training_arguments(config)
    model_source = Path(config.model.path).expanduser()
    tokenizer = load_tokenizer(config.model.tokenizer or config.model.path)
    dataset = build_dataset(config, tokenizer)
    model = load_model(config.model)
    for config_part in (model.config, getattr(model.config, "text_config", None)):
        if config_part is not None:
            config_part.use_cache = False  # no KV cache in training (and none with gradient checkpointing)
    set_trainable(model, config.trainable)
    resumed_from = resolve_resume(resume, args.output_dir)
    if args.process_index == 0:
        atomic_write_text(Path(args.output_dir) / CONFIG_COPY, json.dumps(config.to_dict(), indent=2) + "\n")

    trainer = VideoNSATrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=VideoChatCollator(pad_token_id=tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[CheckpointFinisher(model_source), *(callbacks or [])],
        frames_as_video=config.data.frames_as == "video",
    )
    if resumed_from is not None:
        logger.info("resuming from %s", resumed_from)
    result = trainer.train(resume_from_checkpoint=str(resumed_from) if resumed_from else None)
    # The final model also goes to output_dir itself, marked complete only once fully written.
    if trainer.is_world_process_zero():
        (Path(args.output_dir) / COMPLETE_MARKER).unlink(missing_ok=True)
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        finish_checkpoint(Path(args.output_dir), model_source)
    totals = trainer.data_totals()
    return TrainingOutcome(Path(args.output_dir), result.global_step, float(result.training_loss), resumed_from,
                           totals)
