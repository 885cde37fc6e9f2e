"""videonsa.testing: the tiny tokenizer, processors, batches and checkpoints other tests build on."""

import itertools

import numpy as np
import pytest
import torch

from videonsa import testing


def test_tokenizer_has_qwen_special_tokens_as_single_ids_and_round_trips_text():
    tokenizer = testing.tiny_tokenizer()
    for token, token_id in testing.TOKEN_IDS.items():
        assert tokenizer.convert_tokens_to_ids(token) == token_id
        assert tokenizer(token).input_ids == [token_id]
    text = "Wie viele Vögel? 3 birds, 2 cats."
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert tokenizer.video_token == "<|video_pad|>" and tokenizer.image_token == "<|image_pad|>"
    assert max(tokenizer.get_vocab().values()) < testing.TINY_VOCAB_SIZE


def test_chat_template_renders_qwen_turns_with_vision_placeholders():
    tokenizer = testing.tiny_tokenizer()
    messages = [{"role": "user", "content": [
        {"type": "video"}, {"type": "image"}, {"type": "text", "text": "Describe."}
    ]}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>"
        "<|vision_start|><|image_pad|><|vision_end|>Describe.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    answered = messages + [{"role": "assistant", "content": "A cat."}]
    assert tokenizer.apply_chat_template(answered, tokenize=False).endswith("<|im_start|>assistant\nA cat.<|im_end|>\n")


def test_image_processor_makes_patches_the_tiny_vision_tower_takes():
    processor = testing.tiny_image_processor()
    image = np.random.default_rng(0).integers(0, 255, (56, 84, 3), dtype=np.uint8)
    out = processor(images=[image], return_tensors="pt")
    grid = out["image_grid_thw"][0].tolist()
    assert grid == [1, 4, 6]
    assert out["pixel_values"].shape == (24, 3 * testing.TEMPORAL_PATCH_SIZE * testing.PATCH_SIZE**2)
    model = testing.tiny_model(seed=0)
    with torch.no_grad():
        features = model.model.get_image_features(out["pixel_values"], out["image_grid_thw"])
    assert features.pooler_output[0].shape == (6, model.config.text_config.hidden_size)


def test_tiny_video_batch_places_one_placeholder_per_merged_patch():
    batch = testing.tiny_video_batch(((2, 4, 6), (4, 2, 2)), text_before=[3, 1], text_after=2)
    counts = (batch.input_ids == testing.TOKEN_IDS["<|video_pad|>"]).sum(dim=1).tolist()
    assert counts == [12, 4]
    assert torch.equal(batch.mm_token_type_ids == 2, batch.input_ids == testing.TOKEN_IDS["<|video_pad|>"])
    assert batch.pixel_values_videos.shape[0] == 2 * 4 * 6 + 4 * 2 * 2
    assert batch.attention_mask[1].tolist() == [0] * 10 + [1] * 9  # left padding
    with pytest.raises(ValueError, match="multiples of 2"):
        testing.tiny_video_batch(((2, 3, 4),))


def test_models_are_reproducible_from_their_seed():
    first, second = testing.tiny_model(seed=5), testing.tiny_model(seed=5)
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values(),
                                                   strict=True))
    assert not torch.equal(testing.tiny_model(seed=6).lm_head.weight, first.lm_head.weight)


def _vision_gates(model, batch) -> list[torch.Tensor]:
    """Each layer's gates [N, HQ, 3] at the batch's vision tokens, from the layer inputs of one forward pass."""
    inputs = []
    hooks = [
        layer.self_attn.register_forward_pre_hook(
            lambda module, args, kwargs: inputs.append((module, kwargs["hidden_states"])), with_kwargs=True
        )
        for layer in model.model.language_model.layers
    ]
    with torch.no_grad():
        model(**batch.as_kwargs())
    for hook in hooks:
        hook.remove()
    vision = batch.mm_token_type_ids > 0
    with torch.no_grad():
        return [torch.stack(module.gates(x[vision]), dim=-1) for module, x in inputs]


def test_tiny_model_gates_differ_between_heads_branches_and_tokens():
    # Fresh gates all near 0.5 would hide swapped branches, confused heads or misaligned tokens in every model
    # test: the tiny models' gates must tell each of these apart by a wide margin.
    batch = testing.tiny_video_batch()
    for seed in (0, 2):
        for gates in _vision_gates(testing.tiny_model(seed=seed), batch):
            tokens, heads, branches = gates.shape
            assert (tokens, heads, branches) == (8, 4, 3)
            assert (gates - 0.5).abs().mean() > 0.2
            for i, j in itertools.combinations(range(branches), 2):  # g_cmp, g_slc, g_swa
                assert (gates[..., i] - gates[..., j]).abs().mean() > 0.15
            for i, j in itertools.combinations(range(heads), 2):
                assert (gates[:, i] - gates[:, j]).abs().mean() > 0.1
            assert gates.std(dim=0).mean() > 0.1  # over the tokens, per head and branch
            assert (gates[1:] - gates[:-1]).abs().mean() > 0.1  # neighbouring tokens


def test_tiny_model_without_spread_gates_has_new_gates_and_the_same_other_weights():
    spread, new = testing.tiny_model(seed=4), testing.tiny_model(seed=4, spread_gates=False)
    for (name, a), b in zip(spread.state_dict().items(), new.state_dict().values(), strict=True):
        if ".g_proj_" not in name:
            assert torch.equal(a, b), name
        elif name.endswith(".weight"):
            assert not torch.equal(a, b), name
    for gates in _vision_gates(new, testing.tiny_video_batch()):
        assert (gates - 0.5).abs().max() < 0.1


@pytest.mark.skipif(not testing.video_processor_available(), reason="transformers' video processor needs torchvision")
def test_processor_turns_a_chat_with_a_video_into_model_inputs():
    processor = testing.tiny_processor()
    video = np.random.default_rng(0).integers(0, 255, (4, 56, 56, 3), dtype=np.uint8)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What?"}]}],
        add_generation_prompt=True, tokenize=False,
    )
    inputs = processor(text=[text], videos=[video], return_tensors="pt")
    model = testing.tiny_model(seed=0)
    with torch.no_grad():
        assert model(**inputs).logits.shape[:2] == inputs["input_ids"].shape


@pytest.mark.skipif(testing.video_processor_available(), reason="torchvision is installed")
def test_processor_without_torchvision_says_what_is_missing():
    with pytest.raises(ImportError, match="needs torchvision"):
        testing.tiny_processor()


@pytest.mark.parametrize("legacy_layout", [False, True], ids=["current-layout", "legacy-layout"])
def test_drop_layer_gates_removes_only_that_layers_gates(tmp_path, legacy_layout):
    from safetensors.torch import load_file

    folder = testing.save_tiny_checkpoint(tmp_path / "ckpt", legacy_layout=legacy_layout)
    before = set(load_file(folder / "model.safetensors"))
    assert testing.drop_layer_gates(folder, layer=1) == 4
    after = set(load_file(folder / "model.safetensors"))
    assert all(".layers.1.self_attn.g_proj_" in name for name in before - after)
    assert len(before - after) == 4 and after < before
    assert sum(".layers.0.self_attn.g_proj_" in name for name in after) == 4
