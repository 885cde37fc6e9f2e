"""VideoNSA: Qwen2.5-VL with learned Native Sparse Attention over video tokens.

    >>> import videonsa
    >>> o = videonsa.ops.nsa_attention(q, k, v, g_cmp, g_slc, g_swa)
    >>> model = videonsa.models.VideoNSAForConditionalGeneration.from_pretrained("path/to/VideoNSA")
    >>> answer = videonsa.load("path/to/VideoNSA").ask("talk.mp4", "What is written on the board?")

Importing the package registers the VideoNSA model with the transformers Auto classes.
"""

from videonsa import models, ops
from videonsa.errors import UserError
from videonsa.inference import load

__version__ = "0.1.0"

__all__ = ["load", "models", "ops", "UserError", "__version__"]
