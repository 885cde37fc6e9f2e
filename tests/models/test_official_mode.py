"""The whole model in attention_mode "official" against the same model whose attention layers run the naive
float64 oracle of the original evaluation attention (tests/layers/naive_official.py, docs/official-mode.md).

The oracle layer computes q, k, v from the layer's own projections and rotary embedding, the gate logits from
g_proj_1 / g_proj_2, and tells vision from text as the original does: by the M-RoPE position ids the model
hands its text model (a token is text when its temporal, height and width ids are equal), not by the
placeholder ids. The prompt's video grid (3 x 6 x 6 tokens, 2 position ids per temporal group) makes the
first token of each temporal group's diagonal, (g, 2g, 2g), look like text to that rule: 3 video tokens are
misclassified, as in the original.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen

from videonsa import testing
from videonsa.models.chunked_prefill import CACHE_KWARG

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "layers"))
from naive_official import mrope_is_vision, naive_dense, naive_official_attention  # noqa: E402

GRID = (3, 12, 12)  # patches; 3 temporal groups of 6 x 6 tokens after the 2 x 2 merge


@pytest.fixture(scope="module")
def model():
    # 4 query heads, 2 KV heads, head_dim 16; blocks of 8 with 5 -> 8 selected slots (the top-k network's whole
    # width) over 17 blocks, so several chunks of the network run.
    model = testing.tiny_model(block_size=8, block_counts=5, window_size=16, seed=3)
    return model.to(torch.float64)


@pytest.fixture(scope="module")
def prompt() -> dict[str, torch.Tensor]:
    batch = testing.tiny_video_batch((GRID,), text_before=14, text_after=9, seed=2).as_kwargs()
    batch["pixel_values_videos"] = batch["pixel_values_videos"].to(torch.float64)
    return batch


class OracleAttention:
    """Replaces every text attention layer's forward by the oracle while active; records the M-RoPE ids the
    model passes to its text model (the oracle's token types come from them)."""

    def __init__(self, model, *, is_vision_override: torch.Tensor | None = None) -> None:
        self.model = model
        self.is_vision_override = is_vision_override
        self.position_ids: torch.Tensor | None = None
        self.layers = [layer.self_attn for layer in model.model.language_model.layers]

    def __enter__(self) -> OracleAttention:
        self.hook = self.model.model.language_model.register_forward_pre_hook(self._record_positions, with_kwargs=True)
        for attention in self.layers:
            attention.forward = functools.partial(self._forward, attention)
        return self

    def __exit__(self, *exc) -> None:
        self.hook.remove()
        for attention in self.layers:
            del attention.forward

    def _record_positions(self, _module, _args, kwargs) -> None:
        position_ids = kwargs["position_ids"]
        assert position_ids.ndim == 3 and position_ids.shape[0] in (3, 4)
        self.position_ids = position_ids[-3:]  # (temporal, height, width); a leading text row is dropped

    def _forward(
        self, attention, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
        position_embeddings=None, *, cache=None, **kwargs,
    ):
        cache = cache if cache is not None else past_key_values
        batch, length, _ = hidden_states.shape
        shape = (batch, length, -1, attention.head_dim)
        q = attention.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = attention.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = attention.v_proj(hidden_states).view(shape).transpose(1, 2)
        q, k = qwen.apply_rotary_pos_emb(q, k, *position_embeddings)
        cached = cache.get_seq_length(attention.layer_idx) if cache is not None else 0
        if cache is not None:
            k, v = cache.update(k, v, attention.layer_idx)  # the cache keeps the unmasked keys and values
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # [B, T, H, D]
        is_vision = mrope_is_vision(self.position_ids)
        if self.is_vision_override is not None and not cached:
            is_vision = self.is_vision_override
        if cached:
            # A decoding step: its ids are equal (text), so the original attends densely over every cached key.
            assert not bool(is_vision.any())
            output = naive_dense(q, k, v, attention.scaling)
        else:
            gate_logits = attention.g_proj_2(F.gelu(attention.g_proj_1(hidden_states)))
            settings = attention.settings
            output = naive_official_attention(
                q, k, v, is_vision, gate_logits.view(batch, length, attention.num_heads, 3),
                block_size=settings.block_size, block_counts=settings.block_count,
                window_size=settings.window_size, scale=attention.scaling,
                gate_temperature=settings.gate_temperature,
            )
        return attention.o_proj(output.reshape(batch, length, -1).to(hidden_states.dtype)), None


def _placeholder_is_vision(prompt) -> torch.Tensor:
    return prompt["input_ids"] == testing.TOKEN_IDS["<|video_pad|>"]


@torch.no_grad()
def test_official_mode_prefill_logits_match_the_oracle(model, prompt):
    model.set_attention_mode("official")
    try:
        official = model(**prompt).logits
    finally:
        model.set_attention_mode("nsa")
    with OracleAttention(model) as oracle:
        expected = model(**prompt).logits
    # The case holds video tokens the position rule calls text (and nothing else differs).
    heuristic, placeholders = mrope_is_vision(oracle.position_ids), _placeholder_is_vision(prompt)
    assert bool((heuristic <= placeholders).all())
    assert int((placeholders & ~heuristic).sum()) == 3
    torch.testing.assert_close(official, expected, rtol=0, atol=1e-9)


@torch.no_grad()
def test_the_oracle_tells_vision_by_positions_not_placeholders(model, prompt):
    """Guards the test above: with the placeholders' token types the oracle's logits differ, so the position
    rule is what the comparison checks."""
    with OracleAttention(model):
        by_positions = model(**prompt).logits
    with OracleAttention(model, is_vision_override=_placeholder_is_vision(prompt)):
        by_placeholders = model(**prompt).logits
    assert (by_positions - by_placeholders).abs().max() > 1e-6


def _prefill_and_one_step(model, prompt) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the prompt and of one greedy decoding step through the KV cache, in float64."""
    prefill = model(**prompt, use_cache=True)
    token = prefill.logits[:, -1:].argmax(-1)
    # No attention mask (one unpadded sample): transformers then places the token at cache length + the
    # prompt's rope delta, i.e. right after the prompt's largest position id, equal in all three rows.
    step = model(input_ids=token, mm_token_type_ids=torch.zeros_like(token), use_cache=True,
                 **{CACHE_KWARG: prefill.past_key_values})  # the keyword this transformers version takes
    return prefill.logits, step.logits


@torch.no_grad()
def test_official_mode_decodes_densely_over_the_cache(model, prompt):
    """One decoding step after the prompt: the new token (text by its position ids) attends densely over every
    cached key, the prompt's vision tokens included, with the unmasked keys and values the prefill cached."""
    model.set_attention_mode("official")
    try:
        official_prefill, official_step = _prefill_and_one_step(model, prompt)
    finally:
        model.set_attention_mode("nsa")
    with OracleAttention(model):
        expected_prefill, expected_step = _prefill_and_one_step(model, prompt)
    torch.testing.assert_close(official_prefill, expected_prefill, rtol=0, atol=1e-9)
    assert official_step.shape == (1, 1, official_prefill.shape[-1])
    torch.testing.assert_close(official_step, expected_step, rtol=0, atol=1e-9)


@torch.no_grad()
def test_official_mode_generates_like_the_oracle(model, prompt):
    """generate() end to end (its own cache and positions): same greedy tokens; the scores it returns are float32,
    so they agree to float32 rounding."""
    kwargs = dict(max_new_tokens=3, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    model.set_attention_mode("official")
    try:
        official = model.generate(**prompt, **kwargs)
    finally:
        model.set_attention_mode("nsa")
    with OracleAttention(model):
        expected = model.generate(**prompt, **kwargs)
    assert torch.equal(official.sequences, expected.sequences)
    assert len(official.logits) == len(expected.logits) == 3
    for step_official, step_expected in zip(official.logits, expected.logits, strict=True):
        torch.testing.assert_close(step_official, step_expected, rtol=1e-6, atol=1e-7)
