"""Video time positions keep fractional seconds per temporal patch on every transformers version."""

from __future__ import annotations

import pytest
import torch
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen

from videonsa import testing


@pytest.fixture(scope="module")
def model():
    return testing.tiny_model()


@pytest.mark.parametrize("seconds", [(0.5, 0.5), (0.3, 1.5), (2.0, 0.25), (0.7, 1.0)])
def test_time_positions_follow_fractional_seconds(model, seconds):
    batch = testing.tiny_video_batch(grids=((4, 4, 4), (6, 2, 4)), text_before=(5, 9), text_after=(4, 2))
    seconds_per_patch = torch.tensor(seconds, dtype=torch.float32)
    kwargs = dict(
        mm_token_type_ids=batch.mm_token_type_ids,
        video_grid_thw=batch.video_grid_thw,
        second_per_grid_ts=seconds_per_patch,
        attention_mask=batch.attention_mask,
    )
    ours, our_deltas = model.model.get_rope_index(batch.input_ids, **kwargs)
    stock, _ = qwen.Qwen2_5_VLModel.get_rope_index(model.model, batch.input_ids, **kwargs)
    per_second = model.config.vision_config.tokens_per_second
    is_video = batch.mm_token_type_ids == 2
    torch.testing.assert_close(ours[1:], stock[1:])  # height and width positions untouched
    torch.testing.assert_close(ours[0][~is_video], stock[0][~is_video])  # text positions untouched
    for sample, (grid, spacing) in enumerate(zip(batch.video_grid_thw.tolist(), seconds, strict=True)):
        frames, height, width = grid
        temporal = ours[0, sample][is_video[sample]].view(frames, -1)
        start = temporal[0, 0]
        interval = per_second * torch.tensor(spacing, dtype=torch.float32)  # float32, as the model computes it
        expected = [int(start) + int(k * interval) for k in range(frames)]
        assert temporal[:, 0].tolist() == expected
        assert (temporal == temporal[:, :1]).all()
        real = batch.attention_mask[sample].bool()
        assert our_deltas[sample, 0] == ours[:, sample, real].max() + 1 - real.sum()
