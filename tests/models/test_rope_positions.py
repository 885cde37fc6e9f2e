"""Qwen2.5-VL's M-RoPE position ids as the package computes them (models/rope_positions.py), against a naive
per-token construction written from the rule in docs/layer.md, and against transformers where they agree."""

from __future__ import annotations

import math
import random

import pytest
import torch
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen

from videonsa import testing
from videonsa.models.rope_positions import IMAGE, TEXT, VIDEO, multimodal_position_ids

MERGE = 2


def naive_positions(layout, per_second):
    """Position ids [3, n] of one unpadded sample, one token at a time.

    layout: a list of ("text", n) / ("image", (t, h, w)) / ("video", (t, h, w), seconds) items in prompt order."""
    ids = []
    for item in layout:
        next_id = max((max(p) for p in ids), default=-1) + 1
        if item[0] == "text":
            ids += [(next_id + i,) * 3 for i in range(item[1])]
            continue
        frames, height, width = item[1]
        spacing = item[2] if item[0] == "video" else 0.0
        step = float(torch.tensor(spacing, dtype=torch.float32) * per_second)  # float32 as the model
        for k in range(frames):
            time = math.floor(k * step) if item[0] == "video" else 0
            for r in range(height // MERGE):
                for c in range(width // MERGE):
                    ids.append((next_id + time, next_id + r, next_id + c))
    return torch.tensor(ids).T


def batch_of(layouts):
    """mm_token_type_ids, attention_mask (left padding), image and video grids, seconds of a layout batch."""
    types, images, videos, seconds = [], [], [], []
    for layout in layouts:
        row = []
        for item in layout:
            if item[0] == "text":
                row += [TEXT] * item[1]
                continue
            t, h, w = item[1]
            row += [IMAGE if item[0] == "image" else VIDEO] * (t * h * w // MERGE**2)
            (images if item[0] == "image" else videos).append(item[1])
            if item[0] == "video":
                seconds.append(item[2])
        types.append(row)
    length = max(map(len, types))
    mm = torch.zeros(len(types), length, dtype=torch.long)
    mask = torch.zeros(len(types), length, dtype=torch.long)
    for i, row in enumerate(types):
        mm[i, length - len(row):] = torch.tensor(row)
        mask[i, length - len(row):] = 1
    grid = lambda g: torch.tensor(g, dtype=torch.long) if g else None  # noqa: E731
    return mm, mask, grid(images), grid(videos), torch.tensor(seconds, dtype=torch.float32) if seconds else None


def random_layout(rng):
    layout = [("text", rng.randint(1, 6))]
    for _ in range(rng.randint(1, 3)):
        grid = (rng.choice([1, 2, 3, 6]), 2 * rng.randint(1, 3), 2 * rng.randint(1, 3))
        if rng.random() < 0.3:
            layout.append(("image", (1, grid[1], grid[2])))
        else:
            layout.append(("video", grid, rng.choice([0.25, 0.5, 0.7, 1.0, 1.5, 2.0])))
        if rng.random() < 0.8:  # sometimes two vision blocks back to back
            layout.append(("text", rng.randint(1, 5)))
    return layout


@pytest.mark.parametrize("seed", range(12))
def test_positions_match_the_rule_token_by_token(seed):
    rng = random.Random(seed)
    layouts = [random_layout(rng) for _ in range(rng.randint(1, 3))]
    mm, mask, images, videos, seconds = batch_of(layouts)
    ids, deltas = multimodal_position_ids(mm, images, videos, seconds, mask, tokens_per_second=2,
                                          spatial_merge_size=MERGE)
    for sample, layout in enumerate(layouts):
        real = mask[sample].bool()
        expected = naive_positions(layout, per_second=2)
        torch.testing.assert_close(ids[:, sample, real], expected, rtol=0, atol=0)
        assert (ids[:, sample, ~real] == 1).all()
        assert deltas[sample, 0] == expected.max() + 1 - real.sum()


def test_text_after_a_video_continues_past_its_last_time_position():
    # 6 temporal patches of 2 x 2 merged tokens at 2 s each (4 time ids per patch): the video spans ids 4 .. 24
    # (time) and 4 .. 5 (rows, columns); the text after it starts at 25, not inside the video's time range.
    mm, mask, _, videos, seconds = batch_of([[("text", 4), ("video", (6, 4, 4), 2.0), ("text", 3)]])
    ids, deltas = multimodal_position_ids(mm, None, videos, seconds, mask, tokens_per_second=2,
                                          spatial_merge_size=MERGE)
    video = ids[0, 0, 4:28]
    assert video.min() == 4 and video.max() == 24
    assert ids[:, 0, 28:].tolist() == [[25, 26, 27]] * 3
    assert deltas.item() == 28 - 31


def test_mismatched_grids_are_refused():
    mm, mask, _, videos, seconds = batch_of([[("text", 2), ("video", (2, 4, 4), 1.0)]])
    with pytest.raises(ValueError, match="more video tokens than grids"):
        multimodal_position_ids(mm, None, None, None, mask, tokens_per_second=2, spatial_merge_size=MERGE)
    with pytest.raises(ValueError, match="does not match"):
        multimodal_position_ids(mm, None, torch.tensor([[2, 4, 8]]), seconds, mask, tokens_per_second=2,
                                spatial_merge_size=MERGE)


@pytest.fixture(scope="module")
def model():
    return testing.tiny_model()


def test_the_model_uses_these_positions_and_agrees_with_transformers_before_the_first_video(model):
    batch = testing.tiny_video_batch(grids=((4, 4, 4), (6, 2, 4)), text_before=(5, 9), text_after=(4, 2))
    kwargs = dict(mm_token_type_ids=batch.mm_token_type_ids, video_grid_thw=batch.video_grid_thw,
                  second_per_grid_ts=torch.tensor([0.5, 1.5]), attention_mask=batch.attention_mask)
    ours, our_deltas = model.model.get_rope_index(batch.input_ids, **kwargs)
    direct = multimodal_position_ids(
        batch.mm_token_type_ids, None, batch.video_grid_thw, kwargs["second_per_grid_ts"], batch.attention_mask,
        tokens_per_second=model.config.vision_config.tokens_per_second, spatial_merge_size=MERGE)
    torch.testing.assert_close(ours, direct[0], rtol=0, atol=0)
    torch.testing.assert_close(our_deltas, direct[1], rtol=0, atol=0)
    stock, _ = qwen.Qwen2_5_VLModel.get_rope_index(model.model, batch.input_ids, **kwargs)
    video = batch.mm_token_type_ids == VIDEO
    through_video = (video.long().cumsum(-1) == 0) & batch.attention_mask.bool()  # text before the first video
    assert torch.equal(ours[:, through_video], stock[:, through_video])
    assert torch.equal(ours[1:, video], stock[1:, video])  # rows and columns; transformers >= 5.25 times too
