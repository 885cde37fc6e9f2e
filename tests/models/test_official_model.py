"""attention_mode "official" in the model: the mode switch, the layer against a direct `official_attention` call,
the M-RoPE vision heuristic on a prompt built by the inference pipeline, generation (official prefill, dense
decoding over the unmasked cache), and the clear errors (training, padding, vision after a cached prefix).

Whole-model logits against the naive oracle are in tests/layers (the oracle's own tests); here each layer is
checked on the inputs it actually received.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen

from videonsa import UserError, testing
from videonsa.models import VideoNSAForConditionalGeneration
from videonsa.models.chunked_prefill import CACHE_KWARG
from videonsa.models.official_mode import vision_from_positions
from videonsa.training.config import TrainConfig


def official_attention(*args, **kwargs):
    from videonsa.layers.official import official_attention as library_function

    return library_function(*args, **kwargs)


@dataclass
class LayerCall:
    """What one attention layer received and returned in one forward pass."""

    hidden_states: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    is_vision: torch.Tensor | None
    output: torch.Tensor | None = None


@dataclass
class Recorder:
    """Every call of every attention layer, and the position ids the rotary embedding received."""

    calls: dict[int, list[LayerCall]] = field(default_factory=dict)
    rotary_positions: list[torch.Tensor] = field(default_factory=list)
    handles: list = field(default_factory=list)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def record(model) -> Recorder:
    recorder = Recorder()
    text_model = model.model.language_model
    for index, layer in enumerate(text_model.layers):
        attention = layer.self_attn
        recorder.calls[index] = []

        def before(_module, args, kwargs, index=index):
            recorder.calls[index].append(LayerCall(
                hidden_states=kwargs.get("hidden_states", args[0] if args else None),
                position_embeddings=kwargs["position_embeddings"],
                is_vision=kwargs["videonsa_official_tokens"].is_vision,
            ))

        def after(_module, _args, output, index=index):
            recorder.calls[index][-1].output = output[0]

        recorder.handles += [
            attention.register_forward_pre_hook(before, with_kwargs=True),
            attention.register_forward_hook(after),
        ]

    def rotary(_module, args, kwargs):
        recorder.rotary_positions.append(kwargs.get("position_ids", args[1] if len(args) > 1 else None))

    recorder.handles.append(text_model.rotary_emb.register_forward_pre_hook(rotary, with_kwargs=True))
    return recorder


def one_video_batch(seed: int = 3) -> testing.TinyBatch:
    """One unpadded sample: 5 text tokens, a 2x8x8-patch video (32 tokens, 4x4 per temporal patch), 6 text."""
    return testing.tiny_video_batch(((2, 8, 8),), text_before=5, text_after=6, seed=seed)


def official_model(seed: int = 5, **config) -> VideoNSAForConditionalGeneration:
    model = testing.tiny_model(seed=seed, **config)
    model.set_attention_mode("official")
    return model


def logits_of(model, batch: testing.TinyBatch, **extra) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch.as_kwargs(), **extra).logits


def layer_by_hand(attention, call: LayerCall) -> torch.Tensor:
    """The official-mode layer recomputed from its inputs: projections, M-RoPE, gate logits, then a direct
    `official_attention` call and o_proj. hidden_states [B, T, hidden] -> [B, T, hidden]."""
    x = call.hidden_states
    batch, length, _ = x.shape
    shape = (batch, length, -1, attention.head_dim)
    q = attention.q_proj(x).view(shape).transpose(1, 2)
    k = attention.k_proj(x).view(shape).transpose(1, 2)
    v = attention.v_proj(x).view(shape)
    q, k = qwen.apply_rotary_pos_emb(q, k, *call.position_embeddings)
    gate_logits = attention.g_proj_2(F.gelu(attention.g_proj_1(x))).view(batch, length, attention.num_heads, 3)
    settings = attention.settings
    out = official_attention(
        q.transpose(1, 2), k.transpose(1, 2), v, call.is_vision, gate_logits,
        block_size=settings.block_size, block_counts=settings.block_count, window_size=settings.window_size,
        scale=attention.scaling, gate_temperature=settings.gate_temperature,
    )
    return attention.o_proj(out.reshape(batch, length, -1))


# ---------------------------------------------------------------------------------------------- the mode switch


def test_official_is_a_third_mode_recorded_in_the_config_and_switchable(tmp_path):
    model = testing.tiny_model(seed=1)
    model.set_attention_mode("official")
    assert model.sparse_settings.mode == "official" and model.config.text_config.attention_mode == "official"
    model.save_pretrained(tmp_path)
    loaded = VideoNSAForConditionalGeneration.from_pretrained(tmp_path)
    assert loaded.sparse_settings.mode == "official"
    explicit = VideoNSAForConditionalGeneration.from_pretrained(tmp_path, attention_mode="nsa")
    assert explicit.sparse_settings.mode == "nsa"
    loaded.set_attention_mode("dense")
    assert loaded.sparse_settings.mode == "dense"
    assert testing.tiny_model(attention_mode="official").sparse_settings.mode == "official"


def test_official_mode_refuses_settings_and_shapes_the_original_cannot_run():
    # The original top-k fills next_power_of_two(block_counts) slots from blocks of block_size candidates.
    with pytest.raises(UserError, match=r"'official': block_counts=5 rounds up to 8 slots, more than block_size=4"):
        testing.tiny_model(block_counts=5).set_attention_mode("official")
    with pytest.raises(UserError, match="block_size must be a power of two"):
        testing.tiny_model(block_size=6, block_counts=2).set_attention_mode("official")
    # 64 padded heads: 2 HQ <= 64 and HKV dividing 64.
    model = testing.tiny_model(hidden_size=96, num_heads=6, num_kv_heads=3)
    with pytest.raises(UserError, match="num_key_value_heads dividing 64.*6 and 3"):
        model.set_attention_mode("official")
    assert model.sparse_settings.mode == "nsa"  # left as it was


# ------------------------------------------------------------------------------------------ the layer's function


def test_each_layer_equals_a_direct_official_attention_call_and_the_logits_differ_from_nsa():
    model = official_model(seed=7)
    batch = one_video_batch()
    recorder = record(model)
    official = logits_of(model, batch)
    recorder.remove()
    for index, layer in enumerate(model.model.language_model.layers):
        (call,) = recorder.calls[index]
        assert call.is_vision.shape == batch.input_ids.shape
        with torch.no_grad():
            expected = layer_by_hand(layer.self_attn, call)
        torch.testing.assert_close(call.output, expected, rtol=1e-5, atol=1e-5)

    model.set_attention_mode("nsa")
    nsa = logits_of(model, batch)
    model.set_attention_mode("dense")
    dense = logits_of(model, batch)
    # Even the text before the video differs from plain causal attention: in the mixed path every text token
    # also gets the NSA part, whose compression branch sees its own and every later block.
    for other in (nsa, dense):
        assert ((official - other).abs().amax(dim=-1) > 1e-3).all()


def test_a_batch_without_vision_tokens_is_the_stock_dense_attention():
    model = official_model(seed=8)
    batch = one_video_batch()
    ids = batch.input_ids[:, :5]
    with torch.no_grad():
        official = model(input_ids=ids).logits
        model.set_attention_mode("dense")
        dense = model(input_ids=ids).logits
    torch.testing.assert_close(official, dense, rtol=0, atol=0)


# ------------------------------------------------------------------------------------ the M-RoPE vision heuristic


def _prompt_inputs(tmp_path, seconds_per_patch: float | None):
    """Model inputs of a real question about a synthetic video, built as `videonsa ask` builds them."""
    from videonsa.inference.api import plan_question
    from videonsa.inference.model_files import open_model_files
    from videonsa.inference.prompt import model_inputs
    from videonsa.video import SamplingSettings
    from videonsa.video.decoding import decode_video
    from videonsa.video.synthetic import write_video

    checkpoint = testing.save_tiny_checkpoint(tmp_path / "ckpt", seed=9)
    video = write_video(tmp_path / "clip.mp4", frame_count=16, fps=8, width=112, height=112)
    files = open_model_files(str(checkpoint))
    sampling = SamplingSettings(fps=4.0, pixels_per_frame=112 * 112, min_pixels_per_frame=112 * 112)
    planned = plan_question(files, video, "What moves?", sampling=sampling)
    inputs = model_inputs(planned.prompt, decode_video(planned.plan), files)
    if seconds_per_patch is not None:  # the paper preset's fixed spacing, else the frames' real one
        inputs["second_per_grid_ts"] = torch.tensor([seconds_per_patch])
    return checkpoint, inputs


@pytest.mark.parametrize("seconds_per_patch", [1.0, None])
def test_vision_heuristic_on_a_real_video_prompt_reads_the_rotary_positions(tmp_path, seconds_per_patch):
    checkpoint, inputs = _prompt_inputs(tmp_path, seconds_per_patch)
    model = VideoNSAForConditionalGeneration.from_pretrained(checkpoint, attention_mode="official").eval()
    recorder = record(model)
    with torch.no_grad():
        model(**inputs)
    recorder.remove()
    (rotary,) = recorder.rotary_positions
    (call,) = recorder.calls[0]
    temporal, height, width = rotary[-3:, 0]  # the ids that rotated q and k
    assert torch.equal(call.is_vision[0], ~((temporal == height) & (height == width)))
    for index in recorder.calls:  # one mask, the same in every layer
        assert torch.equal(recorder.calls[index][0].is_vision, call.is_vision)

    # Against the placeholders: text tokens are never vision; a video token is read as text exactly when its
    # row and column equal its temporal offset g * interval (always the first video token).
    placeholders = inputs["mm_token_type_ids"][0] == 2
    assert not call.is_vision[0][~placeholders].any()
    frames, rows, cols = (int(n) for n in inputs["video_grid_thw"][0])
    rows, cols = rows // 2, cols // 2  # merged 2x2
    offsets = temporal[placeholders] - temporal[placeholders][0]
    index = torch.arange(int(placeholders.sum()))
    row, col = (index % (rows * cols)) // cols, index % cols
    read_as_text = (row == col) & (row == offsets)
    assert frames >= 2 and read_as_text[0]
    assert torch.equal(call.is_vision[0][placeholders], ~read_as_text)
    if seconds_per_patch == 1.0:
        # The paper preset: group g sits at time offset g * tokens_per_second (2): token (g, 2g, 2g) is "text".
        group = index // (rows * cols)
        assert torch.equal(offsets, group * 2)
        assert int(read_as_text.sum()) == sum(1 for g in range(frames) if 2 * g < min(rows, cols))


def test_position_ids_handling_matches_the_text_model_for_every_shape():
    t = torch.tensor([[[0, 1, 5, 5, 9]]])
    h = torch.tensor([[[0, 1, 5, 6, 9]]])
    w = torch.tensor([[[0, 1, 6, 5, 9]]])
    three = torch.cat([t, h, w])  # [3, 1, 5]
    expected = torch.tensor([[False, False, True, True, False]])
    assert torch.equal(vision_from_positions(three, 1, 5, torch.device("cpu")), expected)
    four = torch.cat([torch.arange(5).view(1, 1, 5), three])  # generate's [4, B, T]: row 0 text positions
    assert torch.equal(vision_from_positions(four, 1, 5, torch.device("cpu")), expected)
    for text_only in (None, torch.arange(5).view(1, 5), torch.arange(5).view(1, 1, 5)):
        assert not vision_from_positions(text_only, 1, 5, torch.device("cpu")).any()


# ------------------------------------------------------------------------------------------- cache and decoding


def test_cache_holds_the_unmasked_keys_and_values_of_the_prefill():
    model = official_model(seed=10)
    batch = one_video_batch()
    recorder = record(model)
    cache = DynamicCache(config=model.config.text_config)
    with torch.no_grad():
        model(**batch.as_kwargs(), **{CACHE_KWARG: cache}, use_cache=True)
    recorder.remove()
    attention = model.model.language_model.layers[0].self_attn
    (call,) = recorder.calls[0]
    shape = (*call.hidden_states.shape[:2], -1, attention.head_dim)
    with torch.no_grad():
        key = attention.k_proj(call.hidden_states).view(shape).transpose(1, 2)
        value = attention.v_proj(call.hidden_states).view(shape).transpose(1, 2)
        _, key = qwen.apply_rotary_pos_emb(key, key, *call.position_embeddings)
    assert call.is_vision.any() and not call.is_vision.all()
    torch.testing.assert_close(cache.layers[0].keys, key, rtol=0, atol=0)
    torch.testing.assert_close(cache.layers[0].values, value, rtol=0, atol=0)


def test_generate_runs_the_official_prefill_then_dense_decoding(monkeypatch):
    import videonsa.models.modeling_videonsa as modeling

    model = official_model(seed=11)
    batch = one_video_batch()
    prompt = batch.input_ids.shape[1]
    lengths = []
    library_function = modeling.official_attention

    def counted(q, *args, **kwargs):
        lengths.append(q.shape[1])
        return library_function(q, *args, **kwargs)

    monkeypatch.setattr(modeling, "official_attention", counted)
    recorder = record(model)
    with torch.no_grad():
        out = model.generate(**batch.as_kwargs(), max_new_tokens=5, do_sample=False, return_dict_in_generate=True,
                             output_logits=True)
    recorder.remove()
    generated = out.sequences[0, prompt:]
    assert generated.numel() == 5
    # generate hands the text model [4, B, T] position ids (text row first); the prefill's vision mask is still
    # read from the three M-RoPE rows that rotate q and k, and decoding steps are text.
    positions, _ = model.model.get_rope_index(batch.input_ids, batch.mm_token_type_ids,
                                              video_grid_thw=batch.video_grid_thw)
    prefill, *steps = recorder.calls[0]
    assert torch.equal(prefill.is_vision, vision_from_positions(positions, 1, prompt, torch.device("cpu")))
    assert len(steps) == 4 and not any(step.is_vision.any() for step in steps)
    # Only the prefill runs the original function, once per layer; every decoding step is text.
    assert lengths == [prompt] * model.config.text_config.num_hidden_layers
    torch.testing.assert_close(out.logits[0][0], logits_of(model, batch)[0, -1], rtol=1e-5, atol=1e-5)

    # The decoding steps are dense attention over the cache the official prefill wrote: switching the layers
    # to dense mode after the prefill gives the same steps.
    cache = DynamicCache(config=model.config.text_config)
    with torch.no_grad():
        model(**batch.as_kwargs(), **{CACHE_KWARG: cache}, use_cache=True)
        model.set_attention_mode("dense")
        continued = model.generate(
            input_ids=out.sequences[:, :prompt + 1], attention_mask=torch.ones(1, prompt + 1, dtype=torch.long),
            **{CACHE_KWARG: cache}, max_new_tokens=4, do_sample=False,
        )
    assert torch.equal(continued[0, prompt:], generated)


# ---------------------------------------------------------------------------------------------------- refusals


def test_vision_tokens_after_a_cached_prefix_are_refused():
    model = official_model(seed=12)
    batch = one_video_batch()
    positions, _ = model.model.get_rope_index(batch.input_ids, batch.mm_token_type_ids,
                                              video_grid_thw=batch.video_grid_thw)
    cache = DynamicCache(config=model.config.text_config)
    with torch.no_grad():
        model(input_ids=batch.input_ids[:, :3], **{CACHE_KWARG: cache}, use_cache=True)
        with pytest.raises(UserError, match="KV cache already holds 3 tokens"):
            model(
                input_ids=batch.input_ids[:, 3:], mm_token_type_ids=batch.mm_token_type_ids[:, 3:],
                pixel_values_videos=batch.pixel_values_videos, video_grid_thw=batch.video_grid_thw,
                position_ids=positions[:, :, 3:], **{CACHE_KWARG: cache}, use_cache=True,
            )


def test_padded_batches_are_refused(batch):
    model = official_model(seed=13)
    with pytest.raises(UserError, match="no padded batches .* one sample per batch"):
        logits_of(model, batch)


def test_training_through_official_mode_is_refused():
    model = official_model(seed=14)
    batch = one_video_batch()
    model.train()
    with pytest.raises(UserError, match="cannot be trained: train with attention_mode 'nsa'"):
        model(**batch.as_kwargs())
    with torch.no_grad():  # train mode without autograd is still inference
        model(**batch.as_kwargs())


def test_training_config_asking_for_official_mode_is_refused_up_front():
    config = TrainConfig(source="recipe.yaml")
    config.model.path = "ckpt"
    config.model.sparse = {"attention_mode": "official"}
    config.data.manifest = ["m.jsonl"]
    config.trainer = {"output_dir": "out"}
    with pytest.raises(UserError, match="model.sparse.attention_mode 'official' .* cannot be trained in recipe.yaml"):
        config.validate()
    config.model.sparse = {"attention_mode": "nsa"}
    config.validate()


def test_training_loads_a_released_layout_checkpoint_in_nsa_mode(tmp_path):
    from videonsa.training.config import ModelSettings
    from videonsa.training.model_setup import load_model

    path = testing.save_tiny_checkpoint(tmp_path, legacy_layout=True, seed=15)
    _forget_recorded_mode(path)
    assert VideoNSAForConditionalGeneration.from_pretrained(path).sparse_settings.mode == "official"
    assert load_model(ModelSettings(path=str(path))).sparse_settings.mode == "nsa"
    assert load_model(ModelSettings(path=str(path), sparse={"attention_mode": "dense"})).sparse_settings.mode == "dense"


def _forget_recorded_mode(path) -> None:
    """Make a legacy-layout checkpoint look as the released one does: no attention_mode in its config."""
    import json

    config = json.loads((path / "config.json").read_text())
    config["text_config"].pop("attention_mode")
    (path / "config.json").write_text(json.dumps(config))


# ---------------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_official_mode_on_gpu_matches_the_cpu_reference_and_generates():
    # The Triton branches take power-of-two blocks of at least 16 tokens: a 2x16x16-patch video (128 tokens).
    model = official_model(seed=16, block_size=16, block_counts=2, window_size=32)
    batch = testing.tiny_video_batch(((2, 16, 16),), text_before=5, text_after=6, seed=4)
    reference = logits_of(model, batch)
    model.to("cuda")
    inputs = {name: tensor.cuda() for name, tensor in batch.as_kwargs().items()}
    with torch.no_grad():
        fast = model(**inputs).logits
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    torch.testing.assert_close(fast.cpu(), reference, rtol=1e-3, atol=1e-3)
    assert out.shape[1] == batch.input_ids.shape[1] + 4
