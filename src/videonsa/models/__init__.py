"""VideoNSA models on Qwen2.5-VL (transformers 5.x), registered with the transformers Auto classes.

    >>> import videonsa
    >>> from videonsa.models import VideoNSAForConditionalGeneration
    >>> model = VideoNSAForConditionalGeneration.from_pretrained("path/to/VideoNSA")
    >>> model.set_attention_mode("dense")      # or videonsa.models.set_attention_mode(model, "dense")
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

from videonsa.models.configuration_videonsa import NSA_CONFIG_DEFAULTS, VideoNSAConfig
from videonsa.models.modeling_videonsa import (
    VideoNSAAttention,
    VideoNSAForConditionalGeneration,
    VideoNSAModel,
    VideoNSATextModel,
    disable_sequence_parallel,
    enable_sequence_parallel,
    set_attention_mode,
    set_sparsity,
)


def _register_auto_classes() -> None:
    """Let AutoConfig / AutoModel / AutoModelForImageTextToText / AutoProcessor resolve model_type
    "videonsa" (idempotent, so re-importing is harmless)."""
    AutoConfig.register(VideoNSAConfig.model_type, VideoNSAConfig, exist_ok=True)
    AutoModel.register(VideoNSAConfig, VideoNSAModel, exist_ok=True)
    AutoModelForImageTextToText.register(VideoNSAConfig, VideoNSAForConditionalGeneration, exist_ok=True)
    from transformers import AutoProcessor, Qwen2_5_VLProcessor

    AutoProcessor.register(VideoNSAConfig, Qwen2_5_VLProcessor, exist_ok=True)


_register_auto_classes()

__all__ = [
    "NSA_CONFIG_DEFAULTS",
    "VideoNSAAttention",
    "VideoNSAConfig",
    "VideoNSAForConditionalGeneration",
    "VideoNSAModel",
    "VideoNSATextModel",
    "disable_sequence_parallel",
    "enable_sequence_parallel",
    "set_attention_mode",
    "set_sparsity",
]
