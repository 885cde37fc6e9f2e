"""Generating the answer: sampling settings, streaming with timings, multiple-choice letters, the report."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig, TextStreamer

from videonsa.errors import UserError
from videonsa.inference.memory import CHUNK_QUANTUM, PrefillMemory, check_chunk_setting, choose_prefill_chunk
from videonsa.inference.model_files import ModelFiles
from videonsa.inference.prefill_progress import ChunkedPrefillMeter, PrefillCallback, PrefillMeter
from videonsa.inference.prompt import QuestionPrompt, model_inputs
from videonsa.models.chunked_prefill import CACHE_KWARG, check_chunking_supported, prefill_in_chunks
from videonsa.models.kv_cache import preallocated_cache
from videonsa.options import GREEDY_GENERATION
from videonsa.video import DecodedVideo, VideoPlan
from videonsa.video.planning import is_real, is_whole

TextCallback = Callable[[str], None]
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationSettings:
    """How to generate: greedy when temperature is 0, else sampling with temperature / top_p / top_k."""

    max_new_tokens: int = GREEDY_GENERATION["max_new_tokens"]
    temperature: float = GREEDY_GENERATION["temperature"]
    top_p: float = GREEDY_GENERATION["top_p"]
    top_k: int = GREEDY_GENERATION["top_k"]
    seed: int | None = GREEDY_GENERATION["seed"]

    def validate(self) -> GenerationSettings:
        """Return self, or raise `UserError` naming the first bad setting."""
        # Types first: from Python a float token count fails inside generate, after the video is decoded.
        for name in ("max_new_tokens", "top_k", "seed"):
            value = getattr(self, name)
            if not (is_whole(value) or (name == "seed" and value is None)):
                raise UserError(f"{name} must be a whole number, got {value!r}")
        for name in ("temperature", "top_p"):
            if not is_real(getattr(self, name)):
                raise UserError(f"{name} must be a number, got {getattr(self, name)!r}")
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise UserError(f"temperature must be 0 (greedy) or positive, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UserError(f"top_k must be 0 (off) or positive, got {self.top_k}")
        return self

    def answer_tokens(self, multiple_choice: bool) -> int:
        """Tokens the answer may take: one letter for a multiple-choice question, else max_new_tokens."""
        return 1 if multiple_choice else self.max_new_tokens


@dataclass(frozen=True)
class AskReport:
    """What one question cost: frames and tokens, time to decode the video, prefill and decode speed."""

    frames: int
    frame_height: int
    frame_width: int
    video_tokens: int
    prompt_tokens: int
    generated_tokens: int
    video_seconds: float
    prefill_seconds: float
    decode_seconds: float
    attention: str
    prefill_chunk: int | None = None

    @property
    def prefill_chunks(self) -> int:
        """Forwards the prefill took: 1 in one pass, else the prompt's tokens over the chunk size, rounded up."""
        return 1 if self.prefill_chunk is None else -(-self.prompt_tokens // self.prefill_chunk)

    @property
    def decode_tokens_per_second(self) -> float | None:
        """Tokens per second after the first one (None when only one token was generated)."""
        if self.generated_tokens < 2 or self.decode_seconds <= 0:
            return None
        return (self.generated_tokens - 1) / self.decode_seconds

    def describe(self) -> str:
        """A short line for people."""
        speed = self.decode_tokens_per_second
        decode = "n/a" if speed is None else f"{speed:.1f} tokens/s"
        return (
            f"{self.frames} frames at {self.frame_width}x{self.frame_height}, {self.prompt_tokens:,} prompt tokens "
            f"({self.video_tokens:,} video), {self.generated_tokens} generated; video decoding "
            f"{self.video_seconds:.2f}s, prefill {self.prefill_seconds:.2f}s{self._chunking()}, decode {decode} "
            f"[attention {self.attention}]"
        )

    def _chunking(self) -> str:
        if self.prefill_chunk is None:
            return ""
        return f" in {self.prefill_chunks} chunks of {self.prefill_chunk:,} tokens"


@dataclass(frozen=True)
class Answer:
    """The model's answer. `choice` is the option letter for a multiple-choice question, else None;
    `choice_probabilities` gives each letter's probability among the letters."""

    text: str
    plan: VideoPlan
    report: AskReport
    choice: str | None = None
    choice_probabilities: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.text


class TimingStreamer(TextStreamer):
    """transformers' TextStreamer that hands text to a callback and notes when the first new token arrives."""

    def __init__(self, tokenizer, on_text: TextCallback | None) -> None:
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.on_text = on_text
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None

    def put(self, value: torch.Tensor) -> None:
        # The first call carries the prompt; the next one is the first generated token, which ends prefill.
        if not self.next_tokens_are_prompt and self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        super().put(value)

    def end(self) -> None:
        self.finished_at = time.perf_counter()
        super().end()

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        if self.on_text is not None and text:
            self.on_text(text)


def _generation_config(model, settings: GenerationSettings, multiple_choice: bool) -> GenerationConfig:
    """The model's stop and pad tokens with our sampling settings (nothing else carried over from the checkpoint).

    A multiple-choice answer is one token, whose raw logits are kept to report the letters' probabilities.
    """
    base = model.generation_config
    sampling = settings.temperature > 0
    return GenerationConfig(
        max_new_tokens=settings.answer_tokens(multiple_choice),
        return_dict_in_generate=True,
        output_logits=multiple_choice,
        do_sample=sampling,
        temperature=settings.temperature if sampling else None,
        top_p=settings.top_p if sampling else None,
        top_k=(settings.top_k or None) if sampling else None,
        eos_token_id=base.eos_token_id,
        pad_token_id=base.pad_token_id if base.pad_token_id is not None else base.eos_token_id,
        bos_token_id=base.bos_token_id,
    )


def _choice(prompt: QuestionPrompt, token_id: int, first_logits: torch.Tensor) -> tuple[str, dict[str, float]]:
    """The option letter generated (token `token_id`) and each letter's probability among the letters.

    Generation was restricted to the letters, so the token is one of them: the most probable when greedy,
    a draw when sampling. The probabilities come from the raw logits, before temperature.
    """
    letter_logits = first_logits[0, list(prompt.letter_token_ids)].float()
    probabilities = torch.softmax(letter_logits, dim=-1).tolist()
    letter = prompt.letters[prompt.letter_token_ids.index(token_id)]
    return letter, dict(zip(prompt.letters, probabilities, strict=True))


def generate_answer(
    model,
    files: ModelFiles,
    prompt: QuestionPrompt,
    video: DecodedVideo,
    settings: GenerationSettings,
    *,
    on_text: TextCallback | None = None,
    on_prefill: PrefillCallback | None = None,
    prefill_chunk_size: int | str | None = "auto",
) -> Answer:
    """Run the model on the prompt and video and return the answer with its report.

    A multiple-choice prompt generates one token restricted to the option letters; its `choice` is that
    letter. Text is passed to `on_text` as it is generated. `on_prefill` receives a `PrefillProgress` after
    each vision block and decoder layer of a one-pass prefill, or each piece of frames and chunk of a chunked
    one, and once at its end (`PrefillMeter`, `ChunkedPrefillMeter`).

    prefill_chunk_size: "auto" (default: one pass when the prompt fits the device's free memory at once, else
    chunks that fit; `memory.choose_prefill_chunk`), a number of tokens per chunk, or None for one pass
    (docs/long-videos.md). The answer equals the one-pass answer up to float rounding. A number is refused
    (`UserError`) by a model that cannot chunk: attention_mode 'official', or one without chunked prefill.
    """
    settings = settings.validate()
    multiple_choice = bool(prompt.letters)
    device = next(model.parameters()).device
    inputs = _on_device(model, model_inputs(prompt, video, files), device)
    prompt_tokens = inputs["input_ids"].shape[1]
    chunk = _prefill_chunk(model, prefill_chunk_size, prompt_tokens, device)
    extra = {}
    if multiple_choice:
        allowed = list(prompt.letter_token_ids)
        extra = {"prefix_allowed_tokens_fn": lambda batch, ids: allowed}
    config = _generation_config(model, settings, multiple_choice)
    retrying = False
    while True:
        if retrying and device.type == "cuda":
            torch.cuda.empty_cache()  # here, once the failed attempt's tensors are no longer referenced
        streamer = TimingStreamer(files.tokenizer, on_text)
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        try:
            output = _generate(model, inputs, config, streamer, extra, chunk, on_prefill)
            break
        except torch.OutOfMemoryError:
            # The memory model is an estimate: when "auto" misjudged, retry with smaller chunks (nothing has been
            # streamed yet: the prefill is where memory runs out). Explicit settings stand.
            smaller = _smaller_chunk(model, prefill_chunk_size, chunk, prompt_tokens)
            if smaller is None or streamer.first_token_at is not None:
                raise
            logger.warning(
                f"prefill ran out of memory {'in one pass' if chunk is None else f'in chunks of {chunk:,}'}; "
                f"retrying in chunks of {smaller:,} tokens"
            )
            chunk, retrying = smaller, True
    new_tokens = output.sequences[0, prompt_tokens:]
    text = files.tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
    choice, probabilities = None, {}
    if multiple_choice:
        choice, probabilities = _choice(prompt, int(new_tokens[0]), output.logits[0])
    first = streamer.first_token_at or streamer.finished_at or time.perf_counter()
    finished = streamer.finished_at or time.perf_counter()
    plan = video.plan
    report = AskReport(
        frames=plan.frame_count,
        frame_height=plan.frame_height,
        frame_width=plan.frame_width,
        video_tokens=plan.video_tokens,
        prompt_tokens=prompt_tokens,
        generated_tokens=int(new_tokens.numel()),
        video_seconds=video.seconds,
        prefill_seconds=first - streamer.started,
        decode_seconds=finished - first,
        attention=_attention_mode(model),
        prefill_chunk=chunk,
    )
    return Answer(text=text, plan=plan, report=report, choice=choice, choice_probabilities=probabilities)


def _generate(model, inputs, config, streamer, extra, chunk: int | None, on_prefill: PrefillCallback | None):
    """model.generate on the prompt, prefilled in one pass (chunk None) or in chunks, with the progress meter, into
    a KV cache with room for the prompt and the answer (`models.kv_cache`)."""
    prompt_tokens = inputs["input_ids"].shape[1]
    video_rows = inputs["pixel_values_videos"].shape[0] if "pixel_values_videos" in inputs else 0
    meter, on_step = contextlib.nullcontext(), None
    if on_prefill is not None and chunk is None:
        meter = PrefillMeter(model, prompt_tokens=prompt_tokens, vision_rows=video_rows, callback=on_prefill)
    elif on_prefill is not None:
        vision_tokens = int((inputs["input_ids"] == model.config.video_token_id).sum())
        on_step = ChunkedPrefillMeter(
            model, prompt_tokens=prompt_tokens, vision_rows=video_rows, vision_tokens=vision_tokens,
            chunk_size=chunk, callback=on_prefill,
        )
    chunking = prefill_in_chunks(model, chunk, on_step) if chunk is not None else contextlib.nullcontext()
    # Room for the prompt and the whole answer: decoding steps write in place instead of copying the cache.
    cache = preallocated_cache(model.config, prompt_tokens + config.max_new_tokens)
    with torch.inference_mode(), meter, chunking:
        # The cache under the installed transformers' name for it (newer 5.x warn on `past_key_values` at every call).
        return model.generate(**inputs, generation_config=config, streamer=streamer, **{CACHE_KWARG: cache}, **extra)


def _on_device(model, inputs: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The model's inputs on `device`, the pixel rows in the vision tower's dtype. The tower casts its input to
    that dtype anyway (the same values); cast on the host, the rows held through the prefill take half the memory
    of float32 ones (9.4 KB a video token in bf16: 4.8 GB at 512K tokens), and no cast copy of the whole video
    is made on the device."""
    visual = getattr(model, "visual", None)
    pixel_dtype = next(visual.parameters()).dtype if visual is not None else model.dtype
    return {
        name: tensor.to(device, pixel_dtype if name.startswith("pixel_values") else None)
        for name, tensor in inputs.items()
    }


def _smaller_chunk(model, setting: int | str | None, chunk: int | None, prompt_tokens: int) -> int | None:
    """After running out of memory with `chunk` (None: one pass): a quarter of it (of the prompt for one pass),
    in whole CHUNK_QUANTUM, when the setting was "auto" and chunking can go lower; else None."""
    if setting != "auto" or not hasattr(model, "prefill_chunking") or _attention_mode(model) == "official":
        return None
    smaller = (prompt_tokens if chunk is None else chunk) // 4 // CHUNK_QUANTUM * CHUNK_QUANTUM
    return smaller if smaller >= CHUNK_QUANTUM else None


def _prefill_chunk(model, setting: int | str | None, prompt_tokens: int, device: torch.device) -> int | None:
    """The chunk size this prefill runs with (None: one pass), from the setting and the device's free memory."""
    setting = check_chunk_setting(setting)
    check_chunking_supported(model, setting)
    if not hasattr(model, "prefill_chunking"):
        return None  # "auto" or None: one pass
    memory = PrefillMemory.from_config(model.config.to_dict(), model.dtype)
    chunk = choose_prefill_chunk(setting, prompt_tokens, memory, device, _attention_mode(model))
    # A chunk as long as the prompt is one pass.
    return None if chunk is None or chunk >= prompt_tokens else chunk


def _attention_mode(model) -> str:
    text_config = getattr(model.config, "text_config", model.config)
    return getattr(text_config, "attention_mode", "dense")
