"""Question answering over videos: `videonsa.load(model).ask(video, question)`, streaming and reports."""

from videonsa.inference.api import PlannedQuestion, VideoQA, load, plan_question
from videonsa.inference.generation import Answer, AskReport, GenerationSettings
from videonsa.inference.model_files import ModelFiles, load_weights, open_model_files
from videonsa.inference.prefill_progress import PrefillProgress
from videonsa.inference.prompt import QuestionPrompt, build_prompt, model_inputs

__all__ = [
    "Answer",
    "AskReport",
    "GenerationSettings",
    "ModelFiles",
    "PlannedQuestion",
    "PrefillProgress",
    "QuestionPrompt",
    "VideoQA",
    "build_prompt",
    "load",
    "load_weights",
    "model_inputs",
    "open_model_files",
    "plan_question",
]
