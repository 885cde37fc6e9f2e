"""The selection branch through its entry points (`videonsa.ops.triton.selection`: query tiles, dk/dv)
against masked dense attention and the project reference.

Without a GPU the kernels run under the Triton interpreter in a child pytest (`test_under_interpreter`, see
tests/ops/interpreter_harness.py); shapes are tiny, inputs float32 or float16, the reference float64.
"""

from __future__ import annotations

import pytest
import torch
from interpreter_harness import DEVICE, interpreter_tests, packed
from selection_checks import assert_forward_matches, check_selection, dense_selected, gpu_case, random_selection

from videonsa.ops import nsa_parts_reference
from videonsa.ops.triton.selection import SelectionSettings
from videonsa.ops.triton.selection.tiles import _slc_fwd_kernel

kernel_test, test_under_interpreter = interpreter_tests(_slc_fwd_kernel, __file__, min_passed=9)


@kernel_test
def test_gqa_7_to_1_varlen_big_tiles_and_split_lists() -> None:
    """7 query heads per KV head, two packed sequences (lengths not multiples of the block), 64-row tiles
    (9 tokens), and dk/dv token lists cut into pieces of 5 (exercises the ordered partial-sum reduction) with
    32-row dk/dv steps (the default is 16)."""
    check_selection([37, 20], 7, 1, 16, 16, 3, torch.float32, seed=0, tile_rows=64,
                    settings=SelectionSettings(dkdv_split=5, dkdv_rows=32))


@kernel_test
def test_gqa_7_to_1_small_tiles() -> None:
    """16-row tiles (2 tokens x 7 heads) and two KV groups with different selections."""
    check_selection([30], 14, 2, 16, 16, 2, torch.float32, seed=1, tile_rows=16,
                    settings=SelectionSettings(dkdv_rows=16))


@kernel_test
def test_gqa_2_to_1_head_dim_32_auto_tiles() -> None:
    check_selection([45], 4, 2, 32, 16, 3, torch.float32, seed=2)


@kernel_test
def test_mha_1_to_1_short_sequences_fp16() -> None:
    """One query head per KV head, sequences shorter than a block, float16 storage."""
    check_selection([17, 33, 5], 2, 2, 16, 16, 2, torch.float16, seed=3, tile_rows=16)


@kernel_test
def test_forward_matches_project_reference() -> None:
    """o_slc of `nsa_parts_reference` given the same block_indices equals the kernel output."""
    from videonsa.ops.triton.selection import selected_attention_fwd

    seq_lens, heads_q, heads_kv, head_dim, block_size = [40, 26], 7, 1, 16, 16
    q, k, v, _, cu = packed(seq_lens, heads_q, heads_kv, head_dim, seed=4)
    idx = random_selection(cu, heads_kv, 2, block_size, seed=4)
    has = idx.max(dim=-1).values >= 0  # the reference cannot express "nothing selected"; keep rows with some
    idx = torch.where(has[..., None], idx, torch.tensor([0, -1], dtype=torch.int32))
    o, _ = selected_attention_fwd(
        q.float().to(DEVICE), k.float().to(DEVICE), v.float().to(DEVICE), idx.to(DEVICE), cu.to(DEVICE),
        block_size, head_dim**-0.5,
    )
    gates = torch.zeros(1, q.shape[0], heads_q, dtype=torch.float64)
    parts = nsa_parts_reference(
        q[None], k[None], v[None], gates, gates, gates, block_size=block_size, block_count=2, window_size=4,
        cu_seqlens=cu, block_indices=idx[None],
    )
    torch.testing.assert_close(o.cpu().double(), parts.o_slc[0], atol=2e-5, rtol=2e-5)


@kernel_test
def test_backward_is_deterministic() -> None:
    from videonsa.ops.triton.selection import selected_attention_bwd, selected_attention_fwd

    q, k, v, do, cu = packed([40], 7, 1, 16, seed=6)
    idx = random_selection(cu, 1, 3, 16, seed=6).to(DEVICE)
    q, k, v, do, cu = (x.float().to(DEVICE) if x.is_floating_point() else x.to(DEVICE) for x in (q, k, v, do, cu))
    o, lse = selected_attention_fwd(q, k, v, idx, cu, 16, 0.25, tile_rows=64)
    split = SelectionSettings(dkdv_split=7)
    first = selected_attention_bwd(q, k, v, o, lse, do, idx, cu, 16, 0.25, tile_rows=64, settings=split)
    second = selected_attention_bwd(q, k, v, o, lse, do, idx, cu, 16, 0.25, tile_rows=64, settings=split)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@kernel_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backward_do_scale_and_given_delta(dtype: torch.dtype) -> None:
    """do_scale [T, HQ] (a per-row gate) applied inside the kernels gives the gradients of
    sum(o * do * do_scale): checked against the float64 reference, with delta derived from o and with a
    caller-given delta (o = None), and dq/dk/dv must differ from the unscaled ones (the factor is used)."""
    from videonsa.ops.triton.selection import selected_attention_bwd, selected_attention_fwd
    from videonsa.ops.triton.utils import row_dot

    seq_lens, heads_q, heads_kv, head_dim, block_size = [37, 22], 14, 2, 16, 16
    q, k, v, do, cu = packed(seq_lens, heads_q, heads_kv, head_dim, seed=11)
    q, k, v, do = (x.to(dtype).double() for x in (q, k, v, do))
    gate = torch.rand(q.shape[:2], generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    gate = gate.to(dtype).double()  # the kernels see the gate as stored
    idx = random_selection(cu, heads_kv, 3, block_size, seed=11)
    scale = head_dim**-0.5
    dev = lambda x: x.to(DEVICE, dtype) if x.is_floating_point() else x.to(DEVICE)  # noqa: E731
    o, lse = selected_attention_fwd(dev(q), dev(k), dev(v), dev(idx), dev(cu), block_size, scale, tile_rows=16)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o_ref, _ = dense_selected(*leaves, idx, cu, block_size, scale)
    # The kernels never form do * gate (they scale float32 rows of p and do.v^T), so the reference takes the
    # exact float64 product.
    (o_ref * (do * gate[..., None])).sum().backward()
    plain = selected_attention_bwd(dev(q), dev(k), dev(v), o, lse, dev(do), dev(idx), dev(cu), block_size, scale)
    # The materialised product (rounded to the input dtype) through the unscaled kernels: the same gradients
    # up to that rounding.
    do_eff = dev(do * gate[..., None])
    materialised = selected_attention_bwd(
        dev(q), dev(k), dev(v), o, lse, do_eff, dev(idx), dev(cu), block_size, scale, tile_rows=16
    )
    delta = row_dot(o, dev(do)) * dev(gate).float()
    atol = 4e-5 if dtype == torch.float32 else 6e-3
    # Query tiles of 16 and 64 rows, and the block-major dq, with delta derived from o or given.
    for tile_rows, given, by_block in ((16, False, False), (64, True, False), (None, False, True), (None, True, True)):
        grads = selected_attention_bwd(
            dev(q), dev(k), dev(v), None if given else o, lse, dev(do), dev(idx), dev(cu), block_size, scale,
            tile_rows=tile_rows, dq_by_block=by_block, settings=SelectionSettings(dkdv_split=6), do_scale=dev(gate),
            delta=delta if given else None,
        )
        for name, got, leaf, unscaled, mat in zip(("dq", "dk", "dv"), grads, leaves, plain, materialised, strict=True):
            torch.testing.assert_close(got.cpu().double(), leaf.grad, atol=atol, rtol=atol, msg=name)
            torch.testing.assert_close(got, mat, atol=atol, rtol=atol, msg=f"{name} vs materialised do * g")
            assert not torch.allclose(got, unscaled, atol=atol), f"{name}: do_scale ignored"
    with pytest.raises(ValueError, match="o is needed"):
        selected_attention_bwd(
            dev(q), dev(k), dev(v), None, lse, dev(do), dev(idx), dev(cu), block_size, scale, do_scale=dev(gate)
        )


@kernel_test
@pytest.mark.parametrize("by_block", [True, False], ids=["block-major", "query-tiles"])
def test_forward_folds_into_a_gated_sum(by_block: bool) -> None:
    """fold_into / fold_scale: both forward layouts add gate * o into the given tensor in place (no output of
    their own), equal to the float64 o_prev + gate * attention, with the same lse as without folding."""
    from videonsa.ops.triton.selection import selected_attention_fwd

    q, k, v, o_prev, cu = packed([45, 19], 7, 1, 16, seed=23)
    q, k, v, o_prev = (x.float() for x in (q, k, v, o_prev))
    gate = torch.rand(q.shape[:2], generator=torch.Generator().manual_seed(23))
    idx = random_selection(cu, 1, 3, 16, seed=23)
    dev = [x.to(DEVICE) for x in (q, k, v, idx, cu)]
    target = o_prev.clone().to(DEVICE)
    out, lse = selected_attention_fwd(*dev, 16, 0.25, by_block=by_block, fold_into=target,
                                      fold_scale=gate.to(DEVICE))
    assert out is target
    o_ref, lse_ref = dense_selected(q.double(), k.double(), v.double(), idx, cu, 16, 0.25)
    torch.testing.assert_close(target.cpu().double(), o_prev.double() + gate.double()[..., None] * o_ref,
                               atol=2e-5, rtol=2e-5)
    o_plain, lse_plain = selected_attention_fwd(*dev, 16, 0.25, by_block=by_block)
    assert torch.equal(lse, lse_plain)
    with pytest.raises(ValueError, match="go together"):
        selected_attention_fwd(*dev, 16, 0.25, fold_into=target)
    with pytest.raises(ValueError, match="fold_into must be"):
        selected_attention_fwd(*dev, 16, 0.25, fold_into=target[:5], fold_scale=gate.to(DEVICE)[:5])


@kernel_test
def test_backward_ignores_out_of_sequence_and_future_blocks() -> None:
    """The gradients treat those ids the same way: a key block's token list may then start with tokens before
    it (future choosers), which the dk/dv kernel must mask although its later steps skip the causal mask; ids
    past a sequence's end must not reach the next sequence's blocks."""
    from videonsa.ops.triton.selection import selected_attention_bwd, selected_attention_fwd

    q, k, v, do, cu = packed([40, 24], 7, 1, 16, seed=23)
    q, k, v, do = (x.float() for x in (q, k, v, do))
    idx = random_selection(cu, 1, 3, 16, seed=23)
    idx[:40, 0, 2] = torch.where(idx[:40, 0, 2] < 0, 2, idx[:40, 0, 2])  # block 2 of sequence 0: future for t < 32
    idx[:24, 0, 2] = 3  # past sequence 0's 3 blocks: global block 3 is sequence 1's first
    idx[40:, 0, 2] = torch.where(idx[40:, 0, 2] < 0, 5, idx[40:, 0, 2])  # sequence 1 has 2 blocks
    dev = [x.to(DEVICE) for x in (q, k, v, idx, cu)]
    o, lse = selected_attention_fwd(*dev, 16, 0.25)
    grads = selected_attention_bwd(*dev[:3], o, lse, do.to(DEVICE), *dev[3:], 16, 0.25, tile_rows=16,
                                   settings=SelectionSettings(dkdv_rows=16, dkdv_split=5))
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    o_ref, lse_ref = dense_selected(*leaves, idx, cu, 16, 0.25)
    (o_ref * do.double()).sum().backward()
    assert_forward_matches(o, lse, o_ref.detach(), lse_ref.detach(), q.dtype, atol=2e-5)
    for name, got, leaf in zip(("dq", "dk", "dv"), grads, leaves, strict=True):
        torch.testing.assert_close(got.cpu().double(), leaf.grad, atol=4e-5, rtol=4e-5, msg=name)


def test_bad_inputs_are_rejected() -> None:
    from videonsa.ops.triton.selection import selected_attention_fwd

    q, k, v = torch.zeros(8, 3, 16), torch.zeros(8, 2, 16), torch.zeros(8, 2, 16)
    cu = torch.tensor([0, 8], dtype=torch.int32)
    idx = torch.zeros(8, 2, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="incompatible"):
        selected_attention_fwd(q, k, v, idx, cu, 16, 0.25)
    with pytest.raises(ValueError, match="block_indices"):
        selected_attention_fwd(torch.zeros(8, 4, 16), k, v, idx[:4], cu, 16, 0.25)
    with pytest.raises(ValueError, match="power of two"):
        selected_attention_fwd(torch.zeros(8, 4, 16), k, v, idx, cu, 24, 0.25)
    with pytest.raises(ValueError, match="float64"):  # the kernels accumulate in float32: the reference's job
        selected_attention_fwd(*(x.double() for x in (torch.zeros(8, 4, 16), k, v)), idx, cu, 16, 0.25)


@pytest.mark.gpu
@pytest.mark.parametrize("clustered", [False, True])
@pytest.mark.parametrize("tile_rows", [None, 16, 64])
def test_gpu_real_shapes_7_to_1_varlen(clustered: bool, tile_rows: int | None) -> None:
    """64 rows: the dq kernel's own launch (8 warps at D=128), 16 rows: the randn-selection path."""
    gpu_case([1000, 2600, 77, 400], 28, 4, 128, torch.bfloat16, clustered, tile_rows=tile_rows)


@pytest.mark.gpu
@pytest.mark.parametrize("tile_rows", [16, 64, 128])
def test_gpu_1_to_1_head_dim_64_fp16(tile_rows: int) -> None:
    gpu_case([3000], 4, 4, 64, torch.float16, clustered=True, tile_rows=tile_rows)
