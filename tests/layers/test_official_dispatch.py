"""`official_attention`: input checks, the choice between the PyTorch blocks and the kernels, and the fast path
(Triton compression / top-k / selection / window with the gated sum folded into the kernels) against the reference
path on tiny float32 and float16 inputs.

The kernel cases run like tests/ops/test_triton_*.py: directly on a CUDA GPU, otherwise once in a child pytest
under TRITON_INTERPRET=1 (`test_under_interpreter`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ops"))
from interpreter_harness import DEVICE, interpreter_tests  # noqa: E402

import videonsa.layers.official as official  # noqa: E402
from videonsa.layers import official_attention  # noqa: E402
from videonsa.ops.triton import window  # noqa: E402

kernel_test, test_under_interpreter = interpreter_tests(window._swa_fwd_kernel, __file__, min_passed=20)


def make_inputs(batch, seq_len, heads_q, heads_kv, dim, seed, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_len, heads_q, dim, generator=gen)
    k = torch.randn(batch, seq_len, heads_kv, dim, generator=gen)
    v = torch.randn(batch, seq_len, heads_kv, dim, generator=gen)
    logits = torch.randn(batch, seq_len, heads_q, 3, generator=gen)
    return tuple(x.to(device, dtype) for x in (q, k, v, logits))


def vision_layout(batch: int, seq_len: int, device="cpu") -> torch.Tensor:
    """A text prefix, a vision run with one misclassified token inside, a text suffix; the second sample's
    text prefix is longer."""
    is_vision = torch.zeros(batch, seq_len, dtype=torch.bool)
    for b in range(batch):
        is_vision[b, 5 + 7 * b : seq_len - 6] = True
        is_vision[b, 30] = False
    return is_vision.to(device)


# ----------------------------------------------------------------------------------------------------------
# Checks and the choice of path (no kernels needed)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(q=torch.zeros(1, 8, 40, 4)), "2 \\* HQ <= 64"),
        (dict(k=torch.zeros(1, 8, 4, 4), v=torch.zeros(1, 8, 4, 4)), "HQ=6 is not a multiple of HKV=4"),
        (dict(k=torch.zeros(1, 8, 3, 4), v=torch.zeros(1, 8, 3, 4)), "64 % HKV == 0"),
        (dict(k=torch.zeros(1, 9, 2, 4)), "k must be \\[B=1, T=8, HKV, D=4\\]"),
        (dict(is_vision=torch.zeros(1, 8)), "is_vision must be bool"),
        (dict(gate_logits=torch.zeros(1, 8, 6)), "gate_logits must be \\[B, T, HQ, 3\\]"),
        (dict(block_counts=40), "rounds up to 64 slots, more than block_size=32"),
        (dict(block_size=24), "power of two"),
        (dict(window_size=0), "window_size must be positive"),
        (dict(backend="cuda"), "backend must be one of"),
    ],
)
def test_bad_inputs_name_the_problem(change: dict, message: str) -> None:
    args = dict(q=torch.zeros(1, 8, 6, 4), k=torch.zeros(1, 8, 2, 4), v=torch.zeros(1, 8, 2, 4),
                is_vision=torch.zeros(1, 8, dtype=torch.bool), gate_logits=torch.zeros(1, 8, 6, 3), block_size=32)
    args.update(change)
    tensors = [args.pop(name) for name in ("q", "k", "v", "is_vision", "gate_logits")]
    with pytest.raises(ValueError, match=message):
        official_attention(*tensors, **args)


def test_float64_and_cpu_run_the_reference(monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.zeros(1, 4, 2, 4, dtype=torch.float64)
    assert not official._use_fast_path(None, q, 64)
    assert not official._use_fast_path("auto", q.float(), 64)
    with pytest.raises(ValueError, match="bf16/fp16/fp32"):
        official._use_fast_path("triton", q, 64)


def test_text_only_batch_is_plain_causal_attention() -> None:
    q, k, v, logits = make_inputs(1, 12, 4, 2, 8, seed=0, dtype=torch.float64)
    out = official_attention(q, k, v, torch.zeros(1, 12, dtype=torch.bool), logits, block_size=4, block_counts=2)
    for t in range(12):
        for h in range(4):
            s = (k[0, : t + 1, h // 2] @ q[0, t, h]) * 8**-0.5
            torch.testing.assert_close(out[0, t, h], torch.softmax(s, 0) @ v[0, : t + 1, h // 2])


def test_vision_positions_get_the_causal_mean_of_v_added() -> None:
    """The dense term at a vision position is the mean of v over 0..t (unmasked v, KV head j // G)."""
    q, k, v, logits = make_inputs(1, 20, 4, 2, 8, seed=1, dtype=torch.float64)
    is_vision = torch.ones(1, 20, dtype=torch.bool)
    is_vision[0, :3] = False
    settings = dict(block_size=4, block_counts=2, window_size=5)
    mixed = official_attention(q, k, v, is_vision, logits, **settings)
    dense = official.dense_text_part(q, k, v, is_vision, 8**-0.5)
    for t in (3, 11, 19):
        torch.testing.assert_close(dense[0, t], v[0, : t + 1].mean(0).repeat_interleave(2, dim=0))
    gates = ((logits / 0.3) * is_vision[:, :, None, None]).sigmoid()
    vision = is_vision[:, :, None, None]
    nsa = official.padded_nsa(q * vision, k * vision, v * vision, gates, scale=8**-0.5, **settings)
    torch.testing.assert_close(mixed, nsa + dense)


# ----------------------------------------------------------------------------------------------------------
# Fast path against the reference path


def check_fast_against_reference(batch, seq_len, heads_q, heads_kv, dim, is_vision, seed, *, dtype=torch.float32,
                                 fast_settings=None, **settings) -> None:
    """The Triton path against the PyTorch blocks on the same inputs. float32 agrees to float32 rounding; in
    float16 the fast path differs by design where it sums a gated branch in float32 and rounds once (and where
    its online softmaxes round the probabilities against a running maximum): a few float16 ulps."""
    q, k, v, logits = make_inputs(batch, seq_len, heads_q, heads_kv, dim, seed, dtype=dtype, device=DEVICE)
    is_vision = is_vision.to(DEVICE)
    fast = official_attention(q, k, v, is_vision, logits, backend="triton", fast_settings=fast_settings, **settings)
    reference = official_attention(q, k, v, is_vision, logits, backend="reference", **settings)
    assert fast.shape == reference.shape == q.shape and fast.dtype == dtype
    tol = 2e-5 if dtype == torch.float32 else 4e-3
    torch.testing.assert_close(fast, reference, atol=tol, rtol=tol)


# Two cases take a scale and gate temperature other than the defaults (D ** -0.5, 0.3), which the model uses: a
# fast path that dropped either would agree with the reference at the defaults.
@kernel_test
def test_fast_mixed_batch_partial_last_block() -> None:
    check_fast_against_reference(2, 70, 4, 2, 16, vision_layout(2, 70), seed=2,
                                 block_size=16, block_counts=3, window_size=20, scale=0.4, gate_temperature=0.7)


@kernel_test
def test_fast_mixed_many_blocks_and_gqa_7_to_1() -> None:
    """More blocks than the selection budget; 7 query heads per KV head as in the 7B model."""
    check_fast_against_reference(1, 150, 7, 1, 16, vision_layout(1, 150), seed=3,
                                 block_size=16, block_counts=4, window_size=40)


@kernel_test
def test_fast_all_vision_batch() -> None:
    check_fast_against_reference(1, 50, 4, 2, 16, torch.ones(1, 50, dtype=torch.bool), seed=4,
                                 block_size=16, block_counts=2, window_size=16, scale=0.4, gate_temperature=0.7)


@kernel_test
def test_fast_float16_mixed_batch() -> None:
    check_fast_against_reference(1, 90, 4, 2, 16, vision_layout(1, 90), seed=6, dtype=torch.float16,
                                 block_size=16, block_counts=2, window_size=24)


@kernel_test
@pytest.mark.parametrize(("layout", "rows"), [("by-block", None), ("tiles", None), ("tiles", 16)])
def test_fast_selection_layouts(layout: str, rows: int | None) -> None:
    """Every work layout of the selection kernel gives the same result (the bench times them)."""
    settings = official.FastPathSettings(selection_layout=layout, selection_tile_rows=rows)
    check_fast_against_reference(2, 70, 4, 2, 16, vision_layout(2, 70), seed=7, fast_settings=settings,
                                 block_size=16, block_counts=3, window_size=20)


@kernel_test
def test_fast_compression_launch_setting() -> None:
    """A non-default compression launch (two tokens per program) changes nothing."""
    from videonsa.ops.triton.official_compression import CompressionLaunch

    settings = official.FastPathSettings(compression=CompressionLaunch(rows=32, block_n=16, num_warps=4))
    check_fast_against_reference(1, 150, 4, 4, 16, vision_layout(1, 150), seed=8, fast_settings=settings,
                                 block_size=16, block_counts=4, window_size=40)


def test_prepared_inputs_are_the_padded_masked_tensors() -> None:
    """q64 is pad_heads(q * vision), gates64 the padded sigmoid gates per branch, k_cmp / v_cmp the block means
    of the masked k, v (plain PyTorch, no kernel)."""
    q, k, v, logits = make_inputs(2, 41, 6, 2, 8, seed=9)
    q[0, 3, 1, 2] = float("nan")
    is_vision = vision_layout(2, 41)
    q64, k_m, v_m, gates64, k_cmp, v_cmp = official.prepare_fast_inputs(q, k, v, is_vision, logits, 0.3, 4)
    vision = is_vision[:, :, None, None]
    torch.testing.assert_close(q64, official.pad_heads(q * vision), equal_nan=True, rtol=0, atol=0)
    gates = official.pad_heads(((logits / 0.3) * vision).sigmoid())  # [B, T, 64, 3]
    assert torch.equal(gates64, gates.permute(3, 0, 1, 2).reshape(3, 2 * 41, 64))
    assert torch.equal(k_m, k * vision) and torch.equal(v_m, v * vision)
    assert torch.equal(k_cmp, official.mean_pool_blocks(k * vision, 4))
    assert torch.equal(v_cmp, official.mean_pool_blocks(v * vision, 4))
    q64_all, k_all, *_ = official.prepare_fast_inputs(q, k, v, None, logits, 0.3, 4)
    torch.testing.assert_close(q64_all, official.pad_heads(q), equal_nan=True, rtol=0, atol=0)
    assert k_all is k


def test_dense_part_added_in_place_matches_the_reference_rounding() -> None:
    """add_dense_text_part gives round(round(a + b) * 0.5 + dense) like the original, in bf16 (text positions
    on the reference attention here, so only the assembly is compared)."""
    q, k, v, _ = make_inputs(2, 40, 4, 2, 8, seed=10, dtype=torch.bfloat16)
    is_vision = vision_layout(2, 40)
    gen = torch.Generator().manual_seed(11)
    a, b = (torch.randn(2, 40, 4, 8, generator=gen).bfloat16() for _ in range(2))
    expected = ((a + b) * 0.5) + official.dense_text_part(q, k, v, is_vision, 8**-0.5)
    got = official.add_dense_text_part(a + b, q, k, v, is_vision, 8**-0.5)
    text = ~is_vision
    assert torch.equal(got[~text], expected[~text])
    torch.testing.assert_close(got[text], expected[text], atol=2e-2, rtol=2e-2)  # SDPA against the loops


def test_fast_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="selection_layout must be one of"):
        official.FastPathSettings(selection_layout="blocks")
    with pytest.raises(ValueError, match="selection_tile_rows must be a power of two >= 16"):
        official.FastPathSettings(selection_layout="by-block", selection_tile_rows=64)
    with pytest.raises(ValueError, match="selection_tile_rows must be a power of two >= 16"):
        official.FastPathSettings(selection_layout="tiles", selection_tile_rows=24)
    assert official.FastPathSettings(selection_layout="tiles", selection_tile_rows=64).selection_switches() == {
        "tile_rows": 64}
