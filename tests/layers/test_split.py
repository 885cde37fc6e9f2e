"""The vision/text split of a batch: packing offsets, text grid, masks, gather/merge."""

import dataclasses

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


# Layouts for the span fast path: (vision [B, T], padding [B, T] or None). Each sample's vision tokens form at
# most one run; padding (which is text) sits left or right of it.
def _layout(seq_len, runs, padding=None):
    """runs: per sample (start, end) of its vision run; padding: per sample (left, right) padded tokens."""
    vision = torch.zeros(len(runs), seq_len, dtype=torch.bool)
    for b, (start, end) in enumerate(runs):
        vision[b, start:end] = True
    if padding is None:
        return vision, None
    mask = torch.ones(len(runs), seq_len, dtype=torch.long)
    for b, (left, right) in enumerate(padding):
        mask[b, :left] = 0
        mask[b, seq_len - right:] = 0
    return vision, mask


SPAN_LAYOUTS = {
    "one-sample-middle": (_layout(16, [(5, 11)]), ((5, 11),)),
    "one-sample-start": (_layout(16, [(0, 7)]), ((0, 7),)),
    "one-sample-end": (_layout(16, [(9, 16)]), ((9, 16),)),
    "one-sample-all-vision": (_layout(16, [(0, 16)]), ((0, 16),)),
    "one-sample-no-vision": (_layout(16, [(0, 0)]), ((0, 0),)),
    "two-samples-left-and-right-padding": (
        _layout(16, [(6, 12), (2, 13)], padding=[(3, 0), (0, 2)]), ((6, 12), (2, 13)),
    ),
    "sample-without-vision-beside-others": (
        _layout(12, [(0, 0), (4, 9), (0, 3)], padding=[(0, 0), (2, 0), (0, 4)]), ((0, 0), (4, 9), (0, 3)),
    ),
    # Padding inside the video's placeholder run is not vision: the run ends where the padding starts.
    "vision-tokens-under-padding": (_layout(10, [(2, 10)], padding=[(0, 3)]), ((2, 7),)),
}


def _general(split):
    """The same split forced onto the index-based path."""
    general = dataclasses.replace(split, spans=None)
    assert general.spans is None
    return general


def _through_split(split, x, weights):
    """A function of x [B, T, ...] through gather_vision, gather_text and merge, different on each part, so
    that a token routed to the wrong place changes the result."""
    vision = split.gather_vision(x)
    text = split.gather_text(x)
    return split.merge(torch.sin(vision) * 2.0, torch.cos(text) - 1.0) * weights


@pytest.mark.parametrize("name", list(SPAN_LAYOUTS))
def test_contiguous_spans_take_the_slice_path_and_equal_the_index_path(name):
    (vision, padding), spans = SPAN_LAYOUTS[name]
    split = build_token_split(vision, padding)
    assert split.spans == spans  # the fast path is taken, with the right runs
    general = _general(split)
    generator = torch.Generator().manual_seed(len(name))
    x = torch.randn(*vision.shape, 3, 4, generator=generator, dtype=torch.float64)

    for gather in ("gather_vision", "gather_text"):
        got, want = getattr(split, gather)(x), getattr(general, gather)(x)
        assert got.shape == want.shape and torch.equal(got, want), gather  # invalid text slots included
    vision_out = torch.randn_like(general.gather_vision(x))
    text_out = torch.randn_like(general.gather_text(x))
    assert torch.equal(split.merge(vision_out, text_out), general.merge(vision_out, text_out))

    weights = torch.randn(x.shape, generator=generator, dtype=x.dtype)
    leaf, general_leaf = x.clone().requires_grad_(), x.clone().requires_grad_()
    got = _through_split(split, leaf, weights)
    want = _through_split(general, general_leaf, weights)
    assert torch.equal(got, want)
    got.sum().backward()
    want.sum().backward()
    assert torch.equal(leaf.grad, general_leaf.grad)
    assert leaf.grad.abs().sum() > 0


def test_one_sample_vision_run_is_gathered_as_a_view_without_copying():
    split = build_token_split(*_layout(16, [(5, 11)]))
    x = torch.randn(1, 16, 3)
    gathered = split.gather_vision(x)
    assert gathered.data_ptr() == x[:, 5].data_ptr() and gathered.shape == (1, 6, 3)
    assert split.gather_text(x).shape == (1, 10, 3)


def test_merge_casts_vision_outputs_to_the_text_dtype_on_both_paths():
    (vision, padding), _ = SPAN_LAYOUTS["two-samples-left-and-right-padding"]
    split = build_token_split(vision, padding)
    x = torch.randn(*vision.shape, 5)
    vision_out = split.gather_vision(x).to(torch.bfloat16)
    for path in (split, _general(split)):
        merged = path.merge(vision_out, split.gather_text(x))
        assert merged.dtype == torch.float32
        torch.testing.assert_close(merged[vision], x[vision].to(torch.bfloat16).float(), rtol=0, atol=0)


def test_several_vision_runs_in_a_sample_take_the_index_path():
    split = build_token_split(VISION, PADDING)  # sample 1 has runs 1..2 and 6
    assert split.spans is None
    x = torch.randn(2, 8, 3)
    torch.testing.assert_close(split.merge(split.gather_vision(x), split.gather_text(x)), x, rtol=0, atol=0)


def test_grouped_text_mask_repeats_each_slots_row_for_every_folded_head():
    split = build_token_split(VISION, PADDING)
    mask = split.text_attention_mask
    grouped = split.grouped_text_attention_mask(3)
    assert grouped.shape == (2, 1, 3 * 5, 8)
    for g in range(3):
        assert torch.equal(grouped[:, :, g * 5:(g + 1) * 5], mask)
    assert split.grouped_text_attention_mask(3) is grouped  # built once per split, shared by all layers
    assert split.grouped_text_attention_mask(1) is mask
