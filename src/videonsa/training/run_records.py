"""What a training run records about itself, and the checks made with it before a rerun trains anything.

Files in the output folder (see docs/training.md):

* ``videonsa-train-config.json``: the config the run was started with. Written once, never overwritten by a
  resume. Every checkpoint carries a copy of the config it was trained with.
* ``videonsa-train-config.step-N.json``: a config whose differences were accepted (``--accept-config-changes``)
  when the run was resumed from step N.
* ``videonsa-train-result.json``: written with the final model: steps, the mean loss over the whole run, the data
  counters and the config. A rerun whose config asks for no more steps reports it and trains nothing.

A resume compares the config with the record of the checkpoint it resumes. Settings that only change logging,
saving or data loading speed are free to change (`FREE_TO_CHANGE`); any other difference is refused unless
accepted, and a few can never be accepted because the optimizer state would not fit (`NEVER_ACCEPTED`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from videonsa.errors import UserError
from videonsa.files import atomic_write_json
from videonsa.training.config import TrainConfig

CONFIG_RECORD = "videonsa-train-config.json"
RESULT_RECORD = "videonsa-train-result.json"
ACCEPT_FLAG = "--accept-config-changes"

# Changing these does not change what the model learns, only how it is logged, saved or fed (or, for
# model.fresh_gates, whether the starting checkpoint may load at all: a resume takes every weight, gates included,
# from the checkpoint it resumes).
FREE_TO_CHANGE = frozenset({
    "model.fresh_gates",
    "trainer.output_dir", "trainer.logging_dir", "trainer.logging_steps", "trainer.logging_first_step",
    "trainer.logging_strategy", "trainer.report_to", "trainer.run_name", "trainer.disable_tqdm",
    "trainer.save_steps", "trainer.save_total_limit", "trainer.save_strategy",
    "trainer.dataloader_num_workers", "trainer.dataloader_persistent_workers", "trainer.dataloader_prefetch_factor",
    "trainer.dataloader_pin_memory", "data.max_consecutive_skips",
})
# The optimizer state of a checkpoint holds one entry per trained parameter, laid out for one strategy: it cannot
# be loaded into a model that trains other parts, has another architecture, or uses another strategy.
NEVER_ACCEPTED_PREFIXES = ("trainable.", "strategy", "model.architecture")


@dataclass(frozen=True)
class Difference:
    """One setting whose value differs between the recorded config and the current one."""

    name: str
    recorded: Any
    current: Any

    def describe(self) -> str:
        return f"{self.name} {_short(self.recorded)} -> {_short(self.current)}"


def differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[Difference]:
    """Settings (dotted names) whose values differ, apart from those in `FREE_TO_CHANGE`."""
    old, new = _flatten(recorded), _flatten(current)
    found = []
    for name in sorted(old.keys() | new.keys()):
        if name in FREE_TO_CHANGE or old.get(name) == new.get(name):
            continue
        found.append(Difference(name, old.get(name), new.get(name)))
    return found


def check_resume(config: TrainConfig, checkpoint: Path, output_dir: Path, accept_changes: bool) -> list[Difference]:
    """Compare `config` with the record of the run `checkpoint` belongs to; raise `UserError` (one line listing
    the differences) unless there are none or they are accepted. Returns the accepted differences."""
    record_path = checkpoint / CONFIG_RECORD
    if not record_path.is_file():
        record_path = output_dir / CONFIG_RECORD
    if not record_path.is_file():
        return []  # a checkpoint from elsewhere, without a record: nothing to compare with
    recorded = read_json(record_path)
    found = differences(recorded, config.to_dict())
    if not found:
        return []
    listed = ", ".join(difference.describe() for difference in found)
    fixed = [difference for difference in found if difference.name.startswith(NEVER_ACCEPTED_PREFIXES)]
    if fixed:
        names = ", ".join(difference.describe() for difference in fixed)
        raise UserError(f"cannot resume {checkpoint} with a different {names}: its optimizer state does not fit; "
                        f"to go on from its weights, start a new run with --set model.path={checkpoint} and another "
                        "--output-dir")
    if not accept_changes:
        raise UserError(f"the config differs from the one {checkpoint} was trained with ({record_path}): {listed}; "
                        f"pass {ACCEPT_FLAG} to resume with these changes, or use another --output-dir")
    return found


def write_start_record(config: TrainConfig, output_dir: Path, resumed_step: int | None,
                       accepted: list[Difference]) -> Path:
    """Record the config a run starts (or resumes with accepted changes) with; the original is never replaced.
    Returns the record that describes the config now in use."""
    original = output_dir / CONFIG_RECORD
    if resumed_step is None or not original.is_file():
        atomic_write_json(original, config.to_dict())
        return original
    if not accepted:
        return original
    changed = output_dir / f"videonsa-train-config.step-{resumed_step}.json"
    atomic_write_json(changed, config.to_dict())
    return changed


@dataclass(frozen=True)
class RunProgress:
    """Where a run stands: the steps done and the target it was computed for."""

    global_step: int
    max_steps: int
    num_train_epochs: float

    @classmethod
    def of_state(cls, state: dict[str, Any]) -> RunProgress:
        return cls(int(state["global_step"]), int(state["max_steps"]), float(state["num_train_epochs"]))

    def reached(self, trainer_settings: dict[str, Any]) -> bool:
        """Whether the steps done meet what `trainer_settings` ask for (max_steps, else num_train_epochs: the
        recorded step count is the same only if the number of epochs is, which the caller has checked in the
        config records, since the Trainer records a fraction of an epoch rounded up: 1.5 epochs as 2)."""
        max_steps = int(trainer_settings.get("max_steps") or -1)
        if max_steps > 0:
            return self.global_step >= max_steps
        epochs = float(trainer_settings.get("num_train_epochs", 3.0))
        return math.ceil(epochs) == self.num_train_epochs and self.global_step >= self.max_steps > 0


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    return read_json(checkpoint / "trainer_state.json")


def mean_loss(log_history: list[dict[str, Any]]) -> tuple[float, int]:
    """(mean training loss per step, steps covered) over the whole run, from the Trainer's logged losses.

    Each logged ``loss`` is the mean over the steps since the previous log (checkpoints are always logged, so a
    resumed run's logs cover every step); weighting by those spans gives the mean over all steps.
    """
    logged = sorted({entry["step"]: entry["loss"] for entry in log_history if "loss" in entry}.items())
    total, previous = 0.0, 0
    for step, loss in logged:
        total += loss * (step - previous)
        previous = step
    return (total / previous if previous else math.nan), previous


def write_result(output_dir: Path, config: TrainConfig, progress: RunProgress, loss: float,
                 data_totals: dict[str, int]) -> None:
    atomic_write_json(output_dir / RESULT_RECORD, {
        "global_step": progress.global_step, "max_steps": progress.max_steps,
        "num_train_epochs": progress.num_train_epochs, "training_loss": loss, "data_totals": data_totals,
        "config": config.to_dict(),
    })


@dataclass(frozen=True)
class FinishedRun:
    """A finished run found in the output folder."""

    progress: RunProgress
    training_loss: float
    data_totals: dict[str, int]


def finished_run(config: TrainConfig, output_dir: Path, complete_marker: str) -> FinishedRun | None:
    """The finished run in `output_dir` if its final model is complete and `config` asks for nothing more.

    Raises `UserError` when the run there was made with a different config, so that it is not silently
    trained over from the start.
    """
    result_path = output_dir / RESULT_RECORD
    if not (result_path.is_file() and (output_dir / complete_marker).is_file()):
        return None
    result = read_json(result_path)
    progress = RunProgress.of_state(result)
    found = differences(result["config"], config.to_dict())
    if found:
        return None  # the resume check (against the last checkpoint) reports them
    if not progress.reached(config.trainer):
        return None
    return FinishedRun(progress, float(result["training_loss"]), dict(result.get("data_totals") or {}))


def refuse_different_finished_run(config: TrainConfig, output_dir: Path) -> None:
    """Without a checkpoint to resume, a finished run made with another config would be trained over: refuse."""
    result_path = output_dir / RESULT_RECORD
    if not result_path.is_file():
        return
    found = differences(read_json(result_path)["config"], config.to_dict())
    if found:
        listed = ", ".join(difference.describe() for difference in found)
        raise UserError(f"{output_dir} holds a finished run made with a different config ({listed}) and no "
                        "checkpoint to resume; use another --output-dir, or --resume never to train there from the "
                        "start")


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"cannot read {path}: {error}") from None


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):  # an empty mapping (model.sparse: {}) has no settings to compare
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}{key}" if not prefix else f"{prefix}.{key}"))
        return flat
    return {prefix: value}


def _short(value: Any, limit: int = 50) -> str:
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
