"""VideoNSAConfig: a Qwen2.5-VL config whose text config also records the sparse-attention settings.

The settings live in the text config under the names the released Enxin/VideoNSA checkpoint uses:
`block_size`, `block_counts`, `window_size`, `init_blocks`, `local_blocks`, `gate_temperature`, `attention_mode`.
Older flat configs that keep them at the top level are read too.

`model_type` is "videonsa", so that the transformers Auto classes (registered by `import videonsa`) find the
model in checkpoints this package writes. The released checkpoint says `model_type: qwen2_5_vl`; loading it
through `VideoNSAConfig` / `VideoNSAForConditionalGeneration.from_pretrained` accepts that quietly.
"""

from __future__ import annotations

from typing import Any

from transformers import Qwen2_5_VLConfig

from videonsa.layers import SparseSettings

# Text-config key -> default. block_counts is the released checkpoint's name for NSA's block_count.
NSA_CONFIG_DEFAULTS: dict[str, Any] = {
    "block_size": SparseSettings.block_size,
    "block_counts": SparseSettings.block_count,
    "window_size": SparseSettings.window_size,
    "init_blocks": SparseSettings.init_blocks,
    "local_blocks": SparseSettings.local_blocks,
    "gate_temperature": SparseSettings.gate_temperature,
    "attention_mode": SparseSettings.mode,
}
# Checkpoints of Qwen2.5-VL (plain or the released VideoNSA one) that VideoNSAConfig reads as its own.
COMPATIBLE_MODEL_TYPES = ("qwen2_5_vl", "videonsa")


def record_sparse_settings(text_config: Any, settings: SparseSettings) -> None:
    """Store `settings` in a text config under the checkpoint's key names (NSA_CONFIG_DEFAULTS)."""
    text = text_config
    text.block_size, text.block_counts, text.window_size = (
        settings.block_size, settings.block_count, settings.window_size
    )
    text.init_blocks, text.local_blocks = settings.init_blocks, settings.local_blocks
    text.gate_temperature, text.attention_mode = settings.gate_temperature, settings.mode


class VideoNSAConfig(Qwen2_5_VLConfig):
    """Qwen2.5-VL configuration plus VideoNSA's sparse-attention settings (in `text_config`).

    Example:
        >>> config = VideoNSAConfig.from_pretrained("Enxin/VideoNSA")    # released checkpoint's config
        >>> config.sparse_settings()
        SparseSettings(block_size=64, block_count=32, window_size=256, init_blocks=0, local_blocks=1, ...)
    """

    model_type = "videonsa"

    def __post_init__(self, **kwargs: Any) -> None:
        # Flat (legacy) configs carry the settings at the top level; the text config is built by the parent.
        top_level = {key: kwargs.pop(key) for key in NSA_CONFIG_DEFAULTS if key in kwargs}
        super().__post_init__(**kwargs)
        for key, default in NSA_CONFIG_DEFAULTS.items():
            if key not in self.text_config.__dict__:
                setattr(self.text_config, key, top_level.get(key, default))
        self.sparse_settings()  # fail early on bad settings

    def sparse_settings(self) -> SparseSettings:
        """The recorded settings, validated (raises `UserError` naming the bad one)."""
        text = self.text_config
        return SparseSettings(
            block_size=text.block_size,
            block_count=text.block_counts,
            window_size=text.window_size,
            init_blocks=text.init_blocks,
            local_blocks=text.local_blocks,
            gate_temperature=text.gate_temperature,
            mode=text.attention_mode,
        )

    def record_sparse_settings(self, settings: SparseSettings) -> None:
        """Store `settings` in the text config (what `save_pretrained` writes)."""
        record_sparse_settings(self.text_config, settings)

    @classmethod
    def from_qwen2_5_vl(cls, config: Qwen2_5_VLConfig, **settings: Any) -> VideoNSAConfig:
        """A VideoNSAConfig with the architecture of `config` and the given settings (NSA_CONFIG_DEFAULTS keys;
        the rest keep what `config` records, else the defaults)."""
        unknown = set(settings) - set(NSA_CONFIG_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown VideoNSA settings {sorted(unknown)}; known: {sorted(NSA_CONFIG_DEFAULTS)}")
        data = config.to_dict()
        data.pop("model_type", None)
        new = cls.from_dict(data)
        for key, value in settings.items():
            setattr(new.text_config, key, value)
        new.sparse_settings()
        new._attn_implementation = config._attn_implementation
        return new

    @classmethod
    def get_config_dict(cls, *args: Any, **kwargs: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """Read a config file; Qwen2.5-VL ones (the released VideoNSA checkpoint's included) count as ours."""
        config_dict, kwargs = super().get_config_dict(*args, **kwargs)
        if config_dict.get("model_type") in COMPATIBLE_MODEL_TYPES:
            config_dict = {**config_dict, "model_type": cls.model_type}
        return config_dict, kwargs
