"""`videonsa train`: the Hugging Face Trainer, set up with the paper's recipe, checkpoints that survive a kill.

`run_training(config)` builds the dataset, model and `TrainingArguments` from a `TrainConfig` and trains. Every
checkpoint is a Hugging Face model folder (weights, config, tokenizer and processor files) plus the optimizer,
scheduler, RNG and trainer state; a ``videonsa-complete`` marker is written once all processes have finished
saving, and resuming picks the newest checkpoint with that marker. The final model is saved to the output folder
itself and marked the same way. The sampler is seeded and the Trainer skips
the batches already seen, so a resumed run sees the same samples in the same order with the same optimizer state.

Before anything is loaded, a rerun is checked against what the run recorded (`run_records`): a finished run is
reported and left alone, and a resume with a changed config is refused unless the changes are accepted.
Training logs one readable line per logged step (`log_lines`). See docs/training.md.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerCallback, TrainingArguments

from videonsa.errors import UserError, first_line
from videonsa.files import apply_umask_modes, atomic_write_json, atomic_write_text
from videonsa.training.annotations import read_annotations
from videonsa.training.collator import VideoChatCollator
from videonsa.training.config import TrainConfig, config_file
from videonsa.training.conversation import IGNORE_INDEX
from videonsa.training.dataset import STAT_NAMES, VideoChatDataset
from videonsa.training.log_lines import TrainingLog
from videonsa.training.model_setup import checkpoint_folder, load_model, load_tokenizer, set_trainable
from videonsa.training.pixels import patchify_frames
from videonsa.training.prepare import read_manifest
from videonsa.training.run_records import (
    CONFIG_RECORD,
    RESULT_RECORD,
    FinishedRun,
    RunProgress,
    check_resume,
    finished_run,
    mean_loss,
    read_trainer_state,
    refuse_different_finished_run,
    write_result,
    write_start_record,
)

logger = logging.getLogger("videonsa.training")

COMPLETE_MARKER = "videonsa-complete"
CONFIG_COPY = CONFIG_RECORD
# `logging_steps: auto`: log every step of a short run, at least ten times a run, at most every AUTO_LOG_EVERY steps.
AUTO_LOG_EVERY = 10
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
    """After each checkpoint is fully written by every process: add the processor files and the config it was
    trained with (what a resume compares against), then mark it complete."""

    def __init__(self, model_source: Path, config_record: dict[str, Any]) -> None:
        self.model_source = model_source
        self.config_record = config_record

    def on_save(self, args, state, control, **kwargs):
        from accelerate import PartialState

        PartialState().wait_for_everyone()
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                atomic_write_json(folder / CONFIG_RECORD, self.config_record)
                finish_checkpoint(folder, self.model_source)
        PartialState().wait_for_everyone()


class LogSchedule(TrainerCallback):
    """When losses are logged: ``logging_steps: auto`` picks an interval that suits the run's length, and the
    steps that save a checkpoint and the last step are always logged, so the logs cover every step of a run,
    resumed or not (the mean loss over the whole run is computed from them)."""

    def __init__(self, auto_interval: bool) -> None:
        self.auto_interval = auto_interval

    def on_train_begin(self, args, state, control, **kwargs):
        if self.auto_interval:
            state.logging_steps = max(1, min(AUTO_LOG_EVERY, state.max_steps // 10))

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save or state.global_step >= state.max_steps:
            control.should_log = True


class CurrentLearningRate(TrainerCallback):
    """A resume restores the scheduler's saved state, base learning rate included; when the config's
    ``learning_rate`` was changed (and the change accepted), the schedule continues from the new rate."""

    def on_train_begin(self, args, state, control, optimizer=None, lr_scheduler=None, **kwargs):
        if optimizer is None or not isinstance(lr_scheduler, torch.optim.lr_scheduler.LambdaLR):
            return
        if all(math.isclose(rate, args.learning_rate) for rate in lr_scheduler.base_lrs):
            return
        lr_scheduler.base_lrs = [args.learning_rate] * len(lr_scheduler.base_lrs)
        rates = [args.learning_rate * factor(lr_scheduler.last_epoch) for factor in lr_scheduler.lr_lambdas]
        for group, rate in zip(optimizer.param_groups, rates, strict=True):
            group["initial_lr"], group["lr"] = args.learning_rate, rate
        lr_scheduler._last_lr = rates


def finish_checkpoint(folder: Path, model_source: Path) -> None:
    """Copy processor files the model folder lacks from `model_source`, then write the completion marker."""
    copy_processor_files(folder, model_source)
    apply_umask_modes(folder)  # save_pretrained's safetensors files are 0600 (docs/model-files.md)
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
    if settings.get("logging_steps") == "auto":
        settings["logging_steps"] = AUTO_LOG_EVERY  # the run's own interval is set by `LogSchedule`
    if settings.get("dataloader_num_workers") == "auto":
        settings["dataloader_num_workers"] = default_dataloader_workers()
    if settings.get("report_to") == "auto":
        settings["report_to"] = available_reporters()
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
        message = first_line(error)
        raise UserError(f"trainer settings in {config.source}: {message}") from None


def default_dataloader_workers(cpus: int | None = None, processes: int | None = None) -> int:
    """``dataloader_num_workers: auto``: worker processes per training process that fit the machine.

    Frames are decoded in the workers, so more help until the cores run out; the training process needs a core
    of its own. With two cores or fewer per process the main process decodes (0 workers): a worker would only
    compete with it. Otherwise one core less than each process's share, at most 4.
    """
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if processes is None:
        processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    per_process = cpus // max(processes, 1)
    return 0 if per_process <= 2 else min(4, per_process - 1)


def available_reporters() -> list[str] | str:
    """``report_to: auto``: TensorBoard when it is installed (logs under ``output_dir/runs``), else nothing."""
    from transformers.integrations import is_tensorboard_available

    return ["tensorboard"] if is_tensorboard_available() else "none"


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
    training_loss: float  # mean loss per step over the whole run, resumed parts included
    resumed_from: Path | None
    data_totals: dict[str, int]
    already_finished: bool = False  # nothing was trained: the run in output_dir had finished


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
    config: TrainConfig,
    *,
    resume: str = "auto",
    callbacks: list[TrainerCallback] | None = None,
    accept_config_changes: bool = False,
) -> TrainingOutcome:
    """Train as `config` says; `resume` is ``auto``, ``never`` or a checkpoint folder.

    With ``auto``, a finished run in the output folder (same config, target reached) is reported without
    training; a checkpoint already at the final step gives the final model without training either. Resuming
    with a config that differs from the checkpoint's record raises `UserError` unless `accept_config_changes`.
    """
    config.validate()
    # TrainingArguments first: with DeepSpeed ZeRO-3 it must exist before the model is built.
    args = training_arguments(config)
    output_dir = Path(args.output_dir)
    model_source = Path(config.model.path).expanduser()
    resumed_from = resolve_resume(resume, output_dir)
    if resume == "auto":
        finished = finished_run(config, output_dir, COMPLETE_MARKER)
        if finished is not None:
            logger.info("the run in %s finished at step %d", output_dir, finished.progress.global_step)
            return _finished_outcome(output_dir, finished)
    accepted = []
    if resumed_from is not None:
        accepted = check_resume(config, resumed_from, output_dir, accept_config_changes)
        state = read_trainer_state(resumed_from)
        # An accepted change of num_train_epochs moves the target past what the checkpoint's state records.
        epochs_changed = any(difference.name == "trainer.num_train_epochs" for difference in accepted)
        if not epochs_changed and RunProgress.of_state(state).reached(config.trainer):
            return _finish_from_checkpoint(config, args, resumed_from, state)
    elif resume == "auto":
        refuse_different_finished_run(config, output_dir)

    checkpoint_folder(config.model.path)  # before the tokenizer, which would take a missing folder for a Hub id
    tokenizer = load_tokenizer(config.model.tokenizer or config.model.path)
    dataset = build_dataset(config, tokenizer)
    model = load_model(config.model)
    for config_part in (model.config, getattr(model.config, "text_config", None)):
        if config_part is not None:
            config_part.use_cache = False  # no KV cache in training (and none with gradient checkpointing)
    set_trainable(model, config.trainable)
    if args.process_index == 0:
        resumed_step = int(read_trainer_state(resumed_from)["global_step"]) if resumed_from else None
        write_start_record(config, output_dir, resumed_step, accepted)
        _forget_final_model(output_dir)
        _forget_later_checkpoints(output_dir, resumed_step or 0)

    trainer = VideoNSATrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=VideoChatCollator(pad_token_id=tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[CheckpointFinisher(model_source, config.to_dict()),
                   LogSchedule(auto_interval=config.trainer.get("logging_steps") == "auto"),
                   CurrentLearningRate(), *(callbacks or [])],
        frames_as_video=config.data.frames_as == "video",
    )
    _use_readable_log_lines(trainer)
    if resumed_from is not None:
        logger.info("resuming from %s", resumed_from)
    try:
        result = trainer.train(resume_from_checkpoint=str(resumed_from) if resumed_from else None)
    except UserError as error:
        raise worker_error_line(error) from None
    # The final model also goes to output_dir itself, marked complete only once fully written.
    trainer.save_model(args.output_dir)
    totals = trainer.data_totals()
    loss, _ = mean_loss(trainer.state.log_history)
    if trainer.is_world_process_zero():
        finish_checkpoint(output_dir, model_source)
        progress = RunProgress(result.global_step, trainer.state.max_steps, trainer.state.num_train_epochs)
        write_result(output_dir, config, progress, loss, totals)
    return TrainingOutcome(output_dir, result.global_step, loss, resumed_from, totals)


def worker_error_line(error: UserError) -> UserError:
    """The one-line `UserError` a dataloader worker raised (e.g. every sample in a row unreadable).

    torch re-raises a worker's exception in the training process as the same type built from a message that
    holds the worker's whole traceback; its last line is ``videonsa.errors.UserError: <the message>``.
    """
    text = str(error).rstrip()
    if not text.startswith("Caught UserError in DataLoader worker"):
        return error
    return UserError(text.splitlines()[-1].partition("UserError: ")[2] or text.splitlines()[0])


def _use_readable_log_lines(trainer: Trainer) -> None:
    """Replace the Trainer's printing of raw log dicts by `TrainingLog`'s lines (progress bar kept if enabled)."""
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(TrainingLog(progress_bar=not trainer.args.disable_tqdm))


def _forget_final_model(output_dir: Path) -> None:
    """Training starts or goes on: the final model (if any) no longer is one, until this run writes its own."""
    (output_dir / COMPLETE_MARKER).unlink(missing_ok=True)
    (output_dir / RESULT_RECORD).unlink(missing_ok=True)


def _forget_later_checkpoints(output_dir: Path, step: int) -> None:
    """Unmark the checkpoints past `step`, where training starts: they belong to an abandoned run (`--resume
    never`, or an earlier checkpoint resumed), so `--resume auto` must never take them, and the Trainer saving
    over one must not leave a marked folder of mixed files if it is killed meanwhile."""
    if not output_dir.is_dir():
        return
    for child in output_dir.iterdir():
        match = _CHECKPOINT_NAME.match(child.name)
        if match and int(match.group(1)) > step and child.is_dir():
            (child / COMPLETE_MARKER).unlink(missing_ok=True)


def _finished_outcome(output_dir: Path, finished: FinishedRun) -> TrainingOutcome:
    return TrainingOutcome(output_dir, finished.progress.global_step, finished.training_loss, None,
                           finished.data_totals, already_finished=True)


def _finish_from_checkpoint(config: TrainConfig, args: TrainingArguments, checkpoint: Path,
                            state: dict[str, Any]) -> TrainingOutcome:
    """The last checkpoint is at the run's final step but the final model was not written (the run stopped
    while saving it): write it from that checkpoint rather than train past the end."""
    output_dir = Path(args.output_dir)
    progress = RunProgress.of_state(state)
    loss, _ = mean_loss(state["log_history"])
    totals = _logged_data_totals(state["log_history"])
    if args.process_index == 0:
        logger.info("%s is at the final step %d: writing the final model from it", checkpoint, progress.global_step)
        _forget_final_model(output_dir)
        model = load_model(config.model.model_copy(update={"path": str(checkpoint)}))
        model.save_pretrained(output_dir)
        load_tokenizer(str(checkpoint)).save_pretrained(output_dir)
        finish_checkpoint(output_dir, Path(config.model.path).expanduser())
        write_result(output_dir, config, progress, loss, totals)
    return TrainingOutcome(output_dir, progress.global_step, loss, checkpoint, totals, already_finished=True)


def _logged_data_totals(log_history: list[dict[str, Any]]) -> dict[str, int]:
    for entry in reversed(log_history):
        if all(f"data/{name}" in entry for name in STAT_NAMES):
            return {name: int(entry[f"data/{name}"]) for name in STAT_NAMES}
    return dict.fromkeys(STAT_NAMES, 0)
