"""`videonsa analyze budget` and `videonsa analyze context`: accuracy and prefill time over a grid of settings.

Both sweeps load the model once and answer a question set (`needles:DIR` or `needles:FILE.jsonl`, through the
evaluation runner, `videonsa.evaluation.run_eval`) once per grid point:

* `budget`: the sparse-attention budget, block counts x sliding windows, set on the loaded model with
  `set_sparsity` before each point (the model's own budget is restored at the end);
* `context`: frames x pixels per frame under one fixed token budget, through the planner's settings
  (`max_frames`, `pixels_per_frame`, `budget_tokens`); the planner trims a point that does not fit the budget
  as `--prefer` says, and the frames and tokens per frame it really used are recorded with the point.

Resumable at two levels (docs/analysis.md, "budget and context (sweeps)"): every grid point is one line of
`DIR/<sub>.jsonl`, appended and flushed to disk when the point is complete, so a rerun skips the points already
there; a point's own answers go to `DIR/<sub>/<point>/answers.jsonl` as they come (the runner's resume), so a point
cut short by a kill continues where it stopped. The lines record the sweep's settings (model, task, attention,
frames, limit); a rerun into the directory with other settings is refused. `DIR/<sub>.json` holds the summary (every
point and the grids of accuracy and prefill time) and `DIR/<sub>_accuracy.png`, `DIR/<sub>_prefill.png` the
heatmaps.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from videonsa.errors import UserError
from videonsa.options import GREEDY_GENERATION

NEEDLES_PREFIX = "needles:"
DEFAULT_BLOCK_COUNTS = (8, 16, 32, 64)
DEFAULT_WINDOWS = (64, 128, 256, 512)
DEFAULT_CONTEXT_FRAMES = (32, 64, 128, 256)
# Pixels per frame: 64, 128, 256 and 512 tokens per temporal patch (28 x 28 pixels each), the sizes the
# paper's evaluations use (50,176 = 224 x 224).
DEFAULT_CONTEXT_PIXELS = (50_176, 100_352, 200_704, 401_408)
_LOCK_FILE = ".sweep.lock"

# Fields of a point's evaluation summary copied into its line (docs/evaluation.md, summary.json).
_SUMMARY_FIELDS = (
    "accuracy",
    "accuracy_interval",
    "chance",
    "correct",
    "questions",
    "total_questions",
    "frames_per_question",
    "video_tokens_per_question",
    "prompt_tokens_per_question",
    "prefill_seconds",
    "video_decode_seconds",
    "seconds_per_question",
)


# ----------------------------------------------------------------------------------------------------------
# The grid and its resumable record


@dataclass(frozen=True)
class GridPoint:
    """One setting of a sweep: `key` names it in the record and its folder; `values` are the swept knobs."""

    key: str
    row: int
    column: int
    values: Mapping[str, int]


def grid_points(rows: tuple[str, Sequence[int]], columns: tuple[str, Sequence[int]], prefix: tuple[str, str]):
    """Every (row value, column value) pair, row-major: rows[0] names the knob, rows[1] its values."""
    (row_name, row_values), (column_name, column_values) = rows, columns
    return [
        GridPoint(f"{prefix[0]}{r}-{prefix[1]}{c}", i, j, {row_name: r, column_name: c})
        for i, r in enumerate(row_values)
        for j, c in enumerate(column_values)
    ]


def read_points(path: Path) -> list[dict[str, Any]]:
    """The point records of a sweep's `.jsonl` (none if it does not exist); a last line cut short by a kill is
    removed (its point runs again), a malformed line elsewhere is a `UserError` naming it."""
    from videonsa.evaluation.runner import read_answers

    return read_answers(path, repair=True)


def _differing(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    return sorted(key for key in set(old) | set(new) if old.get(key) != new.get(key))


def _append_line(handle, record: Mapping[str, Any]) -> None:
    """Append one JSON line and push it to disk before going on (a kill loses at most the point in progress)."""
    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    handle.flush()
    os.fsync(handle.fileno())


def run_grid(
    out_dir: Path,
    sub: str,
    points: Sequence[GridPoint],
    identity: Mapping[str, Any],
    evaluate: Callable[[GridPoint], Mapping[str, Any]],
) -> dict[str, dict[str, Any]]:
    """Evaluate every point not yet recorded in `out_dir/<sub>.jsonl`, appending one line per finished point.

    identity: the sweep's settings; every line carries them, and a record written with other settings is
    refused (one line naming what differs). Returns the records of `points` by key (earlier and new ones).
    """
    from videonsa.evaluation.runner import exclusive_folder

    path = out_dir / f"{sub}.jsonl"
    identity = json.loads(json.dumps(identity))  # as it reads back from the file
    with exclusive_folder(out_dir, _LOCK_FILE, f"videonsa analyze {sub}"):
        records = read_points(path)
        for record in records:
            changed = _differing(record.get("settings") or {}, identity)
            if changed:
                raise UserError(
                    f"{path}: holds points of a sweep with other settings ({', '.join(changed)} differ); use "
                    f"another --out, or delete {path.name} and {sub}/ to start over"
                )
        done = {record["id"]: record for record in records}
        with path.open("a", encoding="utf-8") as handle:
            for point in points:
                if point.key in done:
                    continue
                record = {"id": point.key, **point.values, **evaluate(point), "settings": identity}
                _append_line(handle, record)
                done[point.key] = record
    return {point.key: done[point.key] for point in points if point.key in done}


# ----------------------------------------------------------------------------------------------------------
# Summaries and heatmaps


def metric_grid(records: Mapping[str, Mapping[str, Any]], points: Sequence[GridPoint], shape, field: str):
    """A rows x columns list of lists holding each point's `field` (None where the point has none yet)."""
    grid: list[list[Any]] = [[None] * shape[1] for _ in range(shape[0])]
    for point in points:
        record = records.get(point.key)
        if record is not None:
            grid[point.row][point.column] = record.get(field)
    return grid


def draw_heatmap(
    path: Path,
    values: Sequence[Sequence[float | None]],
    *,
    row_labels: Sequence[str],
    column_labels: Sequence[str],
    xlabel: str,
    ylabel: str,
    title: str,
    cell_text: Callable[[float], str],
    colormap: str,
    cell_notes: Sequence[Sequence[str]] | None = None,
) -> None:
    """A rows x columns heatmap with every cell's value written in it (blank and grey where None), as a PNG
    written atomically. Uses matplotlib's Agg canvas directly (no global pyplot state)."""
    import numpy as np

    from videonsa.analysis.common import new_figure, save_figure

    data = np.array([[math.nan if v is None else float(v) for v in row] for row in values], dtype=float)
    masked = np.ma.masked_invalid(data)
    figure = new_figure(1.3 * len(column_labels) + 2.2, 0.9 * len(row_labels) + 1.6)
    axes = figure.add_subplot()
    axes.set_facecolor("#dddddd")
    finite = data[np.isfinite(data)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if high <= low:  # one value everywhere: a colour scale around it rather than one of zero width
        pad = 0.1 * abs(low) or 0.1
        low, high = low - pad, high + pad
    image = axes.imshow(masked, cmap=colormap, aspect="auto", vmin=low, vmax=high)
    axes.set_xticks(range(len(column_labels)), labels=list(column_labels))
    axes.set_yticks(range(len(row_labels)), labels=list(row_labels))
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            note = cell_notes[i][j] if cell_notes else ""
            if not math.isfinite(data[i, j]):
                text, colour = "-", "black"
            else:
                text = cell_text(data[i, j])
                red, green, blue, _ = image.cmap(image.norm(data[i, j]))
                # Dark text on light cells, light text on dark ones.
                colour = "black" if 0.299 * red + 0.587 * green + 0.114 * blue > 0.5 else "white"
            axes.text(j, i, text + (f"\n{note}" if note else ""), ha="center", va="center", color=colour, fontsize=8)
    figure.colorbar(image, ax=axes)
    save_figure(figure, path.parent, path.name)


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def _seconds(value: float) -> str:
    return f"{value:.3g}s"


def write_sweep_files(out_dir: Path, sub: str, summary: Mapping[str, Any], axes: Mapping[str, Any]) -> list[Path]:
    """`DIR/<sub>.json` (atomically) and the accuracy and prefill-time heatmaps; returns the written paths."""
    from videonsa.analysis.common import write_json

    written = [write_json(out_dir, sub, dict(summary))]
    common = dict(
        row_labels=axes["row_labels"],
        column_labels=axes["column_labels"],
        xlabel=axes["xlabel"],
        ylabel=axes["ylabel"],
        cell_notes=axes.get("cell_notes"),
    )
    accuracy = out_dir / f"{sub}_accuracy.png"
    draw_heatmap(accuracy, summary["accuracy"], title=f"{axes['title']}: accuracy", cell_text=_percent,
                 colormap="viridis", **common)
    prefill = out_dir / f"{sub}_prefill.png"
    draw_heatmap(prefill, summary["prefill_seconds"], title=f"{axes['title']}: prefill seconds per question",
                 cell_text=_seconds, colormap="magma_r", **common)
    return written + [accuracy, prefill]


def _write_report(out_dir: Path) -> Path:
    """Regenerate the run directory's report.html."""
    from videonsa.analysis.common import finish_run

    return finish_run(out_dir)


# ----------------------------------------------------------------------------------------------------------
# Evaluating one point


@dataclass(frozen=True)
class SweepContext:
    """What every point of a sweep shares: the loaded model (`VideoQA`), the questions and the base settings."""

    model: Any
    questions: Any
    settings: Any  # EvalSettings with the sweep's fixed settings
    out_dir: Path
    sub: str
    limit: int | None
    warmup: int


def _pending(context: SweepContext, point_dir: Path) -> list[Any]:
    """The questions of this point still unanswered in its folder (the runner's own resume)."""
    from videonsa.evaluation.runner import ANSWERS_FILE, read_answers

    selected = list(context.questions.questions[: context.limit] if context.limit else context.questions.questions)
    answered = {record["id"] for record in read_answers(point_dir / ANSWERS_FILE)}
    return [question for question in selected if question.id not in answered]


def evaluate_point(context: SweepContext, point: GridPoint, settings) -> dict[str, Any]:
    """Run the question set with `settings` (an `EvalSettings`) into `DIR/<sub>/<point>/` and return the
    point's numbers: the summary's accuracy and costs, plus the frames and tokens per frame really used.

    The first `warmup` pending questions are asked once before the timed run and their answers dropped: the
    first call at a new budget compiles kernels (Triton specialises on the block count) and would otherwise
    inflate the point's prefill time.
    """
    from videonsa.evaluation.runner import ANSWERS_FILE, answer_question, apply_sparsity, read_answers, run_eval
    from videonsa.evaluation.runner import resolved_settings as resolve

    point_dir = context.out_dir / context.sub / point.key
    pending = _pending(context, point_dir)
    if pending and context.warmup:
        apply_sparsity(context.model, settings)
        resolved = resolve(context.model, settings)
        for question in pending[: context.warmup]:
            answer_question(context.model, question, resolved)
    summary = run_eval(context.model, context.questions, point_dir, settings, progress=True, limit=context.limit)
    record = summary.to_json()
    result = {name: record.get(name) for name in _SUMMARY_FIELDS}
    answers = read_answers(point_dir / ANSWERS_FILE)
    frames = [a["frames"] for a in answers if a.get("frames")]
    tokens = [a["video_tokens"] / a["frames"] for a in answers if a.get("frames") and a.get("video_tokens")]
    result["video_tokens_per_frame"] = sum(tokens) / len(tokens) if tokens else None
    result["min_frames"] = min(frames) if frames else None
    result["max_frames"] = max(frames) if frames else None
    result["per_kind"] = {kind: group.get("accuracy") for kind, group in record.get("per_kind", {}).items()}
    result["directory"] = str(Path(context.sub) / point.key)
    return result


def sweep_identity(context: SweepContext, fixed: Mapping[str, Any]) -> dict[str, Any]:
    """What makes two sweeps comparable: the runner's run record without the swept knobs, plus `fixed`."""
    from videonsa.evaluation.runner import resolved_settings, run_record

    record = run_record(context.model, context.questions, resolved_settings(context.model, context.settings))
    record.pop("questions_file")  # a moved set still resumes
    record.pop("sparsity")  # swept (budget) or fixed below (context)
    return {**record, "limit": context.limit, **fixed}


# ----------------------------------------------------------------------------------------------------------
# Command-line arguments shared by both sweeps


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    """--task, --limit, --warmup."""
    parser.add_argument(
        "--task", required=True, help="needles:DIR (a set from `videonsa eval make-needles`) or needles:FILE.jsonl"
    )
    parser.add_argument("--limit", type=int, help="only the first N questions of the set at every point")
    parser.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="questions asked once, untimed and unrecorded, before each point (default 1: the first call at a "
        "new budget compiles GPU kernels)",
    )


def add_frame_arguments(parser: argparse.ArgumentParser, *, context: bool) -> None:
    """Frame and token-budget flags as in `videonsa eval`; the context sweep takes --max-frames/--pixels as
    lists and runs the planner only."""
    from videonsa.options import PRESETS
    from videonsa.video.planning import DEFAULT_BUDGET_TOKENS, DEFAULT_FPS, PREFERENCES

    frames = parser.add_argument_group("frames and token budget (as in `videonsa eval`)")
    if not context:
        frames.add_argument("--preset", choices=PRESETS, default="auto", help="planner, paper, or auto (default)")
    frames.add_argument("--fps", type=float, help=f"frames sampled per second of video (default {DEFAULT_FPS:g})")
    frames.add_argument("--min-pixels", type=int, help="never fewer pixels per frame")
    frames.add_argument(
        "--budget", type=int, help=f"planner: total tokens per question (default {DEFAULT_BUDGET_TOKENS})"
    )
    frames.add_argument("--prefer", choices=PREFERENCES, help="planner: frames, detail or balanced (default)")
    if not context:
        frames.add_argument("--max-frames", type=int, help="at most this many frames")
        frames.add_argument("--pixels", type=int, help="planner: pixels per frame")
        frames.add_argument("--max-pixels", type=int, help="paper preset: per-frame pixel cap")
        frames.add_argument("--total-pixels", type=int, help="paper preset: pixel allowance of the whole video")
    frames.add_argument("--backend", choices=("pyav", "decord"), default="pyav", help="video decoder (default pyav)")
    # Multiple-choice answers are one greedy letter; `videonsa ask`'s settings helper reads these too.
    parser.set_defaults(**GREEDY_GENERATION, frames_fps=DEFAULT_FPS)


def positive_values(flag: str, values: Sequence[int]) -> list[int]:
    """The distinct values of a grid flag in the order given; a value below 1 is a `UserError`."""
    bad = [value for value in values if value < 1]
    if bad:
        raise UserError(f"{flag}: values must be positive integers, got {bad[0]}")
    return list(dict.fromkeys(values))


def load_questions_of(task: str):
    """The question set of a `needles:PATH` task; anything else is a `UserError` saying what works."""
    from videonsa.evaluation.questions import load_questions

    if not task.startswith(NEEDLES_PREFIX):
        raise UserError(
            f"--task {task}: sweeps run question files in the needle format (needles:DIR or needles:FILE.jsonl); "
            "an lmms-eval task runs one setting at a time with `videonsa eval --task NAME --block-counts B "
            "--window W`"
        )
    path = task[len(NEEDLES_PREFIX) :]
    if not path:
        raise UserError("--task needles: give the set's directory, e.g. --task needles:my-needles")
    return load_questions(path)


def check_common(args: argparse.Namespace) -> None:
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be at least 1, got {args.limit}")
    if args.warmup < 0:
        raise UserError(f"--warmup must be 0 or more, got {args.warmup}")


@contextlib.contextmanager
def restored_sparsity(model) -> Iterator[None]:
    """Put the model's block count and window back as they were when the sweep ends (or fails)."""
    before = model.model.sparse_settings
    try:
        yield
    finally:
        model.model.set_sparsity(block_counts=before.block_count, window_size=before.window_size)


def _rank(record: Mapping[str, Any]) -> tuple[float, float]:
    """Higher accuracy first, then the shorter prefill; a point whose prefill was not measured comes last among
    its equals, not first as if it took 0 s."""
    prefill = record.get("prefill_seconds")
    return record["accuracy"], -math.inf if prefill is None else -prefill


def summary_record(
    sub: str,
    identity: Mapping[str, Any],
    records: Mapping[str, Mapping[str, Any]],
    points: Sequence[GridPoint],
    shape: tuple[int, int],
    axes: Mapping[str, Any],
) -> dict[str, Any]:
    """`DIR/<sub>.json`: the axes, every point in grid order, and the rows x columns grids of the numbers."""
    done = [dict(records[p.key]) for p in points if p.key in records]
    for record in done:
        record.pop("settings", None)
    measured = [r for r in done if r.get("accuracy") is not None]
    best = max(measured, key=_rank, default=None)
    grids = {
        field: metric_grid(records, points, shape, field)
        for field in ("accuracy", "prefill_seconds", "frames_per_question", "video_tokens_per_frame",
                      "video_tokens_per_question")
    }
    accuracies = [r["accuracy"] for r in measured]
    prefills = [r["prefill_seconds"] for r in done if r.get("prefill_seconds") is not None]
    overview = {
        "model": identity.get("model"),
        "attention": identity.get("attention"),
        "task": identity.get("task"),
        "points": f"{len(done)} of {len(points)}",
        "best": None if best is None else f"{best['id']} ({100 * best['accuracy']:.1f}%)",
        "accuracy_range": [min(accuracies), max(accuracies)] if accuracies else None,
        "prefill_seconds_range": [min(prefills), max(prefills)] if prefills else None,
    }
    return {
        "analysis": sub,
        "summary": overview,
        **axes,
        "settings": dict(identity),
        "points": done,
        "complete": len(done) == len(points),
        **grids,
        "best": None if best is None else {key: best[key] for key in ("id", *points[0].values, "accuracy")},
    }


# ----------------------------------------------------------------------------------------------------------
# budget: block counts x windows

BUDGET_HELP = "accuracy and prefill time over block counts x sliding windows (resumable; heatmaps)"


def _listed(values: Sequence[int]) -> str:
    """A default list as --help shows it: "8 16 32 64"."""
    return " ".join(map(str, values))


def add_budget_arguments(parser: argparse.ArgumentParser) -> None:
    """The `budget` flags (the shared --out/--model/--attention/--device/--dtype come from analysis.common)."""
    add_task_arguments(parser)
    grid = parser.add_argument_group("grid")
    grid.add_argument("--block-counts", type=int, nargs="+", default=list(DEFAULT_BLOCK_COUNTS), metavar="N",
                      help=f"blocks each query selects (default {_listed(DEFAULT_BLOCK_COUNTS)})")
    grid.add_argument("--windows", type=int, nargs="+", default=list(DEFAULT_WINDOWS), metavar="W",
                      help=f"sliding-window sizes in tokens (default {_listed(DEFAULT_WINDOWS)})")
    add_frame_arguments(parser, context=False)


def _prepare(args: argparse.Namespace, preset_flag: str | None, *, sparse_only: bool):
    """The checks that need no weights (flags, --out, question set, model files): (questions, opened model,
    preset, frames, generation); the weights are not loaded (`_load`, once every point has been planned)."""
    from videonsa.analysis.common import check_out_dir, open_analysis_model
    from videonsa.commands.ask import _settings
    from videonsa.video.paper import resolve_preset

    check_common(args)
    check_out_dir(Path(args.out).expanduser())
    questions = load_questions_of(args.task)
    opened = open_analysis_model(args)
    if sparse_only and opened.attention == "dense":
        raise UserError(
            f"--attention {args.attention}: the model runs dense attention, on which block counts and windows "
            "have no effect; use --attention nsa (or official)"
        )
    preset = resolve_preset(preset_flag or "auto", opened.attention)
    frames, generation = _settings(args, preset)
    return questions, opened, preset, frames, generation


def _load(opened) -> Any:
    """The weights, as a `VideoQA` (what the evaluation runner takes)."""
    from videonsa.inference.api import VideoQA

    return VideoQA(opened.files, opened.load())


def _recorded_sparsity(opened) -> Any:
    """The `SparseSettings` the model will load with (its config, in the chosen mode), read before the weights."""
    from videonsa.models.configuration_videonsa import VideoNSAConfig

    settings = VideoNSAConfig.from_dict(dict(opened.files.config)).sparse_settings()
    return dataclasses.replace(settings, mode=opened.attention)


def _check_budgets(current, pairs: Sequence[tuple[int, int]]) -> None:
    """Every (block count, window) the sweep will set must be a valid budget for the model (`current`: its
    `SparseSettings`): checked before the weights load, so a mistake costs no waiting."""
    for block_count, window in pairs:
        try:
            dataclasses.replace(current, block_count=block_count, window_size=window)
        except UserError as error:
            raise UserError(f"--block-counts {block_count} / --window(s) {window}: {error}") from None


def _fixed_sparsity(model, *, swept: Sequence[str]) -> dict[str, Any]:
    settings = dataclasses.asdict(model.model.sparse_settings)
    return {name: value for name, value in settings.items() if name not in swept}


def run_budget(args: argparse.Namespace) -> int:
    """`videonsa analyze budget`: the grid of block counts x windows; prints where its files are."""
    from videonsa.analysis.common import prepare_out_dir
    from videonsa.commands.ask import _plan_before_loading
    from videonsa.evaluation.runner import EvalSettings

    block_counts = positive_values("--block-counts", args.block_counts)
    windows = positive_values("--windows", args.windows)
    questions, opened, preset, frames, generation = _prepare(args, args.preset, sparse_only=True)
    _check_budgets(_recorded_sparsity(opened), [(b, w) for b in block_counts for w in windows])
    settings = EvalSettings(preset=preset, frames=frames, generation=generation, backend=args.backend,
                            model=args.model, task=args.task)
    _plan_before_loading(opened.files, questions, args.limit, [settings])  # the same frames at every point
    model = _load(opened)
    out_dir = prepare_out_dir(Path(args.out).expanduser())
    context = SweepContext(model, questions, settings, out_dir, "budget", args.limit, args.warmup)
    points = grid_points(("block_count", block_counts), ("window", windows), ("b", "w"))
    with restored_sparsity(model):
        fixed = {"sparsity": _fixed_sparsity(model, swept=("block_count", "window_size"))}
        identity = sweep_identity(context, fixed)

        def evaluate(point: GridPoint) -> Mapping[str, Any]:
            values = point.values
            chosen = dataclasses.replace(settings, block_counts=values["block_count"], window_size=values["window"])
            result = evaluate_point(context, point, chosen)
            _print_point(point, result)
            return result

        records = run_grid(out_dir, "budget", points, identity, evaluate)
    axes = {
        "block_counts": block_counts,
        "windows": windows,
        "rows": "block_count",
        "columns": "window",
    }
    summary = summary_record("budget", identity, records, points, (len(block_counts), len(windows)), axes)
    plot_axes = {
        "row_labels": [str(b) for b in block_counts],
        "column_labels": [str(w) for w in windows],
        "xlabel": "sliding window (tokens)",
        "ylabel": "selected blocks",
        "title": "attention budget",
    }
    return _finish(out_dir, "budget", summary, plot_axes)


def _print_point(point: GridPoint, result: Mapping[str, Any]) -> None:
    accuracy = result.get("accuracy")
    prefill = result.get("prefill_seconds")
    shown = "-" if accuracy is None else f"{100 * accuracy:.1f}%"
    seconds = "-" if prefill is None else f"{prefill:.3g}s"
    print(f"{point.key}: accuracy {shown} ({result.get('correct')}/{result.get('questions')}), prefill {seconds}",
          flush=True)


def _finish(out_dir: Path, sub: str, summary: Mapping[str, Any], plot_axes: Mapping[str, Any]) -> int:
    written = write_sweep_files(out_dir, sub, summary, plot_axes)
    written.append(_write_report(out_dir))
    best = summary.get("best")
    if best is not None:
        print(f"best {best['id']}: accuracy {100 * best['accuracy']:.1f}%")
    for path in written:
        print(f"wrote  {path}")
    return 0


# ----------------------------------------------------------------------------------------------------------
# context: frames x pixels per frame under one token budget

CONTEXT_HELP = "accuracy and prefill time over frames x pixels per frame at one token budget (resumable; heatmaps)"


def add_context_arguments(parser: argparse.ArgumentParser) -> None:
    """The `context` flags (the shared ones come from analysis.common)."""
    add_task_arguments(parser)
    grid = parser.add_argument_group("grid (the planner's settings; --budget stays fixed)")
    grid.add_argument("--max-frames", type=int, nargs="+", default=list(DEFAULT_CONTEXT_FRAMES), metavar="F",
                      help=f"frame counts asked of the planner (default {_listed(DEFAULT_CONTEXT_FRAMES)})")
    grid.add_argument("--pixels", type=int, nargs="+", default=list(DEFAULT_CONTEXT_PIXELS), metavar="P",
                      help=f"pixels per frame asked of the planner (default {_listed(DEFAULT_CONTEXT_PIXELS)}: 64 to "
                      "512 tokens per frame pair)")
    grid.add_argument("--block-counts", type=int, help="NSA: blocks each query selects (default: the model's)")
    grid.add_argument("--window", type=int, help="NSA: sliding-window size in tokens (default: the model's)")
    add_frame_arguments(parser, context=True)


def run_context(args: argparse.Namespace) -> int:
    """`videonsa analyze context`: the grid of frame counts x pixels per frame at a fixed token budget."""
    from videonsa.analysis.common import prepare_out_dir
    from videonsa.commands.ask import _plan_before_loading
    from videonsa.evaluation.runner import EvalSettings

    frame_counts = positive_values("--max-frames", args.max_frames)
    pixels = positive_values("--pixels", args.pixels)
    # The planner's settings checks, per point, before anything loads (messages name the flag).
    args.preset, args.max_pixels, args.total_pixels = "planner", None, None
    checks = argparse.Namespace(**vars(args))
    for count in frame_counts:
        for size in pixels:
            checks.max_frames, checks.pixels = count, size
            _grid_settings(checks)
    args.max_frames = args.pixels = None
    sparse = {"block_counts": args.block_counts, "window_size": args.window}
    sparse = {name: value for name, value in sparse.items() if value is not None}
    # Dense attention is a fine context sweep, unless a sparse budget was asked for.
    questions, opened, preset, frames, generation = _prepare(args, "planner", sparse_only=bool(sparse))
    if sparse:
        current = _recorded_sparsity(opened)
        _check_budgets(current, [(sparse.get("block_counts", current.block_count),
                                  sparse.get("window_size", current.window_size))])
    settings = EvalSettings(preset=preset, frames=frames, generation=generation, backend=args.backend,
                            model=args.model, task=args.task, **sparse)
    points = grid_points(("max_frames", frame_counts), ("pixels_per_frame", pixels), ("f", "p"))
    every_point = [_context_settings(settings, point) for point in points]
    _plan_before_loading(opened.files, questions, args.limit, every_point)
    model = _load(opened)
    out_dir = prepare_out_dir(Path(args.out).expanduser())
    context = SweepContext(model, questions, settings, out_dir, "context", args.limit, args.warmup)
    with restored_sparsity(model):
        if sparse:
            model.model.set_sparsity(**sparse)
        swept = ("max_frames", "pixels_per_frame")
        fixed_frames = {k: v for k, v in dataclasses.asdict(frames).items() if k not in swept}
        identity = sweep_identity(context, {"sparsity": _fixed_sparsity(model, swept=()), "frames": fixed_frames})

        def evaluate(point: GridPoint) -> Mapping[str, Any]:
            result = evaluate_point(context, point, _context_settings(settings, point))
            _print_point(point, result)
            return result

        records = run_grid(out_dir, "context", points, identity, evaluate)
    axes = {
        "frame_counts": frame_counts,
        "pixels_per_frame": pixels,
        "budget_tokens": frames.budget_tokens,
        "rows": "max_frames",
        "columns": "pixels_per_frame",
    }
    summary = summary_record("context", identity, records, points, (len(frame_counts), len(pixels)), axes)
    notes = [["" for _ in pixels] for _ in frame_counts]
    for point in points:
        record = records.get(point.key)
        if record and record.get("frames_per_question") and record.get("video_tokens_per_frame"):
            notes[point.row][point.column] = (
                f"{record['frames_per_question']:.0f} x {record['video_tokens_per_frame']:.0f} tok"
            )
    plot_axes = {
        "row_labels": [str(f) for f in frame_counts],
        "column_labels": [f"{p:,}" for p in pixels],
        "xlabel": "pixels per frame asked (cells: frames x tokens per frame used)",
        "ylabel": "frames asked",
        "title": f"context at {frames.budget_tokens:,} tokens",
        "cell_notes": notes,
    }
    return _finish(out_dir, "context", summary, plot_axes)


def _context_settings(settings: Any, point: GridPoint) -> Any:
    """The `EvalSettings` of one context point: the sweep's, with the point's frame count and pixels per frame."""
    frames = dataclasses.replace(settings.frames, max_frames=point.values["max_frames"],
                                 pixels_per_frame=point.values["pixels_per_frame"])
    return dataclasses.replace(settings, frames=frames)


def _grid_settings(args: argparse.Namespace):
    from videonsa.commands.ask import _settings

    return _settings(args, "planner")


@dataclass(frozen=True)
class _Subcommand:
    """What `videonsa analyze` needs of a subcommand: its help line, its flags and what runs it."""

    HELP: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


SUBCOMMANDS = {
    "budget": _Subcommand(BUDGET_HELP, add_budget_arguments, run_budget),
    "context": _Subcommand(CONTEXT_HELP, add_context_arguments, run_context),
}

__all__ = [
    "BUDGET_HELP",
    "CONTEXT_HELP",
    "SUBCOMMANDS",
    "GridPoint",
    "SweepContext",
    "add_budget_arguments",
    "add_context_arguments",
    "draw_heatmap",
    "evaluate_point",
    "grid_points",
    "run_budget",
    "run_context",
    "run_grid",
    "summary_record",
]
