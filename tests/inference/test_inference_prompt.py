"""The prompt around the video, the model inputs it becomes, and the M-RoPE time positions they give."""

from __future__ import annotations

import math

import pytest
import torch

from videonsa.errors import UserError
from videonsa.inference import build_prompt, model_inputs, plan_question
from videonsa.inference.prompt import MULTIPLE_CHOICE_INSTRUCTION, build_preset_prompt, label_options, question_text
from videonsa.testing import TOKEN_IDS
from videonsa.video import SamplingSettings, decode_video

TINY_FRAMES = SamplingSettings(pixels_per_frame=56 * 56, min_pixels_per_frame=56 * 56)


def test_options_are_lettered_in_order():
    assert label_options(["red", " green ", "blue"]) == (("A", "B", "C"), ("A. red", "B. green", "C. blue"))
    assert label_options(["A. red", "B) green", "(C) blue"]) == (("A", "B", "C"), ("A. red", "B. green", "C. blue"))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["only"], "at least 2"),
        (["A. red", "C. blue"], "expected A, B in order"),
        (["red", "  "], "choice B is empty"),
        ([f"choice {i}" for i in range(27)], "at most 26"),
        ("red", "options must be a list of answer texts, got 'red'"),  # not three options r, e, d
        (["red", 5], "options must be a list of answer texts"),
    ],
)
def test_bad_options_are_refused(options, message):
    with pytest.raises(UserError, match=message):
        label_options(options)


def test_question_text_lists_options_then_the_instruction():
    assert question_text("  Why?  ") == "Why?"
    text = question_text("Which colour?", ["A. red", "B. green"])
    assert text.splitlines() == ["Which colour?", "Options:", "A. red", "B. green", MULTIPLE_CHOICE_INSTRUCTION]
    with pytest.raises(UserError, match="question is empty"):
        question_text("   ")


@pytest.mark.parametrize("preset", ["planner", "paper"])
@pytest.mark.parametrize("question", [None, 5, ["What moves?"]])
def test_a_question_that_is_not_text_is_named(loaded, preset, question):
    with pytest.raises(UserError, match="the question must be a string, got"):
        build_preset_prompt(loaded.files, question, preset=preset)


def test_prompt_leaves_one_gap_for_the_video(loaded):
    prompt = build_prompt(loaded.files, "What moves?", ["a square", "a disc"])
    assert prompt.text.count("<|video_pad|>") == 1
    assert prompt.ids_before_video[-1] == TOKEN_IDS["<|vision_start|>"]
    assert prompt.ids_after_video[0] == TOKEN_IDS["<|vision_end|>"]
    assert prompt.video_token_id == TOKEN_IDS["<|video_pad|>"]
    assert prompt.letters == ("A", "B")
    assert prompt.letter_token_ids == tuple(loaded.files.tokenizer.encode(x, add_special_tokens=False)[0] for x in "AB")
    whole = loaded.files.tokenizer.encode(prompt.text, add_special_tokens=False)
    assert prompt.text_tokens == len(whole) - 1  # everything but the one placeholder


def test_video_tokens_in_the_inputs_match_the_plan(loaded, inputs):
    planned = plan_question(loaded.files, inputs.video, "What moves?", sampling=TINY_FRAMES)
    plan = planned.plan
    assert (plan.frame_count, plan.frame_height, plan.frame_width, plan.tokens_per_patch) == (8, 56, 56, 4)
    video = decode_video(plan)
    batch = model_inputs(planned.prompt, video, loaded.files)
    ids = batch["input_ids"][0]
    assert int((ids == TOKEN_IDS["<|video_pad|>"]).sum()) == plan.video_tokens == 16
    assert ids.numel() == planned.prompt.text_tokens + plan.video_tokens
    assert plan.total_tokens == ids.numel() + planned.generation.max_new_tokens
    assert batch["mm_token_type_ids"][0].tolist() == [2 if i == TOKEN_IDS["<|video_pad|>"] else 0 for i in ids.tolist()]
    assert batch["video_grid_thw"].tolist() == [[4, 4, 4]]
    assert batch["pixel_values_videos"].shape == (4 * 4 * 4, 3 * 2 * 14 * 14)
    assert batch["second_per_grid_ts"].tolist() == pytest.approx([video.seconds_per_patch])


def video_time_positions(loaded, batch) -> list[int]:
    """Temporal M-RoPE position of each temporal patch, relative to the first, as the model computes them."""
    positions, _ = loaded.model.model.get_rope_index(
        input_ids=batch["input_ids"],
        mm_token_type_ids=batch["mm_token_type_ids"],
        video_grid_thw=batch["video_grid_thw"],
        second_per_grid_ts=batch["second_per_grid_ts"],
    )
    temporal = positions[0, 0][batch["mm_token_type_ids"][0] == 2]
    per_patch = temporal.view(int(batch["video_grid_thw"][0, 0]), -1)
    assert (per_patch == per_patch[:, :1]).all()  # one time position per temporal patch
    return (per_patch[:, 0] - per_patch[0, 0]).tolist()


@pytest.mark.parametrize(
    ("fps", "max_frames", "expected"), [(2, None, [0, 2, 4, 6]), (2, 4, [0, 4]), (1, None, [0, 4])]
)
def test_time_positions_follow_the_real_timestamps(loaded, inputs, fps, max_frames, expected):
    """slow.mp4 shows a frame every 0.5 s; tokens_per_second is 2, so one second is two time positions."""
    settings = SamplingSettings(fps=fps, max_frames=max_frames, pixels_per_frame=3136, min_pixels_per_frame=3136)
    planned = plan_question(loaded.files, inputs.slow_video, "When?", sampling=settings)
    video = decode_video(planned.plan)
    batch = model_inputs(planned.prompt, video, loaded.files)
    positions = video_time_positions(loaded, batch)
    assert positions == expected
    per_second = loaded.files.tokens_per_second
    real = [(video.timestamps[2 * k] - video.timestamps[0]) * per_second for k in range(len(positions))]
    assert positions == [math.floor(r + 1e-6) for r in real]


def test_time_positions_of_an_uneven_sampling_stay_within_one_of_the_real_times(loaded, inputs):
    """clip.mp4 (25 fps) sampled 8 times over 2.4 s: frames land on 1/25 s ticks, not on the 0.3 s grid."""
    planned = plan_question(loaded.files, inputs.video, "When?", sampling=TINY_FRAMES)
    video = decode_video(planned.plan)
    assert video.timestamps != pytest.approx(planned.plan.timestamps)  # real times differ from the planned ones
    positions = video_time_positions(loaded, model_inputs(planned.prompt, video, loaded.files))
    per_second = loaded.files.tokens_per_second
    for k, position in enumerate(positions):
        assert abs(position - (video.timestamps[2 * k] - video.timestamps[0]) * per_second) < 1
    assert torch.tensor(positions).diff().ge(0).all()
