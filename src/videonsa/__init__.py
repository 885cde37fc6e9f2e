"""VideoNSA: Qwen2.5-VL with learned Native Sparse Attention over video tokens.

    >>> import videonsa
    >>> o = videonsa.ops.nsa_attention(q, k, v, g_cmp, g_slc, g_swa)
    >>> model = videonsa.models.VideoNSAForConditionalGeneration.from_pretrained("path/to/VideoNSA")
    >>> answer = videonsa.load("path/to/VideoNSA").ask("talk.mp4", "What is written on the board?")

Importing the package registers the VideoNSA model with the transformers Auto classes.
"""

from typing import Any

from videonsa import models, ops
from videonsa.errors import UserError

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # `load` pulls in video decoding (PyAV); import it on first use so that model-only users (and machines
    # without PyAV, such as a training node fed pre-extracted frames) import the package without it.
    if name == "load":
        from videonsa.inference import load

        return load
    raise AttributeError(f"module 'videonsa' has no attribute {name!r}")

__all__ = ["load", "models", "ops", "UserError", "__version__"]
