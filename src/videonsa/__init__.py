"""VideoNSA: Qwen2.5-VL with learned Native Sparse Attention over video tokens.

    >>> import videonsa
    >>> o = videonsa.ops.nsa_attention(q, k, v, g_cmp, g_slc, g_swa)
    >>> model = videonsa.models.VideoNSAForConditionalGeneration.from_pretrained("path/to/VideoNSA")
    >>> answer = videonsa.load("path/to/VideoNSA").ask("talk.mp4", "What is written on the board?")

`models`, `ops` and `load` are imported on first use, so `import videonsa` (and the `videonsa` command's
`--help`) does not pay seconds for torch and transformers. Importing `videonsa.models` (first use of
`videonsa.models` or `videonsa.load` does) registers the VideoNSA model with the transformers Auto classes.
"""

import importlib
from typing import Any

from videonsa.errors import UserError

__version__ = "0.1.0"

# Names loaded on first use -> the module that provides them. `load` pulls in video decoding (PyAV) as well,
# which model-only users (a training node fed pre-extracted frames) may not have installed.
_LAZY_SUBMODULES = ("models", "ops")
_LAZY_NAMES = {"load": "videonsa.inference"}


def __getattr__(name: str) -> Any:
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f"videonsa.{name}")
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(_LAZY_NAMES[name]), name)
    raise AttributeError(f"module 'videonsa' has no attribute {name!r}")


__all__ = ["load", "models", "ops", "UserError", "__version__"]
