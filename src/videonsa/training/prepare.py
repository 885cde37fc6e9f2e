"""`videonsa data prepare`: probe every clip once, in parallel, filter, and write a manifest and a drop report.

The manifest is JSONL, one `ManifestEntry` per line (the normalised sample plus what probing learned), read by
the training dataset. The report (JSON) says how many samples were kept and dropped, the count per reason, and
every dropped sample with its reason, so a filter that removes too much is visible before hours of training.

Drop reasons: ``malformed`` (the annotation record), ``unsafe_path`` (a media path outside the video root, a URL
or a playlist), ``missing`` (a file is not on disk), ``unreadable`` (the clip cannot be decoded), ``fps`` (native
frame rate below the minimum), ``too_few_frames`` and ``too_many_frames`` (frames counted at the sampling rate, as
training will see them). Ids carried by more than one sample are listed in the report (all are kept).

Media paths are stored absolute; `read_manifest` resolves any relative path against the manifest's own folder,
so training finds the files whatever directory it runs in.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from videonsa.errors import UserError
from videonsa.files import atomic_write_json, atomic_write_text, jsonl_lines
from videonsa.training.annotations import Rejected, Sample, read_annotations
from videonsa.training.probe import ClipInfo, ClipMissing, ClipUnreadable, frames_at_rate, probe_clip
from videonsa.training.workers import die_with_parent

DROP_REASONS = ("malformed", "unsafe_path", "missing", "unreadable", "fps", "too_few_frames", "too_many_frames")

# One clip key: the files it is made of, and whether they form a video file (True) or a frame list (False).
ClipKey = tuple[tuple[str, ...], bool]
Prober = Callable[[tuple[str, ...], bool], ClipInfo]


@dataclass(frozen=True)
class ClipFilter:
    """Which clips to keep. The defaults are the paper's: 4 fps sampling, 350 to 550 frames.

    sample_fps: the rate training samples video files at; frame counts are taken at this rate.
    min_fps: smallest native frame rate accepted (None: the sampling rate; 0: any). Frame lists have no rate
        and pass this check.
    min_frames, max_frames: accepted range of frames at the sampling rate (max_frames None: no upper bound).
    """

    sample_fps: float = 4.0
    min_fps: float | None = None
    min_frames: int = 350
    max_frames: int | None = 550

    def __post_init__(self) -> None:
        if self.sample_fps <= 0:
            raise UserError(f"sample_fps must be a positive sampling rate, got {self.sample_fps:g}")
        if self.min_frames < 1:
            raise UserError(f"min_frames must be at least 1, got {self.min_frames}")
        if self.max_frames is not None and self.max_frames < self.min_frames:
            raise UserError(f"max_frames ({self.max_frames}) is below min_frames ({self.min_frames})")

    def verdict(self, info: ClipInfo) -> tuple[str, str] | None:
        """None when the clip passes, else (reason, detail)."""
        min_fps = self.sample_fps if self.min_fps is None else self.min_fps
        if info.fps is not None and info.fps + 1e-6 < min_fps:
            return "fps", f"native {info.fps:g} fps is below {min_fps:g}"
        frames = frames_at_rate(info, self.sample_fps)
        if frames < self.min_frames:
            return "too_few_frames", f"{frames} frames at {self.sample_fps:g} fps < {self.min_frames}"
        if self.max_frames is not None and frames > self.max_frames:
            return "too_many_frames", f"{frames} frames at {self.sample_fps:g} fps > {self.max_frames}"
        return None


@dataclass(frozen=True)
class ManifestEntry:
    """One training sample that passed the filter, with its probed clip facts."""

    sample: Sample
    clip: ClipInfo

    def to_json(self) -> dict[str, Any]:
        return {**self.sample.to_json(), "clip": self.clip.to_json()}

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> ManifestEntry:
        return cls(Sample.from_json(record), ClipInfo.from_json(record["clip"]))


@dataclass(frozen=True)
class PrepareSummary:
    """What `prepare_manifest` did."""

    kept: int
    dropped: Counter
    manifest: Path
    report: Path
    clip_filter: ClipFilter = ClipFilter()
    duplicate_ids: int = 0

    @property
    def total(self) -> int:
        return self.kept + sum(self.dropped.values())

    def empty_hint(self) -> str:
        """What to change when nothing was kept: the setting behind the most common drop reason."""
        if not self.dropped:
            return "the annotation files hold no records"
        reason, count = self.dropped.most_common(1)[0]
        rule = self.clip_filter
        min_fps = rule.sample_fps if rule.min_fps is None else rule.min_fps
        hints = {
            "malformed": "the records are not in a known layout; see the report's details",
            "unsafe_path": "media paths leave the video root; set --video-root, or --allow-outside-root",
            "missing": "media files are not where the paths point; check --video-root",
            "unreadable": "the clips cannot be decoded; see the report's details",
            "fps": f"native frame rates are below --min-fps {min_fps:g}",
            "too_few_frames": f"clips are shorter than --min-frames {rule.min_frames} at --fps {rule.sample_fps:g}",
            "too_many_frames": f"clips are longer than --max-frames {rule.max_frames} at --fps {rule.sample_fps:g}",
        }
        return f"{count} dropped as {reason}: {hints[reason]}"


def prepare_manifest(
    annotations: str | Path | Sequence[str | Path],
    output: str | Path,
    *,
    media_root: str | Path | None = None,
    clip_filter: ClipFilter | None = None,
    report: str | Path | None = None,
    workers: int | None = None,
    prober: Prober = probe_clip,
    progress: bool = True,
    allow_outside_root: bool = False,
) -> PrepareSummary:
    """Read annotations, probe each distinct clip once (in `workers` processes), filter, write manifest + report.

    The report goes to `report`, or next to the manifest as ``<name>.report.json``. Both are written atomically.
    `workers` defaults to the number of CPUs; 0 probes in this process. `prober` must be picklable when
    `workers` > 0 (a module-level function). Media paths must stay inside `media_root` unless
    `allow_outside_root` (see `videonsa.training.annotations.confined_path`).
    """
    clip_filter = clip_filter or ClipFilter()
    output = Path(output)
    report_path = Path(report) if report is not None else output.with_name(output.stem + ".report.json")
    # Checked before probing, which takes hours on a large dataset, not when the files are written after it.
    for path, what in ((output, "manifest"), (report_path, "report")):
        if path.is_dir():
            raise UserError(f"the {what} path {path} is a folder; give a file name such as {path / 'train.jsonl'}")
    annotation_set = read_annotations(annotations, media_root, allow_outside_root=allow_outside_root)
    clips = sorted({_clip_key(sample) for sample in annotation_set.samples})
    probed = probe_all(clips, prober=prober, workers=os.cpu_count() if workers is None else workers,
                       progress=progress)

    kept: list[ManifestEntry] = []
    rejected: list[Rejected] = list(annotation_set.rejected)
    for sample in annotation_set.samples:
        outcome = probed[_clip_key(sample)]
        verdict = outcome if isinstance(outcome, tuple) else clip_filter.verdict(outcome)
        if verdict is None:
            kept.append(ManifestEntry(sample, outcome))
        else:
            rejected.append(Rejected(sample.id, sample.origin, *verdict))

    atomic_write_text(output, "".join(json.dumps(entry.to_json(), ensure_ascii=False) + "\n" for entry in kept))
    dropped = Counter(item.reason for item in rejected)
    duplicates = annotation_set.duplicate_ids
    atomic_write_json(report_path, _report(annotations, clip_filter, len(kept), dropped, rejected, duplicates))
    return PrepareSummary(kept=len(kept), dropped=dropped, manifest=output, report=report_path,
                          clip_filter=clip_filter, duplicate_ids=len(duplicates))


def probe_all(
    clips: Sequence[ClipKey], *, prober: Prober = probe_clip, workers: int = 0, progress: bool = True
) -> dict[ClipKey, ClipInfo | tuple[str, str]]:
    """Probe every clip; each result is a `ClipInfo` or a (reason, detail) pair for a missing/unreadable one."""
    from tqdm.auto import tqdm

    bar = tqdm(total=len(clips), desc="probing clips", unit="clip", disable=not progress)
    results: dict[ClipKey, ClipInfo | tuple[str, str]] = {}
    try:
        for key, outcome in zip(clips, _probe_stream(clips, prober, workers)):
            results[key] = outcome
            bar.update(1)
    finally:
        bar.close()
    return results


def _probe_stream(clips: Sequence[ClipKey], prober: Prober, workers: int) -> Iterable:
    jobs = [(prober, media, is_video) for media, is_video in clips]
    if workers <= 1 or len(clips) < 2:
        return map(_probe_one, jobs)
    executor = ProcessPoolExecutor(max_workers=min(workers, len(clips)), initializer=die_with_parent,
                                   initargs=(os.getpid(),))
    # Chunks keep inter-process traffic low for 100K+ clips while the bar still moves steadily.
    chunksize = max(1, min(64, len(clips) // (workers * 8)))
    return _closing(executor, executor.map(_probe_one, jobs, chunksize=chunksize))


def _closing(executor: ProcessPoolExecutor, results: Iterable) -> Iterable:
    with executor:
        yield from results


def _probe_one(job: tuple[Prober, tuple[str, ...], bool]) -> ClipInfo | tuple[str, str]:
    prober, media, is_video = job
    try:
        return prober(media, is_video)
    except ClipMissing as error:
        return "missing", f"not found: {error}"
    except ClipUnreadable as error:
        return "unreadable", str(error)


def _clip_key(sample: Sample) -> ClipKey:
    return sample.media_paths, sample.video is not None


def _report(
    annotations: Any,
    clip_filter: ClipFilter,
    kept: int,
    dropped: Counter,
    rejected: list[Rejected],
    duplicate_ids: dict[str, list[str]],
) -> dict[str, Any]:
    files = [str(annotations)] if isinstance(annotations, (str, Path)) else [str(path) for path in annotations]
    return {
        "annotations": files,
        "filter": asdict(clip_filter),
        "total": kept + sum(dropped.values()),
        "kept": kept,
        "dropped": sum(dropped.values()),
        "dropped_by_reason": {reason: dropped.get(reason, 0) for reason in DROP_REASONS},
        "dropped_samples": [asdict(item) for item in rejected],
        "duplicate_ids": duplicate_ids,
    }


def read_manifest(path: str | Path) -> list[ManifestEntry]:
    """Read a manifest written by `prepare_manifest`; a damaged line is a `UserError` naming it.

    Relative media paths are taken relative to the manifest's folder (not the working directory).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"manifest {path} does not exist (write one with `videonsa data prepare`)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"manifest {path} is not UTF-8 text (write one with `videonsa data prepare`)") from None
    entries = []
    for line_number, line in enumerate(jsonl_lines(text), start=1):
        if not line.strip():
            continue
        try:
            entries.append(_anchored(ManifestEntry.from_json(json.loads(line)), path.parent))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError, RecursionError) as error:
            raise UserError(f"manifest {path} line {line_number} is damaged ({error!r})") from None
    return entries


def _anchored(entry: ManifestEntry, folder: Path) -> ManifestEntry:
    """`entry` with its relative media paths joined to `folder` (absolute paths stay as they are)."""
    sample = entry.sample
    if all(os.path.isabs(path) for path in sample.media_paths):
        return entry
    folder = folder.absolute()
    video = str(folder / sample.video) if sample.video is not None else None
    frames = tuple(str(folder / frame) for frame in sample.frames)
    return ManifestEntry(replace(sample, video=video, frames=frames), entry.clip)
