"""`official_attention`: input checks, the choice between the PyTorch blocks and the kernels, and the fast path
(Triton top-k / selection / window, chunked compression) against the reference path on tiny float32 inputs.

The kernel cases run like tests/ops/test_triton_*.py: directly on a CUDA GPU, otherwise once in a child pytest
under TRITON_INTERPRET=1 (`test_under_interpreter`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ops"))
from interpreter_harness import DEVICE, kernels_runnable_here, run_file_under_interpreter  # noqa: E402

import videonsa.layers.official as official  # noqa: E402
from videonsa.layers import official_attention  # noqa: E402
from videonsa.ops.triton import window  # noqa: E402

RUNNABLE = kernels_runnable_here(window._swa_fwd_kernel)
kernel_test = pytest.mark.skipif(not RUNNABLE, reason="runs in the interpreter subprocess (test_under_interpreter)")


@pytest.mark.skipif(RUNNABLE, reason="kernels run in this process")
def test_under_interpreter() -> None:
    run_file_under_interpreter(__file__, min_passed=4)


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
    dense = official.dense_text_part(q, k, v, is_vision, 8**-0.5, fast=False)
    for t in (3, 11, 19):
        torch.testing.assert_close(dense[0, t], v[0, : t + 1].mean(0).repeat_interleave(2, dim=0))
    gates = ((logits / 0.3) * is_vision[:, :, None, None]).sigmoid()
    vision = is_vision[:, :, None, None]
    nsa = official.padded_nsa(q * vision, k * vision, v * vision, gates, scale=8**-0.5, fast=False, **settings)
    torch.testing.assert_close(mixed, nsa + dense)


# ----------------------------------------------------------------------------------------------------------
# Fast path against the reference path


def check_fast_against_reference(batch, seq_len, heads_q, heads_kv, dim, is_vision, seed, **settings) -> None:
    q, k, v, logits = make_inputs(batch, seq_len, heads_q, heads_kv, dim, seed, device=DEVICE)
    is_vision = is_vision.to(DEVICE)
    fast = official_attention(q, k, v, is_vision, logits, backend="triton", **settings)
    reference = official_attention(q, k, v, is_vision, logits, backend="reference", **settings)
    assert fast.shape == reference.shape == q.shape and fast.dtype == torch.float32
    torch.testing.assert_close(fast, reference, atol=2e-5, rtol=2e-5)


@kernel_test
def test_fast_mixed_batch_partial_last_block() -> None:
    check_fast_against_reference(2, 70, 4, 2, 16, vision_layout(2, 70), seed=2,
                                 block_size=16, block_counts=3, window_size=20)


@kernel_test
def test_fast_mixed_many_blocks_and_gqa_7_to_1() -> None:
    """More blocks than the selection budget; 7 query heads per KV head as in the 7B model."""
    check_fast_against_reference(1, 150, 7, 1, 16, vision_layout(1, 150), seed=3,
                                 block_size=16, block_counts=4, window_size=40)


@kernel_test
def test_fast_all_vision_batch() -> None:
    check_fast_against_reference(1, 50, 4, 2, 16, torch.ones(1, 50, dtype=torch.bool), seed=4,
                                 block_size=16, block_counts=2, window_size=16)


@kernel_test
def test_fast_compression_and_topk_match_the_blocks() -> None:
    """The chunked compression (several chunks forced) gives the reference's o and lse, hence the same top-k."""
    from videonsa.ops.official import anticausal_compression, original_topk_reference

    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 90, 64, 16, generator=gen).to(DEVICE)
    k_cmp, v_cmp = (torch.randn(1, 6, 4, 16, generator=gen).to(DEVICE) for _ in range(2))
    saved = official._COMPRESSION_SCORE_ELEMENTS
    official._COMPRESSION_SCORE_ELEMENTS = 2 * 16 * 64 * 6  # two query blocks per chunk
    try:
        o, lse = official.compression_fast(q, k_cmp, v_cmp, 16, 0.25)
    finally:
        official._COMPRESSION_SCORE_ELEMENTS = saved
    o_ref, lse_ref = anticausal_compression(q, k_cmp, v_cmp, 16, 0.25)
    torch.testing.assert_close(o, o_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, lse_ref, atol=1e-5, rtol=1e-5)
    fast_ids = official._topk_implementation()(q, k_cmp, lse, 8, 16, 0.25)
    assert torch.equal(fast_ids.cpu(), original_topk_reference(q, k_cmp, lse_ref, 8, 16, 0.25).cpu())
