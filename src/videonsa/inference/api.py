"""Load once, ask many: `videonsa.load(...)` returns a `VideoQA` whose `ask` answers questions about videos.

>>> import videonsa
>>> model = videonsa.load("Enxin/VideoNSA")     # or a local directory; the released layout runs official attention
>>> answer = model.ask("talk.mp4", "What is written on the board?")     # so the paper preset: its frames, prompt
>>> answer.text, answer.report.describe()
>>> model.ask("talk.mp4", "Who speaks first?", options=["the host", "the guest"]).choice   # "A" or "B"
>>> model.ask("talk.mp4", "What happens?", preset="planner", budget_tokens=65_536)          # our planner instead
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from videonsa.errors import UserError
from videonsa.inference.generation import Answer, GenerationSettings, TextCallback, generate_answer
from videonsa.inference.memory import check_chunk_setting, default_budget_tokens, planning_chunk
from videonsa.inference.model_files import (
    ModelFiles,
    check_attention,
    load_weights,
    open_model_files,
    resolve_attention,
    resolve_device,
    resolve_dtype,
)
from videonsa.inference.prefill_progress import PrefillCallback
from videonsa.inference.prompt import QuestionPrompt, build_preset_prompt
from videonsa.models.chunked_prefill import check_chunking_supported
from videonsa.video import DEFAULT_FPS, SamplingSettings, VideoInfo, VideoInput, VideoPlan, plan_video, probe_video
from videonsa.video.decoding import Progress
from videonsa.video.paper import PaperSettings, decode_planned_video, plan_paper_video, resolve_preset

_GENERATION_FIELDS = {f.name for f in dataclasses.fields(GenerationSettings)}
# `VideoQA.ask`'s prefill_chunk_size when not given: the one `load` was given.
_LOADED: Any = object()


@dataclass(frozen=True)
class PlannedQuestion:
    """A question checked and planned, before any frame is decoded: its prompt and its video plan."""

    prompt: QuestionPrompt
    plan: VideoPlan
    generation: GenerationSettings


def plan_question(
    files: ModelFiles,
    video: VideoInput,
    question: str,
    *,
    options: Sequence[str] | None = None,
    sampling: SamplingSettings | None = None,
    generation: GenerationSettings | None = None,
    backend: str = "pyav",
    frames_fps: float = DEFAULT_FPS,
    preset: str = "planner",
    paper: PaperSettings | None = None,
    info: VideoInfo | None = None,
) -> PlannedQuestion:
    """Check every input (settings, question, options, video) and plan the frames; loads no weights.

    preset: "planner" (our token-budget planner, `sampling`) or "paper" (the paper's evaluation preprocessing,
    `paper`; greedy decoding). For the planner the budget covers the prompt, the video and the answer
    (max_new_tokens, or one letter for options); the paper preset has no budget. info: `video` already probed
    (`probe_video`), so that many questions about one video probe it once.
    """
    if preset not in ("paper", "planner"):
        raise UserError(f"preset must be 'paper' or 'planner' here (resolve 'auto' first), got {preset!r}")
    generation = (generation or GenerationSettings()).validate()
    if preset == "paper":
        _check_paper_generation(generation)
        paper = (paper or PaperSettings()).validate()
    else:
        sampling = (sampling or SamplingSettings()).validate()
    prompt = build_preset_prompt(files, question, options, preset=preset)
    info = info or probe_video(video, backend=backend, frames_fps=frames_fps)
    text_tokens = prompt.text_tokens + generation.answer_tokens(bool(prompt.letters))
    if preset == "paper":
        plan = plan_paper_video(info, paper, text_tokens=text_tokens, geometry=files.geometry)
    else:
        plan = plan_video(info, sampling, text_tokens=text_tokens, geometry=files.geometry)
    return PlannedQuestion(prompt=prompt, plan=plan, generation=generation)


def _check_paper_generation(generation: GenerationSettings) -> None:
    if generation.temperature > 0:
        raise UserError(
            f"temperature={generation.temperature:g}: the paper preset decodes greedily (temperature 0), as the "
            f"paper's evaluation did; use the planner preset to sample"
        )


# Each preset's frame settings class, and how it differs from the other preset (said when a setting is misplaced).
_PRESET_SETTINGS = {"planner": SamplingSettings, "paper": PaperSettings}
_PRESET_NOTES = {"planner": "", "paper": " and has no token budget"}


def resolve_settings(
    preset: str,
    overrides: dict[str, Any],
    *,
    sampling: SamplingSettings | None = None,
    paper: PaperSettings | None = None,
    generation: GenerationSettings | None = None,
) -> tuple[SamplingSettings | None, PaperSettings | None, GenerationSettings]:
    """The settings a question runs with: `overrides` (keyword arguments of `ask` / `plan`) applied on top of the
    given or default settings of `preset` ("planner" or "paper") and of generation.

    Returns (sampling, paper, generation), the settings object of the other preset being None. An override or a
    settings object that belongs to the other preset is a `UserError` saying which preset takes it; a name
    neither preset knows is a `TypeError`, as for any unknown keyword argument.
    """
    if preset not in _PRESET_SETTINGS:
        raise UserError(f"preset must be 'paper' or 'planner' here (resolve 'auto' first), got {preset!r}")
    if preset == "paper" and sampling is not None:
        raise UserError("sampling= holds planner settings; the paper preset takes paper=PaperSettings(...)")
    if preset == "planner" and paper is not None:
        raise UserError("paper= holds paper-preset settings; pass preset='paper' to use them")
    other = "paper" if preset == "planner" else "planner"
    own_fields, other_fields = _field_names(_PRESET_SETTINGS[preset]), _field_names(_PRESET_SETTINGS[other])
    unknown = sorted(set(overrides) - own_fields - _GENERATION_FIELDS)
    if unknown:
        misplaced = [name for name in unknown if name in other_fields]
        if misplaced:
            raise UserError(
                f"{misplaced[0]} is a setting of the {other} preset, but the {preset} preset runs (it takes "
                f"{', '.join(sorted(own_fields))}{_PRESET_NOTES[preset]}); pass preset='{other}' to use it"
            )
        known = ", ".join(sorted(own_fields | _GENERATION_FIELDS))
        raise TypeError(f"unknown setting(s) {', '.join(unknown)}; known: {known}")
    given = paper if preset == "paper" else sampling
    frames = dataclasses.replace(
        given or _PRESET_SETTINGS[preset](), **{k: v for k, v in overrides.items() if k in own_fields}
    )
    generation = dataclasses.replace(
        generation or GenerationSettings(), **{k: v for k, v in overrides.items() if k in _GENERATION_FIELDS}
    )
    if preset == "paper":
        return None, frames, generation
    return frames, None, generation


def _field_names(settings_class: type) -> set[str]:
    return {field.name for field in dataclasses.fields(settings_class)}


class VideoQA:
    """A loaded VideoNSA (or Qwen2.5-VL) model that answers questions about videos.

    Use `videonsa.load` to make one. `ask` plans the frames within the token budget, decodes them, and
    generates; `attention` switches between "nsa", "dense" and "official" without reloading.
    """

    def __init__(
        self, files: ModelFiles, model: torch.nn.Module, prefill_chunk_size: int | str | None = "auto"
    ) -> None:
        self.files = files
        self.model = model
        self.prefill_chunk_size = check_chunk_setting(prefill_chunk_size)

    @property
    def attention(self) -> str:
        """The attention mode in use: "nsa", "dense" or "official"; it picks the preset `ask` uses by default."""
        return self.model.config.text_config.attention_mode

    @attention.setter
    def attention(self, mode: str) -> None:
        self.model.set_attention_mode(resolve_attention(self.files, check_attention(mode)).mode)

    def plan(
        self,
        video: VideoInput,
        question: str,
        *,
        options: Sequence[str] | None = None,
        backend: str = "pyav",
        frames_fps: float = DEFAULT_FPS,
        preset: str = "auto",
        sampling: SamplingSettings | None = None,
        paper: PaperSettings | None = None,
        generation: GenerationSettings | None = None,
        **settings: Any,
    ) -> VideoPlan:
        """The frames `ask` would use for this question, without decoding them (see `ask` for arguments)."""
        return self._plan_question(
            video, question, options, backend, frames_fps, preset, sampling, paper, generation, settings,
            check_chunk_setting(self.prefill_chunk_size),
        ).plan

    def _plan_question(
        self, video, question, options, backend, frames_fps, preset, sampling, paper, generation, settings,
        prefill_chunk_size,
    ) -> PlannedQuestion:
        preset = resolve_preset(preset, self.attention)
        if preset == "planner" and sampling is None and "budget_tokens" not in settings:
            # On a GPU the budget is what fits its free memory beside the loaded weights (docs/long-videos.md), for
            # the prefill that will run (one pass needs room for every token's activations at once).
            parameter = next(self.model.parameters())
            budget = default_budget_tokens(
                self.files.config, parameter.device, parameter.dtype, loaded_bytes=_weight_bytes(self.model),
                chunk=planning_chunk(prefill_chunk_size, self.attention),
            )
            if budget is not None:
                settings = {**settings, "budget_tokens": budget}
        sampling, paper, generation = resolve_settings(
            preset, settings, sampling=sampling, paper=paper, generation=generation
        )
        return plan_question(
            self.files,
            video,
            question,
            options=options,
            sampling=sampling,
            generation=generation,
            backend=backend,
            frames_fps=frames_fps,
            preset=preset,
            paper=paper,
        )

    def ask(
        self,
        video: VideoInput,
        question: str,
        *,
        options: Sequence[str] | None = None,
        on_text: TextCallback | None = None,
        progress: Progress | None = None,
        on_prefill: PrefillCallback | None = None,
        backend: str = "pyav",
        frames_fps: float = DEFAULT_FPS,
        preset: str = "auto",
        sampling: SamplingSettings | None = None,
        paper: PaperSettings | None = None,
        generation: GenerationSettings | None = None,
        prefill_chunk_size: int | str | None = _LOADED,
        **settings: Any,
    ) -> Answer:
        """Answer `question` about `video` (a file, a folder of frames or a list of image paths).

        options: multiple-choice answers; the answer's `choice` is then the chosen letter.
        on_text: called with each piece of the answer as it is generated (e.g. `print`, with end="").
        progress: called as `progress(done, total)` while frames decode.
        on_prefill: called with a `PrefillProgress` after each vision block and decoder layer of the prefill
            (the forward pass over the whole prompt) and once at its end; `.describe()` is a line for people.
        preset: how frames are chosen and prompted. "planner": our token-budget planner (`sampling`);
            "paper": the paper's evaluation preprocessing (`paper`: frame indices and sizes as the original
            video reader picked them, 1.0 s per temporal patch, its prompt layout, greedy decoding);
            "auto" (default): "paper" when the attention mode is "official", else "planner".
        settings: keyword overrides. Planner: fields of `SamplingSettings` (fps, max_frames, pixels_per_frame,
            min_pixels_per_frame, budget_tokens, prefer). Paper: fields of `PaperSettings` (fps, max_frames,
            min_pixels, max_pixels, total_pixels; with max_pixels below min_pixels, small frames are scaled UP
            to min_pixels). Both: `GenerationSettings` (max_new_tokens, temperature, top_p, top_k, seed).
            On a CUDA device the planner's default budget_tokens is what fits the GPU's free memory.
        prefill_chunk_size: "auto", tokens per prefill chunk, or None for one pass (default: the one `load`
            was given; docs/long-videos.md). Any other value, or a number of tokens in attention mode
            "official" (which prefills in one pass), raises `UserError` before the video is read.
        """
        # Checked before the video is probed or decoded, so that a bad setting costs nothing: its value, and that
        # the model can chunk at all (generate_answer checks that again, for its other callers).
        prefill_chunk_size = check_chunk_setting(
            self.prefill_chunk_size if prefill_chunk_size is _LOADED else prefill_chunk_size
        )
        check_chunking_supported(self.model, prefill_chunk_size)
        planned = self._plan_question(
            video, question, options, backend, frames_fps, preset, sampling, paper, generation, settings,
            prefill_chunk_size,
        )
        decoded = decode_planned_video(planned.plan, progress=progress)
        return generate_answer(
            self.model,
            self.files,
            planned.prompt,
            decoded,
            planned.generation,
            on_text=on_text,
            on_prefill=on_prefill,
            prefill_chunk_size=prefill_chunk_size,
        )


def load(
    model: str,
    *,
    attention: str = "auto",
    device: str = "auto",
    dtype: str = "auto",
    fresh_gates: bool = False,
    prefill_chunk_size: int | str | None = "auto",
) -> VideoQA:
    """Load a model from a local directory or a Hugging Face Hub id, ready to `ask`.

    attention: "auto" (default: the checkpoint decides; "official" for the released Enxin/VideoNSA layout,
    which also makes `ask` use the paper preset), "nsa" (sparse attention over video tokens), "dense", or
    "official" (the function the released checkpoint was evaluated with). device: "auto", "cpu", "cuda" or
    "cuda:N". dtype: "auto" (bfloat16 on GPU, float32 on CPU), "bfloat16", "float16" or "float32".
    fresh_gates: accept a checkpoint storing gates for some layers only, initialising the others fresh (without it
    such a checkpoint is refused, naming the layers). prefill_chunk_size: how `ask` prefills a prompt: "auto"
    (default: in one pass when it fits the device's free memory, else in chunks that fit), a number of tokens
    per chunk, or None (one pass); docs/long-videos.md. Raises `UserError` with one line for a missing directory,
    an unreachable hub id, a bad setting, or a broken model folder (docs/model-files.md).
    """
    check_attention(attention)
    check_chunk_setting(prefill_chunk_size)
    resolved_device = resolve_device(device)
    resolved_dtype = resolve_dtype(dtype, resolved_device)
    files = open_model_files(model)
    weights = load_weights(
        files, attention=attention, device=resolved_device, dtype=resolved_dtype, fresh_gates=fresh_gates
    )
    return VideoQA(files, weights, prefill_chunk_size)


def _weight_bytes(model: torch.nn.Module) -> int:
    return sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())


__all__ = ["PlannedQuestion", "VideoQA", "load", "plan_question", "resolve_settings"]
