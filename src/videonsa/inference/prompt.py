"""The chat prompt around a video: question, multiple-choice options, and the model inputs it becomes.

The prompt is tokenized before the video is decoded, with the video left as a gap, so the planner knows how
many tokens the text takes; `model_inputs` then fills the gap with one placeholder per video token.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from videonsa.errors import UserError, first_line
from videonsa.inference.model_files import ModelFiles
from videonsa.video import DecodedVideo, frames_to_patches
from videonsa.video.paper import PAPER_SYSTEM_PROMPT

OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# The instruction long-video benchmarks (Video-MME, LongVideoBench, MLVU, ...) put after the options.
MULTIPLE_CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."
_LABELLED = re.compile(r"^\s*\(?([A-Z])[.):]\s*(.*)$", re.DOTALL)
# Qwen2.5-VL's token type for video placeholders in mm_token_type_ids (0 text, 1 image).
VIDEO_TOKEN_TYPE = 2


@dataclass(frozen=True)
class QuestionPrompt:
    """A tokenized chat prompt with a gap where the video goes.

    `letters` are the option letters ("A", "B", ...) and `letter_token_ids` their single-token ids, empty for
    an open question.
    """

    text: str
    ids_before_video: tuple[int, ...]
    ids_after_video: tuple[int, ...]
    video_token_id: int
    letters: tuple[str, ...] = ()
    letter_token_ids: tuple[int, ...] = ()

    @property
    def text_tokens(self) -> int:
        """Tokens of the prompt besides the video placeholders."""
        return len(self.ids_before_video) + len(self.ids_after_video)


def label_options(options: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(letters, lines) for `options`: "red" becomes "A. red"; options already labelled A., B., ... are kept.

    Raises `UserError` for fewer than 2, more than 26, empty, or wrongly lettered options, and for options that
    are not a sequence of strings (one string would otherwise be taken letter by letter as its own options).
    """
    if isinstance(options, str) or not all(isinstance(option, str) for option in options):
        raise UserError(f"options must be a list of answer texts, got {options!r}")
    if len(options) < 2:
        raise UserError(f"options: give at least 2 choices, got {len(options)}")
    if len(options) > len(OPTION_LETTERS):
        raise UserError(f"options: at most {len(OPTION_LETTERS)} choices, got {len(options)}")
    letters = tuple(OPTION_LETTERS[: len(options)])
    matches = [_LABELLED.match(option) for option in options]
    if all(matches):
        found = tuple(match.group(1) for match in matches)
        if found != letters:
            raise UserError(f"options: labelled {', '.join(found)}; expected {', '.join(letters)} in order")
        texts = [match.group(2).strip() for match in matches]
    else:
        texts = [option.strip() for option in options]
    for letter, text in zip(letters, texts, strict=True):
        if not text:
            raise UserError(f"options: choice {letter} is empty")
    return letters, tuple(f"{letter}. {text}" for letter, text in zip(letters, texts, strict=True))


def _check_is_text(question: object) -> None:
    if not isinstance(question, str):
        raise UserError(f"the question must be a string, got {type(question).__name__} {question!r}")


def question_text(question: str, option_lines: Sequence[str] = ()) -> str:
    """The user turn's text: the question, then the options and the answer-with-a-letter instruction."""
    _check_is_text(question)
    if not question.strip():
        raise UserError("the question is empty")
    if not option_lines:
        return question.strip()
    return "\n".join([question.strip(), "Options:", *option_lines, MULTIPLE_CHOICE_INSTRUCTION])


def _single_token_id(files: ModelFiles, text: str) -> int:
    ids = files.tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise UserError(f"model '{files.name}': its tokenizer splits option letter {text!r} into {len(ids)} tokens")
    return ids[0]


def _video_token(files: ModelFiles) -> tuple[str, int]:
    token = getattr(files.tokenizer, "video_token", None) or "<|video_pad|>"
    token_id = files.tokenizer.convert_tokens_to_ids(token)
    expected = files.config.get("video_token_id")
    if token_id is None or (expected is not None and token_id != expected):
        raise UserError(
            f"model '{files.name}': tokenizer's video token {token!r} has id {token_id}, config says {expected}"
        )
    return token, token_id


def _render_chat_template(files: ModelFiles, messages: list[dict]) -> str:
    """The prompt text of `messages` by the model's chat template. The template comes from the model folder
    (untrusted): a syntax error, or a template that raises, is a `UserError` naming the model."""
    from jinja2 import TemplateError

    try:
        return files.tokenizer.apply_chat_template(
            messages, chat_template=files.chat_template, tokenize=False, add_generation_prompt=True
        )
    except TemplateError as error:
        why = first_line(error)
        raise UserError(f"model '{files.name}': its chat template cannot render the question ({why})") from None


def build_prompt(
    files: ModelFiles,
    question: str,
    options: Sequence[str] | None = None,
    *,
    system_prompt: str | None = None,
) -> QuestionPrompt:
    """Render the model's chat template for one user turn holding the video and `question` (with `options`).

    The user turn is the video, then the text. `system_prompt`, when given, is sent as a system turn before it
    (the paper preset sends "You are a helpful assistant."); else the template's own default applies.
    """
    letters, lines = label_options(options) if options else ((), ())
    messages = [
        {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question_text(question, lines)}]}
    ]
    if system_prompt is not None:
        messages.insert(0, {"role": "system", "content": system_prompt})
    text = _render_chat_template(files, messages)
    token, token_id = _video_token(files)
    if text.count(token) != 1:
        raise UserError(f"model '{files.name}': its chat template does not place exactly one video ({token})")
    before, after = text.split(token)
    encode = files.tokenizer.encode
    return QuestionPrompt(
        text=text,
        ids_before_video=tuple(encode(before, add_special_tokens=False)),
        ids_after_video=tuple(encode(after, add_special_tokens=False)),
        video_token_id=token_id,
        letters=letters,
        letter_token_ids=tuple(_single_token_id(files, letter) for letter in letters),
    )


def build_preset_prompt(
    files: ModelFiles, question: str, options: Sequence[str] | None = None, *, preset: str = "planner"
) -> QuestionPrompt:
    """The prompt for `preset`: "paper" is the paper's evaluation layout, "planner" our default one.

    The paper layout: system turn "You are a helpful assistant.", then one user turn with the video first and
    the text after it, with any "<image>" marker removed from the text (as the evaluation did with benchmark
    prompts). Options keep our formatting in both.
    """
    _check_is_text(question)
    if preset == "paper":
        return build_prompt(files, question.replace("<image>", ""), options, system_prompt=PAPER_SYSTEM_PROMPT)
    return build_prompt(files, question, options)


def model_inputs(prompt: QuestionPrompt, video: DecodedVideo, files: ModelFiles) -> dict[str, torch.Tensor]:
    """Qwen2.5-VL inputs for one sample: the prompt with one placeholder per video token, and the video.

    input_ids, attention_mask, mm_token_type_ids: [1, L]; pixel_values_videos: [patches, 3 * 2 * 14 * 14];
    video_grid_thw: [1, 3]; second_per_grid_ts: [1], the seconds between temporal patches, which sets the
    M-RoPE time positions: the plan's fixed value where it has one (the paper preset's 1.0), else the real
    spacing fitted to the decoded frames' timestamps.
    """
    pixels, grid = frames_to_patches(video.frames, files.geometry, mean=files.image_mean, std=files.image_std)
    merge = files.geometry.merge_size
    video_tokens = int(grid.prod()) // (merge * merge)
    if video_tokens != video.plan.video_tokens:
        raise RuntimeError(f"planned {video.plan.video_tokens} video tokens, the frames give {video_tokens}")
    ids = [*prompt.ids_before_video, *([prompt.video_token_id] * video_tokens), *prompt.ids_after_video]
    input_ids = torch.tensor([ids], dtype=torch.long)
    return {
        "input_ids": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "mm_token_type_ids": (input_ids == prompt.video_token_id).long() * VIDEO_TOKEN_TYPE,
        "pixel_values_videos": pixels,
        "video_grid_thw": grid,
        "second_per_grid_ts": torch.tensor([_seconds_per_patch(video)], dtype=torch.float32),
    }


def _seconds_per_patch(video: DecodedVideo) -> float:
    fixed = video.plan.second_per_grid_ts
    return video.seconds_per_patch if fixed is None else fixed
