"""Finding a model (local directory or Hugging Face Hub id), reading its small files, loading its weights.

`open_model_files` reads everything but the weights: config, tokenizer with chat template, pixel statistics.
It is cheap, so the CLI runs it (and checks the video) before `load_weights` spends minutes on a 7B model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from videonsa.errors import UserError, first_line
from videonsa.options import ATTENTION_MODES
from videonsa.video import VisionGeometry
from videonsa.video.patches import CLIP_MEAN, CLIP_STD
from videonsa.video.planning import is_real

# Everything a model directory holds besides its weights (config, tokenizer, processor, chat template).
SMALL_FILE_PATTERNS = ("*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken")
logger = logging.getLogger(__name__)
DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


@dataclass(frozen=True)
class ModelFiles:
    """A model's small files, read: where it lives, its tokenizer, vision geometry and pixel statistics."""

    name: str
    directory: Path
    hub_id: str | None
    config: dict[str, Any]
    tokenizer: Any
    chat_template: str
    geometry: VisionGeometry
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    tokens_per_second: float


@contextlib.contextmanager
def _quiet_hub() -> Iterator[None]:
    """Silence huggingface_hub's retry warnings: a failure is reported as one line of ours instead."""
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub_logger.setLevel(level)


def _looks_like_a_path(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~", ".\\")) or value.endswith(("/", "\\")) or value.count("/") > 1


def _download(hub_id: str, patterns: tuple[str, ...] | None) -> Path:
    """Download (or find in the cache) the files of `hub_id` matching `patterns`; `UserError` on failure."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, HFValidationError, RepositoryNotFoundError

    try:
        with _quiet_hub():
            return Path(snapshot_download(hub_id, allow_patterns=list(patterns) if patterns else None))
    except HFValidationError:
        raise UserError(f"model '{hub_id}': no such local directory, nor a valid Hub id (owner/name)") from None
    except GatedRepoError:
        raise UserError(f"model '{hub_id}': gated on the Hugging Face Hub; accept its terms there and log in") from None
    except RepositoryNotFoundError:
        raise UserError(f"model '{hub_id}': no such model on the Hugging Face Hub (nor a local directory)") from None
    except (OSError, HfHubHTTPError):
        from huggingface_hub import constants

        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "no network?"
        raise UserError(
            f"model '{hub_id}': cannot download it from the Hugging Face Hub ({why}) and it is not in the "
            f"local cache; pass a local model directory instead"
        ) from None


def locate_model(model: str | Path) -> tuple[Path, str | None]:
    """(local directory, hub id or None) for `model`, downloading only the small files of a hub id."""
    value = str(model)
    path = Path(value).expanduser()
    if path.exists() or _looks_like_a_path(value):
        if not path.exists():
            raise UserError(f"model '{value}': no such directory")
        if not path.is_dir():
            raise UserError(f"model '{value}': is a file; pass the model's directory")
        return path, None
    return _download(value, SMALL_FILE_PATTERNS), value


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: not readable JSON ({error})") from None


def _chat_template(directory: Path, tokenizer: Any) -> str:
    """The chat template: the tokenizer's, else chat_template.jinja, else chat_template.json's."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text()
    if (directory / "chat_template.json").is_file():
        template = _read_json(directory / "chat_template.json").get("chat_template")
        if template:
            return template
    raise UserError(f"{directory}: the model has no chat template (tokenizer_config.json or chat_template.*)")


def _load_tokenizer(directory: Path) -> Any:
    from transformers import AutoTokenizer

    import videonsa.models  # noqa: F401  (registers model_type "videonsa" so the tokenizer's config lookup knows it)

    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError) as error:
        raise UserError(f"{directory}: cannot load the tokenizer ({first_line(error)})") from None


def _pixel_statistics(directory: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of the model's image normalisation, from its processor config, else CLIP's."""
    for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
        if (directory / name).is_file():
            config = _read_json(directory / name)
            if isinstance(config, dict) and "image_mean" in config and "image_std" in config:
                where = directory / name
                mean = _channel_values(config["image_mean"], "image_mean", where)
                std = _channel_values(config["image_std"], "image_std", where)
                if min(std) <= 0:
                    raise UserError(f"{where}: image_std must be positive (frames are divided by it), got {std}")
                return mean, std
    return CLIP_MEAN, CLIP_STD


def _channel_values(value: Any, name: str, where: Path) -> tuple[float, float, float]:
    """A per-channel statistic of a processor config as 3 floats (R, G, B); one number stands for all three, as
    transformers' processors take it. The folder is untrusted: anything else is a `UserError` naming the file,
    here rather than as a reshape error once the frames are decoded and the weights loaded."""
    values = [value] * 3 if _is_finite(value) else value
    if not (isinstance(values, list) and len(values) == 3 and all(map(_is_finite, values))):
        raise UserError(f"{where}: {name} must be 3 finite numbers (R, G, B), got {value!r}")
    return tuple(float(v) for v in values)


def _is_finite(value: Any) -> bool:
    return is_real(value) and math.isfinite(value)


def open_model_files(model: str | Path) -> ModelFiles:
    """Find `model` (a local directory or a Hub id) and read all but its weights.

    Raises `UserError` with one line naming the model for a missing directory, an unreachable or unknown hub
    id, or a directory without config, tokenizer or chat template, and one naming the file for an implausible
    config.json or (local folders) weights that are not safetensors or disagree with the config
    (`videonsa.models.checkpoint_checks.check_checkpoint`).
    """
    from videonsa.models.checkpoint_checks import check_checkpoint, read_config

    directory, hub_id = locate_model(model)
    if not (directory / "config.json").is_file():
        raise UserError(f"model '{model}': {directory} has no config.json, so it is not a model directory")
    # A local folder is checked whole now (config against the weights' headers), before any frame is decoded; a
    # hub model's weights are not downloaded yet, so `load_weights` checks them.
    config = read_config(directory) if hub_id else check_checkpoint(directory).config
    vision = config.get("vision_config") or {}
    tokenizer = _load_tokenizer(directory)
    mean, std = _pixel_statistics(directory)
    return ModelFiles(
        name=str(model),
        directory=directory,
        hub_id=hub_id,
        config=config,
        tokenizer=tokenizer,
        chat_template=_chat_template(directory, tokenizer),
        geometry=VisionGeometry(
            patch_size=vision.get("patch_size", 14),
            merge_size=vision.get("spatial_merge_size", 2),
            temporal_patch_size=vision.get("temporal_patch_size", 2),
        ),
        image_mean=mean,
        image_std=std,
        tokens_per_second=float(vision.get("tokens_per_second", 2)),
    )


def resolve_device(device: str) -> torch.device:
    """ "auto" (first CUDA GPU, else CPU), "cpu", "cuda" or "cuda:N"; `UserError` for unusable devices."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise UserError(f"device '{device}' is not a device name (auto, cpu, cuda, cuda:N)") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device '{device}': no CUDA GPU is visible here")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise UserError(f"device '{device}': only {torch.cuda.device_count()} CUDA GPU(s) are visible")
    elif resolved.type != "cpu":
        raise UserError(f"device '{device}' is not supported (auto, cpu, cuda, cuda:N)")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """ "auto" (bfloat16 on GPU, float32 on CPU) or a name in `DTYPES`; `UserError` for others."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"dtype '{dtype}' is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_attention(attention: str) -> str:
    """Return `attention` if it is "auto", "nsa", "dense" or "official", else raise `UserError`."""
    if attention not in ATTENTION_MODES:
        raise UserError(f"attention must be one of {', '.join(ATTENTION_MODES)}, got '{attention}'")
    return attention


@dataclass(frozen=True)
class AttentionChoice:
    """The attention mode a model will run, and where that came from.

    mode: "nsa", "dense" or "official". from_checkpoint: True when the user asked for "auto" and the checkpoint
    decided, False for an explicit choice. source: "user" for an explicit choice, else why the checkpoint
    decided: "config" (its config.json records attention_mode), "released-layout" (the released Enxin/VideoNSA
    checkpoint as published: gates in the legacy flat layout, no recorded mode) or "default" (nothing recorded:
    "nsa"). notice: the one line to show the user (official mode chosen by the checkpoint), else None.
    """

    mode: str
    from_checkpoint: bool
    source: str
    notice: str | None = None


def resolve_attention(files: ModelFiles, attention: str = "auto") -> AttentionChoice:
    """Which attention mode `files`' model runs for the user's `attention` setting, from its small files only
    (config.json and the tensor names of the weights index or header; no weights are read).

    An explicit "nsa", "dense" or "official" always wins. "auto" takes the checkpoint's default: the mode its
    config.json records; "official" for the released checkpoint's layout (the function it was trained with);
    "nsa" otherwise. Raises `UserError` for an unknown setting or a checkpoint that records an unknown mode.
    """
    from videonsa.models.checkpoints import checkpoint_attention_mode

    if check_attention(attention) != "auto":
        return AttentionChoice(attention, from_checkpoint=False, source="user")
    default = checkpoint_attention_mode(files.directory)
    if default.mode not in ATTENTION_MODES[1:]:
        raise UserError(
            f"model '{files.name}': config.json records attention_mode '{default.mode}', not one of "
            f"{', '.join(ATTENTION_MODES[1:])}; pass the attention mode explicitly"
        )
    return AttentionChoice(default.mode, from_checkpoint=True, source=default.source, notice=default.notice(files.name))


def load_weights(
    files: ModelFiles, *, attention: str, device: torch.device, dtype: torch.dtype, fresh_gates: bool = False
):
    """Load the model (VideoNSA, or plain Qwen2.5-VL with fresh gates) in eval mode on `device`.

    attention: "auto" (the checkpoint decides, see `resolve_attention`; an official-mode default is announced
    in one logged warning line) or an explicit "nsa", "dense" or "official". fresh_gates: accept a checkpoint
    with gates in some layers only, initialising the missing ones fresh (otherwise a `UserError`)."""
    from videonsa.models import VideoNSAForConditionalGeneration

    choice = resolve_attention(files, attention)
    if choice.notice:
        logger.warning(choice.notice)
    directory = _download(files.hub_id, None) if files.hub_id else files.directory
    try:
        model = VideoNSAForConditionalGeneration.from_pretrained(
            directory, dtype=dtype, device_map=str(device), attention_mode=choice.mode, fresh_gates=fresh_gates
        )
    except OSError as error:
        raise UserError(f"model '{files.name}': cannot load its weights ({first_line(error)})") from None
    return model.eval()
