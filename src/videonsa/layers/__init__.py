"""The VideoNSA attention glue, independent of any particular model: gates, vision/text split, packing."""

from videonsa.layers.attention import (
    ATTENTION_MODES,
    DenseAttend,
    SparseSettings,
    dense_text_attention,
    sdpa_attend,
    videonsa_attention,
    vision_nsa_attention,
)
from videonsa.layers.gates import GATE_INIT_STD, branch_gates, init_gate_projections_, make_gate_projections
from videonsa.layers.official import official_attention
from videonsa.layers.split import TokenHistory, TokenSplit, build_token_split, empty_history

__all__ = [
    "ATTENTION_MODES",
    "GATE_INIT_STD",
    "DenseAttend",
    "SparseSettings",
    "TokenHistory",
    "TokenSplit",
    "branch_gates",
    "build_token_split",
    "dense_text_attention",
    "empty_history",
    "init_gate_projections_",
    "make_gate_projections",
    "official_attention",
    "sdpa_attend",
    "videonsa_attention",
    "vision_nsa_attention",
]
