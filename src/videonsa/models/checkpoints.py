"""Checkpoint key layouts and what a checkpoint on disk (or in the hub cache) holds.

Two layouts of the same Qwen2.5-VL weights exist:

- current (transformers >= 4.52, 5.x): `model.language_model.*`, `model.visual.*`, `lm_head.*`;
- legacy flat (older transformers, and the released Enxin/VideoNSA checkpoint): `model.*` for the text model,
  `visual.*`, `lm_head.*`.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

# transformers `key_mapping` (regex -> replacement) that reads legacy keys as current ones and leaves current
# keys alone, so it can be passed for either layout.
LEGACY_KEY_MAPPING: dict[str, str] = {
    r"^model\.(?!language_model\.|visual\.)": "model.language_model.",
    r"^visual\.": "model.visual.",
}
_GATE_NAME = re.compile(r"\.self_attn\.g_proj_[12]\.(weight|bias)$")


def to_legacy_key(key: str) -> str:
    """A current-layout parameter name in the legacy flat layout (`model.language_model.x` -> `model.x`)."""
    if key.startswith("model.language_model."):
        return "model." + key.removeprefix("model.language_model.")
    if key.startswith("model.visual."):
        return key.removeprefix("model.")
    return key


def to_current_key(key: str) -> str:
    """A parameter name of either layout in the current layout."""
    for pattern, replacement in LEGACY_KEY_MAPPING.items():
        key = re.sub(pattern, replacement, key)
    return key


def checkpoint_tensor_names(path: str | os.PathLike, subfolder: str = "", **hub_kwargs: Any) -> set[str] | None:
    """Names of the tensors a checkpoint stores, read from its safetensors index or header (no weights are
    loaded), or None if it has neither. `path` is a local folder or a hub id already in the local cache."""
    from safetensors import safe_open
    from transformers.utils import cached_file

    def locate(filename: str) -> str | None:
        return cached_file(
            path, filename, subfolder=subfolder,
            _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False,
            **hub_kwargs,
        )

    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if index := locate(index_name):
            with open(index) as handle:
                return set(json.load(handle)["weight_map"])
    if single := locate("model.safetensors"):
        with safe_open(single, framework="pt") as handle:
            return set(handle.keys())
    return None


def checkpoint_has_gates(path: str | os.PathLike, subfolder: str = "", **hub_kwargs: Any) -> bool | None:
    """Whether a checkpoint stores VideoNSA gate projections; None where its tensor names cannot be read."""
    names = checkpoint_tensor_names(path, subfolder, **hub_kwargs)
    if names is None:
        return None
    return any(_GATE_NAME.search(name) for name in names)
