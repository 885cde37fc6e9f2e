"""The official mode's anti-causal compression kernel (`videonsa.ops.triton.official_compression`) against the
PyTorch block `videonsa.ops.official.anticausal_compression`.

Kernels run under the Triton interpreter where there is no CUDA GPU (see interpreter_harness), in float32 and
float16 (bf16 tl.dot is wrong in the Triton 3.9 interpreter); on a GPU the same cases run directly, plus a bf16
case. The kernel's online softmax rounds the probabilities against the running maximum instead of the final one,
so half-precision outputs agree to the dtype's rounding, float32 ones to float32 rounding.
"""

from __future__ import annotations

import pytest
import torch
from interpreter_harness import DEVICE, HAS_CUDA, interpreter_tests

from videonsa.ops.official import anticausal_compression, mean_pool_blocks
from videonsa.ops.triton import official_compression
from videonsa.ops.triton.official_compression import CompressionLaunch, anticausal_compression_triton

kernel_test, test_under_interpreter = interpreter_tests(
    official_compression._anticausal_compression_kernel, __file__, min_passed=8
)
TOLERANCE = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make_inputs(batch, seq_len, heads, heads_kv, dim, block_size, seed, dtype):
    """q [B, T, HP, D] with a few all-zero tokens (text positions), k_cmp / v_cmp as block means."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_len, heads, dim, generator=gen)
    q[:, ::7] = 0.0
    k, v = (torch.randn(batch, seq_len, heads_kv, dim, generator=gen) for _ in range(2))
    q, k, v = (x.to(DEVICE, dtype) for x in (q, k, v))
    return q, mean_pool_blocks(k, block_size), mean_pool_blocks(v, block_size)


def check_against_reference(batch, seq_len, heads, heads_kv, dim, block_size, seed, dtype=torch.float32,
                            launch=official_compression.DEFAULT_LAUNCH) -> None:
    q, k_cmp, v_cmp = make_inputs(batch, seq_len, heads, heads_kv, dim, block_size, seed, dtype)
    scale = dim**-0.5
    o, lse = anticausal_compression_triton(q, k_cmp, v_cmp, block_size, scale, launch=launch)
    o_ref, lse_ref = anticausal_compression(q, k_cmp, v_cmp, block_size, scale)
    assert o.shape == q.shape and o.dtype == dtype and o.is_contiguous()
    assert lse.shape == (batch, heads, seq_len) and lse.dtype == torch.float32 and lse.is_contiguous()
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(o, o_ref, atol=tol, rtol=tol)
    torch.testing.assert_close(lse, lse_ref, atol=2e-5, rtol=2e-5)


@kernel_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_partial_last_block_two_sequences_four_groups(dtype) -> None:
    """B=2, 70 tokens in blocks of 16 (the last holds 6), 64 heads over 4 KV heads; 16-block steps force the
    online softmax over several steps."""
    check_against_reference(2, 70, 64, 4, 16, 16, seed=0, dtype=dtype, launch=CompressionLaunch(block_n=16))


@kernel_test
def test_default_launch_many_blocks() -> None:
    """More compressed blocks than one step holds (NB = 90 > 64), several tiles per block."""
    check_against_reference(1, 360, 32, 2, 32, 4, seed=1)


@kernel_test
@pytest.mark.parametrize(
    "launch",
    [CompressionLaunch(rows=16, block_n=16), CompressionLaunch(rows=64, block_n=32, num_warps=4, num_stages=1)],
)
def test_tiles_straddling_blocks(launch) -> None:
    """Tiles of 8 and 16 tokens over blocks of 4: rows of one tile have different own blocks (the mask)."""
    check_against_reference(1, 45, 8, 4, 16, 4, seed=2, launch=launch)


@kernel_test
def test_group_larger_than_rows_and_odd_dim() -> None:
    """G = 32 heads per KV head with 16-row tiles (raised to one token of 32 rows); D = 24 (padded to 32)."""
    check_against_reference(1, 20, 32, 1, 24, 8, seed=3, launch=CompressionLaunch(rows=16, block_n=16))


@kernel_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gate_is_the_rounded_product(dtype) -> None:
    """With a gate the output is round(round(o_cmp) * gate), bit for bit, and lse is unchanged."""
    q, k_cmp, v_cmp = make_inputs(2, 40, 16, 2, 16, 8, seed=4, dtype=dtype)
    gen = torch.Generator().manual_seed(5)
    gate = torch.rand(2, 40, 16, generator=gen).to(DEVICE, dtype)
    o, lse = anticausal_compression_triton(q, k_cmp, v_cmp, 8, 0.25)
    gated, lse_gated = anticausal_compression_triton(q, k_cmp, v_cmp, 8, 0.25, gate=gate)
    assert torch.equal(gated, o * gate[..., None])
    assert torch.equal(lse_gated, lse)


@pytest.mark.skipif(not HAS_CUDA, reason="bf16 needs a GPU (the interpreter's bf16 dot is wrong)")
@pytest.mark.gpu
def test_bf16_model_shape() -> None:
    check_against_reference(1, 1000, 64, 4, 128, 64, seed=6, dtype=torch.bfloat16)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(k_cmp=torch.zeros(1, 3, 2, 8), v_cmp=torch.zeros(1, 3, 2, 8)), "k_cmp must be \\[B=1, NB=2"),
        (dict(k_cmp=torch.zeros(1, 2, 3, 8), v_cmp=torch.zeros(1, 2, 3, 8)), "HP=4 is not a multiple of HKV=3"),
        (dict(q=torch.zeros(1, 8, 4, 8, dtype=torch.float64)), "bf16 / fp16 / fp32"),
        (dict(gate=torch.zeros(1, 8, 5)), "gate must be \\[B, T, HP\\]"),
    ],
)
def test_bad_inputs_name_the_problem(change: dict, message: str) -> None:
    args = dict(q=torch.zeros(1, 8, 4, 8), k_cmp=torch.zeros(1, 2, 2, 8), v_cmp=torch.zeros(1, 2, 2, 8), gate=None)
    args.update(change)
    with pytest.raises(ValueError, match=message):
        anticausal_compression_triton(args["q"], args["k_cmp"], args["v_cmp"], 4, 0.5, gate=args["gate"])


def test_launch_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="rows must be a power of two >= 16"):
        CompressionLaunch(rows=24)
    with pytest.raises(ValueError, match="num_stages"):
        CompressionLaunch(num_stages=0)
