"""Progress of the prefill: the forward pass over the whole prompt before the first answer token (one pass, or
chunks of it: `ChunkedPrefillMeter`).

On a long video the prefill is most of the wait (minutes on a CPU), yet it is a single call into the model.
`PrefillMeter` watches it through forward hooks on the vision encoder's blocks and the language model's decoder
layers, which run one after another, each over all of its tokens at once. Each finished block or layer is
weighted by its parameter count times the rows it processed (video patches for the vision blocks, prompt tokens
for the decoder layers), the cost of its matrix products, so the share of the work done, and from it the
tokens done, the rate and the time left, read like a progress over tokens. See docs/prefill-progress.md.

    >>> with PrefillMeter(model, prompt_tokens=20_000, vision_rows=patches, callback=print):
    ...     model.generate(**inputs)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

STAGE_NAMES = {"vision": "vision block", "text": "decoder layer", "vision-chunk": "vision tokens", "chunk": "chunk"}


@dataclass(frozen=True)
class PrefillProgress:
    """Where the prefill stands after one vision block or decoder layer (or at its end, `finished`).

    stage: "vision" (the vision encoder's blocks, first) or "text" (the language model's decoder layers); in a
    chunked prefill (`ChunkedPrefillMeter`) "vision-chunk" (the vision tower over pieces of frames; stage_done /
    stage_total count vision tokens) then "chunk" (the language model over chunks of the prompt).
    stage_done / stage_total: blocks, layers, vision tokens or chunks of that stage done. work_done: share of the
    whole prefill's estimated work done, in [0, 1]. seconds: time since the prefill began.
    """

    prompt_tokens: int
    stage: str
    stage_done: int
    stage_total: int
    work_done: float
    seconds: float
    finished: bool = False

    @property
    def tokens_done(self) -> int:
        """The prompt's tokens in proportion to the work done (all of them once finished)."""
        return self.prompt_tokens if self.finished else round(self.prompt_tokens * self.work_done)

    @property
    def tokens_per_second(self) -> float | None:
        """Prompt tokens per second so far; None before any time has passed."""
        return self.tokens_done / self.seconds if self.seconds > 0 else None

    @property
    def seconds_left(self) -> float | None:
        """Time to the end at the rate so far; None before any work is done."""
        if self.finished:
            return 0.0
        if self.work_done <= 0:
            return None
        return self.seconds * (1 - self.work_done) / self.work_done

    def describe(self) -> str:
        """One line for people, e.g. `prefill 5,000/20,000 tokens (decoder layer 7/28), 500 tokens/s, ~30s left`."""
        rate = self.tokens_per_second
        speed = "" if rate is None else f", {rate:,.0f} tokens/s"
        if self.finished:
            return f"prefill {self.prompt_tokens:,} tokens in {self.seconds:.1f}s{speed}"
        left = self.seconds_left
        eta = "" if left is None else f", ~{left:.0f}s left"
        step = f"{STAGE_NAMES.get(self.stage, self.stage)} {self.stage_done:,}/{self.stage_total:,}"
        return f"prefill {self.tokens_done:,}/{self.prompt_tokens:,} tokens ({step}){speed}{eta}"


PrefillCallback = Callable[[PrefillProgress], None]


def _module_at(model: torch.nn.Module, paths: tuple[str, ...]) -> Any:
    """The first attribute path of `paths` that `model` has (e.g. "model.language_model"), else None."""
    for path in paths:
        module: Any = model
        for name in path.split("."):
            module = getattr(module, name, None)
            if module is None:
                break
        if module is not None:
            return module
    return None


# Where Qwen2.5-VL keeps its parts: this package's layout and transformers' older flat one.
VISION_TOWER_PATHS = ("model.visual", "visual")
TEXT_MODEL_PATHS = ("model.language_model", "language_model", "model")


def _parameter_count(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


class PrefillMeter:
    """Reports `PrefillProgress` to `callback` after each vision block and decoder layer of the next forward.

    A context manager: hooks go on at entry and come off when the language model's first forward returns
    (the prefill; decoding steps are not reported) or at exit, whichever is first. `vision_rows` is the number
    of patches the vision encoder receives (`pixel_values_videos.shape[0]`; 0 when there is no video).
    On CUDA each report waits for the layer's kernels (one synchronisation per block and layer), so the
    progress is what the GPU has done, not what the host has queued.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        prompt_tokens: int,
        vision_rows: int,
        callback: PrefillCallback,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.callback = callback
        self.prompt_tokens = prompt_tokens
        self.clock = clock
        vision = _module_at(model, VISION_TOWER_PATHS)
        self.text_model = _module_at(model, TEXT_MODEL_PATHS)
        blocks = list(getattr(vision, "blocks", ())) if vision_rows > 0 else []
        layers = list(getattr(self.text_model, "layers", ()))
        self.stages = {"vision": blocks, "text": layers}
        # Work of each block / layer: parameters x rows through it (its matrix products' multiply-adds).
        self.work = {
            "vision": [_parameter_count(block) * vision_rows for block in blocks],
            "text": [_parameter_count(layer) * prompt_tokens for layer in layers],
        }
        self.total_work = sum(map(sum, self.work.values())) or 1
        self.done_work = 0
        self.done = {"vision": 0, "text": 0}
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.started = 0.0

    def __enter__(self) -> PrefillMeter:
        self.started = self.clock()
        for stage, modules in self.stages.items():
            for module in modules:
                self.handles.append(module.register_forward_hook(partial(self._step_done, stage)))
        if self.text_model is not None and self.stages["text"]:
            self.handles.append(self.text_model.register_forward_hook(self._prefill_done))
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._remove_hooks()

    def _remove_hooks(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _report(self, stage: str, finished: bool, output: Any) -> None:
        tensor = output[0] if isinstance(output, tuple) else output
        if isinstance(tensor, torch.Tensor) and tensor.device.type == "cuda":
            torch.cuda.synchronize(tensor.device)
        self.callback(
            PrefillProgress(
                prompt_tokens=self.prompt_tokens,
                stage=stage,
                stage_done=self.done[stage],
                stage_total=len(self.stages[stage]),
                work_done=min(1.0, self.done_work / self.total_work),
                seconds=self.clock() - self.started,
                finished=finished,
            )
        )

    def _step_done(self, stage: str, module: torch.nn.Module, args: Any, output: Any) -> None:
        index = self.done[stage]
        if index >= len(self.stages[stage]):  # a second forward before the hooks came off: not the prefill
            return
        self.done[stage] = index + 1
        self.done_work += self.work[stage][index]
        self._report(stage, finished=False, output=output)

    def _prefill_done(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self._remove_hooks()
        hidden = getattr(output, "last_hidden_state", output)
        self._report("text", finished=True, output=hidden)


class ChunkedPrefillMeter:
    """Reports `PrefillProgress` of a chunked prefill (`videonsa.models.chunked_prefill`) to `callback`: after each
    piece of the vision tower (stage "vision-chunk") and each chunk of the prompt through the language model
    (stage "chunk"), the last one `finished`.

    Pass the meter as the chunked prefill's `on_step`. The work is weighted as `PrefillMeter` weighs it: the
    vision tower's parameters x its patches, the language model's parameters x the prompt tokens, shared in
    proportion to the vision tokens and prompt tokens done. On CUDA each report first waits for the GPU.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        prompt_tokens: int,
        vision_rows: int,
        vision_tokens: int,
        chunk_size: int,
        callback: PrefillCallback,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.callback = callback
        self.prompt_tokens = prompt_tokens
        self.vision_tokens = vision_tokens
        self.chunks = -(-prompt_tokens // chunk_size)
        self.clock = clock
        self.device = next(model.parameters()).device
        vision = _module_at(model, VISION_TOWER_PATHS)
        text = _module_at(model, TEXT_MODEL_PATHS)
        vision_work = _parameter_count(vision) * vision_rows if vision is not None and vision_tokens else 0
        text_work = (_parameter_count(text) if text is not None else 1) * prompt_tokens
        self.vision_share = vision_work / ((vision_work + text_work) or 1)
        self.started = clock()
        self.chunks_done = 0

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        """The chunked prefill's progress callback: ("vision", tokens so far, _) or ("text", tokens so far, total)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if stage == "vision":
            share = done / self.vision_tokens if self.vision_tokens else 1.0
            self._report("vision-chunk", done, self.vision_tokens, self.vision_share * min(1.0, share))
        else:
            self.chunks_done += 1
            share = self.vision_share + (1 - self.vision_share) * done / self.prompt_tokens
            self._report("chunk", self.chunks_done, self.chunks, share, finished=done >= self.prompt_tokens)

    def _report(self, stage: str, stage_done: int, stage_total: int, work_done: float, finished: bool = False) -> None:
        self.callback(
            PrefillProgress(
                prompt_tokens=self.prompt_tokens,
                stage=stage,
                stage_done=stage_done,
                stage_total=stage_total,
                work_done=min(1.0, work_done),
                seconds=self.clock() - self.started,
                finished=finished,
            )
        )
