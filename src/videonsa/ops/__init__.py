"""NSA operators: `nsa_attention` (fast kernel on CUDA, plain PyTorch elsewhere) and its parts for analysis.

`NSAConfig` is torch-free and imported at once; the operators (which import torch) load on first use, so that
reading the budget's defaults (the command line's --help) does not pay for torch.
"""

import importlib
from typing import Any

from videonsa.ops.config import NSAConfig

# Names loaded on first use -> the module that provides them.
_LAZY_NAMES = {
    "NSAParts": "videonsa.ops.common",
    "available_backends": "videonsa.ops.nsa",
    "nsa_attention": "videonsa.ops.nsa",
    "nsa_attention_parts": "videonsa.ops.nsa",
    "nsa_attention_reference": "videonsa.ops.reference",
    "nsa_parts_reference": "videonsa.ops.reference",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(_LAZY_NAMES[name]), name)
    raise AttributeError(f"module 'videonsa.ops' has no attribute {name!r}")


def __dir__() -> list[str]:
    # dir() and completion list the lazily loaded operators too.
    return sorted({*globals(), *_LAZY_NAMES})


__all__ = [
    "NSAConfig",
    "NSAParts",
    "available_backends",
    "nsa_attention",
    "nsa_attention_parts",
    "nsa_attention_reference",
    "nsa_parts_reference",
]
