"""Loading the model to train and choosing which of its parts learn.

Parts, told apart by parameter name (both the current transformers layout and the legacy flat one):
``gates`` (each layer's ``g_proj_1`` / ``g_proj_2``), ``projector`` (``visual.merger``), ``vision_tower`` (the rest
of ``visual``), ``language_model`` (everything else: embeddings, decoder layers, final norm, ``lm_head``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from videonsa.errors import UserError
from videonsa.training.config import TRAINABLE_PARTS, ModelSettings, TrainableSettings

logger = logging.getLogger("videonsa.training")

GATE_MARKERS = (".g_proj_1.", ".g_proj_2.")


def part_of(parameter_name: str) -> str:
    """Which trainable part a parameter belongs to (see the module docstring)."""
    name = f".{parameter_name}"
    if any(marker in name for marker in GATE_MARKERS):
        return "gates"
    if ".visual.merger." in name:
        return "projector"
    if ".visual." in name:
        return "vision_tower"
    return "language_model"


def set_trainable(model: torch.nn.Module, trainable: TrainableSettings) -> dict[str, dict[str, int]]:
    """Freeze the parts `trainable` turns off; return parameter counts per part, trained and total.

    In ``dense`` attention mode the gates take no part in the forward pass, so they are frozen too (an unused
    trainable parameter would also stop multi-process training). Raises `UserError` when nothing would be
    trained (for example gates only on a model without gates, or in dense mode).
    """
    dense = getattr(getattr(model.config, "text_config", None), "attention_mode", None) == "dense"
    if dense and trainable.gates:
        logger.info("attention_mode is dense: the gates are unused, so they are not trained")
    counts = {part: {"trained": 0, "total": 0} for part in TRAINABLE_PARTS}
    for name, parameter in model.named_parameters():
        part = part_of(name)
        parameter.requires_grad_(bool(getattr(trainable, part)) and not (dense and part == "gates"))
        counts[part]["total"] += parameter.numel()
        counts[part]["trained"] += parameter.numel() if parameter.requires_grad else 0
    if not any(count["trained"] for count in counts.values()):
        raise UserError("no parameter is left to train with the chosen trainable parts "
                        f"(frozen: {', '.join(trainable.frozen()) or 'none'}; a model without gates, or gates "
                        "in dense attention mode?)")
    for part, count in counts.items():
        state = "trained" if count["trained"] else "frozen"
        logger.info("%-15s %12s parameters, %s", part, f"{count['total']:,}", state)
    return counts


def load_model(settings: ModelSettings) -> Any:
    """Load the checkpoint at `settings.path` as the model to train.

    ``architecture: videonsa`` loads a VideoNSA checkpoint as is, or a plain Qwen2.5-VL checkpoint with new gates
    (`settings.sparse` overrides the sparse-attention settings either way); with `settings.fresh_gates` also a
    checkpoint with gates in some layers only, the missing ones new (docs/model-files.md). ``qwen2_5_vl`` loads
    transformers' stock model, the dense baseline.
    """
    path = checkpoint_folder(settings.path)
    dtype = getattr(torch, settings.dtype)
    if settings.architecture == "qwen2_5_vl":
        from transformers import Qwen2_5_VLForConditionalGeneration

        if settings.sparse:
            raise UserError("model.sparse is set but model.architecture is qwen2_5_vl (dense, no sparse settings)")
        if settings.fresh_gates:
            raise UserError("model.fresh_gates is set but model.architecture is qwen2_5_vl (the stock model has no "
                            "gates)")
        return Qwen2_5_VLForConditionalGeneration.from_pretrained(
            path, dtype=dtype, attn_implementation=settings.attn_implementation
        )
    from videonsa.models import NSA_CONFIG_DEFAULTS, VideoNSAForConditionalGeneration

    for key in settings.sparse:
        if key not in NSA_CONFIG_DEFAULTS:
            raise UserError(f"unknown setting model.sparse.{key} (known: {', '.join(NSA_CONFIG_DEFAULTS)})")
    model = VideoNSAForConditionalGeneration.from_pretrained(
        path,
        dtype=dtype,
        attn_implementation=settings.attn_implementation,
        fresh_gates=settings.fresh_gates,
        **settings.sparse,
    )
    if model.sparse_settings.mode == "official" and "attention_mode" not in settings.sparse:
        # The released checkpoint (or one recording official) loads in the inference-only official mode by
        # default; training runs the corrected NSA unless model.sparse.attention_mode says otherwise.
        model.set_attention_mode("nsa")
        logger.info("%s runs attention_mode 'official' by default, which cannot train: training in 'nsa'", path)
    return model


def checkpoint_folder(path: str | None) -> Path:
    """The local checkpoint folder `path` (model.path), checked to exist and hold a readable config.json."""
    if not path:
        raise UserError("model.path is not set")
    directory = Path(path).expanduser()
    if not directory.exists():
        raise UserError(f"model.path {directory} does not exist")
    if not directory.is_dir():
        raise UserError(f"model.path {directory} is not a checkpoint folder")
    if not (directory / "config.json").is_file():
        raise UserError(f"model.path {directory} has no config.json")
    try:
        json.loads((directory / "config.json").read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{directory / 'config.json'} is not valid JSON ({error.msg})") from None
    return directory


def load_tokenizer(path: str) -> Any:
    """The tokenizer with its chat template; the template may also sit in chat_template.jinja / .json."""
    from transformers import AutoTokenizer

    import videonsa.models  # noqa: F401  (registers model_type "videonsa", which AutoTokenizer reads)

    directory = Path(path).expanduser()
    if not directory.exists() and _looks_local(path):
        # Else transformers takes it for a Hub id and complains about the id's characters.
        raise UserError(f"cannot load a tokenizer from {directory}: it does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as error:
        raise UserError(f"cannot load a tokenizer from {directory}: {error}") from None
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = _chat_template_file(directory)
    if not tokenizer.chat_template:
        raise UserError(f"the tokenizer in {directory} has no chat template (expected Qwen2.5-VL's)")
    if tokenizer.pad_token_id is None:
        raise UserError(f"the tokenizer in {directory} has no padding token")
    return tokenizer


def _looks_local(path: str) -> bool:
    """Whether `path` means a local folder rather than a Hub id (``owner/name``): absolute, ``./``, ``../`` or
    ``~``, or inside a folder that exists."""
    parent = Path(path).expanduser().parent
    return path.startswith(("/", "./", "../", "~")) or (parent != Path(".") and parent.is_dir())


def _chat_template_file(directory: Path) -> str | None:
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    legacy = directory / "chat_template.json"
    if legacy.is_file():
        return json.loads(legacy.read_text(encoding="utf-8")).get("chat_template")
    return None
