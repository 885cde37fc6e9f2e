"""One readable line per training log: ``step 30/500  epoch 0.06  loss 1.2345  lr 9.8e-07  grad norm 0.41 ...``.

Replaces the Trainer's printing of raw log dicts (numbers formatted as strings). Lines go to the
``videonsa.training`` logger (which `videonsa train` shows), or above the progress bar when one is drawn.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import ProgressCallback

logger = logging.getLogger("videonsa.training")

# Keys shown as "name value" in this order (the dataset's counters are shown separately); others follow.
_KNOWN = (("loss", "loss", "{:.4f}"), ("learning_rate", "lr", "{:.3g}"), ("grad_norm", "grad norm", "{:.3g}"))
_HIDDEN = {"epoch", "total_flos", "step"}


def describe_log(logs: dict[str, Any], global_step: int, max_steps: int) -> str:
    """The line for one Trainer log entry (a training step's, the end-of-training summary, or any other)."""
    if "train_runtime" in logs:
        return (f"training took {logs['train_runtime']:.1f}s, "
                f"{logs.get('train_samples_per_second', 0.0):.3g} samples/s, "
                f"{logs.get('train_steps_per_second', 0.0):.3g} steps/s")
    parts = [f"step {global_step}/{max_steps}"]
    if isinstance(logs.get("epoch"), (int, float)):
        parts.append(f"epoch {logs['epoch']:.2f}")
    for key, label, form in _KNOWN:
        if isinstance(logs.get(key), (int, float)):
            parts.append(f"{label} {form.format(logs[key])}")
    data = _data_counters(logs)
    if data:
        parts.append(data)
    known = {key for key, _, _ in _KNOWN} | _HIDDEN
    for key, value in logs.items():
        if key not in known and not key.startswith("data/") and not key.startswith("train_"):
            parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return "  ".join(parts)


def _data_counters(logs: dict[str, Any]) -> str:
    """``frames 1,234`` plus whichever of dropped frames, trimmed and skipped samples is not zero."""
    if "data/frames_kept" not in logs:
        return ""
    text = f"frames {int(logs['data/frames_kept']):,}"
    for key, label in (("frames_dropped", "dropped"), ("samples_trimmed", "samples trimmed"),
                       ("samples_skipped", "samples skipped")):
        count = int(logs.get(f"data/{key}", 0))
        if count:
            text += f", {label} {count:,}"
    return text


class TrainingLog(ProgressCallback):
    """Readable log lines on the main process, with the Trainer's progress bar when `progress_bar` is on."""

    def __init__(self, progress_bar: bool) -> None:
        super().__init__()
        self.progress_bar = progress_bar

    def on_train_begin(self, args, state, control, **kwargs):
        self.current_step = state.global_step
        if self.progress_bar and state.is_world_process_zero:
            super().on_train_begin(args, state, control, **kwargs)
            self.training_bar.update(state.global_step)  # a resumed run starts where it stopped
            self.current_step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            super().on_step_end(args, state, control, **kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        line = describe_log(logs, state.global_step, state.max_steps)
        if self.training_bar is not None:
            self.training_bar.write(line)
        else:
            logger.info("%s", line)

    def on_train_end(self, args, state, control, **kwargs):
        if self.training_bar is not None:
            super().on_train_end(args, state, control, **kwargs)
