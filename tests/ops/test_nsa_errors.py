"""Misuse of `nsa_attention` fails with one clear ValueError naming the problem; odd-but-valid inputs work."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from videonsa.ops import nsa_attention, nsa_attention_parts

B, T, HQ, HKV, D = 1, 12, 4, 2, 8


def valid_call() -> tuple[dict[str, torch.Tensor], dict]:
    """Inputs and settings of a call that works; each test breaks one thing."""
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "q": torch.randn(B, T, HQ, D, generator=gen),
        "k": torch.randn(B, T, HKV, D, generator=gen),
        "v": torch.randn(B, T, HKV, D, generator=gen),
        "g_cmp": torch.rand(B, T, HQ, generator=gen),
        "g_slc": torch.rand(B, T, HQ, generator=gen),
        "g_swa": torch.rand(B, T, HQ, generator=gen),
    }
    settings = dict(block_size=4, block_count=2, window_size=4, init_blocks=0, local_blocks=1)
    return tensors, settings


def _replace(name: str, make: Callable[[dict[str, torch.Tensor]], torch.Tensor]):
    def change(tensors: dict[str, torch.Tensor], settings: dict) -> None:
        tensors[name] = make(tensors)

    return change


def _setting(**changes):
    def change(tensors: dict[str, torch.Tensor], settings: dict) -> None:
        settings.update(changes)

    return change


def _three_kv_heads(tensors: dict[str, torch.Tensor], settings: dict) -> None:
    tensors["k"], tensors["v"] = torch.randn(B, T, 3, D), torch.randn(B, T, 3, D)


def _batch_of_two(tensors: dict[str, torch.Tensor], settings: dict) -> None:
    for name, x in tensors.items():
        tensors[name] = torch.cat([x, x])
    settings["cu_seqlens"] = torch.tensor([0, 5, T], dtype=torch.int32)


MISUSES = {
    "q_not_4d": (_replace("q", lambda t: t["q"][0]), r"q must be \[B, T, HQ, D\]"),
    "k_other_length": (_replace("k", lambda t: t["k"][:, :-1]), r"k must be \[B=1, T=12, HKV, D=8\]"),
    "v_other_head_dim": (_replace("v", lambda t: t["v"][..., :-1]), r"v must be \[B=1, T=12, HKV, D=8\]"),
    "k_v_heads_differ": (_replace("v", lambda t: t["v"][:, :, :1]), r"k and v shapes differ"),
    "hq_not_multiple_of_hkv": (_three_kv_heads, r"HQ=4 is not a multiple of HKV=3"),
    "gate_shape": (_replace("g_slc", lambda t: t["g_slc"][..., :1]), r"g_slc must be \[B, T, HQ\]"),
    "dtype_mismatch": (_replace("k", lambda t: t["k"].double()), r"k has dtype torch.float64 but q has"),
    "gate_dtype_mismatch": (_replace("g_swa", lambda t: t["g_swa"].half()), r"g_swa has dtype torch.float16"),
    "integer_inputs": (_replace("q", lambda t: t["q"].long()), r"q must be floating point"),
    "device_mismatch": (_replace("v", lambda t: t["v"].to("meta")), r"v is on meta but q is on cpu"),
    "cu_seqlens_not_from_zero": (
        _setting(cu_seqlens=torch.tensor([1, 5, T], dtype=torch.int32)), r"cu_seqlens must start at 0"
    ),
    "cu_seqlens_repeated": (
        _setting(cu_seqlens=torch.tensor([0, 5, 5, T], dtype=torch.int32)), r"strictly increasing"
    ),
    "cu_seqlens_decreasing": (
        _setting(cu_seqlens=torch.tensor([0, 7, 5, T], dtype=torch.int32)), r"strictly increasing"
    ),
    "cu_seqlens_short_of_T": (
        _setting(cu_seqlens=torch.tensor([0, 5, T - 1], dtype=torch.int32)), r"cu_seqlens ends at 11"
    ),
    "cu_seqlens_beyond_T": (
        _setting(cu_seqlens=torch.tensor([0, 5, T + 3], dtype=torch.int32)), r"cu_seqlens ends at 15"
    ),
    "cu_seqlens_with_batch": (_batch_of_two, r"cu_seqlens needs batch size 1"),
    "cu_seqlens_float": (_setting(cu_seqlens=torch.tensor([0.0, 5.0, T])), r"cu_seqlens must be an integer"),
    "cu_seqlens_2d": (_setting(cu_seqlens=torch.tensor([[0, T]], dtype=torch.int32)), r"cu_seqlens must be 1-D"),
    "block_count_below_forced": (
        _setting(init_blocks=2, local_blocks=2, block_count=3), r"block_count=3 is smaller than the forced"
    ),
    "block_size_zero": (_setting(block_size=0), r"block_size must be positive"),
    "block_count_zero": (_setting(block_count=0, local_blocks=0), r"block_count must be positive"),
    "window_negative": (_setting(window_size=-4), r"window_size must be positive"),
    "init_blocks_negative": (_setting(init_blocks=-1), r"init_blocks must be >= 0"),
    "local_blocks_negative": (_setting(local_blocks=-1), r"local_blocks must be >= 0"),
}


@pytest.mark.parametrize("entry", [nsa_attention, nsa_attention_parts], ids=["attention", "parts"])
@pytest.mark.parametrize("misuse", list(MISUSES))
def test_misuse_raises_a_clear_value_error(misuse: str, entry: Callable) -> None:
    tensors, settings = valid_call()
    entry(**tensors, **settings)  # the unbroken call works
    change, message = MISUSES[misuse]
    change(tensors, settings)
    with pytest.raises(ValueError, match=message) as raised:
        entry(**tensors, **settings)
    text = str(raised.value)
    assert text.startswith("nsa_attention:") and "\n" not in text


def test_empty_sequence_gives_empty_parts_and_gradients() -> None:
    """T = 0 (e.g. a batch without vision tokens) is not an error: every part is empty, backward works."""
    tensors, settings = valid_call()
    tensors = {name: x[:, :0].clone().requires_grad_() for name, x in tensors.items()}
    parts = nsa_attention_parts(**tensors, **settings)
    assert parts.o.shape == (B, 0, HQ, D) and parts.o.dtype == tensors["q"].dtype
    assert parts.block_indices.shape == (B, 0, HKV, settings["block_count"])
    assert parts.lse_cmp.shape == (B, 0, HQ)
    parts.o.sum().backward()
    assert tensors["q"].grad.shape == tensors["q"].shape


NON_INTEGER_SIZES = {
    "block_size_float": (dict(block_size=4.0), r"block_size must be an integer, got 4.0"),
    "window_size_fraction": (dict(window_size=4.5), r"window_size must be an integer, got 4.5"),
    "block_count_bool": (dict(block_count=True, local_blocks=0), r"block_count must be an integer, got True"),
    "local_blocks_bool": (dict(local_blocks=False), r"local_blocks must be an integer, got False"),
}


@pytest.mark.parametrize("case", list(NON_INTEGER_SIZES))
def test_float_or_bool_sizes_are_refused_not_rounded(case: str) -> None:
    tensors, settings = valid_call()
    changes, message = NON_INTEGER_SIZES[case]
    with pytest.raises(ValueError, match=message):
        nsa_attention(**tensors, **{**settings, **changes})


def test_integer_like_sizes_are_accepted() -> None:
    """Sizes that are integers of another type (numpy, 0-d tensors read with int()) give the same result."""
    import numpy as np

    tensors, settings = valid_call()
    expected = nsa_attention(**tensors, **settings)
    numpy_sizes = {name: np.int64(value) for name, value in settings.items()}
    torch.testing.assert_close(nsa_attention(**tensors, **numpy_sizes), expected, rtol=0, atol=0)


def test_zero_head_dim_is_a_clear_error() -> None:
    tensors, settings = valid_call()
    for name in ("q", "k", "v"):
        tensors[name] = tensors[name][..., :0]
    with pytest.raises(ValueError, match=r"nsa_attention: head dimension D must be positive, got D=0"):
        nsa_attention(**tensors, **settings)


def test_zero_query_heads_is_a_clear_error() -> None:
    tensors, settings = valid_call()
    tensors["q"] = tensors["q"][:, :, :0]
    for name in ("g_cmp", "g_slc", "g_swa"):
        tensors[name] = tensors[name][..., :0]
    with pytest.raises(ValueError, match=r"nsa_attention: HQ=0"):
        nsa_attention(**tensors, **settings)


@pytest.mark.parametrize("entry", [nsa_attention, nsa_attention_parts], ids=["attention", "parts"])
def test_empty_batch_gives_empty_result_and_gradients(entry: Callable) -> None:
    """B = 0 is an empty batch, not an error: the output is empty and backward gives empty gradients."""
    tensors, settings = valid_call()
    tensors = {name: x[:0].clone().requires_grad_() for name, x in tensors.items()}
    result = entry(**tensors, **settings)
    parts = result if entry is nsa_attention_parts else None
    output = result.o if parts is not None else result
    assert output.shape == (0, T, HQ, D) and output.dtype == tensors["q"].dtype
    if parts is not None:
        assert parts.block_indices.shape == (0, T, HKV, settings["block_count"])
        assert parts.lse_cmp.shape == (0, T, HQ)
    output.sum().backward()
    for name, x in tensors.items():
        assert x.grad is not None and x.grad.shape == x.shape, name


def test_empty_batch_is_still_checked() -> None:
    tensors, settings = valid_call()
    tensors = {name: x[:0] for name, x in tensors.items()}
    with pytest.raises(ValueError, match=r"block_size must be positive"):
        nsa_attention(**tensors, **{**settings, "block_size": 0})
