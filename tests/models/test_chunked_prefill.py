"""Chunked prefill: logits and KV cache equal to one pass, generation after it, the vision tower in pieces."""

import pytest
import torch
from transformers import DynamicCache

from videonsa import testing
from videonsa.errors import UserError
from videonsa.models.chunked_prefill import CACHE_KWARG, prefill_in_chunks


def _two_videos_per_sample(seed: int = 5) -> testing.TinyBatch:
    """One sample whose prompt holds two videos with text between them (one vision stream of 24 + 16 tokens)."""
    first = testing.tiny_video_batch(((2, 4, 12),), text_before=3, text_after=5, seed=seed)
    second = testing.tiny_video_batch(((4, 4, 4),), text_before=2, text_after=4, seed=seed + 1)
    return testing.TinyBatch(
        input_ids=torch.cat([first.input_ids, second.input_ids], dim=1),
        attention_mask=torch.cat([first.attention_mask, second.attention_mask], dim=1),
        mm_token_type_ids=torch.cat([first.mm_token_type_ids, second.mm_token_type_ids], dim=1),
        pixel_values_videos=torch.cat([first.pixel_values_videos, second.pixel_values_videos]),
        video_grid_thw=torch.cat([first.video_grid_thw, second.video_grid_thw]),
    )


def _forward(model, batch, chunk_size=None, steps=None):
    cache = DynamicCache(config=model.config.text_config)
    on_step = None if steps is None else (lambda *step: steps.append(step))
    with torch.no_grad(), prefill_in_chunks(model, chunk_size, on_step):
        logits = model(**batch.as_kwargs(), **{CACHE_KWARG: cache}, use_cache=True).logits
    return logits, cache


def _assert_same_cache(chunked, one_pass):
    assert chunked.get_seq_length() == one_pass.get_seq_length()
    for ours, theirs in zip(chunked.layers, one_pass.layers, strict=True):
        torch.testing.assert_close(ours.keys, theirs.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours.values, theirs.values, rtol=1e-5, atol=1e-5)


# One sample: 5 text tokens, <|vision_start|> at 5, 32 vision tokens at 6..37 (NSA blocks of 4), 5 after.
# Chunk 6 ends exactly where the video starts, 14 after 8 vision tokens (a block boundary), 9 and 7 inside blocks
# and in the text, 1 feeds one token at a time.
@pytest.mark.parametrize("mode", ["nsa", "dense"])
@pytest.mark.parametrize("chunk_size", [1, 6, 7, 9, 14])
def test_chunked_logits_and_cache_equal_one_pass(mode, chunk_size):
    batch = testing.tiny_video_batch(((2, 8, 8),), text_before=5, text_after=4, seed=2)
    model = testing.tiny_model(seed=31)
    model.set_attention_mode(mode)
    one_pass, one_cache = _forward(model, batch)
    steps = []
    chunked, cache = _forward(model, batch, chunk_size, steps)
    assert len([step for step in steps if step[0] == "text"]) == -(-batch.input_ids.shape[1] // chunk_size)
    torch.testing.assert_close(chunked, one_pass, rtol=1e-5, atol=1e-5)
    _assert_same_cache(cache, one_cache)


@pytest.mark.parametrize("mode", ["nsa", "dense"])
def test_two_unpadded_samples_chunked_equal_one_pass(mode):
    # Unpadded batches of several samples take the maskless path too (the causal mask broadcast over the batch).
    batch = testing.tiny_video_batch(((2, 8, 8), (2, 8, 8)), text_before=5, text_after=4, seed=7)
    assert bool(batch.attention_mask.all())
    model = testing.tiny_model(seed=3)
    model.set_attention_mode(mode)
    one_pass, one_cache = _forward(model, batch)
    chunked, cache = _forward(model, batch, chunk_size=10)
    torch.testing.assert_close(chunked, one_pass, rtol=1e-5, atol=1e-5)
    _assert_same_cache(cache, one_cache)


def _masks_seen(mode, run):
    """The attention_mask argument of layer 0's attention in every forward of `run(model, batch)`: a tiny model
    in `mode` on one unpadded sample of 43 tokens (5 text, a video of 32 tokens between its markers, 4 text)."""
    batch = testing.tiny_video_batch(((2, 8, 8),), text_before=5, text_after=4, seed=2)
    model = testing.tiny_model(seed=31)
    model.set_attention_mode(mode)
    masks = []

    def record(module, args, kwargs):
        masks.append(kwargs.get("attention_mask"))

    hook = model.model.language_model.layers[0].self_attn.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            run(model, batch)
    finally:
        hook.remove()
    return masks


@pytest.mark.parametrize("mode", ["nsa", "dense"])
def test_unpadded_chunks_after_the_cache_build_no_mask_tensor(mode):
    # A [chunk, cached + chunk] mask per chunk would cost chunk x prompt bytes (8 GiB for 16K chunks of a
    # 512K prompt): the layers of unpadded chunks get none and align the causal mask themselves.
    masks = _masks_seen(mode, lambda model, batch: _forward(model, batch, chunk_size=9))
    assert len(masks) == -(-43 // 9)  # 43 prompt tokens
    assert all(mask is None for mask in masks[1:])


@pytest.mark.parametrize("mode", ["nsa", "dense", "official"])
def test_decoding_steps_of_an_unpadded_prompt_get_no_mask_tensor(mode):
    # With a mask, transformers' SDPA path copies k and v to every query head, over the whole cache, per step.
    def generate(model, batch):
        model.generate(**batch.as_kwargs(), max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)

    masks = _masks_seen(mode, generate)
    assert len(masks) == 4 and all(mask is None for mask in masks[1:])


@pytest.mark.parametrize("chunk_size", [4, 10, 13])
def test_chunk_boundaries_between_and_inside_two_videos_of_one_stream(chunk_size):
    # Two videos of one sample form one vision stream: the second video's queries read the first's blocks
    # through the cache. Chunk 13 ends at the second video's <|vision_start|>; 10 and 4 cut both videos.
    batch = _two_videos_per_sample()
    model = testing.tiny_model(seed=32)
    one_pass, one_cache = _forward(model, batch)
    chunked, cache = _forward(model, batch, chunk_size)
    torch.testing.assert_close(chunked, one_pass, rtol=1e-5, atol=1e-5)
    _assert_same_cache(cache, one_cache)


@pytest.mark.parametrize("mode", ["nsa", "dense"])
def test_padded_batch_of_different_videos_chunked_equals_one_pass(batch, mode):
    # The fixture: 32 and 8 vision tokens, the second sample left-padded, so a chunk holds one sample's vision
    # tokens and not the other's.
    model = testing.tiny_model(seed=33)
    model.set_attention_mode(mode)
    one_pass, one_cache = _forward(model, batch)
    for chunk_size in (5, 16):
        chunked, cache = _forward(model, batch, chunk_size)
        real = batch.attention_mask.bool()
        torch.testing.assert_close(chunked[real], one_pass[real], rtol=1e-5, atol=1e-5)
        _assert_same_cache(cache, one_cache)


def test_only_the_last_positions_are_computed_when_generation_asks_for_them():
    batch = testing.tiny_video_batch(((2, 8, 8),), text_before=5, text_after=4, seed=2)
    model = testing.tiny_model(seed=34)
    one_pass, _ = _forward(model, batch)
    for keep in (1, 12):  # within the last chunk of 10 tokens, and beyond it
        with torch.no_grad(), prefill_in_chunks(model, 10):
            logits = model(**batch.as_kwargs(), use_cache=True, logits_to_keep=keep).logits
        assert logits.shape[1] == keep
        torch.testing.assert_close(logits, one_pass[:, -keep:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["nsa", "dense"])
def test_generation_after_a_chunked_prefill_gives_the_tokens_of_one_pass(batch, mode):
    model = testing.tiny_model(seed=35)
    model.set_attention_mode(mode)
    runs = []
    for chunk_size in (None, 7):
        with torch.no_grad(), prefill_in_chunks(model, chunk_size):
            runs.append(model.generate(
                **batch.as_kwargs(), max_new_tokens=6, do_sample=False, pad_token_id=0,
                output_scores=True, return_dict_in_generate=True,
            ))
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    for one_pass, chunked in zip(runs[0].scores, runs[1].scores, strict=True):
        torch.testing.assert_close(chunked, one_pass, rtol=1e-4, atol=1e-4)


def test_progress_reports_every_chunk_and_the_vision_tokens():
    batch = testing.tiny_video_batch(((4, 4, 4),), text_before=5, text_after=4, seed=3)  # 16 vision tokens
    model = testing.tiny_model(seed=36)
    steps = []
    _forward(model, batch, chunk_size=8, steps=steps)
    seq_len = batch.input_ids.shape[1]
    text = [step for step in steps if step[0] == "text"]
    assert text == [("text", min(end, seq_len), seq_len) for end in range(8, seq_len + 8, 8)]
    vision = [step for step in steps if step[0] == "vision"]
    assert vision == [("vision", 8, None), ("vision", 16, None)]  # two pieces of 8 tokens (2 temporal patches)


def test_official_mode_refuses_chunked_prefill():
    model = testing.tiny_model(seed=37, num_heads=4, num_kv_heads=1)
    model.set_attention_mode("official")
    with pytest.raises(UserError, match="attention_mode 'official' prefills in one pass"), prefill_in_chunks(model, 8):
        pass


@pytest.mark.parametrize("chunk_size", [0, -3, 2.5, True])
def test_bad_chunk_sizes_are_refused(chunk_size):
    model = testing.tiny_model(seed=38)
    with pytest.raises(UserError, match="prefill_chunk_size must be a positive integer"), prefill_in_chunks(
        model, chunk_size
    ):
        pass


def test_a_short_prompt_runs_in_one_pass_and_labels_are_refused():
    batch = testing.tiny_video_batch(((2, 4, 4),), text_before=2, text_after=2, seed=4)
    model = testing.tiny_model(seed=39)
    steps = []
    _forward(model, batch, chunk_size=1000, steps=steps)
    assert [step for step in steps if step[0] == "text"] == []  # shorter than a chunk: the one-pass forward
    refused = pytest.raises(UserError, match="forward with labels runs in one pass")
    with refused, torch.no_grad(), prefill_in_chunks(model, 4):
        model(**batch.as_kwargs(), labels=batch.input_ids)


@pytest.mark.parametrize("chunk_tokens", [1, 4, 9, 100])
def test_vision_tower_in_chunks_equals_one_pass(chunk_tokens):
    # Two videos of 3 and 4 temporal patches (8 and 4 tokens each): pieces cut inside a video, and several
    # videos' pieces grouped into one tower call.
    model = testing.tiny_model(seed=40)
    visual = model.model.visual
    grid = torch.tensor([[3, 4, 8], [4, 4, 4]])
    pixels = torch.randn(int(grid.prod(dim=1).sum()), 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(0))
    steps = []
    with torch.no_grad():
        expected = visual(pixels, grid_thw=grid)
        with prefill_in_chunks(model, chunk_tokens, lambda *step: steps.append(step)):
            chunked = visual(pixels, grid_thw=grid)
    torch.testing.assert_close(chunked.pooler_output, expected.pooler_output, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked.last_hidden_state, expected.last_hidden_state, rtol=1e-5, atol=1e-5)
    assert [done for _, done, _ in steps][-1] == expected.pooler_output.shape[0]
    assert len(steps) == {1: 7, 4: 7, 9: 5, 100: 1}[chunk_tokens]
    assert visual.chunk_tokens is None  # off again after the block


def test_logits_to_keep_as_index_tensor_gives_the_one_pass_rows():
    # transformers also takes logits_to_keep as a tensor of positions; the chunked prefill must pick the same rows.
    batch = testing.tiny_video_batch(((2, 8, 8),), text_before=5, text_after=4, seed=2)
    model = testing.tiny_model(seed=34)
    one_pass, _ = _forward(model, batch)
    positions = torch.tensor([0, 7, batch.input_ids.shape[1] - 1])
    with torch.no_grad(), prefill_in_chunks(model, 10):
        logits = model(**batch.as_kwargs(), use_cache=True, logits_to_keep=positions).logits
    torch.testing.assert_close(logits, one_pass[:, positions], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("flag", ["output_hidden_states", "output_attentions"])
def test_per_layer_outputs_are_refused_rather_than_given_for_the_last_chunk_only(flag):
    batch = testing.tiny_video_batch(((2, 8, 8),), text_before=5, text_after=4, seed=2)
    model = testing.tiny_model(seed=34)
    with torch.no_grad(), prefill_in_chunks(model, 10), pytest.raises(ValueError, match=flag):
        model(**batch.as_kwargs(), use_cache=True, **{flag: True})
