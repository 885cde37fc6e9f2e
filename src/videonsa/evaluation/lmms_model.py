"""The `videonsa` model for lmms-eval: `python -m lmms_eval --model videonsa --model_args pretrained=DIR,...`.

lmms-eval finds this class through the `lmms_eval.models` entry point (`videonsa.evaluation.lmms_plugin`); it
is a plain ("simple") lmms-eval model: each request carries the task's prompt text, its generation settings
and a function that gives the document's visuals (video paths or PIL images). Frames are planned and decoded
by `videonsa.video` through the inference API (`plan_question`, `decode_planned_video`, `generate_answer`),
exactly as `videonsa ask` does, so a benchmark sees the same pipeline as a user. The task parses the answer.

Requests that share a video are answered one after another from one decode: when two questions about the
same video get the same frames (same times and size, which the planner gives unless the budget is so tight
that the prompt lengths matter), the frames are decoded once. Generation itself runs one question at a time:
hour-long videos fill the GPU at batch 1, and the official attention mode refuses padded batches. See
docs/lmms-eval.md for the model_args and how a budget study uses them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm

from videonsa.errors import UserError, first_line
from videonsa.inference.api import PlannedQuestion, VideoQA, load, plan_question
from videonsa.inference.generation import GenerationSettings, generate_answer
from videonsa.video import SamplingSettings
from videonsa.video.decoding import DecodedVideo
from videonsa.video.paper import PaperSettings, decode_planned_video, resolve_preset

logger = logging.getLogger(__name__)

# model_args that only one preset understands, and what each becomes in that preset's settings.
PLANNER_ARGS = {"budget": "budget_tokens", "prefer": "prefer", "pixels": "pixels_per_frame"}
PAPER_ARGS = {"max_pixels": "max_pixels", "total_pixels": "total_pixels"}
# Arguments lmms-eval itself adds from its --batch_size / --max_batch_size / --device flags.
LMMS_EVAL_ARGS = ("batch_size", "max_batch_size")
# lmms-eval generation_kwargs this model honours; any other key is named once in a warning and ignored.
HONOURED_GEN_KWARGS = frozenset({"max_new_tokens", "temperature", "do_sample", "top_p", "top_k", "num_beams", "until"})


@dataclass(frozen=True)
class LmmsModelArgs:
    """What `--model_args` may set (docs/lmms-eval.md). None means "the default of the preset / API".

    pretrained: checkpoint directory or Hugging Face Hub id. attention: "auto", "nsa", "dense" or "official".
    preset: "auto", "planner" or "paper" (auto: paper for the official attention, else planner).
    fps, max_frames, min_pixels: both presets. budget (tokens), prefer, pixels (per frame): planner only.
    max_pixels, total_pixels: paper preset only. block_counts, window_size: the sparse budget (NSA modes).
    max_new_tokens: an upper bound on what the task asks for. backend: "pyav" or "decord".
    """

    pretrained: str
    attention: str | None = None
    preset: str = "auto"
    device: str = "auto"
    dtype: str = "auto"
    fps: float | None = None
    max_frames: int | None = None
    min_pixels: int | None = None
    budget: int | None = None
    prefer: str | None = None
    pixels: int | None = None
    max_pixels: int | None = None
    total_pixels: int | None = None
    block_counts: int | None = None
    window_size: int | None = None
    max_new_tokens: int | None = None
    backend: str = "pyav"


_INT_ARGS = {"max_frames", "min_pixels", "budget", "pixels", "max_pixels", "total_pixels", "block_counts"}
_INT_ARGS |= {"window_size", "max_new_tokens"}
_FLOAT_ARGS = {"fps"}
_ARG_NAMES = tuple(field.name for field in dataclasses.fields(LmmsModelArgs))


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UserError(f"videonsa model_args: {name} must be a whole number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise UserError(f"videonsa model_args: {name} must be a whole number, got {value!r}") from None
    if not number.is_integer():
        raise UserError(f"videonsa model_args: {name} must be a whole number, got {value!r}")
    return int(number)


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UserError(f"videonsa model_args: {name} must be a number, got {value!r}")
    try:
        return float(value)
    except ValueError:
        raise UserError(f"videonsa model_args: {name} must be a number, got {value!r}") from None


def parse_model_args(args: dict[str, Any]) -> LmmsModelArgs:
    """Check `--model_args` (as lmms-eval parsed them: numbers already converted) and return them typed.

    Raises `UserError` with one line for an unknown argument, a missing `pretrained`, a value of the wrong
    type, or an argument of the other preset.
    """
    unknown = sorted(set(args) - set(_ARG_NAMES))
    if unknown:
        raise UserError(
            f"videonsa model_args: unknown argument(s) {', '.join(unknown)}; known: {', '.join(_ARG_NAMES)}"
        )
    if not args.get("pretrained"):
        raise UserError("videonsa model_args: pretrained=DIR_OR_HUB_ID is required")
    typed: dict[str, Any] = {}
    for name, value in args.items():
        if value is None:
            continue
        if name in _INT_ARGS:
            typed[name] = _as_int(name, value)
        elif name in _FLOAT_ARGS:
            typed[name] = _as_float(name, value)
        else:
            typed[name] = str(value)
    return LmmsModelArgs(**typed)


def _check_preset_args(args: LmmsModelArgs, preset: str) -> None:
    """One line naming the first argument the resolved preset does not take."""
    foreign = PAPER_ARGS if preset == "planner" else PLANNER_ARGS
    for name in foreign:
        if getattr(args, name) is not None:
            other = "paper" if preset == "planner" else "planner"
            raise UserError(
                f"videonsa model_args: {name} is a setting of the {other} preset, and this run uses preset={preset} "
                f"(set preset={other}, or drop {name})"
            )


def sampling_settings(args: LmmsModelArgs) -> SamplingSettings:
    """The planner's settings: its defaults, overridden by the model_args given."""
    given = {
        "fps": args.fps,
        "max_frames": args.max_frames,
        "min_pixels_per_frame": args.min_pixels,
        "budget_tokens": args.budget,
        "prefer": args.prefer,
        "pixels_per_frame": args.pixels,
    }
    return dataclasses.replace(SamplingSettings(), **{k: v for k, v in given.items() if v is not None}).validate()


def paper_settings(args: LmmsModelArgs) -> PaperSettings:
    """The paper preset's settings: its defaults, overridden by the model_args given."""
    given = {
        "fps": args.fps,
        "max_frames": args.max_frames,
        "min_pixels": args.min_pixels,
        "max_pixels": args.max_pixels,
        "total_pixels": args.total_pixels,
    }
    return dataclasses.replace(PaperSettings(), **{k: v for k, v in given.items() if v is not None}).validate()


def generation_settings(gen_kwargs: dict[str, Any], cap: int | None, task: str) -> GenerationSettings:
    """The task's generation_kwargs as our settings: greedy unless it samples; max_new_tokens at most `cap`.

    Raises `UserError` for beam search, which `generate_answer` does not do.
    """
    beams = gen_kwargs.get("num_beams")
    if beams not in (None, 1):
        raise UserError(f"task {task}: num_beams={beams} asks for beam search; videonsa decodes greedily or samples")
    temperature = float(gen_kwargs.get("temperature") or 0.0)
    sampling = temperature > 0 and gen_kwargs.get("do_sample", True) is not False
    defaults = GenerationSettings()
    max_new_tokens = int(gen_kwargs.get("max_new_tokens") or cap or defaults.max_new_tokens)
    if cap is not None:
        max_new_tokens = min(max_new_tokens, cap)
    return GenerationSettings(
        max_new_tokens=max_new_tokens,
        temperature=temperature if sampling else 0.0,
        top_p=float(gen_kwargs.get("top_p") or 1.0) if sampling else 1.0,
        top_k=int(gen_kwargs.get("top_k") or 0) if sampling else 0,
    ).validate()


def stop_strings(gen_kwargs: dict[str, Any], task: str) -> tuple[str, ...]:
    """The task's `until` as a tuple of non-empty stop strings."""
    until = gen_kwargs.get("until") or ()
    if isinstance(until, str):
        until = (until,)
    if not isinstance(until, (list, tuple)) or not all(isinstance(item, str) for item in until):
        raise UserError(f"task {task}: generation_kwargs until must be a string or a list of strings, got {until!r}")
    return tuple(item for item in until if item)


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """`text` up to the first occurrence of any stop string (all of it when none occurs)."""
    cut = len(text)
    for stop in stops:
        found = text.find(stop)
        if found != -1:
            cut = min(cut, found)
    return text[:cut]


@dataclass
class _Visual:
    """A request's visual input, as `plan_question` takes it: a video file, or image files shown as frames."""

    video: str | list[str]
    key: tuple | None  # requests with equal keys show the same video (None: images, never shared)
    scratch: tempfile.TemporaryDirectory | None = None


class VideoNSALmms(lmms):
    """lmms-eval's `videonsa` model (see the module docstring and docs/lmms-eval.md)."""

    is_simple = True

    def __init__(self, **model_args: Any) -> None:
        super().__init__()
        batch_size = model_args.pop("batch_size", 1)
        model_args.pop("max_batch_size", None)
        if str(batch_size).strip() != "1":
            raise UserError(
                f"videonsa: batch_size={batch_size} is not supported; use 1 (questions run one at a time, and "
                "questions about the same video share one decode)"
            )
        self.args = parse_model_args(model_args)
        self._rank, self._world_size, device = _distributed_placement(self.args.device)
        load_args = {"device": device, "dtype": self.args.dtype}
        if self.args.attention is not None:
            load_args["attention"] = self.args.attention
        if self.args.preset != "auto" or self.args.attention not in (None, "auto"):
            # Known before the checkpoint is read: refuse the other preset's arguments before minutes of loading.
            _check_preset_args(self.args, resolve_preset(self.args.preset, self.args.attention))
        self.qa: VideoQA = load(self.args.pretrained, **load_args)
        # "auto" attention is only known once the checkpoint is read.
        self.preset = resolve_preset(self.args.preset, self.qa.attention)
        _check_preset_args(self.args, self.preset)
        self.sampling = sampling_settings(self.args) if self.preset == "planner" else None
        self.paper = paper_settings(self.args) if self.preset == "paper" else None
        sparsity = {"block_counts": self.args.block_counts, "window_size": self.args.window_size}
        sparsity = {name: value for name, value in sparsity.items() if value is not None}
        if sparsity:
            self.qa.model.set_sparsity(**sparsity)
        self._device = next(self.qa.model.parameters()).device
        self._ignored_gen_kwargs: set[str] = set()
        self._decoded: tuple[tuple, DecodedVideo] | None = None
        self._failures = 0

    # lmms-eval reads these.
    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return 1

    @property
    def tokenizer(self):
        return self.qa.files.tokenizer

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """Answer each request: its context is the prompt text, its visuals the video (or images).

        Requests whose visuals are image objects are answered as they come; video files are answered after,
        grouped by file so that each video is probed and decoded as few times as possible. A request that fails
        on its own document (no video, an unreadable one, a question the budget cannot hold, out of memory) is
        logged and answered with an empty reply, which the task scores as wrong: lmms-eval writes results only at
        the end, so one bad video must not lose the run. A task's generation settings that cannot run stop it.
        """
        results: list[GenerationResult | None] = [None] * len(requests)
        deferred: list[tuple[tuple, int, _Visual]] = []
        self._failures = 0
        with tqdm(total=len(requests), disable=self.rank != 0, desc="videonsa answering") as bar:
            for index, request in enumerate(requests):
                try:
                    visual = self._visual(request)
                except Exception as error:
                    results[index] = self._failed(request, error)
                    bar.update(1)
                    continue
                if visual.key is None:
                    results[index] = self._answer(request, visual)
                    bar.update(1)
                else:
                    deferred.append((visual.key, index, visual))
            for _key, index, visual in sorted(deferred, key=lambda item: (item[0], item[1])):
                results[index] = self._answer(requests[index], visual)
                bar.update(1)
        self._decoded = None
        if self._failures:
            logger.error(
                "videonsa: %d of %d requests failed (errors above) and were answered with an empty reply",
                self._failures,
                len(requests),
            )
        return results

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            "videonsa: loglikelihood requests (tasks with output_type loglikelihood or multiple_choice) are not "
            "supported; the video benchmarks it serves (LongVideoBench, MLVU, TimeScope, LongTimeScope, TOMATO, "
            "VSI-Bench) ask for generate_until"
        )

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(
            "videonsa: generate_until_multi_round (multi-turn tasks) is not supported; it answers one question "
            "about one video per request (generate_until)"
        )

    def _visual(self, request: Instance) -> _Visual:
        """The request's visual: one video file, or one or more images (PIL images or image files)."""
        _context, _gen_kwargs, doc_to_visual, doc_id, task, split = request.args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else None
        if isinstance(visuals, (str, os.PathLike, Image.Image)):  # one visual not in a list: not its characters
            visuals = [visuals]
        visuals = list(visuals or [])
        where = f"task {task}, doc {doc_id}"
        if not visuals:
            raise UserError(f"videonsa: {where} has no video or image; videonsa answers questions about videos")
        if all(isinstance(item, (str, os.PathLike)) for item in visuals) and len(visuals) == 1:
            path = Path(visuals[0]).expanduser()
            if path.suffix.lower() not in _IMAGE_SUFFIXES:
                return _Visual(video=str(path), key=(str(path.resolve()),))
        if not all(isinstance(item, (str, os.PathLike, Image.Image)) for item in visuals):
            kinds = sorted({type(item).__name__ for item in visuals})
            raise UserError(f"videonsa: {where} gives visuals of type {', '.join(kinds)}; expected a video or images")
        files = [Path(item) for item in visuals if isinstance(item, (str, os.PathLike))]
        if any(path.suffix.lower() not in _IMAGE_SUFFIXES for path in files):
            raise UserError(f"videonsa: {where} gives {len(visuals)} visuals with a video among them; one video only")
        return _images_as_frames(visuals)

    def _generation(self, gen_kwargs: dict[str, Any], task: str) -> GenerationSettings:
        """The task's generation settings, refused (`UserError`) when this model cannot run them at all."""
        self._warn_ignored(gen_kwargs)
        generation = generation_settings(gen_kwargs, self.args.max_new_tokens, task)
        if self.preset == "paper" and generation.temperature > 0:
            raise UserError(
                f"task {task}: temperature={generation.temperature:g} asks for sampling, and the paper preset "
                "decodes greedily as the paper's evaluation did (preset=planner samples)"
            )
        return generation

    def _plan(self, request: Instance, visual: _Visual, generation: GenerationSettings) -> PlannedQuestion:
        context, _gen_kwargs, _doc_to_visual, _doc_id, _task, _split = request.args
        # Image frames are shown at the sampling rate, so that every image is kept.
        frames_fps = (self.sampling or self.paper).fps
        return plan_question(
            self.qa.files,
            visual.video,
            context.replace("<image>", ""),
            sampling=self.sampling,
            paper=self.paper,
            generation=generation,
            backend=self.args.backend,
            frames_fps=frames_fps,
            preset=self.preset,
        )

    def _decode(self, planned: PlannedQuestion, visual: _Visual) -> DecodedVideo:
        """The planned frames, reusing the last decode when it showed the same video at the same frames."""
        plan = planned.plan
        key = None
        if visual.key is not None:
            key = (*visual.key, type(plan).__name__, plan.timestamps, plan.frame_height, plan.frame_width)
            if self._decoded is not None and self._decoded[0] == key:
                return dataclasses.replace(self._decoded[1], plan=plan)
        decoded = decode_planned_video(plan)
        self._decoded = None if key is None else (key, decoded)
        return decoded

    def _answer(self, request: Instance, visual: _Visual) -> GenerationResult:
        context, gen_kwargs, _doc_to_visual, _doc_id, task, _split = request.args
        try:
            # Outside the per-request net: settings the task gives every request would fail them all.
            generation = self._generation(gen_kwargs, task)
            stops = stop_strings(gen_kwargs, task)
            try:
                planned = self._plan(request, visual, generation)
                decoded = self._decode(planned, visual)
                answer = generate_answer(self.qa.model, self.qa.files, planned.prompt, decoded, planned.generation)
            except Exception as error:
                return self._failed(request, error)
        finally:
            if visual.scratch is not None:
                visual.scratch.cleanup()
        logger.info("%s: %s; %s", task, planned.plan.describe(), answer.report.describe())
        text = cut_at_stop(answer.text, stops)
        self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        counts = TokenCounts(input_tokens=answer.report.prompt_tokens, output_tokens=answer.report.generated_tokens)
        return GenerationResult(text=text, token_counts=counts)

    def _failed(self, request: Instance, error: Exception) -> GenerationResult:
        """An empty reply for a request that failed, after one error line naming its task and document."""
        _context, _gen_kwargs, _doc_to_visual, doc_id, task, _split = request.args
        self._failures += 1
        logger.error(
            "videonsa: task %s, doc %s not answered (%s: %s)", task, doc_id, type(error).__name__, first_line(error)
        )
        if isinstance(error, torch.OutOfMemoryError) and self._device.type == "cuda":
            torch.cuda.empty_cache()  # the failed attempt's memory, for the next request
        return GenerationResult(text="", token_counts=None)

    def _warn_ignored(self, gen_kwargs: dict[str, Any]) -> None:
        for name in sorted(set(gen_kwargs) - HONOURED_GEN_KWARGS - self._ignored_gen_kwargs):
            logger.warning("videonsa: generation_kwargs %s=%r is not used", name, gen_kwargs[name])
            self._ignored_gen_kwargs.add(name)


_IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})


def _images_as_frames(visuals: Sequence[Any]) -> _Visual:
    """Images as the frames of a video: PIL images are written to a scratch folder as PNG files.

    A single image is shown twice: Qwen2.5-VL repeats a still image to fill one temporal patch of two frames,
    so the pixels the model sees are the same as for an image input.
    """
    scratch = tempfile.TemporaryDirectory(prefix="videonsa-lmms-")
    paths: list[str] = []
    for index, item in enumerate(visuals):
        if isinstance(item, Image.Image):
            path = Path(scratch.name) / f"frame_{index:05d}.png"
            item.convert("RGB").save(path)
            paths.append(str(path))
        else:
            paths.append(str(Path(item).expanduser()))
    if len(paths) == 1:
        paths = paths * 2
    return _Visual(video=paths, key=None, scratch=scratch)


def _distributed_placement(device: str) -> tuple[int, int, str]:
    """(rank, world size, device) under `accelerate launch` / `torchrun` data parallelism, else (0, 1, device).

    Each process answers its share of the requests on its own GPU (cuda:LOCAL_RANK) when the device is left
    to "auto" or given as "cuda".
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1, device
    rank = int(os.environ.get("RANK", "0"))
    if device in ("auto", "cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return rank, world_size, device


__all__ = ["LmmsModelArgs", "VideoNSALmms", "cut_at_stop", "generation_settings", "parse_model_args"]
