"""The VideoNSA attention inside the model: NSA path, text path, split, dense mode, batches, gradients."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from model_checks import capture_attention, use_package_positions
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb

from videonsa import testing
from videonsa.errors import UserError
from videonsa.models import modeling_videonsa as modeling
from videonsa.ops import nsa_attention


def _logits(model, batch, **overrides):
    with torch.no_grad():
        return model(**{**batch.as_kwargs(), **overrides}).logits


def _expected_first_layer(model, batch, capture):
    """Layer 0's attention output recomputed by hand from its captured input: q/k/v, M-RoPE as transformers
    applies it, then for each sample the NSA operator on that sample's vision tokens (no packing) with gates
    sigmoid(g2(gelu(g1(x))) / T), and plain softmax over earlier real tokens for text tokens."""
    attn = model.model.language_model.layers[0].self_attn
    settings = attn.settings
    x = capture.hidden_states
    batch_size, seq_len, _ = x.shape
    heads_q, heads_kv, dim = attn.num_heads, attn.num_key_value_heads, attn.head_dim
    q = attn.q_proj(x).view(batch_size, seq_len, heads_q, dim).transpose(1, 2)
    k = attn.k_proj(x).view(batch_size, seq_len, heads_kv, dim).transpose(1, 2)
    v = attn.v_proj(x).view(batch_size, seq_len, heads_kv, dim)
    q, k = apply_rotary_pos_emb(q, k, *capture.position_embeddings)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    gates = torch.sigmoid(attn.g_proj_2(F.gelu(attn.g_proj_1(x))) / settings.gate_temperature)
    gates = gates.view(batch_size, seq_len, heads_q, 3)

    real = batch.attention_mask.bool()
    vision = (batch.input_ids == testing.TOKEN_IDS["<|video_pad|>"]) & real
    out = torch.zeros(batch_size, seq_len, heads_q, dim)
    for b in range(batch_size):
        idx = vision[b].nonzero().flatten()
        g = [gates[b, idx, :, i][None] for i in range(3)]
        out[b, idx] = nsa_attention(
            q[b, idx][None], k[b, idx][None], v[b, idx][None], *g, scale=dim**-0.5, **settings.nsa_kwargs()
        )[0]
        for t in (~vision[b]).nonzero().flatten().tolist():
            visible = real[b] & (torch.arange(seq_len) <= t)
            visible[t] = True
            for h in range(heads_q):
                kv_head = h // (heads_q // heads_kv)
                weights = torch.softmax(k[b, visible, kv_head] @ q[b, t, h] * dim**-0.5, dim=0)
                out[b, t, h] = weights @ v[b, visible, kv_head]
    return attn.o_proj(out.reshape(batch_size, seq_len, -1)), vision


@pytest.mark.parametrize("heads", [(4, 2), (7, 1)], ids=["gqa4:2", "gqa7:1"])
def test_first_layer_equals_nsa_on_each_vision_stream_and_dense_attention_for_text(batch, heads):
    num_heads, num_kv_heads = heads
    model = testing.tiny_model(num_heads=num_heads, num_kv_heads=num_kv_heads, hidden_size=16 * num_heads, seed=2)
    capture = capture_attention(model.model.language_model.layers[0].self_attn)
    _logits(model, batch)
    capture.remove()
    with torch.no_grad():
        expected, vision = _expected_first_layer(model, batch, capture)
    assert vision.sum() == 40
    torch.testing.assert_close(capture.output[vision], expected[vision], rtol=1e-4, atol=1e-5)
    text = batch.attention_mask.bool() & ~vision
    torch.testing.assert_close(capture.output[text], expected[text], rtol=1e-4, atol=1e-5)


def test_first_layer_vision_outputs_do_not_depend_on_text_before_the_video(batch):
    model = testing.tiny_model(seed=3)
    changed = testing.tiny_video_batch(((2, 8, 8), (2, 4, 4)), text_before=[5, 7], text_after=[4, 9], seed=1)
    changed.input_ids[0, 1] = (changed.input_ids[0, 1] + 1) % 256  # a text token before the first video
    changed.input_ids[1, 10] = (changed.input_ids[1, 10] + 1) % 256  # ... and before the second
    vision = batch.mm_token_type_ids > 0

    outputs = {}
    for mode in ("nsa", "dense"):
        model.set_attention_mode(mode)
        capture = capture_attention(model.model.language_model.layers[0].self_attn)
        _logits(model, batch)
        before = capture.output
        _logits(model, changed)
        outputs[mode] = (before, capture.output)
        capture.remove()
    before, after = outputs["nsa"]
    torch.testing.assert_close(after[vision], before[vision], rtol=0, atol=0)
    # The test can fail: with dense attention the vision tokens do see the changed text.
    before, after = outputs["dense"]
    assert not torch.allclose(after[vision], before[vision])


def test_dense_mode_equals_stock_qwen2_5_vl_with_the_same_weights(batch):
    model = testing.tiny_model(seed=4)
    stock = use_package_positions(testing.tiny_model(videonsa=False, seed=99))
    missing, unexpected = stock.load_state_dict(model.state_dict(), strict=False)
    assert missing == [] and all(".g_proj_" in key for key in unexpected) and len(unexpected) == 8
    model.set_attention_mode("dense")
    torch.testing.assert_close(_logits(model, batch), _logits(stock, batch), rtol=0, atol=0)
    # NSA mode is a different function of the same weights.
    model.set_attention_mode("nsa")
    assert not torch.allclose(_logits(model, batch), _logits(stock, batch), atol=1e-3)


def test_eager_attention_backend_gives_the_same_model(batch):
    sdpa = testing.tiny_model(seed=5)
    eager = testing.tiny_model(seed=5, attn_implementation="eager")
    torch.testing.assert_close(_logits(eager, batch), _logits(sdpa, batch), rtol=1e-4, atol=1e-5)


def test_each_sample_of_a_padded_batch_matches_running_it_alone(batch):
    model = testing.tiny_model(seed=6)
    together = _logits(model, batch)
    patches = batch.video_grid_thw.prod(dim=1).tolist()
    pixel_rows = [slice(0, patches[0]), slice(patches[0], patches[0] + patches[1])]
    for i in range(2):
        start = int((batch.attention_mask[i] == 0).sum())  # left padding
        alone = testing.TinyBatch(
            input_ids=batch.input_ids[i:i + 1, start:],
            attention_mask=batch.attention_mask[i:i + 1, start:],
            mm_token_type_ids=batch.mm_token_type_ids[i:i + 1, start:],
            pixel_values_videos=batch.pixel_values_videos[pixel_rows[i]],
            video_grid_thw=batch.video_grid_thw[i:i + 1],
        )
        torch.testing.assert_close(together[i, start:], _logits(model, alone)[0], rtol=1e-4, atol=1e-4)
    assert int((batch.attention_mask[1] == 0).sum()) > 0


def test_split_from_placeholder_ids_equals_split_from_mm_token_type_ids(batch):
    model = testing.tiny_model(seed=7)
    from_types = model.model.token_split(None, batch.mm_token_type_ids, batch.attention_mask)
    from_ids = model.model.token_split(batch.input_ids, None, batch.attention_mask)
    for name in ("vision_mask", "vision_batch", "vision_pos", "cu_seqlens", "text_pos", "text_valid"):
        assert torch.equal(getattr(from_types, name), getattr(from_ids, name)), name
    assert from_ids.cu_seqlens.tolist() == [0, 32, 40]
    # While decoding, some transformers versions pass the whole sequence's types: this chunk's are used.
    last = model.model.token_split(batch.input_ids[:, -1:], batch.mm_token_type_ids, batch.attention_mask)
    assert not last.has_vision and last.shape == (2, 1)


def test_modes_and_budget_switch_on_a_loaded_model_without_reloading(batch):
    model = testing.tiny_model(seed=8)
    nsa = _logits(model, batch)
    model.set_attention_mode("dense")
    dense = _logits(model, batch)
    assert model.config.text_config.attention_mode == "dense"
    model.set_attention_mode("nsa")
    torch.testing.assert_close(_logits(model, batch), nsa, rtol=0, atol=0)
    assert not torch.allclose(nsa, dense, atol=1e-3)

    model.set_sparsity(block_counts=4, window_size=4)
    assert model.sparse_settings.block_count == 4 and model.config.text_config.block_counts == 4
    assert all(layer.self_attn.settings.window_size == 4 for layer in model.model.language_model.layers)
    assert not torch.allclose(_logits(model, batch), nsa, atol=1e-4)
    with pytest.raises(UserError, match="unknown sparsity setting"):
        model.set_sparsity(block_count=4)
    with pytest.raises(UserError, match="attention_mode"):
        model.set_attention_mode("sparse")


def test_inputs_embeds_without_token_types_are_refused_in_nsa_mode(batch):
    model = testing.tiny_model(seed=9)
    embeds = model.get_input_embeddings()(batch.input_ids)
    kwargs = {**batch.as_kwargs(), "input_ids": None, "inputs_embeds": embeds, "mm_token_type_ids": None}
    kwargs.pop("pixel_values_videos"), kwargs.pop("video_grid_thw")
    with pytest.raises(UserError, match="pass mm_token_type_ids"):
        model(**kwargs)


def test_gradient_checkpointing_gives_the_same_gradients(batch):
    grads, calls = [], []
    for checkpointing in (False, True):
        model = testing.tiny_model(seed=10).train()
        if checkpointing:
            testing.enable_checkpointing(model, {"use_reentrant": False})
        attention = model.model.language_model.layers[0].self_attn
        count = []
        handle = attention.register_forward_hook(lambda *_, count=count: count.append(1))
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
        model(**batch.as_kwargs(), labels=labels).loss.backward()
        handle.remove()
        calls.append(len(count))
        grads.append({name: p.grad for name, p in model.named_parameters() if p.grad is not None})
    assert calls == [1, 2]  # the checkpointed layer ran again in backward, with its token split
    assert grads[0].keys() == grads[1].keys()
    gate = "model.language_model.layers.0.self_attn.g_proj_1.weight"
    assert gate in grads[1] and grads[1][gate].abs().sum() > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)


def test_packed_sequences_are_refused_in_nsa_mode(batch):
    model = testing.tiny_model(seed=11)
    single = testing.tiny_video_batch(((2, 4, 4),), text_before=3, text_after=2, seed=2)
    length = single.input_ids.shape[1]
    restart = torch.cat([torch.arange(length), torch.arange(length)])  # two samples in one row
    positions = restart.expand(4, 1, 2 * length)
    inputs = dict(input_ids=single.input_ids.repeat(1, 2), mm_token_type_ids=single.mm_token_type_ids.repeat(1, 2),
                  position_ids=positions)
    with pytest.raises(UserError, match="packed sequences"), torch.no_grad():
        model(**inputs)


def test_span_fast_path_gives_the_index_path_model_exactly(batch, monkeypatch):
    """The batch's samples each hold one video (one vision run): the split takes the slice path. Forcing the
    index path must give the same logits and gradients, bit for bit."""
    model = testing.tiny_model(seed=12).train()
    assert model.model.token_split(batch.input_ids, None, batch.attention_mask).spans is not None
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    build = modeling.build_token_split
    runs = []
    for force_index_path in (False, True):
        if force_index_path:
            monkeypatch.setattr(
                modeling, "build_token_split", lambda *args: dataclasses.replace(build(*args), spans=None)
            )
            assert model.model.token_split(batch.input_ids, None, batch.attention_mask).spans is None
        model.zero_grad()
        out = model(**batch.as_kwargs(), labels=labels)
        out.loss.backward()
        runs.append((out.logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()
                                           if p.grad is not None}))
    (fast_logits, fast_grads), (index_logits, index_grads) = runs
    assert torch.equal(fast_logits, index_logits)
    assert fast_grads.keys() == index_grads.keys()
    for name, grad in fast_grads.items():
        assert torch.equal(grad, index_grads[name]), name
    assert fast_grads["model.language_model.layers.0.self_attn.g_proj_1.weight"].abs().sum() > 0


@pytest.mark.parametrize("one_sample", [False, True], ids=["padded-pair", "one-sample"])
@pytest.mark.parametrize("heads", [(4, 2), (6, 3), (7, 1)], ids=["gqa4:2", "gqa6:3", "gqa7:1"])
def test_text_attention_equals_transformers_sdpa_with_repeated_key_value_heads(batch, heads, one_sample):
    """`dense_attend` folds each KV group's query heads into rows (padded pair) or needs no mask at all (one
    unpadded sample); transformers' SDPA path (what the layer called before) repeats K and V instead. Same
    result up to float rounding, forward and backward."""
    num_heads, num_kv_heads = heads
    model = testing.tiny_model(num_heads=num_heads, num_kv_heads=num_kv_heads, hidden_size=16 * num_heads, seed=13)
    attn = model.model.language_model.layers[0].self_attn
    if one_sample:
        batch = testing.tiny_video_batch(((2, 4, 4),), text_before=5, text_after=4, seed=3)
    split = model.model.token_split(batch.input_ids, None, batch.attention_mask)
    assert split.unpadded == one_sample and split.spans is not None
    generator = torch.Generator().manual_seed(0)
    batch_size, seq_len = split.shape
    dim = attn.head_dim
    q = torch.randn(batch_size, num_heads, split.text_pos.shape[1], dim, generator=generator)
    k, v = (torch.randn(batch_size, num_kv_heads, seq_len, dim, generator=generator) for _ in range(2))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    got = attn.dense_attend(*leaves, split)
    want, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](
        attn, *ref_leaves, split.text_attention_mask, dropout=0.0, scaling=attn.scaling
    )
    assert got.shape == want.shape == (batch_size, q.shape[2], num_heads, dim)
    torch.testing.assert_close(got, want)
    weights = torch.randn(got.shape, generator=generator)
    for grad, ref_grad in zip(torch.autograd.grad((got * weights).sum(), leaves),
                              torch.autograd.grad((want * weights).sum(), ref_leaves), strict=True):
        torch.testing.assert_close(grad, ref_grad)
