"""Turn a conversation into token ids and labels with the tokenizer's chat template (Qwen2.5-VL's).

The clip becomes chat-template media parts: one ``image`` part per frame when frames are fed as images (the
paper's recipe), or one ``video`` part. The template renders each part as
``<|vision_start|><|image_pad|><|vision_end|>`` (or ``<|video_pad|>``); that single pad token is then repeated
as many times as the frame (or video) has vision tokens, so the 35K-token text is never built as a string.

Labels are the token ids on assistant turns only (the reply and the end-of-turn token); everything else,
system prompt, user turns, vision tokens and the ``<|im_start|>assistant`` header, is -100. The assistant spans
are found by rendering growing prefixes of the conversation, so no template text is hard-coded here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from videonsa.errors import UserError
from videonsa.training.annotations import IMAGE_TAG, VIDEO_TAG, Turn

IGNORE_INDEX = -100
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
TEXT_TYPE, IMAGE_TYPE, VIDEO_TYPE = 0, 1, 2  # values of mm_token_type_ids, as Qwen2.5-VL numbers them
FramesAs = Literal["images", "video"]
_TAG_SPLIT = re.compile(f"({re.escape(VIDEO_TAG)}|{re.escape(IMAGE_TAG)})")


@dataclass(frozen=True)
class EncodedConversation:
    """Token-level view of one conversation.

    input_ids, labels, mm_token_type_ids: equal-length lists; labels is -100 outside assistant replies;
    mm_token_type_ids is 0 for text, 1 for image tokens, 2 for video tokens.
    """

    input_ids: list[int]
    labels: list[int]
    mm_token_type_ids: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


class ConversationEncoder:
    """Renders conversations with a tokenizer's chat template and computes assistant-only labels.

    `frames_as` chooses how the clip is fed: ``images`` (one image per frame) or ``video`` (one video).
    """

    def __init__(self, tokenizer: Any, frames_as: FramesAs = "images") -> None:
        if frames_as not in ("images", "video"):
            raise UserError(f"frames_as must be 'images' or 'video', got {frames_as!r}")
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("the tokenizer has no chat template (expected Qwen2.5-VL's)")
        self.tokenizer = tokenizer
        self.frames_as = frames_as
        self.image_pad_id = _token_id(tokenizer, IMAGE_PAD)
        self.video_pad_id = _token_id(tokenizer, VIDEO_PAD)

    def messages(self, turns: Sequence[Turn], kept_frames: Sequence[bool], per_frame_tags: bool) -> list[dict]:
        """Chat-template messages: text parts, and a media part for every kept frame (or one for the video).

        kept_frames: one flag per frame of the clip; dropped frames get no part (per-frame tags vanish too).
        """
        frame_cursor = 0
        messages = []
        for turn in turns:
            parts: list[dict[str, Any]] = []
            for piece in _TAG_SPLIT.split(turn.text):
                if piece == VIDEO_TAG:
                    parts.extend(self._clip_parts(sum(kept_frames)))
                elif piece == IMAGE_TAG:  # only present with per-frame tags
                    kept = kept_frames[frame_cursor]
                    if self.frames_as == "images" and kept:
                        parts.append({"type": "image"})
                    elif self.frames_as == "video" and frame_cursor == 0:
                        parts.append({"type": "video"})
                    frame_cursor += 1
                elif piece:
                    parts.append({"type": "text", "text": piece})
            messages.append({"role": turn.role, "content": parts})
        return messages

    def _clip_parts(self, kept: int) -> list[dict[str, str]]:
        if self.frames_as == "video":
            return [{"type": "video"}]
        return [{"type": "image"}] * kept

    def render(self, messages: list[dict], **options: Any) -> str:
        """The chat template's text for `messages` (one pad token per media part)."""
        return self.tokenizer.apply_chat_template(messages, tokenize=False, **options)

    def assistant_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The full rendered text and the character spans [start, end) of every assistant reply in it.

        A reply's span is what the template adds for that turn after the generation prompt, without trailing
        whitespace: the reply text and its end-of-turn token.
        """
        full = self.render(messages)
        spans = []
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self.render(messages[:index], add_generation_prompt=True)
            with_reply = self.render(messages[: index + 1])
            if not (with_reply.startswith(prompt) and full.startswith(with_reply)):
                raise UserError("the chat template does not render conversations prefix by prefix; "
                                "cannot locate assistant turns for the labels")
            spans.append((len(prompt), len(prompt) + len(with_reply[len(prompt):].rstrip())))
        return full, spans

    def encode(self, messages: list[dict], vision_tokens: Sequence[int]) -> EncodedConversation:
        """Token ids, labels and token types; the i-th media part expands to `vision_tokens[i]` pad tokens."""
        text, spans = self.assistant_spans(messages)
        encoding = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        input_ids: list[int] = []
        labels: list[int] = []
        token_types: list[int] = []
        media_index = 0
        span_index = 0
        for token_id, (start, _end) in zip(encoding["input_ids"], encoding["offset_mapping"], strict=True):
            if token_id in (self.image_pad_id, self.video_pad_id):
                if media_index >= len(vision_tokens):
                    raise ValueError(f"more media parts in the text than the {len(vision_tokens)} given")
                count = vision_tokens[media_index]
                media_index += 1
                input_ids.extend([token_id] * count)
                labels.extend([IGNORE_INDEX] * count)
                token_types.extend([IMAGE_TYPE if token_id == self.image_pad_id else VIDEO_TYPE] * count)
                continue
            while span_index < len(spans) and start >= spans[span_index][1]:
                span_index += 1
            in_reply = span_index < len(spans) and spans[span_index][0] <= start < spans[span_index][1]
            input_ids.append(token_id)
            labels.append(token_id if in_reply else IGNORE_INDEX)
            token_types.append(TEXT_TYPE)
        if media_index != len(vision_tokens):
            raise ValueError(f"{media_index} media parts in the text, {len(vision_tokens)} given")
        return EncodedConversation(input_ids, labels, token_types)

    def text_length(self, messages: list[dict]) -> int:
        """Tokens of the rendered conversation with one token per media part."""
        return len(self.tokenizer(self.render(messages), add_special_tokens=False)["input_ids"])


def _token_id(tokenizer: Any, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        raise UserError(f"the tokenizer lacks the Qwen2.5-VL token {token}")
    return int(token_id)
