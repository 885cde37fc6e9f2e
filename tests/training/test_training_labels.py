"""Chat-template encoding: labels cover assistant replies only; vision tokens expand and are typed."""

from __future__ import annotations

import pytest

from videonsa import testing
from videonsa.errors import UserError
from videonsa.training.annotations import Turn
from videonsa.training.conversation import IGNORE_INDEX, ConversationEncoder

TURNS = (
    Turn("system", "Answer in one word."),
    Turn("user", "<video>\nWhat colour is the square?"),
    Turn("assistant", "Red."),
    Turn("user", "And the disc?"),
    Turn("assistant", "Green, mostly."),
)


def labelled_text(tokenizer, encoded) -> str:
    return tokenizer.decode([label for label in encoded.labels if label != IGNORE_INDEX])


def test_labels_mask_everything_but_the_assistant_replies(tokenizer):
    encoder = ConversationEncoder(tokenizer, "images")
    messages = encoder.messages(TURNS, [True, True, True], per_frame_tags=False)
    encoded = encoder.encode(messages, [6, 6, 6])
    assert labelled_text(tokenizer, encoded) == "Red.<|im_end|>Green, mostly.<|im_end|>"
    # Every labelled token is the input token at that position (the model shifts them itself).
    for token, label in zip(encoded.input_ids, encoded.labels, strict=True):
        assert label in (IGNORE_INDEX, token)
    # The labelled positions form exactly two contiguous runs, one per reply.
    labelled = [label != IGNORE_INDEX for label in encoded.labels]
    starts = sum(1 for i, flag in enumerate(labelled) if flag and (i == 0 or not labelled[i - 1]))
    assert starts == 2
    # Nothing of the system prompt, the questions or the assistant header is learned.
    full = tokenizer.decode(encoded.input_ids)
    assert full.startswith("<|im_start|>system\nAnswer in one word.<|im_end|>")
    assert "<|im_start|>assistant\nRed.<|im_end|>" in full


def test_each_frame_becomes_an_image_with_its_token_count(tokenizer):
    encoder = ConversationEncoder(tokenizer, "images")
    messages = encoder.messages(TURNS, [True, False, True, True], per_frame_tags=False)
    encoded = encoder.encode(messages, [4, 5, 6])
    image_id = testing.TOKEN_IDS["<|image_pad|>"]
    assert encoded.input_ids.count(image_id) == 15
    assert encoded.mm_token_type_ids.count(1) == 15 and 2 not in encoded.mm_token_type_ids
    for token, kind, label in zip(encoded.input_ids, encoded.mm_token_type_ids, encoded.labels, strict=True):
        assert (kind == 1) == (token == image_id)
        if kind:
            assert label == IGNORE_INDEX
    assert encoded.input_ids.count(testing.TOKEN_IDS["<|vision_start|>"]) == 3


def test_video_mode_uses_one_video_part(tokenizer):
    encoder = ConversationEncoder(tokenizer, "video")
    messages = encoder.messages(TURNS, [True] * 8, per_frame_tags=False)
    encoded = encoder.encode(messages, [16])
    assert encoded.input_ids.count(testing.TOKEN_IDS["<|video_pad|>"]) == 16
    assert encoded.mm_token_type_ids.count(2) == 16
    assert labelled_text(tokenizer, encoded) == "Red.<|im_end|>Green, mostly.<|im_end|>"


def test_per_frame_tags_drop_with_their_frames(tokenizer):
    encoder = ConversationEncoder(tokenizer, "images")
    turns = (Turn("user", "A <image> B <image> C <image> ?"), Turn("assistant", "ok"))
    messages = encoder.messages(turns, [True, False, True], per_frame_tags=True)
    parts = messages[0]["content"]
    assert [part["type"] for part in parts] == ["text", "image", "text", "text", "image", "text"]


def test_media_count_must_match(tokenizer):
    encoder = ConversationEncoder(tokenizer, "images")
    messages = encoder.messages(TURNS, [True, True], per_frame_tags=False)
    with pytest.raises(ValueError, match="media parts"):
        encoder.encode(messages, [4])


def test_tokenizer_without_chat_template_is_a_user_error():
    tokenizer = testing.tiny_tokenizer()
    tokenizer.chat_template = None
    with pytest.raises(UserError, match="chat template"):
        ConversationEncoder(tokenizer)
