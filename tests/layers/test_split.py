"""The vision/text split of a batch: packing offsets, text grid, masks, gather/merge."""

import pytest
import torch

from videonsa.errors import UserError
from videonsa.layers import build_token_split

# Two samples of 8 tokens: sample 0 left-padded by 2 with vision at 3..5; sample 1 with vision at 1, 2 and 6.
VISION = torch.tensor([
    [0, 0, 0, 1, 1, 1, 0, 0],
    [0, 1, 1, 0, 0, 0, 1, 0],
], dtype=torch.bool)
PADDING = torch.tensor([
    [0, 0, 1, 1, 1, 1, 1, 1],
    [1, 1, 1, 1, 1, 1, 1, 1],
])


def test_vision_tokens_are_packed_sample_by_sample_in_order():
    split = build_token_split(VISION, PADDING)
    assert split.vision_batch.tolist() == [0, 0, 0, 1, 1, 1]
    assert split.vision_pos.tolist() == [3, 4, 5, 1, 2, 6]
    assert split.cu_seqlens.tolist() == [0, 3, 6]
    assert split.cu_seqlens.dtype == torch.int32
    assert split.has_vision


def test_text_grid_lists_each_samples_text_positions_and_marks_unused_slots():
    split = build_token_split(VISION, PADDING)
    assert split.text_pos.shape == (2, 5)
    assert split.text_pos[0].tolist() == [0, 1, 2, 6, 7]  # padding counts as text (its output is ignored)
    assert split.text_pos[1, :5].tolist() == [0, 3, 4, 5, 7]
    assert split.text_valid.tolist() == [[True] * 5, [True] * 5]


def test_samples_without_vision_get_no_stream_and_uneven_text_counts_are_masked():
    vision = torch.tensor([[0, 0, 0, 0], [0, 1, 1, 1]], dtype=torch.bool)
    split = build_token_split(vision)
    assert split.cu_seqlens.tolist() == [0, 3]
    assert split.text_valid.tolist() == [[True] * 4, [True, False, False, False]]
    assert split.text_pos[1, 0].item() == 0


def test_padding_is_never_vision_and_generation_masks_are_cut_to_this_chunk():
    vision = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    whole_sequence_mask = torch.tensor([[1, 1, 1, 1, 0, 1, 1]])  # 4 cached tokens, then this chunk of 3
    split = build_token_split(vision, whole_sequence_mask)
    assert split.vision_pos.tolist() == [1]
    assert split.token_mask.tolist() == [[False, True, True]]


def test_gather_then_merge_gives_back_every_token():
    split = build_token_split(VISION, PADDING)
    x = torch.randn(2, 8, 3, 5)
    merged = split.merge(split.gather_vision(x), split.gather_text(x))
    torch.testing.assert_close(merged, x, rtol=0, atol=0)


def test_text_attention_mask_is_causal_over_real_tokens_plus_the_diagonal():
    split = build_token_split(VISION, PADDING)
    mask = split.text_attention_mask
    assert mask.shape == (2, 1, 5, 8)
    for b in range(2):
        for slot, query in enumerate(split.text_pos[b].tolist()):
            expected = [(key <= query and bool(PADDING[b, key])) or key == query for key in range(8)]
            assert mask[b, 0, slot].tolist() == expected


def test_a_mask_that_is_not_a_padding_mask_is_refused():
    with pytest.raises(UserError, match="2-D padding attention_mask"):
        build_token_split(VISION, torch.ones(2, 1, 8, 8))
    with pytest.raises(UserError, match="2-D padding attention_mask"):
        build_token_split(VISION, torch.ones(2, 5))
