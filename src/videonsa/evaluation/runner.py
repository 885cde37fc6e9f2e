"""Run a multiple-choice question set with a loaded model, resumably, and score it.

Each answered question becomes one line of `answers.jsonl`, written and flushed to disk (fsync) before the
next question starts, so a killed run loses at most the question it was on. A rerun into the same directory
skips the ids already answered; a line cut short by a kill is dropped and its question asked again. The
directory's `run.json` records the model and settings of the first run, and a rerun with other settings is
refused (their answers would not be comparable). When every question is answered, `summary.json` and
`accuracy_by_length.png` are written (see report.py).

>>> model = videonsa.load("Enxin/VideoNSA", attention="nsa")
>>> summary = run_eval(model, load_questions("needles"), "results/nsa", EvalSettings(model="Enxin/VideoNSA"))
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from videonsa.errors import UserError, first_line
from videonsa.evaluation.questions import Question, QuestionSet
from videonsa.evaluation.report import Summary, latest_answers, summarize, write_report
from videonsa.files import atomic_write_text, jsonl_lines

ANSWERS_FILE = "answers.jsonl"
RUN_FILE = "run.json"
LOCK_FILE = ".lock"
AnswerCallback = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class EvalSettings:
    """How every question is asked.

    preset: "auto" (paper for official attention, else planner), "planner" or "paper" (see `VideoQA.ask`).
    frames: `SamplingSettings` for the planner or `PaperSettings` for the paper preset; None for the defaults.
    block_counts / window_size: the sparse budget set on the model before the run (None: keep the model's).
    model / task: names recorded in run.json and the summary.
    """

    preset: str = "auto"
    frames: Any = None
    generation: Any = None
    backend: str = "pyav"
    block_counts: int | None = None
    window_size: int | None = None
    model: str = ""
    task: str = ""


def _as_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {key: _as_json(item) for key, item in dataclasses.asdict(value).items()}
    if isinstance(value, (list, tuple)):
        return [_as_json(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _as_json(item) for key, item in value.items()}
    return value


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resolved_settings(model, settings: EvalSettings) -> EvalSettings:
    """`settings` with the preset resolved for the model's attention mode and defaults filled in."""
    from videonsa.inference.generation import GenerationSettings
    from videonsa.video import SamplingSettings
    from videonsa.video.paper import PaperSettings, resolve_preset

    preset = resolve_preset(settings.preset, model.attention)
    frames = settings.frames or (PaperSettings() if preset == "paper" else SamplingSettings())
    if not isinstance(frames, PaperSettings if preset == "paper" else SamplingSettings):
        raise UserError(
            f"the {preset} preset takes {'PaperSettings' if preset == 'paper' else 'SamplingSettings'} "
            f"as frames, got {type(frames).__name__}"
        )
    generation = settings.generation or GenerationSettings()
    return dataclasses.replace(settings, preset=preset, frames=frames.validate(), generation=generation.validate())


def run_record(model, questions: QuestionSet, settings: EvalSettings) -> dict[str, Any]:
    """What identifies a run: model, attention, preset, frame and generation settings, sparse budget, question
    file (SHA-256; its path is recorded too). Two runs into one directory must agree on all of it but the path.
    `settings` are resolved."""
    sparse = getattr(model.model, "sparse_settings", None)
    return {
        "model": settings.model or model.files.name,
        "attention": model.attention,
        "preset": settings.preset,
        "frames": _as_json(settings.frames),
        "generation": _as_json(settings.generation),
        "backend": settings.backend,
        "sparsity": _as_json(sparse) if sparse is not None else None,
        "task": settings.task,
        "questions_file": str(questions.path.resolve()),
        "questions_sha256": _file_digest(questions.path),
    }


def _claim_run(out_dir: Path, record: Mapping[str, Any]) -> None:
    """Write run.json, or check that the one there describes the same run."""
    path = out_dir / RUN_FILE
    if path.is_file():
        try:
            existing = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise UserError(f"{path}: unreadable ({error}); delete it or use another --out") from None
        # The question file is known by its contents: a set moved to another folder still resumes.
        keys = (set(existing) | set(record)) - {"questions_file"}
        changed = sorted(key for key in keys if existing.get(key) != record.get(key))
        if changed:
            raise UserError(
                f"{out_dir}: holds answers of a run with other settings ({', '.join(changed)} differ); "
                "use another --out, or delete the directory to start over"
            )
        return
    atomic_write_text(path, json.dumps(record, indent=2) + "\n")


def read_answers(path: str | os.PathLike, *, repair: bool = False) -> list[dict[str, Any]]:
    """The records of an answers file (none if it does not exist); `path` a str or a path.

    A last line without its newline is what a killed run leaves: with `repair` it is cut off the file (its
    question will be asked again), else ignored. A malformed line elsewhere raises `UserError` naming it.
    """
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    complete_end = data.rfind(b"\n") + 1
    if complete_end < len(data) and repair:
        with path.open("r+b") as handle:
            handle.truncate(complete_end)
    records = []
    for number, line in enumerate(jsonl_lines(data[:complete_end].decode("utf-8", errors="replace")), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}:{number}: not valid JSON ({error.msg}); delete the line to ask it again") from None
        except RecursionError:
            raise UserError(f"{path}:{number}: nested too deeply to read as JSON; delete the line") from None
        if not isinstance(record, dict) or not isinstance(record.get("id"), str):
            raise UserError(f"{path}:{number}: an answer must be a JSON object with an 'id'")
        records.append(record)
    return records


@contextlib.contextmanager
def exclusive_folder(out_dir: Path, lock_name: str, command: str) -> Iterator[None]:
    """Hold an exclusive lock (file `lock_name` in `out_dir`) so that two runs never append to one record file;
    a second `command` writing there gets one line."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; the user keeps runs apart
        yield
        return
    with (out_dir / lock_name).open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise UserError(
                f"{out_dir}: another {command} is writing there; wait for it or use another --out"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def apply_sparsity(model, settings: EvalSettings) -> None:
    """Set the run's block count and window on the model (only the ones given)."""
    knobs = {"block_counts": settings.block_counts, "window_size": settings.window_size}
    knobs = {name: value for name, value in knobs.items() if value is not None}
    if knobs:
        model.model.set_sparsity(**knobs)


def _frame_settings(settings: EvalSettings) -> dict[str, Any]:
    """The keyword that hands `settings.frames` to `ask` / `plan_question`: `paper` or `sampling`."""
    return {"paper" if settings.preset == "paper" else "sampling": settings.frames}


def plan_questions(
    files, questions: Sequence[Question], settings: EvalSettings, probed: dict[str, Any] | None = None
) -> None:
    """Plan every question as `answer_question` will, from the model's small files (`open_model_files`): prompts
    tokenized, each video probed once, no frame decoded, no weights needed. A setting some question cannot run
    with (a budget below its text plus the smallest pair of frames) is then refused before minutes of loading,
    as a `UserError` naming the question. `settings` are resolved (`resolved_settings`). probed: video path ->
    `probe_video`'s result, shared by several calls (a sweep plans every grid point with one probe per video)."""
    from videonsa.inference.api import plan_question
    from videonsa.video import probe_video

    probed = {} if probed is None else probed
    for question in questions:
        try:
            if question.video_path not in probed:
                probed[question.video_path] = probe_video(question.video_path, backend=settings.backend)
            plan_question(
                files, question.video_path, question.question, options=list(question.options),
                preset=settings.preset, backend=settings.backend, generation=settings.generation,
                info=probed[question.video_path], **_frame_settings(settings),
            )
        except UserError as error:
            raise UserError(f"question {question.id}: {first_line(error)}") from None


def answer_question(model, question: Question, settings: EvalSettings) -> dict[str, Any]:
    """Ask one question and return its answers.jsonl record (choice, correctness, frames, tokens, timings).

    `settings` are resolved (`resolved_settings`)."""
    started = time.perf_counter()
    answer = model.ask(
        question.video_path,
        question.question,
        options=list(question.options),
        preset=settings.preset,
        backend=settings.backend,
        generation=settings.generation,
        **_frame_settings(settings),
    )
    report = answer.report
    return {
        "id": question.id,
        "kind": question.kind,
        "length_bin": question.length_bin,
        "video_seconds": question.video_seconds,
        "answer": question.answer,
        "choice": answer.choice,
        "correct": answer.choice == question.answer,
        "probabilities": {letter: round(share, 6) for letter, share in answer.choice_probabilities.items()},
        "frames": report.frames,
        "frame_width": report.frame_width,
        "frame_height": report.frame_height,
        "video_tokens": report.video_tokens,
        "prompt_tokens": report.prompt_tokens,
        "video_decode_seconds": round(report.video_seconds, 4),
        "prefill_seconds": round(report.prefill_seconds, 4),
        "generate_seconds": round(report.decode_seconds, 4),
        "seconds": round(time.perf_counter() - started, 4),
        "attention": report.attention,
    }


def _append(handle, record: Mapping[str, Any]) -> None:
    """Append one line and push it to disk before going on."""
    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    handle.flush()
    os.fsync(handle.fileno())


@contextlib.contextmanager
def _progress_bar(enabled: bool, total: int, done: int) -> Iterator[Callable[[int, int, int], None]]:
    """A rich progress bar on stderr (shown on a terminal) advanced as `update(done, correct, answered)`."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, disable=not (enabled and console.is_terminal)) as progress:
        task = progress.add_task("answering", total=total, completed=done)

        def update(done: int, correct: int, answered: int) -> None:
            accuracy = f"accuracy {correct / answered:.1%}" if answered else "answering"
            progress.update(task, completed=done, description=accuracy)

        yield update


def run_eval(
    model,
    questions: QuestionSet,
    out_dir: str | os.PathLike,
    settings: EvalSettings | None = None,
    *,
    progress: bool = True,
    limit: int | None = None,
    on_answer: AnswerCallback | None = None,
) -> Summary:
    """Answer every question of `questions` not yet in `out_dir`/answers.jsonl with `model` (a `VideoQA`),
    then score them all and write summary.json and accuracy_by_length.png (when the set is complete).

    limit: only the first `limit` questions of the set count (a quick look). on_answer: called with each new
    answer's record after it is on disk. Returns the summary of every answer in the file.
    """
    settings = settings or EvalSettings()
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    selected = list(questions.questions[:limit] if limit is not None else questions.questions)
    out_dir = Path(out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    apply_sparsity(model, settings)
    settings = resolved_settings(model, settings)
    record = run_record(model, questions, settings)
    with exclusive_folder(out_dir, LOCK_FILE, "videonsa eval"):
        _claim_run(out_dir, record)
        answers_path = out_dir / ANSWERS_FILE
        answers = read_answers(answers_path, repair=True)
        answered = {answer["id"] for answer in answers}
        known = {question.id for question in questions}
        strangers = sorted(answered - known)
        if strangers:
            raise UserError(f"{answers_path}: answers question '{strangers[0]}', which {questions.path} lacks")
        pending = [question for question in selected if question.id not in answered]
        done = len(selected) - len(pending)
        by_id = {question.id: question for question in selected}
        latest, _ = latest_answers(answers)
        correct = sum(answer.get("choice") == by_id[answer["id"]].answer for answer in latest if answer["id"] in by_id)
        with answers_path.open("a", encoding="utf-8") as handle, _progress_bar(progress, len(selected), done) as bar:
            bar(done, correct, done)
            for question in pending:
                result = answer_question(model, question, settings)
                _append(handle, result)
                answers.append(result)
                done += 1
                correct += bool(result["correct"])
                bar(done, correct, done)
                if on_answer is not None:
                    on_answer(result)
        summary = summarize(selected, answers, record)
        write_report(summary, out_dir)
    return summary


__all__ = [
    "ANSWERS_FILE",
    "RUN_FILE",
    "EvalSettings",
    "answer_question",
    "apply_sparsity",
    "plan_questions",
    "read_answers",
    "resolved_settings",
    "run_eval",
    "run_record",
]
