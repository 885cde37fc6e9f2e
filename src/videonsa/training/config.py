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
import os
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from videonsa.errors import UserError
from videonsa.training.config_files import load_mapping, load_yaml

STRATEGIES = ("auto", "ddp", "zero2", "zero3", "fsdp2")
TRAINABLE_PARTS = ("vision_tower", "projector", "language_model", "gates")
ARCHITECTURES = ("videonsa", "qwen2_5_vl")
DTYPES = ("float32", "bfloat16", "float16")
SECTIONS = ("model", "data", "trainable", "strategy", "trainer")
# Settings that name files or folders; relative ones are resolved against the config file that sets them (or the
# working directory, for command-line values). See docs/training.md.
PATH_SETTINGS = (("model", "path"), ("model", "tokenizer"), ("data", "manifest"), ("data", "annotations"),
                 ("data", "media_root"), ("trainer", "output_dir"), ("trainer", "logging_dir"),
                 ("trainer", "deepspeed"))

PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveNumber = Annotated[float, Field(gt=0)]
NonNegativeNumber = Annotated[float, Field(ge=0)]


class _Settings(BaseModel):
    """Strict settings: unknown keys and values of the wrong type (``"false"`` for a bool, ``"4"`` for a number)
    are errors rather than conversions; integers are accepted where a float belongs; inf and nan are not numbers
    here."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class ModelSettings(_Settings):
    """Where the weights come from and how the model is built.

    path: a Qwen2.5-VL checkpoint (VideoNSA gates are added, freshly initialised) or a VideoNSA checkpoint.
    fresh_gates: also accept a checkpoint with gates stored for some layers only (a partly converted one),
        initialising the missing gates fresh; without it such a checkpoint is refused, naming the layers.
    architecture: ``videonsa`` (sparse vision attention) or ``qwen2_5_vl`` (the dense baseline, stock model).
    sparse: VideoNSA settings (block_size, block_counts, window_size, init_blocks, local_blocks,
        gate_temperature, attention_mode) that override the checkpoint's; empty keeps the checkpoint's, or
        VideoNSA's defaults for a Qwen2.5-VL checkpoint. Checked by `SparseOverrides`.
    dtype: the dtype of the weights held in memory; float32 with ``trainer.bf16`` is mixed precision, which
        keeps lr 1e-6 updates from vanishing in bf16 rounding (DeepSpeed keeps its own fp32 master copy).
    tokenizer: where the tokenizer and chat template come from (default: `path`).
    """

    path: str | None = None
    fresh_gates: bool = False
    architecture: Literal["videonsa", "qwen2_5_vl"] = "videonsa"
    sparse: dict[str, Any] = Field(default_factory=dict)
    attn_implementation: str = "sdpa"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    tokenizer: str | None = None


class SparseOverrides(_Settings):
    """The keys `model.sparse` may hold, with their types (the model checks how they fit together when built)."""

    block_size: PositiveInt | None = None
    block_counts: PositiveInt | None = None
    window_size: NonNegativeInt | None = None
    init_blocks: NonNegativeInt | None = None
    local_blocks: NonNegativeInt | None = None
    gate_temperature: PositiveNumber | None = None
    attention_mode: Literal["nsa", "dense", "official"] | None = None


class DataSettings(_Settings):
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

    manifest: list[str] = Field(default_factory=list)
    annotations: list[str] = Field(default_factory=list)
    media_root: str | None = None
    sample_fps: PositiveNumber = 4.0
    max_frames: PositiveInt | None = None
    min_pixels: Annotated[int, Field(ge=784)] = 3136
    max_pixels: Annotated[int, Field(ge=784)] = 50176
    frames_as: Literal["images", "video"] = "images"
    max_tokens: PositiveInt = 36864
    max_consecutive_skips: NonNegativeInt = 16

    @field_validator("manifest", "annotations", mode="before")
    @classmethod
    def _one_path_is_a_list(cls, value: Any) -> Any:
        if value is None:
            return []
        return [value] if isinstance(value, str) else value


class TrainableSettings(_Settings):
    """Which parts of the model are trained; the recipe trains everything."""

    vision_tower: bool = True
    projector: bool = True
    language_model: bool = True
    gates: bool = True

    def frozen(self) -> list[str]:
        return [part for part in TRAINABLE_PARTS if not getattr(self, part)]


class TrainerValues(_Settings):
    """Types and ranges of the `trainer` settings this pipeline relies on. Any other `TrainingArguments` field
    is allowed and checked by `TrainingArguments` itself. ``auto`` is resolved by `training_arguments`."""

    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)

    output_dir: str | None = None
    learning_rate: PositiveNumber | None = None
    adam_beta1: Annotated[float, Field(ge=0, lt=1)] | None = None
    adam_beta2: Annotated[float, Field(ge=0, lt=1)] | None = None
    adam_epsilon: PositiveNumber | None = None
    weight_decay: NonNegativeNumber | None = None
    max_grad_norm: NonNegativeNumber | None = None
    warmup_steps: NonNegativeNumber | None = None
    per_device_train_batch_size: PositiveInt | None = None
    gradient_accumulation_steps: PositiveInt | None = None
    num_train_epochs: PositiveNumber | None = None
    max_steps: Annotated[int, Field(ge=-1)] | None = None
    save_steps: PositiveNumber | None = None
    save_total_limit: PositiveInt | None = None
    logging_steps: PositiveNumber | Literal["auto"] | None = None
    seed: NonNegativeInt | None = None
    dataloader_num_workers: NonNegativeInt | Literal["auto"] | None = None
    report_to: str | list[str] | None = None
    bf16: bool | None = None
    fp16: bool | None = None
    gradient_checkpointing: bool | None = None
    dataloader_persistent_workers: bool | None = None
    disable_tqdm: bool | None = None

    @field_validator("max_steps")
    @classmethod
    def _positive_or_unset(cls, value: int | None) -> int | None:
        if value == 0:
            raise ValueError("should be at least 1, or -1 to train for num_train_epochs")
        return value


class TrainConfig(_Settings):
    """Everything `videonsa train` needs. `trainer` holds `TrainingArguments` fields by name."""

    model: ModelSettings = Field(default_factory=ModelSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    trainable: TrainableSettings = Field(default_factory=TrainableSettings)
    strategy: str = "auto"
    trainer: dict[str, Any] = Field(default_factory=dict)
    source: str = "<defaults>"

    def validate(self) -> TrainConfig:
        """Return self, or raise `UserError` listing every setting that cannot work (what a complete run needs,
        and settings that contradict each other; types and ranges were checked when the config was read)."""
        problems = self.problems()
        if len(problems) == 1:
            what, hint = problems[0]
            raise UserError(f"{what} in {self.source}" + (f": {hint}" if hint else ""))
        if problems:
            listed = "; ".join(what + (f" ({hint})" if hint else "") for what, hint in problems)
            raise UserError(f"{len(problems)} problems in {self.source}: {listed}")
        return self

    def problems(self) -> list[tuple[str, str]]:
        """(what is wrong, how to fix it) for each setting that stops this config from training."""
        problems = []
        if not self.model.path:
            problems.append(("model.path is not set", "a Qwen2.5-VL or VideoNSA checkpoint folder"))
        if bool(self.data.manifest) == bool(self.data.annotations):
            problems.append(("set exactly one of data.manifest or data.annotations", ""))
        if self.data.min_pixels > self.data.max_pixels:
            problems.append(("data.min_pixels is above data.max_pixels", ""))
        if not any(getattr(self.trainable, part) for part in TRAINABLE_PARTS):
            problems.append(("every part is frozen", "nothing to train"))
        if self.model.sparse.get("attention_mode") == "official":
            problems.append(("model.sparse.attention_mode 'official' reproduces the original code's inference "
                             "function and cannot be trained", "use 'nsa' or 'dense'"))
        if self.model.architecture == "qwen2_5_vl" and self.trainable.frozen() == list(TRAINABLE_PARTS[:3]):
            problems.append(("gates-only training needs model.architecture videonsa", ""))
        if self.model.architecture == "qwen2_5_vl" and self.model.fresh_gates:
            problems.append(("model.fresh_gates needs model.architecture videonsa", "the stock model has no gates"))
        if self.strategy not in STRATEGIES and not self.strategy.endswith(".json"):
            problems.append((f"strategy must be one of {', '.join(STRATEGIES)} or a DeepSpeed .json file", ""))
        output_dir = self.trainer.get("output_dir")
        if not output_dir:
            problems.append(("trainer.output_dir is not set", "set it or pass --output-dir"))
        elif Path(output_dir).expanduser().is_file():
            problems.append((f"trainer.output_dir {output_dir} is a file", "give a folder"))
        return problems

    def to_dict(self) -> dict[str, Any]:
        """The config as plain data (what is saved next to the checkpoints)."""
        return self.model_dump(exclude={"source"})


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

    Every setting's type and range is checked here, and all the bad ones are reported in one `UserError`;
    unknown keys are errors too, so a typo never silently falls back to a default. Relative paths in the file
    are relative to the file's folder, those in `overrides` to the working directory.
    """
    merged = load_mapping(recipe_path())
    source = "<defaults>"
    if path is not None:
        source = str(path)
        merged = _deep_merge(merged, _resolve_paths(load_mapping(path), Path(path).absolute().parent), source)
    for dotted, value in (overrides or {}).items():
        merged = _deep_merge(merged, _resolve_paths(_nest(dotted, value), Path.cwd()), f"the override {dotted}")
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
    """Check the merged settings against the schema; raise one `UserError` listing every bad one."""
    problems = [f"unknown section {key!r} (expected {', '.join(SECTIONS)})" for key in mapping if key not in SECTIONS]
    values = {key: mapping[key] for key in SECTIONS if mapping.get(key) is not None}
    trainer = values.pop("trainer", {})
    if not isinstance(trainer, dict):
        problems.append("trainer must be a mapping of TrainingArguments settings")
        trainer = {}
    config = None
    try:
        config = TrainConfig.model_validate({**copy.deepcopy(values), "trainer": dict(trainer), "source": source})
    except ValidationError as error:
        problems += _describe(error, (), TrainConfig)
    sparse = (values.get("model") or {}).get("sparse") if isinstance(values.get("model"), dict) else None
    if isinstance(sparse, dict):
        problems += _validation_problems(SparseOverrides, sparse, ("model", "sparse"))
    problems += _validation_problems(TrainerValues, trainer, ("trainer",))
    problems += _unknown_trainer_keys(trainer)
    if problems:
        raise UserError(_one_line(problems, source))
    assert config is not None
    return config


def _validation_problems(schema: type[BaseModel], values: dict[str, Any], prefix: tuple[str, ...]) -> list[str]:
    try:
        schema.model_validate(values)
    except ValidationError as error:
        return _describe(error, prefix, schema)
    return []


def _describe(error: ValidationError, prefix: tuple[str, ...], schema: type[BaseModel]) -> list[str]:
    """One phrase per bad setting, e.g. ``trainer.learning_rate: should be greater than 0, got -1e-06``.

    A value checked against several alternatives (``a number or 'auto'``) yields one error per alternative from
    pydantic; they are merged into one phrase. Locations deeper than the setting (list items, the alternatives'
    tags) are left out.
    """
    found: dict[str, tuple[list[str], Any]] = {}
    for item in error.errors():
        loc = tuple(str(part) for part in item["loc"])
        depth = 2 if schema is TrainConfig and loc and loc[0] in ("model", "data", "trainable") else 1
        name = ".".join(prefix + loc[:depth])
        if item["type"] == "extra_forbidden":
            found[f"unknown setting {name}"] = ([_known_keys(schema, loc[:depth - 1])], None)
            continue
        if item["type"] == "model_type":
            found[f"{name} must be a mapping"] = ([], None)
            continue
        expected = item["msg"].removeprefix("Input ").removeprefix("Value error, ")
        messages, _ = found.setdefault(name, ([], item.get("input")))
        if expected not in messages:
            messages.append(expected)
    phrases = []
    for name, (messages, value) in found.items():
        if name.startswith("unknown setting") or name.endswith("must be a mapping"):
            phrases.append(name + (f" (known: {messages[0]})" if messages else ""))
            continue
        merged = messages[0] + "".join(f" or {text.removeprefix('should be ')}" for text in messages[1:])
        phrases.append(f"{name}: {merged}, got {_short_repr(value)}")
    return phrases


def _known_keys(schema: type[BaseModel], section: tuple[str, ...]) -> str:
    if section:
        schema = TrainConfig.model_fields[section[0]].annotation
    return ", ".join(sorted(name for name in schema.model_fields if name != "source"))


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _unknown_trainer_keys(trainer: dict[str, Any]) -> list[str]:
    import dataclasses

    from transformers import TrainingArguments

    known = {field.name for field in dataclasses.fields(TrainingArguments)}
    return [f"unknown setting trainer.{key} (not a transformers TrainingArguments field)"
            for key in trainer if key not in known]


def _one_line(problems: list[str], source: str) -> str:
    if len(problems) == 1:
        return f"{problems[0]} in {source}"
    return f"{len(problems)} problems in {source}: {'; '.join(problems)}"


def _resolve_paths(mapping: dict[str, Any], base: Path) -> dict[str, Any]:
    """`mapping` with the relative paths of `PATH_SETTINGS` (and a DeepSpeed ``strategy`` file) made absolute
    against `base`; ``~`` is expanded. Values of the wrong type are left for validation to report."""
    resolved = copy.copy(mapping)
    for section, key in PATH_SETTINGS:
        values = resolved.get(section)
        if isinstance(values, dict) and key in values:
            resolved[section] = {**values, key: _absolute(values[key], base)}
    strategy = resolved.get("strategy")
    if isinstance(strategy, str) and strategy.endswith(".json"):
        resolved["strategy"] = _absolute(strategy, base)
    return resolved


def _absolute(value: Any, base: Path) -> Any:
    if isinstance(value, list):
        return [_absolute(item, base) for item in value]
    if not isinstance(value, str) or not value:
        return value
    return os.path.normpath(os.path.join(base, os.path.expanduser(value)))


def _deep_merge(base: dict[str, Any], update: dict[str, Any], source: str,
                prefix: tuple[str, ...] = ()) -> dict[str, Any]:
    """`base` updated by `update`, key by key inside mappings; `source` names `update` in errors.

    A mapping of `base` is only ever updated: an empty section (``trainer:`` with every key commented out,
    read as None) leaves it as it is, and any other non-mapping is refused, since a later key of the section
    (``--output-dir`` is ``trainer.output_dir``) would otherwise replace it and the recipe's section be lost.
    """
    merged = dict(base)
    for key, value in update.items():
        if not isinstance(merged.get(key), dict):
            merged[key] = value
        elif isinstance(value, dict):
            merged[key] = _deep_merge(merged[key], value, source, (*prefix, key))
        elif value is not None:
            name = ".".join((*prefix, key))
            raise UserError(f"{name} must be a mapping of settings, got {_short_repr(value)} in {source}")
    return merged


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    result: Any = value
    for part in reversed(dotted.split(".")):
        result = {part: result}
    return result
