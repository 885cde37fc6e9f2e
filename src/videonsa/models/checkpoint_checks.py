"""Checks of a checkpoint folder before any weight is loaded (docs/model-files.md).

A model folder is untrusted input. Before building the model, `check_checkpoint` makes sure that

- config.json holds an object whose architecture keys are present, integers of plausible size and consistent
  with each other (`check_config`: a typed schema), so `{}` never becomes a full-size default model and
  ``num_hidden_layers: 1e6`` never starts building;
- the weights are safetensors (pickle-format files are refused, never opened: unpickling can run code) whose
  headers parse and whose tensor names and shapes agree with what the config builds; only the headers are read.

`gate_coverage` tells which text layers store VideoNSA gate projections. Every failure is one `UserError` line
naming the file at fault.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, ValidationError, model_validator

from videonsa.errors import UserError, first_line
from videonsa.models.checkpoints import to_current_key

# Upper bounds far above any Qwen2.5-VL (72B: 80 layers, hidden 8192, MLP 29568, vocab 152064), low enough that
# a typo or a hostile file cannot make the model builder loop for hours or allocate terabytes.
MAX_LAYERS = 1024
MAX_WIDTH = 65_536
MAX_MLP_WIDTH = 1_048_576
MAX_HEADS = 4096
MAX_VOCAB = 4_194_304
MAX_PATCH = 1024

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Weight formats stored with pickle (torch.save): refused, never unpickled.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
GATE_PARAMETERS = tuple(f"g_proj_{i}.{kind}" for i in (1, 2) for kind in ("weight", "bias"))
_TEXT_LAYER = re.compile(r"^model\.language_model\.layers\.(\d+)\.")
_VISION_BLOCK = re.compile(r"^model\.visual\.blocks\.(\d+)\.")
_GATE = re.compile(r"^model\.language_model\.layers\.(\d+)\.self_attn\.(g_proj_[12]\.(?:weight|bias))$")


def _size(upper: int, default: Any = ...) -> Any:
    return Field(default, gt=0, le=upper)


class _TextArchitecture(BaseModel):
    """The text model's architecture keys (in text_config, or at the top level in flat configs)."""

    model_config = ConfigDict(extra="allow")

    hidden_size: StrictInt = _size(MAX_WIDTH)
    intermediate_size: StrictInt = _size(MAX_MLP_WIDTH)
    num_hidden_layers: StrictInt = _size(MAX_LAYERS)
    num_attention_heads: StrictInt = _size(MAX_HEADS)
    num_key_value_heads: StrictInt | None = _size(MAX_HEADS, None)
    head_dim: StrictInt | None = _size(MAX_WIDTH, None)
    vocab_size: StrictInt = _size(MAX_VOCAB)

    @model_validator(mode="after")
    def _heads_fit(self) -> _TextArchitecture:
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )
        if self.num_key_value_heads is not None and self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads "
                f"{self.num_key_value_heads}"
            )
        return self


class _VisionArchitecture(BaseModel):
    """The vision tower's architecture keys (vision_config)."""

    model_config = ConfigDict(extra="allow")

    depth: StrictInt = _size(MAX_LAYERS)
    hidden_size: StrictInt = _size(MAX_WIDTH)
    num_heads: StrictInt = _size(MAX_HEADS)
    intermediate_size: StrictInt | None = _size(MAX_MLP_WIDTH, None)
    out_hidden_size: StrictInt | None = _size(MAX_WIDTH, None)
    patch_size: StrictInt | None = _size(MAX_PATCH, None)
    spatial_merge_size: StrictInt | None = _size(64, None)
    temporal_patch_size: StrictInt | None = _size(64, None)
    tokens_per_second: StrictInt | StrictFloat | None = Field(None, gt=0)
    fullatt_block_indexes: list[StrictInt] | None = None

    @model_validator(mode="after")
    def _heads_fit(self) -> _VisionArchitecture:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        outside = [i for i in self.fullatt_block_indexes or () if not 0 <= i < self.depth]
        if outside:
            raise ValueError(f"fullatt_block_indexes {outside} are not blocks of a depth-{self.depth} tower")
        return self


class _TopLevel(BaseModel):
    model_config = ConfigDict(extra="allow")

    text_config: dict[str, Any] | None = None
    vision_config: dict[str, Any]
    tie_word_embeddings: bool | None = None
    image_token_id: StrictInt | None = Field(None, ge=0)
    video_token_id: StrictInt | None = Field(None, ge=0)
    vision_start_token_id: StrictInt | None = Field(None, ge=0)
    vision_end_token_id: StrictInt | None = Field(None, ge=0)


def _problems(error: ValidationError, prefix: str) -> list[str]:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in (prefix, *item["loc"]) if part != "")
        if item["type"] == "missing":
            lines.append(f"{where}: missing")
            continue
        message = item["msg"].removeprefix("Value error, ")
        shown = "" if item["type"] == "value_error" else f" (got {item['input']!r})"
        lines.append(f"{where + ': ' if where else ''}{message}{shown}")
    return lines


def check_config(config: Any, where: str | Path) -> None:
    """Raise `UserError` (one line listing every problem, naming `where`) unless `config` (config.json's
    parsed content) describes a plausible Qwen2.5-VL: architecture keys present, integers within bounds,
    heads dividing widths, special token ids inside the vocabulary."""
    if not isinstance(config, dict):
        raise UserError(f"{where} must hold a JSON object, not a {type(config).__name__}")
    problems: list[str] = []
    try:
        _TopLevel.model_validate(config)
    except ValidationError as error:
        problems += _problems(error, "")
    nested = isinstance(config.get("text_config"), dict)
    text = config["text_config"] if nested else config
    try:
        _TextArchitecture.model_validate(text)
    except ValidationError as error:
        problems += _problems(error, "text_config" if nested else "")
    if isinstance(config.get("vision_config"), dict):
        try:
            _VisionArchitecture.model_validate(config["vision_config"])
        except ValidationError as error:
            problems += _problems(error, "vision_config")
    if not problems:
        problems += _cross_checks(config, text)
    if problems:
        raise UserError(f"{where}: {'; '.join(problems)}")


def _cross_checks(config: dict[str, Any], text: dict[str, Any]) -> list[str]:
    """Agreements between sections that no tensor shape shows: token ids inside the vocabulary, the vision
    tower's output width equal to the text width, M-RoPE sections covering half the head dimension."""
    problems = []
    vocab = text["vocab_size"]
    for key in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        if isinstance(config.get(key), int) and config[key] >= vocab:
            problems.append(f"{key} {config[key]} is not below vocab_size {vocab}")
    out_width = config["vision_config"].get("out_hidden_size")
    if out_width is not None and out_width != text["hidden_size"]:
        width = text["hidden_size"]
        problems.append(f"vision_config.out_hidden_size {out_width} differs from the text hidden_size {width}")
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    for key in ("rope_parameters", "rope_scaling"):
        section = text.get(key).get("mrope_section") if isinstance(text.get(key), dict) else None
        if section is None:
            continue
        if not isinstance(section, list) or not all(type(x) is int and x > 0 for x in section):
            problems.append(f"{key}.mrope_section must be a list of positive integers, got {section!r}")
        elif 2 * sum(section) != head_dim:
            problems.append(f"{key}.mrope_section {section} sums to {sum(section)}, not half the head dimension "
                            f"{head_dim}")
    return problems


def read_config(directory: Path) -> dict[str, Any]:
    """config.json of `directory`, parsed and checked (`check_config`)."""
    path = directory / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{directory}: no config.json, so it is not a model directory") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise UserError(f"{path}: not readable JSON ({first_line(error)})") from None
    check_config(config, path)
    return config


# ---------------------------------------------------------------------------------------------------------------
# Weights: safetensors headers only


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as a safetensors header describes it."""

    shape: tuple[int, ...]
    dtype: str
    file: str


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files holding `directory`'s weights: model.safetensors, else the index's shards.

    The order is transformers' (`from_pretrained` reads model.safetensors when both are there), so the files
    checked are the files loaded: saving a model unsharded into a folder that held shards leaves the old index
    behind (transformers removes the shards, not the index).

    Raises `UserError` for a folder holding only pickle-format weights, no weights, an unreadable index or an
    index naming a missing shard or a file outside the folder.
    """
    if (directory / SINGLE_FILE).is_file():
        return [directory / SINGLE_FILE]
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, RecursionError) as error:
            raise UserError(f"{index}: not a readable safetensors index ({first_line(error)})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UserError(f"{index}: weight_map must map tensor names to file names")
        shards = sorted(set(weight_map.values()))
        for shard in shards:
            if Path(shard).name != shard or not shard.endswith(".safetensors"):
                raise UserError(f"{index}: lists {shard!r}, not a .safetensors file in the model folder")
            if not (directory / shard).is_file():
                raise UserError(f"{index}: lists {shard}, which is missing from {directory}")
        return [directory / shard for shard in shards]
    pickled = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name.endswith(PICKLE_SUFFIXES))
    if pickled:
        raise UserError(
            f"{directory / pickled[0]}: pickle-format weights are not loaded (unpickling can run code); "
            f"convert them to safetensors with a tool you trust"
        )
    raise UserError(f"{directory}: no weights ({SINGLE_FILE} or {INDEX_FILE})")


def read_tensor_headers(directory: Path) -> dict[str, StoredTensor]:
    """Name (current layout) -> shape and dtype of every tensor `directory` stores, from the safetensors
    headers only (no tensor data is read). Raises `UserError` naming the file for truncated or garbage files
    and for non-floating-point tensors."""
    from safetensors import SafetensorError, safe_open

    tensors: dict[str, StoredTensor] = {}
    for file in weight_files(directory):
        try:
            with safe_open(file, framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    piece = handle.get_slice(name)
                    tensors[to_current_key(name)] = StoredTensor(tuple(piece.get_shape()), piece.get_dtype(), file.name)
        except (SafetensorError, OSError, ValueError) as error:
            why = first_line(error)
            raise UserError(f"{file}: not a readable safetensors file (truncated or corrupt: {why})") from None
    for name, tensor in tensors.items():
        if tensor.dtype not in FLOAT_DTYPES:
            raise UserError(f"{directory / tensor.file}: tensor {name} is stored as {tensor.dtype}, not a float type")
    return tensors


# ---------------------------------------------------------------------------------------------------------------
# Gates


@dataclass(frozen=True)
class GateCoverage:
    """Which text layers store their gate projections (g_proj_1/g_proj_2 weight and bias).

    layers: the model's text layer count. gated: layers with all four gate tensors stored.
    """

    layers: int
    gated: frozenset[int]

    @property
    def missing(self) -> list[int]:
        """Layers whose gates are not (all) stored, ascending."""
        return [i for i in range(self.layers) if i not in self.gated]

    @property
    def complete(self) -> bool:
        return len(self.gated) == self.layers

    @property
    def partial(self) -> bool:
        """Some layers have gates, others do not: not a plain Qwen2.5-VL, not a whole VideoNSA checkpoint."""
        return 0 < len(self.gated) < self.layers


def gate_coverage(names: Iterable[str], layers: int) -> GateCoverage:
    """The gates stored among tensor `names` (either key layout) of a model with `layers` text layers."""
    found: dict[int, set[str]] = {}
    for name in names:
        if match := _GATE.match(to_current_key(name)):
            found.setdefault(int(match.group(1)), set()).add(match.group(2))
    gated = frozenset(i for i, kinds in found.items() if i < layers and kinds.issuperset(GATE_PARAMETERS))
    return GateCoverage(layers, gated)


def describe_layers(indices: Iterable[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> "0-2, 5, 7-8"."""
    runs: list[list[int]] = []
    for i in sorted(indices):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def refuse_partial_gates(coverage: GateCoverage, name: str) -> None:
    """`UserError` for a checkpoint with gates in some layers only (see `GateCoverage.partial`)."""
    if coverage.partial:
        raise UserError(
            f"{name}: VideoNSA gates are missing for layer(s) {describe_layers(coverage.missing)} of "
            f"{coverage.layers} (stored for {describe_layers(coverage.gated)}); a damaged or partly converted "
            f"checkpoint? Pass fresh_gates=True (--fresh-gates) to initialise the missing gates fresh"
        )


# ---------------------------------------------------------------------------------------------------------------
# Config against weights


@dataclass(frozen=True)
class CheckpointCheck:
    """What `check_checkpoint` found: the config (checked), the stored tensors and the gate coverage."""

    config: dict[str, Any]
    tensors: dict[str, StoredTensor]
    gates: GateCoverage


def check_checkpoint(directory: str | Path) -> CheckpointCheck:
    """Check `directory` (a local checkpoint folder) without loading a weight: config.json plausible
    (`check_config`), weights readable safetensors (`read_tensor_headers`), and every tensor the config builds
    stored with the shape it builds (layer counts first). Gates may be missing (see `gate_coverage`).

    Raises `UserError` with one line naming the file at fault.
    """
    directory = Path(directory)
    config = read_config(directory)
    _check_sparse_settings(directory / "config.json", config)
    tensors = read_tensor_headers(directory)
    expected, layers, tied = _expected_shapes(directory, config)
    _compare_layer_counts(directory, tensors, expected)
    stored_in = lambda name: directory / tensors[name].file  # noqa: E731
    differ = [name for name in expected if name in tensors and tensors[name].shape != expected[name]]
    if differ:
        name = differ[0]
        more = f" ({len(differ) - 1} more tensors differ)" if len(differ) > 1 else ""
        raise UserError(
            f"{directory / 'config.json'} and {stored_in(name)} disagree: {name} is {list(expected[name])} by the "
            f"config but {list(tensors[name].shape)} in the weights{more}"
        )
    optional = {"lm_head.weight"} if tied else set()
    missing = [n for n in expected if n not in tensors and n not in optional and not _GATE.match(n)]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise UserError(f"{directory}: the weights lack {missing[0]}{more}, which config.json's model has")
    return CheckpointCheck(config, tensors, gate_coverage(tensors, layers))


def _expected_shapes(directory: Path, config: dict[str, Any]) -> tuple[dict[str, tuple[int, ...]], int, bool]:
    """(name -> shape of every parameter the config builds, text layer count, tied embeddings), from a model
    built on the meta device (no memory)."""
    import torch
    from huggingface_hub.errors import StrictDataclassError

    from videonsa.models.configuration_videonsa import NSA_CONFIG_DEFAULTS, VideoNSAConfig
    from videonsa.models.modeling_videonsa import VideoNSAForConditionalGeneration

    # The sparse-attention settings shape no tensor: checked on their own (`_check_sparse_settings`).
    architecture = {k: v for k, v in config.items() if k != "model_type" and k not in NSA_CONFIG_DEFAULTS}
    if isinstance(config.get("text_config"), dict):
        architecture["text_config"] = {
            k: v for k, v in config["text_config"].items() if k not in NSA_CONFIG_DEFAULTS
        }
    try:
        model_config = VideoNSAConfig.from_dict(architecture)
        with torch.device("meta"):
            model = VideoNSAForConditionalGeneration(model_config)
    except (ValueError, TypeError, KeyError, AttributeError, ZeroDivisionError, RuntimeError,
            StrictDataclassError) as error:
        cause = error.__cause__ if isinstance(error, StrictDataclassError) and error.__cause__ else error
        why = first_line(cause)
        raise UserError(f"{directory / 'config.json'}: not a usable Qwen2.5-VL config ({why})") from None
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    text = model_config.text_config
    tied = bool(getattr(model_config, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False))
    return shapes, text.num_hidden_layers, tied


def _check_sparse_settings(where: Path, config: dict[str, Any]) -> None:
    """The recorded sparse-attention settings (text_config, else the top level) as `SparseSettings` checks them.

    An unknown recorded attention_mode is left to `resolve_attention`, which names it; the budget is then
    checked as for "nsa"."""
    from videonsa.layers import SparseSettings
    from videonsa.layers.attention import ATTENTION_MODES
    from videonsa.models.configuration_videonsa import NSA_CONFIG_DEFAULTS

    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    value = lambda key: text.get(key, config.get(key, NSA_CONFIG_DEFAULTS[key]))  # noqa: E731
    mode = value("attention_mode")
    try:
        SparseSettings(
            block_size=value("block_size"), block_count=value("block_counts"), window_size=value("window_size"),
            init_blocks=value("init_blocks"), local_blocks=value("local_blocks"),
            gate_temperature=value("gate_temperature"), mode=mode if mode in ATTENTION_MODES else "nsa",
        )
    except UserError as error:
        raise UserError(f"{where}: {error}") from None


def _compare_layer_counts(directory: Path, tensors: dict[str, StoredTensor], expected: dict[str, Any]) -> None:
    for pattern, what, key in ((_TEXT_LAYER, "text layers", "num_hidden_layers"),
                               (_VISION_BLOCK, "vision blocks", "vision_config.depth")):
        built = _count(pattern, expected)
        stored = _count(pattern, tensors)
        if stored != built:
            raise UserError(
                f"{directory / 'config.json'} says {built} {what} ({key}) but the weights hold {stored}"
            )


def _count(pattern: re.Pattern[str], names: Iterable[str]) -> int:
    indices = {int(m.group(1)) for name in names if (m := pattern.match(name))}
    return max(indices) + 1 if indices else 0
