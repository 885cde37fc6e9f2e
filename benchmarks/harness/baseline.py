"""Committed baselines (`benchmarks/baselines/<card>.json`), the ratio of a run's numbers to them, and updating
them from a run (`--write-baseline`).

A baseline file holds the current numbers of the main benchmarks on one card model, as flat metric names:

    {"card": "NVIDIA H100 80GB HBM3", "versions": {...}, "sources": {...},
     "metrics": {"ops/randn/T131072/videonsa/fwd_ms": 66.49, ...}}

Each bench script names its numbers the same way (`metrics` functions) and, with `--compare-baseline`, prints
now / baseline for every name both have: for times (ms) and memory (GiB) above 1 is worse. Cards of one
model vary by a few per cent between machines and calls, so a ratio within ~5% is noise; the baseline of record
is always rerun in the same call before a change is claimed (CONTRIBUTING.md).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from harness.env import describe
from harness.output import fmt, markdown_table, write_json

BASELINES = Path(__file__).resolve().parents[1] / "baselines"
CARD_FILES = {"H100": "h100.json", "H200": "h200.json"}


def baseline_path(device: str, choice: str = "auto") -> Path:
    """The baseline file for `device` (a CUDA device name) or the file named by `choice`."""
    if choice != "auto":
        return Path(choice)
    for card, name in CARD_FILES.items():
        if card in device:
            return BASELINES / name
    raise SystemExit(f"--compare-baseline: no committed baseline for {device!r} (known: {sorted(CARD_FILES)}); "
                     "pass a baseline file")


def load_baseline(path: Path) -> dict:
    """The baseline file's content; exits with one line if it is missing or not a baseline."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise SystemExit(f"--compare-baseline: {path} does not exist") from None
    except json.JSONDecodeError as error:
        raise SystemExit(f"--compare-baseline: {path} is not JSON ({error})") from None
    if not isinstance(data, dict) or not isinstance(data.get("metrics"), dict):
        raise SystemExit(f"--compare-baseline: {path} has no 'metrics' object")
    return data


def compare(metrics: Mapping[str, float], baseline: Mapping[str, float]) -> list[tuple[str, float, float, float]]:
    """(name, now, baseline, now / baseline) for every metric both have, in the run's order."""
    rows = []
    for name, now in metrics.items():
        then = baseline.get(name)
        if now is None or then is None or then == 0:
            continue
        rows.append((name, float(now), float(then), float(now) / float(then)))
    return rows


def report(metrics: Mapping[str, float], device: str, choice: str) -> str:
    """The comparison table for `metrics` against the chosen baseline (printed by the bench scripts)."""
    path = baseline_path(device, choice)
    data = load_baseline(path)
    rows = compare(metrics, data["metrics"])
    caption = f"Against {path.name} ({data.get('card', '?')}; now / baseline, above 1 is slower or larger):"
    if not rows:
        return caption + "\nno metric of this run is in the baseline (other lengths or inputs?)"
    table = markdown_table(["metric", "now", "baseline", "ratio"],
                           [(name, fmt(now), fmt(then), f"{ratio:.3f}") for name, now, then, ratio in rows])
    return caption + "\n\n" + table


def update(metrics: Mapping[str, float], env: dict[str, Any], choice: str, source: str) -> Path:
    """Put `metrics` into the baseline file for env's card (or `choice`), keeping its other metrics; the run's
    card, versions and commit are recorded under "sources" with `source` (the script's name)."""
    path = baseline_path(env["device"], choice)
    data = load_baseline(path) if path.exists() else {"card": env["device"], "sources": {}, "metrics": {}}
    data["metrics"] = dict(sorted({**data["metrics"], **{k: round(float(v), 4) for k, v in metrics.items()}}.items()))
    data.setdefault("sources", {})[source] = describe(env) + f", {env.get('utc', '')}"
    write_json(path, data)
    return path


def finish(metrics: Mapping[str, float], env: dict[str, Any], args: Any, source: str) -> None:
    """What a bench script does with --compare-baseline and --write-baseline once its run is done."""
    if getattr(args, "compare_baseline", None):
        print(report(metrics, env["device"], args.compare_baseline))
    if getattr(args, "write_baseline", None):
        print(f"baseline written: {update(metrics, env, args.write_baseline, source)}")
