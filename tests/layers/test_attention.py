"""VideoNSA attention over a split batch, checked against the NSA operator per sample and plain softmax."""

import math

import pytest
import torch

from videonsa.errors import UserError
from videonsa.layers import SparseSettings, build_token_split, sdpa_attend, videonsa_attention
from videonsa.ops import nsa_attention

SETTINGS = SparseSettings(block_size=4, block_count=2, window_size=6, init_blocks=0, local_blocks=1)


def _batch(heads_q=4, heads_kv=2, dim=8, dtype=torch.float64, seed=0):
    """Two samples of 24 tokens: sample 0 left-padded by 3 with 13 vision tokens, sample 1 with two vision
    runs (9 + 4 tokens) separated by text."""
    generator = torch.Generator().manual_seed(seed)
    vision = torch.zeros(2, 24, dtype=torch.bool)
    vision[0, 6:19] = True
    vision[1, 2:11] = True
    vision[1, 15:19] = True
    padding = torch.ones(2, 24, dtype=torch.long)
    padding[0, :3] = 0
    rand = lambda *shape: torch.randn(*shape, generator=generator, dtype=dtype)  # noqa: E731
    q, k, v = rand(2, 24, heads_q, dim), rand(2, 24, heads_kv, dim), rand(2, 24, heads_kv, dim)
    n_vision = int(vision.sum())
    gates = tuple(torch.rand(1, n_vision, heads_q, generator=generator, dtype=dtype) for _ in range(3))
    return q, k, v, gates, vision, padding


def _softmax_attention(q, k, v, visible, scale):
    """One query: q [HQ, D], k/v [T, HKV, D], visible bool [T] -> [HQ, D], GQA by head groups."""
    groups = q.shape[0] // k.shape[1]
    out = []
    for head in range(q.shape[0]):
        keys, values = k[visible, head // groups], v[visible, head // groups]
        weights = torch.softmax(keys @ q[head] * scale, dim=0)
        out.append(weights @ values)
    return torch.stack(out)


def _expected(q, k, v, gates, vision, padding, settings):
    """Vision: the NSA operator on each sample's own stream (no packing). Text: softmax over earlier real tokens."""
    scale = q.shape[-1] ** -0.5
    out = torch.zeros_like(q)
    offset = 0
    for b in range(q.shape[0]):
        real = padding[b].bool()
        positions = (vision[b] & real).nonzero().flatten()
        n = len(positions)
        sample_gates = [g[:, offset:offset + n] for g in gates]
        offset += n
        o = nsa_attention(
            q[b, positions][None], k[b, positions][None], v[b, positions][None], *sample_gates,
            scale=scale, **settings.nsa_kwargs(),
        )
        out[b, positions] = o[0]
        for t in range(q.shape[1]):
            if vision[b, t] and real[t]:
                continue
            visible = real & (torch.arange(q.shape[1]) <= t)
            visible[t] = True
            out[b, t] = _softmax_attention(q[b, t], k[b], v[b], visible, scale)
    return out


@pytest.mark.parametrize("heads_q,heads_kv", [(4, 2), (7, 1)])
def test_vision_queries_get_nsa_over_their_stream_and_text_queries_dense_causal_attention(heads_q, heads_kv):
    q, k, v, gates, vision, padding = _batch(heads_q, heads_kv)
    split = build_token_split(vision, padding)
    got = videonsa_attention(q, k, v, gates, split, SETTINGS, attend=sdpa_attend())
    torch.testing.assert_close(got, _expected(q, k, v, gates, vision, padding, SETTINGS))


def test_gradients_match_the_per_sample_composition():
    q, k, v, gates, vision, padding = _batch()
    leaves = [x.clone().requires_grad_() for x in (q, k, v, *gates)]
    split = build_token_split(vision, padding)
    got = videonsa_attention(*leaves[:3], tuple(leaves[3:]), split, SETTINGS, attend=sdpa_attend())
    weights = torch.randn_like(got)
    got_grads = torch.autograd.grad((got * weights).sum(), leaves)

    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v, *gates)]
    ref = _expected(*ref_leaves[:3], tuple(ref_leaves[3:]), vision, padding, SETTINGS)
    ref_grads = torch.autograd.grad((ref * weights).sum(), ref_leaves)
    for got_grad, ref_grad in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(got_grad, ref_grad)
    assert all(g.abs().sum() > 0 for g in got_grads)


def test_vision_outputs_ignore_text_keys_and_text_outputs_see_vision_keys():
    q, k, v, gates, vision, padding = _batch()
    split = build_token_split(vision, padding)
    base = videonsa_attention(q, k, v, gates, split, SETTINGS, attend=sdpa_attend())
    k2, v2 = k.clone(), v.clone()
    k2[1, 12], v2[1, 12] = torch.randn(2, 8, dtype=k.dtype), torch.randn(2, 8, dtype=v.dtype)  # a text token
    changed = videonsa_attention(q, k2, v2, gates, split, SETTINGS, attend=sdpa_attend())
    torch.testing.assert_close(changed[vision], base[vision], rtol=0, atol=0)
    assert not torch.allclose(changed[1, 12:], base[1, 12:])  # later text tokens see it
    k3 = k.clone()
    k3[1, 3] += 1.0  # a vision token: the text token right after the first run attends to it
    assert not torch.allclose(videonsa_attention(q, k3, v, gates, split, SETTINGS, attend=sdpa_attend())[1, 11],
                              base[1, 11])


def test_padding_keys_are_never_attended():
    q, k, v, gates, vision, padding = _batch()
    split = build_token_split(vision, padding)
    base = videonsa_attention(q, k, v, gates, split, SETTINGS, attend=sdpa_attend())
    k2 = k.clone()
    k2[0, :3] = 100.0  # padding of sample 0
    changed = videonsa_attention(q, k2, v, gates, split, SETTINGS, attend=sdpa_attend())
    torch.testing.assert_close(changed[0, 3:], base[0, 3:], rtol=0, atol=0)


def test_settings_are_validated_with_one_line_user_errors():
    with pytest.raises(UserError, match="attention_mode"):
        SparseSettings(mode="sparse")
    with pytest.raises(UserError, match="block_count=1 is smaller than the forced blocks"):
        SparseSettings(block_count=1, init_blocks=1, local_blocks=1)
    with pytest.raises(UserError, match="block_size must be positive"):
        SparseSettings(block_size=0)
    with pytest.raises(UserError, match="gate_temperature"):
        SparseSettings(gate_temperature=0.0)
    with pytest.raises(UserError, match="window_size must be an integer"):
        SparseSettings(window_size=math.pi)
    assert SparseSettings().nsa_kwargs() == dict(
        block_size=64, block_count=32, window_size=256, init_blocks=0, local_blocks=1
    )
