"""The entry point lmms-eval reads (group `lmms_eval.models`) to find the `videonsa` model.

Kept apart from `lmms_model` so that lmms-eval's start-up, which loads every registered entry point, imports
nothing heavy: the model class (and torch, transformers, videonsa's model code) loads only when `--model
videonsa` is asked for. Importing this module never imports lmms-eval either; `model_manifests` does.
"""

from __future__ import annotations

MODEL_NAME = "videonsa"
MODEL_CLASS_PATH = "videonsa.evaluation.lmms_model.VideoNSALmms"


def model_manifests() -> list:
    """lmms-eval's `ModelManifest` for `--model videonsa` (a plain, non-chat model class)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_NAME, simple_class_path=MODEL_CLASS_PATH)]
