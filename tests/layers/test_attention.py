"""VideoNSA attention over a split batch, checked against the NSA operator per sample and plain softmax."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from videonsa.errors import UserError
from videonsa.layers import SparseSettings, build_token_split, sdpa_attend, videonsa_attention
from videonsa.layers.attention import decoding_sdpa, grouped_text_sdpa
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


def _expected(q, k, v, gates, vision, padding, settings, scale=None):
    """Vision: the NSA operator on each sample's own stream (no packing). Text: softmax over earlier real tokens."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
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


# scale None: the operator's default D ** -0.5; 0.9 (not the default) checks that both paths are given it.
@pytest.mark.parametrize("scale", [None, 0.9])
@pytest.mark.parametrize("heads_q,heads_kv", [(4, 2), (7, 1)])
def test_vision_queries_get_nsa_over_their_stream_and_text_queries_dense_causal_attention(heads_q, heads_kv, scale):
    q, k, v, gates, vision, padding = _batch(heads_q, heads_kv)
    split = build_token_split(vision, padding)
    got = videonsa_attention(q, k, v, gates, split, SETTINGS, attend=sdpa_attend(scale), scale=scale)
    torch.testing.assert_close(got, _expected(q, k, v, gates, vision, padding, SETTINGS, scale=scale))


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


def _contiguous_batch(heads_q=4, heads_kv=2, dim=8, dtype=torch.float64, seed=0):
    """Three samples of 20 tokens, each with at most one vision run: left padding, right padding, no vision."""
    generator = torch.Generator().manual_seed(seed)
    vision = torch.zeros(3, 20, dtype=torch.bool)
    vision[0, 5:17] = True
    vision[2, 2:9] = True
    padding = torch.ones(3, 20, dtype=torch.long)
    padding[0, :2] = 0
    padding[2, 15:] = 0
    rand = lambda *shape: torch.randn(*shape, generator=generator, dtype=dtype)  # noqa: E731
    q, k, v = rand(3, 20, heads_q, dim), rand(3, 20, heads_kv, dim), rand(3, 20, heads_kv, dim)
    gates = tuple(torch.rand(1, int(vision.sum()), heads_q, generator=generator, dtype=dtype) for _ in range(3))
    return q, k, v, gates, vision, padding


def _repeat_kv_sdpa(q, k, v, mask, scale=None):
    """The text attention as it was before folding: K and V repeated to the query heads, then SDPA."""
    groups = q.shape[1] // k.shape[1]
    k, v = (x.repeat_interleave(groups, dim=1) for x in (k, v))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(1, 2)


def _text_inputs(dtype, heads_q=6, heads_kv=2, dim=8, seed=0):
    """Text queries of `_contiguous_batch` (uneven text counts: invalid slots) and its keys."""
    q, k, v, _, vision, padding = _contiguous_batch(heads_q, heads_kv, dim, dtype=torch.float32, seed=seed)
    split = build_token_split(vision, padding)
    q_text = split.gather_text(q).transpose(1, 2)
    return [x.to(dtype) for x in (q_text, k.transpose(1, 2), v.transpose(1, 2))], split


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, {}), (torch.bfloat16, dict(rtol=2e-2, atol=2e-2))])
@pytest.mark.parametrize("heads_q,heads_kv", [(6, 2), (4, 4), (7, 1)])
def test_folded_text_attention_equals_sdpa_over_repeated_key_value_heads(dtype, tolerance, heads_q, heads_kv):
    (q, k, v), split = _text_inputs(dtype, heads_q, heads_kv)
    assert not split.text_valid.all()  # rows of invalid slots are compared too: both compute them
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    got = grouped_text_sdpa(*leaves, split, scale=0.3)
    want = _repeat_kv_sdpa(*ref_leaves, split.text_attention_mask, scale=0.3)
    assert got.shape == want.shape == (3, q.shape[2], heads_q, q.shape[3])
    torch.testing.assert_close(got, want, **tolerance)
    weights = torch.randn(got.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads = torch.autograd.grad((got * weights).float().sum(), leaves)
    ref_grads = torch.autograd.grad((want * weights).float().sum(), ref_leaves)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref_grad, **tolerance)
        assert grad.float().abs().sum() > 0
    # Head h must read KV head h // G: with the KV heads swapped the result changes.
    if heads_kv > 1:
        swapped = _repeat_kv_sdpa(q, k.flip(1), v.flip(1), split.text_attention_mask, scale=0.3)
        assert not torch.allclose(got.detach().float(), swapped.float(), **tolerance)


def test_folded_text_attention_applies_dropout_to_the_folded_rows():
    (q, k, v), split = _text_inputs(torch.float32)
    torch.manual_seed(0)
    dropped = grouped_text_sdpa(q, k, v, split, dropout_p=0.5)
    plain = grouped_text_sdpa(q, k, v, split)
    assert dropped.shape == plain.shape and not torch.allclose(dropped, plain)


def test_span_fast_path_gives_the_index_path_attention_and_gradients_exactly():
    q, k, v, gates, vision, padding = _contiguous_batch()
    split = build_token_split(vision, padding)
    assert split.spans == ((5, 17), (0, 0), (2, 9))
    general = dataclasses.replace(split, spans=None)
    outputs, grads = [], []
    weights = torch.randn(q.shape, generator=torch.Generator().manual_seed(3), dtype=q.dtype)
    for path in (split, general):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, *gates)]
        out = videonsa_attention(*leaves[:3], tuple(leaves[3:]), path, SETTINGS, attend=sdpa_attend())
        outputs.append(out)
        grads.append(torch.autograd.grad((out * weights).sum(), leaves))
    assert torch.equal(outputs[0], outputs[1])
    for fast, index in zip(*grads, strict=True):
        assert torch.equal(fast, index)
    torch.testing.assert_close(outputs[0], _expected(q, k, v, gates, vision, padding, SETTINGS))


ONE_SAMPLE_RUNS = {"middle": (5, 11), "start": (0, 7), "end": (9, 16), "all-vision": (0, 16), "no-vision": (0, 0)}


def _one_sample_text_inputs(run, dtype, heads_q=6, heads_kv=2, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    vision = torch.zeros(1, 16, dtype=torch.bool)
    vision[0, run[0]:run[1]] = True
    split = build_token_split(vision)
    q, k, v = (torch.randn(1, 16, heads, dim, generator=generator) for heads in (heads_q, heads_kv, heads_kv))
    q_text = split.gather_text(q).transpose(1, 2)
    return [x.to(dtype) for x in (q_text, k.transpose(1, 2), v.transpose(1, 2))], split


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, {}), (torch.bfloat16, dict(rtol=2e-2, atol=2e-2))])
@pytest.mark.parametrize("name", list(ONE_SAMPLE_RUNS))
def test_one_unpadded_sample_runs_text_attention_without_a_mask(name, dtype, tolerance):
    (q, k, v), split = _one_sample_text_inputs(ONE_SAMPLE_RUNS[name], dtype)
    assert split.unpadded and split.spans == (ONE_SAMPLE_RUNS[name],)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    got = grouped_text_sdpa(*leaves, split, scale=0.3)
    assert "text_attention_mask" not in split.__dict__  # the mask-free path ran: no mask was ever built
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    want = _repeat_kv_sdpa(*ref_leaves, split.text_attention_mask, scale=0.3)
    assert got.shape == want.shape == (1, q.shape[2], 6, 8)
    torch.testing.assert_close(got, want, **tolerance)
    if got.numel():
        weights = torch.randn(got.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        for grad, ref_grad in zip(torch.autograd.grad((got * weights).float().sum(), leaves),
                                  torch.autograd.grad((want * weights).float().sum(), ref_leaves), strict=True):
            torch.testing.assert_close(grad, ref_grad, **tolerance)
            assert grad.float().abs().sum() > 0


def test_padding_or_several_samples_keep_the_masked_text_attention():
    (q, k, v), split = _one_sample_text_inputs((5, 11), torch.float32)
    vision = split.vision_mask
    padded = build_token_split(vision, torch.cat((torch.zeros(1, 2), torch.ones(1, 14)), dim=1))
    assert not padded.unpadded and padded.spans == ((5, 11),)
    grouped_text_sdpa(q, k, v, padded)
    assert "text_attention_mask" in padded.__dict__
    two = build_token_split(vision.expand(2, -1))
    assert two.unpadded and two.spans == ((5, 11), (5, 11))
    grouped_text_sdpa(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1), two)
    assert "text_attention_mask" in two.__dict__


def test_mask_free_text_attention_under_autocast_runs_in_the_autocast_dtype():
    """Under autocast q and k arrive in float32 (rotary) and v in bfloat16; both paths compute in bfloat16."""
    (q, k, v), split = _one_sample_text_inputs((5, 11), torch.float32)
    v = v.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = grouped_text_sdpa(q, k, v, split, scale=0.3)
        want = _repeat_kv_sdpa(q, k, v, split.text_attention_mask, scale=0.3)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("one_sample", [True, False], ids=["mask-free", "folded-mask"])
def test_text_attention_on_the_gpu_kernels_matches_repeated_key_value_heads(one_sample):
    """7B head shapes in bfloat16 on CUDA, where the mask-free path takes the flash kernel and the folded one
    a masked kernel (cuDNN or memory-efficient): both against SDPA over repeated K/V heads, forward and
    backward, within bfloat16 rounding."""
    seq_len, text = 8192, 64
    generator = torch.Generator(device="cuda").manual_seed(0)
    vision = torch.zeros(1 if one_sample else 2, seq_len, dtype=torch.bool, device="cuda")
    vision[:, text:seq_len - text] = True
    padding = None
    if not one_sample:
        vision[1, seq_len - 2 * text:] = False  # a shorter video, then right padding
        padding = torch.ones(2, seq_len, dtype=torch.long, device="cuda")
        padding[1, seq_len - text:] = 0
    split = build_token_split(vision, padding)
    assert split.unpadded == one_sample
    rand = lambda *shape: torch.randn(*shape, generator=generator, device="cuda", dtype=torch.bfloat16)  # noqa: E731
    batch = vision.shape[0]
    q = split.gather_text(rand(batch, seq_len, 28, 128)).transpose(1, 2)
    k, v = rand(batch, 4, seq_len, 128), rand(batch, 4, seq_len, 128)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    got = grouped_text_sdpa(*leaves, split, scale=128 ** -0.5)
    want = _repeat_kv_sdpa(*ref_leaves, split.text_attention_mask, scale=128 ** -0.5)
    valid = split.text_valid
    torch.testing.assert_close(got[valid], want[valid], rtol=2e-2, atol=2e-2)
    weights = rand(*got.shape) * valid[..., None, None]
    grads = torch.autograd.grad((got * weights).float().sum(), leaves)
    ref_grads = torch.autograd.grad((want * weights).float().sum(), ref_leaves)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(grad, ref_grad, rtol=2e-2, atol=2e-2)


def _history(vision, padding, end):
    from videonsa.layers import TokenHistory

    real = padding[:, :end].bool()
    return TokenHistory(vision[:, :end] & real, real, bool(real.all()))


@pytest.mark.parametrize("cut", [3, 8, 10, 16, 23])
def test_a_chunk_after_cached_tokens_gives_the_rows_of_one_pass(cut):
    # The batch's last 24 - cut tokens as a chunk after `cut` cached ones (k, v of all 24 tokens): every output
    # row equals one pass. Cuts fall in the padding (3), inside a block (10), between sample 1's two vision runs
    # (16, where sample 0 still has vision) and on the last token (23).
    q, k, v, gates, vision, padding = _batch(seed=4)
    attend = sdpa_attend(scale=q.shape[-1] ** -0.5)
    whole = videonsa_attention(q, k, v, gates, build_token_split(vision, padding), SETTINGS, attend,
                               scale=q.shape[-1] ** -0.5)
    split = build_token_split(vision[:, cut:], padding, _history(vision, padding, cut))
    counts = (vision & padding.bool()).sum(dim=1).tolist()
    cached = (vision[:, :cut] & padding[:, :cut].bool()).sum(dim=1).tolist()
    # The chunk's gates: each sample's vision tokens after the cut, in packed order.
    chunk_gates = tuple(torch.cat([g[:, sum(counts[:b]) + cached[b]: sum(counts[: b + 1])] for b in range(2)], dim=1)
                        for g in gates)
    cache_before = k.clone(), v.clone()
    out = videonsa_attention(q[:, cut:], k, v, chunk_gates, split, SETTINGS, attend, scale=q.shape[-1] ** -0.5)
    real = padding[:, cut:].bool()
    torch.testing.assert_close(out[real], whole[:, cut:][real], rtol=1e-10, atol=1e-10)
    # The keys and values the chunk reads are the cache later chunks read too: the call leaves them as they were.
    assert torch.equal(k, cache_before[0]) and torch.equal(v, cache_before[1])


def test_one_sample_chunk_takes_the_mask_free_text_path_with_the_cache():
    # One unpadded sample, one vision run: the text of a chunk after cached tokens runs SDPA with bottom-right
    # causal masks over the cache (no mask tensor), equal to one pass.
    generator = torch.Generator().manual_seed(7)
    vision = torch.zeros(1, 30, dtype=torch.bool)
    vision[0, 5:22] = True
    padding = torch.ones(1, 30, dtype=torch.long)
    q, k, v = (torch.randn(1, 30, h, 8, generator=generator, dtype=torch.float64) for h in (4, 2, 2))
    gates = tuple(torch.rand(1, 17, 4, generator=generator, dtype=torch.float64) for _ in range(3))
    attend = sdpa_attend()
    whole = videonsa_attention(q, k, v, gates, build_token_split(vision, padding), SETTINGS, attend)
    for cut in (2, 5, 13, 25):
        split = build_token_split(vision[:, cut:], padding, _history(vision, padding, cut))
        assert split.unpadded and split.spans is not None and split.past == cut
        vision_before = int(vision[0, :cut].sum())
        chunk_gates = tuple(g[:, vision_before:] for g in gates)
        out = videonsa_attention(q[:, cut:], k, v, chunk_gates, split, SETTINGS, attend)
        torch.testing.assert_close(out, whole[:, cut:], rtol=1e-10, atol=1e-10)


def test_a_chunk_split_refuses_keys_that_do_not_cover_the_cache():
    q, k, v, gates, vision, padding = _batch()
    split = build_token_split(vision[:, 10:], padding, _history(vision, padding, 10))
    with pytest.raises(ValueError, match="follows 10 cached tokens but k holds 14"):
        videonsa_attention(q[:, 10:], k[:, 10:], v[:, 10:], gates, split, SETTINGS, sdpa_attend())


def _enabled_sdpa_backends() -> set[SDPBackend]:
    flags = torch.backends.cuda
    return {backend for backend, on in ((SDPBackend.CUDNN_ATTENTION, flags.cudnn_sdp_enabled()),
                                        (SDPBackend.FLASH_ATTENTION, flags.flash_sdp_enabled()),
                                        (SDPBackend.EFFICIENT_ATTENTION, flags.mem_efficient_sdp_enabled()),
                                        (SDPBackend.MATH, flags.math_sdp_enabled())) if on}


CUDNN, FLASH, EFFICIENT, MATH = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                                 SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


@pytest.mark.parametrize(("enabled", "inside"), [
    ({CUDNN, FLASH, EFFICIENT, MATH}, {FLASH, EFFICIENT, MATH}),
    ({CUDNN, EFFICIENT, MATH}, {EFFICIENT, MATH}),  # a backend turned off stays off
    ({FLASH, MATH}, {FLASH, MATH}),  # cuDNN off already: unchanged
    ({CUDNN}, {CUDNN}),  # nothing else to run on: unchanged
])
def test_decoding_sdpa_leaves_cudnn_out_of_the_enabled_backends(enabled, inside):
    overrideable = getattr(torch._C, "_get_overrideable_sdp_enabled", lambda: None)  # other devices' backend
    with sdpa_kernel(sorted(enabled, key=lambda backend: backend.value)):
        before = overrideable()
        with decoding_sdpa():
            assert _enabled_sdpa_backends() == inside
            assert overrideable() == before
        assert _enabled_sdpa_backends() == enabled


def test_decoding_sdpa_turns_cudnn_back_on_after_an_error():
    with pytest.raises(RuntimeError, match="in a decoding step"), decoding_sdpa():
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        raise RuntimeError("in a decoding step")
    assert torch.backends.cuda.cudnn_sdp_enabled()
