"""Turn a Qwen2.5-VL checkpoint into a VideoNSA one, and write checkpoints in the legacy flat layout.

The legacy layout is the released Enxin/VideoNSA checkpoint's: weights under `model.*` (text), `visual.*` and
`lm_head.*`, config with `model_type: qwen2_5_vl` and `architectures: ["VideoNSAForConditionalGeneration"]`.
Everything is written to temporary names first and renamed into place, so a failure leaves no half-written
checkpoint behind. The formats: docs/checkpoints.md.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from videonsa.errors import UserError
from videonsa.files import atomic_write, staging_folder
from videonsa.models.checkpoints import to_current_key, to_legacy_key

# Shards of at most this many bytes, as transformers writes them by default.
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
# Files of a checkpoint folder that hold the model itself; everything else (tokenizer, processor, chat
# template, generation config) is copied unchanged by `convert_checkpoint`.
_MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".index.json")
_MODEL_FILE_NAMES = ("config.json",)
# A training checkpoint's state and completion marker (videonsa.training): copied, they would make the converted
# folder look like a checkpoint that `videonsa train` can resume.
_TRAINING_STATE_NAMES = ("trainer_state.json", "videonsa-complete")
# The shard names `_save` (and transformers) write: model-00001-of-00003.safetensors.
_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def save_legacy_layout(
    model: nn.Module, path: str | os.PathLike, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
) -> None:
    """Save `model` (a Qwen2.5-VL or VideoNSA model) with legacy flat key names and a `qwen2_5_vl` config,
    as the released Enxin/VideoNSA checkpoint is stored.

    Writes config.json, generation_config.json and model.safetensors (or shards plus an index) into `path`,
    removing the weight files of an earlier save there.
    """
    _save(model, path, legacy=True, max_shard_bytes=max_shard_bytes)


def save_current_layout(
    model: nn.Module, path: str | os.PathLike, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES
) -> None:
    """Save `model` with transformers' current key names (`model.language_model.*`, `model.visual.*`)
    whatever layout it was loaded from (`save_pretrained` keeps the layout of a legacy checkpoint)."""
    _save(model, path, legacy=False, max_shard_bytes=max_shard_bytes)


def _save(model: nn.Module, path: str | os.PathLike, *, legacy: bool, max_shard_bytes: int) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rename = to_legacy_key if legacy else to_current_key
    tensors = {rename(name): t.detach().contiguous() for name, t in _unique_tensors(model.state_dict()).items()}
    shards = _shard(tensors, max_shard_bytes)
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards, strict=True):
        _write_atomic(path / name, lambda tmp, shard=shard: save_file(shard, tmp, metadata={"format": "pt"}))
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
            "weight_map": {key: name for name, shard in zip(names, shards, strict=True) for key in shard},
        }
        _write_json(path / "model.safetensors.index.json", index)
    _remove_stale_weights(path, names)

    config = json.loads(model.config.to_json_string(use_diff=False))
    if legacy:
        config["model_type"] = "qwen2_5_vl"
    config["architectures"] = [type(model).__name__]
    _write_json(path / "config.json", config)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        _write_json(path / "generation_config.json", json.loads(generation_config.to_json_string()))


def _remove_stale_weights(path: Path, written: list[str]) -> None:
    """Delete the weight files of an earlier save into `path` that this one did not rewrite: transformers loads
    model.safetensors before an index, so an old single file would shadow new shards, and an old index or shards
    would describe weights that are not there."""
    keep = set(written)
    if len(written) > 1:
        keep.add("model.safetensors.index.json")
    for item in path.iterdir():
        weights = item.name in ("model.safetensors", "model.safetensors.index.json") or _SHARD_NAME.fullmatch(item.name)
        if weights and item.name not in keep and item.is_file():
            item.unlink()


def convert_checkpoint(
    source: str | os.PathLike,
    destination: str | os.PathLike,
    *,
    legacy_layout: bool = False,
    dtype: str = "auto",
    seed: int = 0,
    fresh_gates: bool = False,
    **settings: Any,
) -> Path:
    """Write a VideoNSA checkpoint made from the Qwen2.5-VL (or VideoNSA) checkpoint folder `source`.

    Weights are kept; gates missing from `source` are initialised fresh (N(0, 0.02), bias 0, seeded by `seed`).
    Tokenizer, processor and other non-weight files are copied (not a training checkpoint's state). `settings`
    (block_size, block_counts, window_size, init_blocks, local_blocks, gate_temperature, attention_mode) are
    recorded in the new config.

    `source` is checked first (`from_pretrained` runs `checkpoint_checks.check_checkpoint`): a malformed config,
    weights that are not safetensors or disagree with it, or gates stored for some layers only (unless
    `fresh_gates`) are a `UserError`, and nothing is written. Staging folders of a killed earlier conversion to
    the same destination are removed (`videonsa.files.staging_folder`).

    Args:
        legacy_layout: write the released checkpoint's flat layout instead of transformers' current one.
        dtype: "auto" (as stored), "bfloat16", "float16" or "float32".
        fresh_gates: accept a source with gates in some layers only; the missing ones are initialised fresh.
    """
    from videonsa.models.modeling_videonsa import VideoNSAForConditionalGeneration

    source, destination = Path(source), Path(destination)
    if not (source / "config.json").is_file():
        raise UserError(f"{source}: not a checkpoint folder (no config.json)")
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise UserError(f"{destination}: already exists and is not an empty folder")
    torch_dtype = _parse_dtype(dtype)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VideoNSAForConditionalGeneration.from_pretrained(
            source, dtype=torch_dtype, fresh_gates=fresh_gates, **settings
        )

    with staging_folder(destination) as staging:
        _save(model, staging, legacy=legacy_layout, max_shard_bytes=DEFAULT_MAX_SHARD_BYTES)
        for item in source.iterdir():
            if item.is_file() and not _is_model_file(item.name) and not (staging / item.name).exists():
                shutil.copy2(item, staging / item.name)
        if destination.exists():
            destination.rmdir()  # empty, checked above
        os.replace(staging, destination)
    return destination


def _parse_dtype(name: str) -> str | torch.dtype:
    choices = {"auto": "auto", "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if name not in choices:
        raise UserError(f"dtype must be one of {sorted(choices)}, got {name!r}")
    return choices[name]


def _is_model_file(name: str) -> bool:
    """Whether `name` is written by the conversion itself or left behind (weights, config, training state)."""
    return name in _MODEL_FILE_NAMES or name in _TRAINING_STATE_NAMES or name.endswith(_MODEL_FILE_SUFFIXES)


def _unique_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop names that share storage with an earlier one (tied embeddings): safetensors stores each once, and
    loading re-ties them from the config."""
    seen: set[tuple[int, int]] = set()
    unique = {}
    for name, tensor in state_dict.items():
        identity = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if identity in seen:
            continue
        seen.add(identity)
        unique[name] = tensor
    return unique


def _shard(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def _write_atomic(path: Path, write: Any) -> None:
    """Run write(temporary_path) and rename the result to `path` (`videonsa.files.atomic_write`)."""
    atomic_write(path, write)


def _write_json(path: Path, data: dict) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
            handle.write("\n")

    _write_atomic(path, write)
