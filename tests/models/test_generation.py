"""generate() with the KV cache: same tokens as without it, decoding steps dense and without cuDNN's SDPA, late vision
tokens refused."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import DynamicCache

from videonsa import testing
from videonsa.errors import UserError
from videonsa.models.chunked_prefill import CACHE_KWARG


def _generate(model, batch, **kwargs):
    with torch.no_grad():
        return model.generate(**batch.as_kwargs(), max_new_tokens=6, pad_token_id=0, **kwargs)


def test_greedy_generation_gives_the_same_tokens_with_and_without_the_cache(batch):
    model = testing.tiny_model(seed=21)
    cached = _generate(model, batch, do_sample=False, use_cache=True)
    uncached = _generate(model, batch, do_sample=False, use_cache=False)
    assert cached.shape == (2, batch.input_ids.shape[1] + 6)
    assert torch.equal(cached, uncached)
    # The scores agree too, not only their argmax.
    with torch.no_grad():
        scores = [model.generate(**batch.as_kwargs(), max_new_tokens=6, do_sample=False, use_cache=use,
                                 output_scores=True, return_dict_in_generate=True, pad_token_id=0).scores
                  for use in (True, False)]
    for with_cache, without in zip(*scores, strict=True):
        torch.testing.assert_close(with_cache, without, rtol=1e-4, atol=1e-4)


def test_sampling_with_the_cache_draws_the_same_tokens_as_without(batch):
    model = testing.tiny_model(seed=22)
    draws = []
    for use_cache in (True, False):
        torch.manual_seed(0)
        draws.append(_generate(model, batch, do_sample=True, temperature=1.5, top_k=0, use_cache=use_cache))
    assert torch.equal(draws[0], draws[1])


def test_dense_mode_generates_like_stock_qwen2_5_vl(batch):
    model = testing.tiny_model(seed=23)
    stock = testing.tiny_model(videonsa=False, seed=0)
    stock.load_state_dict(model.state_dict(), strict=False)
    model.set_attention_mode("dense")
    assert torch.equal(_generate(model, batch, do_sample=False), _generate(stock, batch, do_sample=False))


@pytest.mark.parametrize("mode", ["nsa", "dense", "official"])
def test_unpadded_decoding_without_a_mask_scores_as_with_one(mode):
    # Decoding steps of an unpadded prompt get no mask tensor under SDPA (a single query sees every cached key);
    # eager attention keeps transformers' mask. Both must score alike, and dense mode as the stock model does.
    single = testing.tiny_video_batch(((2, 8, 8),), text_before=5, text_after=4, seed=3)
    scores = []
    for implementation in ("sdpa", "eager"):
        model = testing.tiny_model(seed=24)
        model.set_attention_mode(mode)
        model.set_attn_implementation(implementation)
        scores.append(_decoding_scores(model, single))
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-4, atol=1e-4)
    if mode == "dense":
        stock = testing.tiny_model(videonsa=False, seed=0)
        stock.load_state_dict(model.state_dict(), strict=False)
        torch.testing.assert_close(scores[0], _decoding_scores(stock, single), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["nsa", "dense", "official"])
def test_decoding_steps_run_sdpa_without_cudnn_and_prefills_with_it(mode):
    # cuDNN's SDPA builds a plan for every new key length, which a decoding step has at every step.
    model = testing.tiny_model(seed=25)
    model.set_attention_mode(mode)
    calls = []

    def note_backends(attention, args, kwargs):
        flags = torch.backends.cuda
        calls.append((kwargs["hidden_states"].shape[1], flags.cudnn_sdp_enabled(), flags.flash_sdp_enabled()))

    for layer in model.model.language_model.layers:
        layer.self_attn.register_forward_pre_hook(note_backends, with_kwargs=True)
    single = testing.tiny_video_batch(((2, 8, 8),), text_before=5, text_after=4, seed=3)
    backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    with sdpa_kernel(backends):
        _generate(model, single, do_sample=False, min_new_tokens=6)
        assert torch.backends.cuda.cudnn_sdp_enabled()  # set back after every step
    steps = [(cudnn, flash) for tokens, cudnn, flash in calls if tokens == 1]
    prefill = [cudnn for tokens, cudnn, _ in calls if tokens > 1]
    assert len(steps) == 5 * model.config.text_config.num_hidden_layers  # 6 new tokens, the first from the prefill
    assert steps == [(False, True)] * len(steps)
    assert len(prefill) == model.config.text_config.num_hidden_layers and all(prefill)


def _decoding_scores(model, batch):
    """[5, B, V] scores of greedy decoding steps 2 to 6 (the first token comes from the prefill)."""
    with torch.no_grad():
        out = model.generate(**batch.as_kwargs(), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                             output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    return torch.stack(out.scores[1:])


def _prefill(model, batch):
    cache = DynamicCache(config=model.config.text_config)
    with torch.no_grad():
        model(**batch.as_kwargs(), **{CACHE_KWARG: cache}, use_cache=True)
    return cache


def _second_turn(model, batch, cache):
    """Send the same video-holding batch again after the cache already holds the first turn."""
    length = cache.get_seq_length()
    positions = (torch.arange(batch.input_ids.shape[1]) + length).expand(3, *batch.input_ids.shape)
    mask = torch.cat([batch.attention_mask, batch.attention_mask], dim=1)
    with torch.no_grad():
        model(**{**batch.as_kwargs(), "attention_mask": mask}, position_ids=positions, **{CACHE_KWARG: cache},
              use_cache=True)


def test_vision_tokens_after_a_cache_filled_elsewhere_are_refused_without_touching_the_cache(batch):
    # A cache VideoNSA did not watch being filled (here: in dense mode) has no record of which cached tokens were
    # vision, so a later chunk's vision streams cannot be rebuilt: refused, the cache left as it was.
    model = testing.tiny_model(seed=24)
    model.set_attention_mode("dense")
    cache = _prefill(model, batch)
    model.set_attention_mode("nsa")
    length = cache.get_seq_length()
    with pytest.raises(UserError, match=f"KV cache already holds {length} tokens that VideoNSA did not see"):
        _second_turn(model, batch, cache)
    assert cache.get_seq_length() == length


def test_vision_tokens_in_a_later_turn_continue_the_vision_stream_of_one_pass(batch):
    # The second turn's video joins its sample's vision stream: the logits equal one pass over both turns.
    model = testing.tiny_model(seed=24)
    cache = DynamicCache(config=model.config.text_config)
    first_positions = torch.arange(batch.input_ids.shape[1]).expand(3, *batch.input_ids.shape)
    with torch.no_grad():
        model(**batch.as_kwargs(), position_ids=first_positions, **{CACHE_KWARG: cache}, use_cache=True)
        positions = first_positions + cache.get_seq_length()
        second = model(**{**batch.as_kwargs(), "attention_mask": torch.cat([batch.attention_mask] * 2, dim=1)},
                       position_ids=positions, **{CACHE_KWARG: cache}, use_cache=True).logits
        both = {key: torch.cat([value, value], dim=1) for key, value in batch.as_kwargs().items()
                if key not in ("pixel_values_videos", "video_grid_thw")}
        # Each sample's two videos in a row, sample after sample, as the placeholders come.
        rows = batch.video_grid_thw.prod(dim=1).tolist()
        pixels = batch.pixel_values_videos.split(rows)
        both["pixel_values_videos"] = torch.cat([p for video in pixels for p in (video, video)])
        both["video_grid_thw"] = batch.video_grid_thw.repeat_interleave(2, dim=0)
        whole = model(**both, position_ids=torch.cat([first_positions, positions], dim=2)).logits
    torch.testing.assert_close(second, whole[:, batch.input_ids.shape[1]:], rtol=1e-5, atol=1e-5)


def test_dense_mode_accepts_vision_tokens_in_a_later_turn(batch):
    model = testing.tiny_model(seed=25)
    model.set_attention_mode("dense")
    cache = _prefill(model, batch)
    _second_turn(model, batch, cache)
    assert cache.get_seq_length() == 2 * batch.input_ids.shape[1]


def test_a_record_outgrown_by_a_crop_stays_void_when_the_cache_regrows_to_its_length(batch):
    # Cropped into the video and refilled with text to the old length, the cache no longer holds what the record
    # says (its last video tokens are text now): a later turn's vision tokens are refused, not streamed with them.
    model = testing.tiny_model(seed=24)
    cache = _prefill(model, batch)
    length = cache.get_seq_length()
    video_end = int(batch.mm_token_type_ids[0].nonzero().max()) + 1
    cache.crop(video_end - 2 - length)  # negative: tokens to drop, on every transformers 5.x
    kept = cache.get_seq_length()
    text = torch.full((batch.input_ids.shape[0], length - kept), 65)
    positions = (torch.arange(text.shape[1]) + kept).expand(3, *text.shape)
    mask = torch.cat([batch.attention_mask[:, :kept], torch.ones_like(text)], dim=1)
    with torch.no_grad():
        model(input_ids=text, attention_mask=mask, position_ids=positions, **{CACHE_KWARG: cache}, use_cache=True)
    assert cache.get_seq_length() == length
    with pytest.raises(UserError, match="KV cache already holds"):
        _second_turn(model, batch, cache)
