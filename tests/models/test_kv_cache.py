"""The preallocated KV cache: the keys and values a DynamicCache holds, written in place; generation and chunked
prefill through it give what they give through transformers' cache."""

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from videonsa import testing
from videonsa.models.chunked_prefill import CACHE_KWARG, prefill_in_chunks
from videonsa.models.kv_cache import PreallocatedLayer, preallocated_cache

STEPS = [7, 3, 1, 1, 1, 5, 1, 1]  # tokens per update: a prefill, a chunk, decoding steps, a later turn


def _states(tokens: int, generator: torch.Generator, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Random keys and values [batch, 2 heads, tokens, 4]."""
    return tuple(torch.randn(batch, 2, tokens, 4, generator=generator) for _ in range(2))


def _same(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> None:
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("capacity", [1, 10, sum(STEPS), 64])
def test_updates_return_what_a_dynamic_layer_returns(capacity):
    generator = torch.Generator().manual_seed(0)
    layer, dynamic = PreallocatedLayer(capacity), DynamicLayer()
    for tokens in STEPS:
        states = _states(tokens, generator)
        _same(layer.update(*states), dynamic.update(*states))
        assert layer.get_seq_length() == dynamic.get_seq_length()


def test_updates_within_the_capacity_write_into_one_buffer():
    generator = torch.Generator().manual_seed(1)
    layer = PreallocatedLayer(sum(STEPS))
    keys, _ = layer.update(*_states(STEPS[0], generator))
    first = keys.data_ptr()
    for tokens in STEPS[1:]:
        keys, values = layer.update(*_states(tokens, generator))
        assert keys.data_ptr() == first  # no new allocation, no copy of the cached tokens
    assert keys.shape[-2] == sum(STEPS)


def test_a_layer_past_its_capacity_grows_and_keeps_its_tokens():
    generator = torch.Generator().manual_seed(2)
    layer, dynamic = PreallocatedLayer(8), DynamicLayer()
    for tokens in [8, 1, 1, 1]:
        states = _states(tokens, generator)
        _same(layer.update(*states), dynamic.update(*states))
    assert layer._key_buffer.shape[-2] >= 11


@pytest.mark.parametrize("change", ["crop", "reorder", "select", "reset"])
def test_updates_after_transformers_changes_the_cache_match_a_dynamic_layer(change):
    generator = torch.Generator().manual_seed(3)
    layer, dynamic = PreallocatedLayer(32), DynamicLayer()
    for tokens in [6, 1, 1]:
        states = _states(tokens, generator)
        layer.update(*states)
        dynamic.update(*states)
    for cache in (layer, dynamic):
        if change == "crop":
            cache.crop(-3)
        elif change == "reorder":
            cache.reorder_cache(torch.tensor([1, 0]))
        elif change == "select":
            cache.batch_select_indices(torch.tensor([1]))
    if change == "reset":
        # Empty again (transformers 5.17's DynamicLayer.reset zeroes its tokens but keeps their count).
        layer.reset()
        dynamic = DynamicLayer()
        assert layer.get_seq_length() == 0
    batch = 1 if change == "select" else 2
    for tokens in [2, 1, 1]:
        states = _states(tokens, generator, batch)
        _same(layer.update(*states), dynamic.update(*states))
        assert layer.get_seq_length() == dynamic.get_seq_length()


def test_states_with_gradients_are_concatenated_and_keep_their_backward():
    generator = torch.Generator().manual_seed(4)
    layer = PreallocatedLayer(16)
    first = [x.requires_grad_() for x in _states(4, generator)]
    second = [x.requires_grad_() for x in _states(2, generator)]
    layer.update(*first)
    keys, values = layer.update(*second)
    (keys.square().sum() + values.sum()).backward()
    torch.testing.assert_close(first[0].grad, 2 * first[0].detach())
    torch.testing.assert_close(second[1].grad, torch.ones_like(second[1]))


def test_cached_states_with_gradients_keep_their_backward_when_new_ones_have_none():
    generator = torch.Generator().manual_seed(6)
    layer = PreallocatedLayer(16)
    first = [x.requires_grad_() for x in _states(4, generator)]
    layer.update(*first)  # e.g. a trainable prefix
    losses = [layer.update(*_states(1, generator))[0].square().sum() for _ in range(2)]  # each step's keys used
    sum(losses).backward()
    torch.testing.assert_close(first[0].grad, 4 * first[0].detach())


def test_offloading_and_reset_free_the_buffers_and_updates_go_on():
    generator = torch.Generator().manual_seed(7)
    layer, dynamic = PreallocatedLayer(16), DynamicLayer()
    states = _states(5, generator)
    layer.update(*states)
    dynamic.update(*states)
    layer.offload()
    dynamic.offload()
    assert layer._key_buffer is None and layer._value_buffer is None
    states = _states(1, generator)
    _same(layer.update(*states), dynamic.update(*states))
    layer.reset()
    assert layer._key_buffer is None and layer.get_seq_length() == 0


def test_a_cache_filled_in_inference_mode_takes_updates_outside_it():
    generator = torch.Generator().manual_seed(5)
    layer, dynamic = PreallocatedLayer(16), DynamicLayer()
    with torch.inference_mode():
        states = _states(5, generator)
        layer.update(*states)
        dynamic.update(*states)
    with torch.no_grad():
        states = _states(1, generator)
        _same(layer.update(*states), dynamic.update(*states))


def test_a_capacity_below_one_token_is_refused():
    with pytest.raises(ValueError, match="capacity of at least 1"):
        PreallocatedLayer(0)


def test_the_cache_has_a_preallocated_layer_per_decoder_layer():
    config = testing.tiny_videonsa_config()
    cache = preallocated_cache(config, 100)
    assert isinstance(cache, DynamicCache)
    assert [type(layer) for layer in cache.layers] == [PreallocatedLayer] * config.text_config.num_hidden_layers
    assert {layer.capacity for layer in cache.layers} == {100}


@pytest.mark.parametrize("mode", ["nsa", "dense", "official"])
def test_generation_through_the_preallocated_cache_scores_as_through_a_dynamic_one(mode):
    model = testing.tiny_model(seed=26)
    model.set_attention_mode(mode)
    single = testing.tiny_video_batch(((2, 8, 8),), text_before=5, text_after=4, seed=3)
    outputs = []
    for cache in (None, preallocated_cache(model.config, single.input_ids.shape[1] + 3)):  # grows past it too
        with torch.no_grad():
            outputs.append(model.generate(**single.as_kwargs(), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                                          output_scores=True, return_dict_in_generate=True, pad_token_id=0,
                                          **{CACHE_KWARG: cache}))
    assert torch.equal(outputs[0].sequences, outputs[1].sequences)
    for dynamic, preallocated in zip(outputs[0].scores, outputs[1].scores, strict=True):
        torch.testing.assert_close(preallocated, dynamic, rtol=1e-5, atol=1e-5)


def test_chunked_prefill_into_the_preallocated_cache_fills_what_a_dynamic_cache_holds(batch):
    model = testing.tiny_model(seed=27)
    length = batch.input_ids.shape[1]
    caches = [DynamicCache(config=model.config.text_config), preallocated_cache(model.config, length)]
    logits = []
    for cache in caches:
        with torch.no_grad(), prefill_in_chunks(model, 7):
            logits.append(model(**batch.as_kwargs(), **{CACHE_KWARG: cache}, use_cache=True).logits)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-5, atol=1e-5)
    for dynamic, preallocated in zip(caches[0].layers, caches[1].layers, strict=True):
        torch.testing.assert_close(preallocated.keys, dynamic.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(preallocated.values, dynamic.values, rtol=1e-5, atol=1e-5)
