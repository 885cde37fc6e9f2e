"""Checkpoint key layouts and what a checkpoint on disk (or in the hub cache) holds.

Two layouts of the same Qwen2.5-VL weights exist:

- current (transformers >= 4.52, 5.x): `model.language_model.*`, `model.visual.*`, `lm_head.*`;
- legacy flat (older transformers, and the released Enxin/VideoNSA checkpoint): `model.*` for the text model,
  `visual.*`, `lm_head.*`.

Which attention mode a checkpoint runs by default (`checkpoint_attention_mode`): the `attention_mode` its
config.json records (this package always records one); else, for a checkpoint with gates in the legacy flat layout
and no recorded mode, that is the released Enxin/VideoNSA checkpoint as published, trained and evaluated with the
original code: "official"; else "nsa". Both layouts and the config keys: docs/checkpoints.md.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Any

# transformers `key_mapping` (regex -> replacement) that reads legacy keys as current ones and leaves current
# keys alone, so it can be passed for either layout.
LEGACY_KEY_MAPPING: dict[str, str] = {
    r"^model\.(?!language_model\.|visual\.)": "model.language_model.",
    r"^visual\.": "model.visual.",
}
_GATE_NAME = re.compile(r"\.self_attn\.g_proj_[12]\.(weight|bias)$")
# A gate in the legacy flat layout: `model.layers.{i}.self_attn.g_proj_*` (current: model.language_model.layers).
_LEGACY_GATE_NAME = re.compile(r"^model\.layers\.\d+\.self_attn\.g_proj_[12]\.(weight|bias)$")


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


@dataclass(frozen=True)
class CheckpointAttention:
    """The attention mode a checkpoint runs when none is asked for, and why.

    mode: "nsa", "dense" or "official". source: "config" (config.json records attention_mode), "released-layout"
    (gates in the legacy flat layout, no recorded mode: the released checkpoint as published) or "default"
    (nothing says otherwise: plain Qwen2.5-VL, or no readable config).
    """

    mode: str
    source: str

    def notice(self, name: str) -> str | None:
        """The one line to show when `name` loads in official mode by default (None for the other modes)."""
        if self.mode != "official":
            return None
        why = "released-checkpoint layout" if self.source == "released-layout" else "config.json records it"
        return (
            f"{name}: {why}, running attention_mode='official' (the function it was trained with); "
            "pass attention_mode='nsa' (--attention nsa on the command line) for the corrected NSA"
        )


def checkpoint_attention_mode(path: str | os.PathLike, subfolder: str = "", **hub_kwargs: Any) -> CheckpointAttention:
    """The attention mode the checkpoint at `path` (a local folder or a hub id in the local cache) runs by
    default, read from its config.json and tensor names only (see the module docstring)."""
    config_file = _locate(path, "config.json", subfolder, **hub_kwargs)
    config: dict[str, Any] = {}
    if config_file:
        try:
            with open(config_file) as handle:
                config = json.load(handle)
        except (OSError, json.JSONDecodeError):
            config = {}
    text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    recorded = text_config.get("attention_mode", config.get("attention_mode"))
    if recorded is not None:
        return CheckpointAttention(str(recorded), "config")
    names = checkpoint_tensor_names(path, subfolder, **hub_kwargs)
    if names and any(_LEGACY_GATE_NAME.match(name) for name in names):
        return CheckpointAttention("official", "released-layout")
    return CheckpointAttention("nsa", "default")


def _locate(path: str | os.PathLike, filename: str, subfolder: str = "", **hub_kwargs: Any) -> str | None:
    """The local path of `filename` in a checkpoint folder or cached hub snapshot, or None."""
    from transformers.utils import cached_file

    return cached_file(
        path, filename, subfolder=subfolder,
        _raise_exceptions_for_missing_entries=False, _raise_exceptions_for_connection_errors=False,
        **hub_kwargs,
    )


def checkpoint_tensor_names(path: str | os.PathLike, subfolder: str = "", **hub_kwargs: Any) -> set[str] | None:
    """Names of the tensors a checkpoint stores, read from its safetensors index or header (no weights are
    loaded), or None if it has neither. `path` is a local folder or a hub id already in the local cache."""
    from safetensors import safe_open

    def locate(filename: str) -> str | None:
        return _locate(path, filename, subfolder, **hub_kwargs)

    # transformers' order: model.safetensors before an index (a stale index may sit beside it).
    if single := locate("model.safetensors"):
        with safe_open(single, framework="pt") as handle:
            return set(handle.keys())
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if index := locate(index_name):
            with open(index) as handle:
                return set(json.load(handle)["weight_map"])
    return None


def checkpoint_has_gates(path: str | os.PathLike, subfolder: str = "", **hub_kwargs: Any) -> bool | None:
    """Whether a checkpoint stores VideoNSA gate projections; None where its tensor names cannot be read."""
    names = checkpoint_tensor_names(path, subfolder, **hub_kwargs)
    if names is None:
        return None
    return any(_GATE_NAME.search(name) for name in names)
