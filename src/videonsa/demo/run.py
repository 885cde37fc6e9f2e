"""`videonsa demo`: generate a needle task, build a small VideoNSA from scratch, train it with `videonsa train`'s
recipe code, evaluate it with `videonsa eval`'s runner on held-out videos, and report (docs/demo.md).

Stages, each skipped when its artefacts exist, so that a stopped run picks up where it stopped:

1. videos: the training and held-out needle sets (`make_needle_set` completes a partial set) and the training
   annotations;
2. model: the from-scratch checkpoint (`DIR/initial-model`);
3. steps: with `--minutes`, a few timed training steps decide how many steps fit (recorded in `DIR/demo.json`);
4. train: `run_training` into `DIR/model` (it resumes from the last complete checkpoint by itself);
5. eval: `run_eval` on the held-out set into `DIR/eval` (it resumes from `answers.jsonl` by itself);
6. report: `DIR/loss.png`, `DIR/accuracy_by_position.png` and `DIR/summary.json`.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from videonsa.demo.model import (
    ABLATIONS,
    ATTENTION_CHOICES,
    DemoModelSpec,
    GatesOff,
    GatesOffDuringTraining,
    ablation_branches,
    write_initial_checkpoint,
)
from videonsa.demo.plots import (
    LOSS_PLOT,
    POSITION_PLOT,
    accuracy_by_position,
    plot_accuracy_by_position,
    plot_loss,
)
from videonsa.demo.task import TASK_KINDS, DemoTask, chat_texts, make_videos, write_annotations
from videonsa.demo.training import FRAME_PIXELS, DemoTraining, training_config
from videonsa.errors import UserError
from videonsa.files import atomic_write_json

logger = logging.getLogger("videonsa.demo")

SETTINGS_FILE = "demo.json"
SUMMARY_FILE = "summary.json"
TIMINGS_FILE = "timings.json"
ANNOTATIONS = "train.annotations.jsonl"
CALIBRATION_STEPS = 8  # timed steps when --minutes decides the step count (the first two are not counted)
MIN_STEPS = 20


@dataclass(frozen=True)
class DemoSettings:
    """Everything that defines a demo run. `minutes`: a training budget from which the step count is measured on
    this machine (None, the default: `training.steps` as given, the same run everywhere)."""

    attention: str = "nsa"
    ablation: str = "none"
    task: DemoTask = field(default_factory=DemoTask)
    model: DemoModelSpec = field(default_factory=DemoModelSpec)
    training: DemoTraining = field(default_factory=DemoTraining)
    minutes: float | None = None

    def validate(self) -> DemoSettings:
        if self.attention not in ATTENTION_CHOICES:
            raise UserError(f"--attention must be one of {', '.join(ATTENTION_CHOICES)}, got {self.attention!r}")
        if self.ablation not in ABLATIONS:
            raise UserError(f"--ablation must be one of {', '.join(ABLATIONS)}, got {self.ablation!r}")
        if self.task.kind not in TASK_KINDS:
            raise UserError(f"--task must be one of {', '.join(TASK_KINDS)}, got {self.task.kind!r}")
        if self.ablation != "none" and self.attention == "dense":
            raise UserError("--ablation window-only needs --attention nsa (dense attention has no NSA branches)")
        if self.minutes is not None and not (math.isfinite(self.minutes) and self.minutes > 0):
            raise UserError(f"--minutes must be a positive number, got {self.minutes}")
        if self.training.steps < 1:
            raise UserError(f"--steps must be at least 1, got {self.training.steps}")
        # The video generator's seeds are unsigned: a negative one would fail after the run folder is made.
        for seed in (self.task.seed, self.training.seed):
            if seed < 0:
                raise UserError(f"--seed must be 0 or more, got {seed}")
        return self

    def to_json(self) -> dict[str, Any]:
        return {"attention": self.attention, "ablation": self.ablation, "task": self.task.as_dict(),
                "model": self.model.as_dict(), "training": self.training.as_dict(), "minutes": self.minutes}

    @property
    def label(self) -> str:
        return "window-only" if self.ablation == "window-only" else self.attention


@dataclass(frozen=True)
class DemoResult:
    """What `run_demo` reports (also in summary.json)."""

    summary: dict[str, Any]
    out_dir: Path

    def describe(self) -> str:
        s = self.summary
        return (f"held-out accuracy {s['accuracy']:.1%} ({s['correct']}/{s['questions']}) against chance "
                f"{s['chance']:.0%}: {s['accuracy'] / s['chance']:.1f}x chance ({s['label']}, {s['steps']} steps, "
                f"{s['train_seconds']:.0f} s of training)")

    def ask_command(self) -> str:
        """A `videonsa ask` command line that puts the first held-out question to the trained model."""
        import shlex

        from videonsa.evaluation.questions import load_questions

        heldout = self.out_dir / "videos" / "heldout"
        question = load_questions(heldout).questions[0]
        return shlex.join(["videonsa", "ask", "--model", str(self.out_dir / "model"), "--video",
                           str(heldout / question.video), "--fps", str(self.summary["settings"]["task"]["fps"]),
                           "--pixels", str(FRAME_PIXELS), "--min-pixels", str(FRAME_PIXELS), question.question,
                           "--options", *question.options])


class _Stages:
    """Prints one line per stage and times it (for summary.json)."""

    def __init__(self, out_dir: Path, echo: Callable[[str], None]) -> None:
        self.path = out_dir / TIMINGS_FILE
        self.echo = echo
        self.seconds: dict[str, float] = {}
        if self.path.is_file():
            self.seconds = json.loads(self.path.read_text(encoding="utf-8"))

    def record(self, name: str, seconds: float) -> None:
        self.seconds[name] = round(self.seconds.get(name, 0.0) + seconds, 3)
        atomic_write_json(self.path, self.seconds)


class TrainingClock(TrainerCallback):
    """Adds the wall time spent training (data loading included) to `DIR/timings.json` at every checkpoint and at
    the end, so that a resumed run's `train_seconds` covers every part of it (up to the last checkpoint of a part
    that was killed)."""

    def __init__(self, stages: _Stages) -> None:
        self.stages = stages
        self.mark = time.perf_counter()

    def _flush(self) -> None:
        now = time.perf_counter()
        self.stages.record("train", now - self.mark)
        self.mark = now

    def on_train_begin(self, args, state, control, **kwargs):
        self.mark = time.perf_counter()

    def on_save(self, args, state, control, **kwargs):
        self._flush()

    def on_train_end(self, args, state, control, **kwargs):
        self._flush()


def run_demo(out_dir: str | Path, settings: DemoSettings, *, echo: Callable[[str], None] = print,
             progress: bool = True) -> DemoResult:
    """Run (or finish) the demo in `out_dir`; returns its summary. `echo` prints the stage lines."""
    settings = settings.validate()
    out_dir = Path(out_dir).expanduser()
    settings = _claim(out_dir, settings)
    stages = _Stages(out_dir, echo)
    task = settings.task

    echo(f"[1/5] videos: {task.train_videos} training and {task.heldout_videos} held-out videos, "
         f"{task.seconds} s at {task.fps} fps, {task.size[0]}x{task.size[1]}")
    started = time.perf_counter()
    videos = out_dir / "videos"
    train_set = make_videos(videos / "train", task, heldout=False, progress=_bar("training videos", progress))
    heldout_set = make_videos(videos / "heldout", task, heldout=True, progress=_bar("held-out videos", progress))
    annotations = out_dir / ANNOTATIONS
    if not annotations.is_file():
        write_annotations(train_set.questions, annotations)
    stages.record("videos", time.perf_counter() - started)

    initial = out_dir / "initial-model"
    if not initial.is_dir():
        echo(f"[2/5] model: a small VideoNSA from scratch ({settings.model.layers} layers, hidden "
             f"{settings.model.hidden_size}, attention {settings.attention})")
        write_initial_checkpoint(initial, settings.model, settings.attention, settings.training.seed,
                                 chat_texts(train_set.questions.questions[0]))
    else:
        echo("[2/5] model: from-scratch checkpoint already written")

    def config(training: DemoTraining, output: Path):
        return training_config(initial, annotations, train_set.directory, output, task, training)

    if settings.minutes is not None and "steps_measured" not in _read_settings(out_dir):
        settings = _measure_steps(out_dir, settings, config, echo)

    echo(f"[3/5] train: {settings.training.steps} steps of {settings.training.batch_size} videos "
         f"({settings.label}) with the videonsa train recipe")
    _train(out_dir, settings, config(settings.training, out_dir / "model"), stages)

    echo(f"[4/5] eval: {task.heldout_videos} held-out questions with the videonsa eval runner")
    eval_summary = _evaluate(out_dir, settings, heldout_set.questions, progress)

    echo("[5/5] report")
    summary = _report(out_dir, settings, heldout_set.questions, eval_summary, stages)
    return DemoResult(summary, out_dir)


def _claim(out_dir: Path, settings: DemoSettings) -> DemoSettings:
    """Record the settings in DIR/demo.json, or check that a run already there used the same ones (a measured step
    count is taken from the record)."""
    recorded = _read_settings(out_dir)
    wanted = json.loads(json.dumps(settings.to_json()))  # as read back from the file (tuples become lists)
    if recorded:
        steps_measured = recorded.get("steps_measured")
        mine = {key: value for key, value in recorded.items() if key != "steps_measured"}
        if steps_measured is not None:
            mine["training"] = {**mine["training"], "steps": wanted["training"]["steps"]}
        changed = sorted(key for key in wanted if mine.get(key) != wanted[key])
        if changed:
            raise UserError(f"{out_dir}: holds a demo run with other settings ({', '.join(changed)} differ); use "
                            "another --out, or delete it to start over")
        if steps_measured is not None:
            return replace(settings, training=replace(settings.training, steps=int(steps_measured)))
        return settings
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir}: exists and is not an empty folder or a demo run; choose another --out")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a parent that is a file, no permission: the user's --out
        raise UserError(f"{out_dir}: cannot create the run folder ({error.strerror or error})") from None
    atomic_write_json(out_dir / SETTINGS_FILE, wanted)
    return settings


def _read_settings(out_dir: Path) -> dict[str, Any]:
    path = out_dir / SETTINGS_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: unreadable ({error}); delete the folder to start over") from None


def _measure_steps(out_dir: Path, settings: DemoSettings, config, echo) -> DemoSettings:
    """Time a few training steps (the recipe's own, in a scratch folder) and fit the step count to --minutes."""
    from videonsa.training.trainer import run_training

    scratch = out_dir / "step-timing"
    shutil.rmtree(scratch, ignore_errors=True)
    timer = _PerStepTimer()
    probe = replace(settings.training, steps=CALIBRATION_STEPS, save_steps=10 * CALIBRATION_STEPS)
    echo(f"      timing {CALIBRATION_STEPS} training steps to fit --minutes {settings.minutes:g}")
    callbacks = [timer, *_ablation_callbacks(settings)]
    with _quiet_training():
        run_training(config(probe, scratch), resume="never", callbacks=callbacks)
    shutil.rmtree(scratch, ignore_errors=True)
    per_step = statistics.median(timer.durations[1:] or timer.durations)
    steps = max(MIN_STEPS, int(settings.minutes * 60 / per_step))
    echo(f"      {per_step:.2f} s per step: {steps} steps fit {settings.minutes:g} minutes")
    recorded = _read_settings(out_dir)
    recorded["steps_measured"] = steps
    atomic_write_json(out_dir / SETTINGS_FILE, recorded)
    return replace(settings, training=replace(settings.training, steps=steps))


class _PerStepTimer(TrainerCallback):
    """Wall time between consecutive step ends: a whole step, reading and decoding its videos included."""

    def __init__(self) -> None:
        self.durations: list[float] = []
        self._last: float | None = None

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        if self._last is not None:
            self.durations.append(now - self._last)
        self._last = now


class _quiet_training:
    """Silences the training logger and progress bar (for the timing probe)."""

    def __enter__(self):
        self.logger = logging.getLogger("videonsa")
        self.level = self.logger.level
        self.logger.setLevel(logging.WARNING)
        return self

    def __exit__(self, *exc_info):
        self.logger.setLevel(self.level)


def _ablation_callbacks(settings: DemoSettings) -> list[TrainerCallback]:
    branches = ablation_branches(settings.ablation)
    return [GatesOffDuringTraining(branches)] if branches else []


def _train(out_dir: Path, settings: DemoSettings, config, stages: _Stages) -> None:
    from videonsa.training.trainer import run_training

    outcome = run_training(config, callbacks=[TrainingClock(stages), *_ablation_callbacks(settings)])
    what = "already trained" if outcome.already_finished else "trained"
    logger.info("%s %d steps, mean loss %.4f", what, outcome.global_step, outcome.training_loss)


# The model as eval/run.json names it: the checkpoint in the run folder's model/, whatever path reaches the folder
# (the runner refuses to resume answers recorded under another model name).
EVAL_MODEL_NAME = "videonsa demo model/"


def eval_settings(task: DemoTask):
    """How the held-out questions are asked: every frame at the videos' rate, at the 28 x 28 pixels trained on."""
    from videonsa.evaluation import EvalSettings
    from videonsa.video import SamplingSettings

    frames = SamplingSettings(fps=float(task.fps), pixels_per_frame=FRAME_PIXELS, min_pixels_per_frame=FRAME_PIXELS)
    return EvalSettings(preset="planner", frames=frames, model=EVAL_MODEL_NAME, task="demo held-out")


def load_trained(model_dir: Path, settings: DemoSettings):
    """The trained model as `videonsa.load` gives it, with the ablation's gates forced off."""
    import videonsa

    model = videonsa.load(str(model_dir), attention=settings.attention, device="cpu", dtype="float32")
    branches = ablation_branches(settings.ablation)
    if branches:
        GatesOff(branches).apply(model.model)
    return model


def _evaluate(out_dir: Path, settings: DemoSettings, questions, progress: bool):
    from videonsa.evaluation import run_eval

    model_dir = out_dir / "model"
    model = load_trained(model_dir, settings)
    started = time.perf_counter()
    summary = run_eval(model, questions, out_dir / "eval", eval_settings(settings.task), progress=progress)
    return summary, time.perf_counter() - started


def _loss_history(model_dir: Path) -> tuple[list[int], list[float]]:
    """Logged training losses of the whole run (the last checkpoint's trainer state holds all of them)."""
    from videonsa.training.trainer import last_complete_checkpoint

    checkpoint = last_complete_checkpoint(model_dir)
    if checkpoint is None:
        return [], []
    history = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))["log_history"]
    logged = sorted({entry["step"]: entry["loss"] for entry in history if "loss" in entry}.items())
    return [step for step, _ in logged], [loss for _, loss in logged]


def _report(out_dir: Path, settings: DemoSettings, questions, evaluated, stages: _Stages) -> dict[str, Any]:
    from videonsa.evaluation import read_answers
    from videonsa.evaluation.runner import ANSWERS_FILE

    eval_summary, eval_seconds = evaluated
    stages.record("eval", eval_seconds)
    answers = read_answers(out_dir / "eval" / ANSWERS_FILE)
    bins = accuracy_by_position(list(questions), answers)
    label = settings.label
    steps, losses = _loss_history(out_dir / "model")
    # The loss is the mean over the reply's two tokens (letter, end of turn); guessing the letter among four
    # with a certain end of turn gives ln(4) / 2.
    plot_loss(steps, losses, math.log(4) / 2, out_dir / LOSS_PLOT,
              title=f"videonsa demo: training loss ({label}, {len(steps)} logged steps)")
    plot_accuracy_by_position(bins, eval_summary.chance, out_dir / POSITION_PLOT,
                              title=f"videonsa demo: held-out accuracy {eval_summary.accuracy:.1%} ({label})")
    summary = {
        "accuracy": eval_summary.accuracy,
        "accuracy_interval": eval_summary.accuracy_interval,
        "chance": eval_summary.chance,
        "correct": eval_summary.correct,
        "questions": eval_summary.questions,
        "attention": settings.attention,
        "ablation": settings.ablation,
        "label": label,
        "train_seconds": stages.seconds.get("train", 0.0),
        "seconds": dict(stages.seconds),
        "steps": settings.training.steps,
        "final_loss": losses[-1] if losses else None,
        "accuracy_by_position": [b.to_json() for b in bins],
        "settings": settings.to_json(),
        "files": {"checkpoint": "model", "answers": "eval/answers.jsonl", "loss_plot": LOSS_PLOT,
                  "position_plot": POSITION_PLOT, "held_out_questions": "videos/heldout/questions.jsonl"},
    }
    atomic_write_json(out_dir / SUMMARY_FILE, summary)
    return summary


def _bar(description: str, enabled: bool) -> Callable[[int, int], None] | None:
    """A `progress(done, total)` callback drawing a tqdm bar on stderr (closed when done)."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    state: dict[str, Any] = {}

    def update(done: int, total: int) -> None:
        if "bar" not in state:
            if total == 0:
                return
            state["bar"] = tqdm(total=total, desc=description, unit="video")
        bar = state["bar"]
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return update
