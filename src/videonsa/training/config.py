"""The training configuration: the paper's recipe as defaults, a YAML/JSON file on top, command-line overrides last.

A config file has these sections (all optional except ``model.path`` and a data source):

* ``model``: the checkpoint to start from (Qwen2.5-VL, whose gates start new, or VideoNSA) and how to load it.
* ``data``: the manifest(s) from ``videonsa data prepare`` (or raw annotation files), sampling and token budget.
* ``trainable``: which parts learn (vision tower, projector, language model, gates).
* ``strategy``: ``auto`` (whatever ``accelerate launch`` set up, else DDP), ``ddp``, ``zero2``, ``zero3``,
  ``fsdp2``, or the path of a DeepSpeed JSON file.
* ``trainer``: any ``transformers.TrainingArguments`` field (optimizer, schedule, precision, checkpoints, ...).

The shipped ``configs/recipe.yaml`` holds every default with comments; `load_config` starts from it.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from videonsa.errors import UserError
from videonsa.training.io import load_mapping, load_yaml

STRATEGIES = ("auto", "ddp", "zero2", "zero3", "fsdp2")
TRAINABLE_PARTS = ("vision_tower", "projector", "language_model", "gates")
ARCHITECTURES = ("videonsa", "qwen2_5_vl")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class ModelSettings:
    """Where the weights come from and how the model is built.

    path: a Qwen2.5-VL checkpoint (VideoNSA gates are added, freshly initialised) or a VideoNSA checkpoint.
    architecture: ``videonsa`` (sparse vision attention) or ``qwen2_5_vl`` (the dense baseline, stock model).
    sparse: VideoNSA settings (block_size, block_counts, window_size, init_blocks, local_blocks,
        gate_temperature, attention_mode) that override the checkpoint's; empty keeps the checkpoint's, or
        VideoNSA's defaults for a Qwen2.5-VL checkpoint.
    dtype: the dtype of the weights held in memory; float32 with ``trainer.bf16`` is mixed precision, which
        keeps lr 1e-6 updates from vanishing in bf16 rounding (DeepSpeed keeps its own fp32 master copy).
    tokenizer: where the tokenizer and chat template come from (default: `path`).
    """

    path: str | None = None
    architecture: str = "videonsa"
    sparse: dict[str, Any] = field(default_factory=dict)
    attn_implementation: str = "sdpa"
    dtype: str = "float32"
    tokenizer: str | None = None


@dataclass
class DataSettings:
    """What the model sees of each sample.

    manifest: one or more manifests from ``videonsa data prepare`` (the normal path).
    annotations / media_root: raw annotation files instead of a manifest; clips are then probed lazily and
        unreadable ones skipped during training rather than filtered beforehand.
    sample_fps: frames per second sampled from video files (frame lists are used as given).
    max_frames: cap on frames per sample before the token budget (None: no cap).
    min_pixels / max_pixels: bounds on each frame's pixel count after resizing (paper: 50,176 = 224 x 224).
    frames_as: ``images`` (each frame an image, 64 tokens at 224 x 224: the paper's 36K context) or ``video``.
    max_tokens: tokens per sample; over it, frames are dropped evenly across the clip (and counted).
    max_consecutive_skips: how many unreadable samples in a row are skipped before giving up.
    """

    manifest: list[str] = field(default_factory=list)
    annotations: list[str] = field(default_factory=list)
    media_root: str | None = None
    sample_fps: float = 4.0
    max_frames: int | None = None
    min_pixels: int = 3136
    max_pixels: int = 50176
    frames_as: str = "images"
    max_tokens: int = 36864
    max_consecutive_skips: int = 16


@dataclass
class TrainableSettings:
    """Which parts of the model are trained; the recipe trains everything."""

    vision_tower: bool = True
    projector: bool = True
    language_model: bool = True
    gates: bool = True

    def frozen(self) -> list[str]:
        return [part for part in TRAINABLE_PARTS if not getattr(self, part)]


@dataclass
class TrainConfig:
    """Everything `videonsa train` needs. `trainer` holds `TrainingArguments` fields by name."""

    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    trainable: TrainableSettings = field(default_factory=TrainableSettings)
    strategy: str = "auto"
    trainer: dict[str, Any] = field(default_factory=dict)
    source: str = "<defaults>"

    def validate(self) -> TrainConfig:
        """Return self, or raise `UserError` naming the first setting that cannot work."""
        where = f"in {self.source}"
        if not self.model.path:
            raise UserError(f"model.path is not set {where} (a Qwen2.5-VL or VideoNSA checkpoint)")
        if self.model.architecture not in ARCHITECTURES:
            raise UserError(f"model.architecture must be one of {', '.join(ARCHITECTURES)} {where}")
        if self.model.dtype not in DTYPES:
            raise UserError(f"model.dtype must be one of {', '.join(DTYPES)} {where}")
        if bool(self.data.manifest) == bool(self.data.annotations):
            raise UserError(f"set exactly one of data.manifest or data.annotations {where}")
        if self.data.frames_as not in ("images", "video"):
            raise UserError(f"data.frames_as must be 'images' or 'video' {where}")
        if self.data.sample_fps <= 0 or self.data.max_tokens <= 0:
            raise UserError(f"data.sample_fps and data.max_tokens must be positive {where}")
        if not 784 <= self.data.min_pixels <= self.data.max_pixels:
            raise UserError(f"need 784 <= data.min_pixels <= data.max_pixels {where}")
        if self.data.max_frames is not None and self.data.max_frames < 1:
            raise UserError(f"data.max_frames must be at least 1 {where}")
        if not any(getattr(self.trainable, part) for part in TRAINABLE_PARTS):
            raise UserError(f"every part is frozen {where}: nothing to train")
        if self.model.sparse.get("attention_mode") == "official":
            raise UserError(f"model.sparse.attention_mode 'official' reproduces the original code's inference "
                            f"function and cannot be trained {where}: use 'nsa' or 'dense'")
        if self.model.architecture == "qwen2_5_vl" and self.trainable.frozen() == list(TRAINABLE_PARTS[:3]):
            raise UserError(f"gates-only training needs model.architecture videonsa {where}")
        if self.strategy not in STRATEGIES and not self.strategy.endswith(".json"):
            raise UserError(f"strategy must be one of {', '.join(STRATEGIES)} or a DeepSpeed .json file {where}")
        if not self.trainer.get("output_dir"):
            raise UserError(f"trainer.output_dir is not set {where} (or pass --output-dir)")
        return self

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data (what is saved next to the checkpoints)."""
        data = dataclasses.asdict(self)
        data.pop("source")
        return data


def recipe_path() -> Path:
    """Path of the shipped default recipe (``configs/recipe.yaml``)."""
    return config_file("recipe.yaml")


def config_file(name: str) -> Path:
    """Path of a file shipped in ``videonsa/training/configs``."""
    path = Path(str(resources.files("videonsa.training").joinpath("configs", name)))
    if not path.is_file():
        raise UserError(f"no shipped config named {name}")
    return path


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The recipe, updated by the file at `path` (YAML or JSON), then by dotted `overrides` (``"a.b": value``).

    Unknown keys are errors, so a typo never silently falls back to a default.
    """
    merged = load_mapping(recipe_path())
    source = "<defaults>"
    if path is not None:
        merged = _deep_merge(merged, load_mapping(path))
        source = str(path)
    for dotted, value in (overrides or {}).items():
        merged = _deep_merge(merged, _nest(dotted, value))
    return _from_mapping(merged, source)


def parse_override(text: str) -> tuple[str, Any]:
    """``"trainer.learning_rate=2e-5"`` -> ("trainer.learning_rate", 2e-05); the value is read as YAML."""
    import yaml

    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"override {text!r} is not of the form section.key=value")
    try:
        value = load_yaml(raw)
    except yaml.YAMLError:
        raise UserError(f"override {text!r}: the value is not valid YAML") from None
    return key.strip(), value


def _from_mapping(mapping: dict[str, Any], source: str) -> TrainConfig:
    sections = {"model": ModelSettings, "data": DataSettings, "trainable": TrainableSettings}
    unknown = set(mapping) - {*sections, "strategy", "trainer"}
    if unknown:
        raise UserError(f"unknown section {sorted(unknown)[0]!r} in {source} "
                        f"(expected model, data, trainable, strategy, trainer)")
    built = {name: _section(kind, mapping.get(name) or {}, name, source) for name, kind in sections.items()}
    for key in ("manifest", "annotations"):
        value = getattr(built["data"], key)
        setattr(built["data"], key, [value] if isinstance(value, str) else list(value or []))
    trainer = mapping.get("trainer") or {}
    if not isinstance(trainer, dict):
        raise UserError(f"trainer in {source} must be a mapping of TrainingArguments settings")
    _check_trainer_keys(trainer, source)
    strategy = str(mapping.get("strategy") or "auto")
    return TrainConfig(**built, strategy=strategy, trainer=dict(trainer), source=source)


def _section(kind: type, values: Any, name: str, source: str) -> Any:
    if not isinstance(values, dict):
        raise UserError(f"{name} in {source} must be a mapping")
    known = {f.name for f in dataclasses.fields(kind)}
    for key in values:
        if key not in known:
            raise UserError(f"unknown setting {name}.{key} in {source} (known: {', '.join(sorted(known))})")
    return kind(**copy.deepcopy(values))


def _check_trainer_keys(trainer: dict[str, Any], source: str) -> None:
    from transformers import TrainingArguments

    known = {f.name for f in dataclasses.fields(TrainingArguments)}
    for key in trainer:
        if key not in known:
            raise UserError(f"unknown setting trainer.{key} in {source} (not a transformers TrainingArguments field)")


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    result: Any = value
    for part in reversed(dotted.split(".")):
        result = {part: result}
    return result
