"""The demo's small VideoNSA, built from scratch, and the window-only ablation.

The model is the 7B's architecture at toy scale: the same classes (`VideoNSAForConditionalGeneration`, the
Qwen2.5-VL vision tower with 14-pixel patches, temporal patches of 2 frames and 2 x 2 merging, M-RoPE) and the same
NSA operator, only with a few layers, a small hidden size and a sparse budget scaled to the demo's short token
streams (docs/demo.md gives the numbers). It is written as an ordinary checkpoint folder (weights, config,
tokenizer, processor files), which `videonsa train` starts from like any other checkpoint.

Tokenizer: the byte-level tokenizer of `videonsa.testing` (Qwen2.5-VL's special tokens at the same ids), plus
byte-pair merges learnt from the demo's own prompt, so that the fixed chat prompt is a few dozen tokens instead of
two hundred single bytes: fewer text tokens for the answer to look past on its way to the video, and a shorter
sequence to train on. The option letters stay single tokens.

Window-only ablation: `GatesOff` fixes the compression and selection gates of every layer to 0, so that each
vision token sees only its sliding window (text tokens keep their dense attention). It is a forward hook on each
layer's gate projection, which sets those two branches' logits to -inf before the sigmoid: the gate MLP, the NSA
operator and the checkpoint format are untouched, and the same hook is applied when training and when evaluating.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import TrainerCallback

from videonsa.errors import UserError
from videonsa.options import DEFAULT_GATE_TEMPERATURE

# Order of the branches in the gate projection's output, per query head: (compression, selection, window).
BRANCHES = ("compression", "selection", "window")
ATTENTION_CHOICES = ("nsa", "dense")
ABLATIONS = ("none", "window-only")


@dataclass(frozen=True)
class DemoModelSpec:
    """Sizes of the demo model. The sparse budget is in vision tokens: one token per temporal patch (two frames)
    of a 28 x 28 frame, so a 120 s video at 2 fps is a stream of 120 tokens."""

    layers: int = 2
    hidden_size: int = 64
    heads: int = 4
    kv_heads: int = 2
    intermediate_size: int = 128
    vision_depth: int = 2
    vision_hidden_size: int = 32
    block_size: int = 8  # vision tokens per compression / selection block
    block_counts: int = 2  # selected blocks per query (the current block is one of them)
    window_size: int = 8  # sliding window, in vision tokens: 16 frames, 8 s of a 120 s video
    gate_temperature: float = DEFAULT_GATE_TEMPERATURE

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


MERGES = 160  # byte-pair merges learnt from the prompt (the vocabulary grows by as many tokens)


def demo_tokenizer(prompts: Sequence[str]) -> Any:
    """`videonsa.testing.tiny_tokenizer` with byte-pair merges learnt from `prompts` (rendered chat texts).

    Byte tokens and special tokens keep their ids (0-255, then Qwen2.5-VL's specials); merged tokens follow.
    """
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from videonsa import testing

    base = testing.tiny_tokenizer()
    specials = list(testing.SPECIAL_TOKENS)
    plain = [_without(text, specials) for text in prompts]
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    learner.train_from_iterator(plain, trainers.BpeTrainer(
        vocab_size=len(alphabet) + MERGES, initial_alphabet=alphabet, show_progress=False
    ))
    merges = [tuple(pair) for pair in json.loads(learner.to_str())["model"]["merges"]]
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    for token in specials:
        vocab[token] = testing.TOKEN_IDS[token]
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    backend = Tokenizer.from_str(base.backend_tokenizer.to_str())
    model = json.loads(backend.to_str())
    model["model"]["vocab"], model["model"]["merges"] = vocab, [list(pair) for pair in merges]
    backend = Tokenizer.from_str(json.dumps(model))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None,
        bos_token=None, model_max_length=base.model_max_length, padding_side="left",
        chat_template=base.chat_template,
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )


def _without(text: str, tokens: Sequence[str]) -> str:
    for token in tokens:
        text = text.replace(token, " ")
    return text


def vocabulary_rows(tokenizer: Any) -> int:
    """Embedding rows for `tokenizer`: its size rounded up to a multiple of 16, as real checkpoints do."""
    return -(-len(tokenizer) // 16) * 16


def build_model(spec: DemoModelSpec, attention: str, seed: int, vocab_size: int | None = None) -> Any:
    """A randomly initialised `VideoNSAForConditionalGeneration` of `spec`'s sizes in attention mode `attention`
    (`vocab_size`: embedding rows, default the tiny tokenizer's)."""
    from videonsa import testing

    if attention not in ATTENTION_CHOICES:
        raise UserError(f"--attention must be one of {', '.join(ATTENTION_CHOICES)}, got {attention!r}")
    config = testing.tiny_videonsa_config(
        num_layers=spec.layers,
        hidden_size=spec.hidden_size,
        num_heads=spec.heads,
        num_kv_heads=spec.kv_heads,
        intermediate_size=spec.intermediate_size,
        block_size=spec.block_size,
        block_counts=spec.block_counts,
        window_size=spec.window_size,
        gate_temperature=spec.gate_temperature,
        attention_mode=attention,
        vocab_size=vocab_size or testing.TINY_VOCAB_SIZE,
    )
    config.vision_config.update(testing.tiny_vision_config_kwargs(
        out_hidden_size=spec.hidden_size, depth=spec.vision_depth, hidden_size=spec.vision_hidden_size
    ))
    # New gates, as training a converted checkpoint starts from (not the tiny test models' spread-out ones).
    return testing.tiny_model(config, seed=seed, spread_gates=False)


def write_initial_checkpoint(
    directory: str | os.PathLike, spec: DemoModelSpec, attention: str, seed: int, prompts: Sequence[str]
) -> Path:
    """Write the from-scratch model, with its tokenizer (merges from `prompts`) and the image/video processor
    files, as a checkpoint folder (atomically: a temporary folder renamed into place). Returns the folder."""
    import shutil
    import tempfile

    from videonsa import testing

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        tokenizer = demo_tokenizer(prompts)
        build_model(spec, attention, seed, vocabulary_rows(tokenizer)).save_pretrained(staging)
        if testing.video_processor_available():
            from transformers import Qwen2_5_VLProcessor

            processor = testing.tiny_processor()
            Qwen2_5_VLProcessor(image_processor=processor.image_processor, tokenizer=tokenizer,
                                video_processor=processor.video_processor,
                                chat_template=testing.CHAT_TEMPLATE).save_pretrained(staging)
        else:
            tokenizer.save_pretrained(staging)
            testing.tiny_image_processor().save_pretrained(staging)
        os.replace(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def attention_layers(model: nn.Module) -> list[nn.Module]:
    """The VideoNSA attention modules of `model` (a VideoNSA model or anything holding one)."""
    from videonsa.models.modeling_videonsa import VideoNSAAttention

    layers = [module for module in model.modules() if isinstance(module, VideoNSAAttention)]
    if not layers:
        raise UserError("the model has no VideoNSA attention layers to ablate")
    return layers


class GatesOff:
    """Forces the gates of `branches` (names from `BRANCHES`) to 0 in every VideoNSA layer of a model.

    >>> handle = GatesOff(("compression", "selection")).apply(model)   # window only
    >>> handle.remove()                                                 # back to the learned gates
    """

    def __init__(self, branches: Sequence[str]) -> None:
        unknown = sorted(set(branches) - set(BRANCHES))
        if unknown:
            raise ValueError(f"unknown NSA branches {unknown}; known: {', '.join(BRANCHES)}")
        self.columns = [BRANCHES.index(branch) for branch in branches]
        self.handles: list[Any] = []

    def _hook(self, num_heads: int):
        columns = self.columns

        def force_off(module: nn.Module, inputs: Any, logits: Tensor) -> Tensor:
            # logits [..., 3 * HQ], per head (cmp, slc, swa); -inf makes sigmoid exactly 0, and no gradient flows
            # to the gate MLP through the forced branches.
            per_head = logits.unflatten(-1, (num_heads, len(BRANCHES)))
            off = torch.zeros(len(BRANCHES), dtype=torch.bool, device=logits.device)
            off[columns] = True
            return per_head.masked_fill(off, float("-inf")).flatten(-2)

        return force_off

    def apply(self, model: nn.Module) -> GatesOff:
        """Hook every VideoNSA layer of `model`; returns self (call `remove` to undo)."""
        for layer in attention_layers(model):
            self.handles.append(layer.g_proj_2.register_forward_hook(self._hook(layer.num_heads)))
        return self

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def ablation_branches(ablation: str) -> tuple[str, ...]:
    """The branches an ablation turns off: none, or compression and selection for ``window-only``."""
    if ablation not in ABLATIONS:
        raise UserError(f"--ablation must be one of {', '.join(ABLATIONS)}, got {ablation!r}")
    return ("compression", "selection") if ablation == "window-only" else ()


class GatesOffDuringTraining(TrainerCallback):
    """Applies `GatesOff` to the model the Trainer trains, from the start of training (resumed runs too)."""

    def __init__(self, branches: Sequence[str]) -> None:
        self.gates_off = GatesOff(branches)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None and not self.gates_off.handles:
            self.gates_off.apply(model)

    def on_train_end(self, args, state, control, **kwargs):
        self.gates_off.remove()
