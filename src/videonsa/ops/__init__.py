"""NSA operators: `nsa_attention` (fast kernel on CUDA, plain PyTorch elsewhere) and its parts for analysis."""

from videonsa.ops.common import NSAConfig, NSAParts
from videonsa.ops.nsa import available_backends, nsa_attention, nsa_attention_parts
from videonsa.ops.reference import nsa_attention_reference, nsa_parts_reference

__all__ = [
    "NSAConfig",
    "NSAParts",
    "available_backends",
    "nsa_attention",
    "nsa_attention_parts",
    "nsa_attention_reference",
    "nsa_parts_reference",
]
