"""The block-major selection forward and dq (`videonsa.ops.triton.selection.by_block`) against masked dense
attention and the query-tile layout.

Without a GPU the kernels run under the Triton interpreter in a child pytest (`test_under_interpreter`, see
tests/ops/interpreter_harness.py); shapes are tiny, inputs float32 or float16, the reference float64.
"""

from __future__ import annotations

import pytest
import torch
from interpreter_harness import DEVICE, interpreter_tests, packed
from selection_checks import assert_forward_matches, dense_selected, gpu_case, random_selection

from videonsa.ops.triton.selection import SelectionSettings
from videonsa.ops.triton.selection.tiles import _slc_fwd_kernel

kernel_test, test_under_interpreter = interpreter_tests(_slc_fwd_kernel, __file__, min_passed=6)


@kernel_test
@pytest.mark.parametrize(
    ("seq_lens", "heads_q", "heads_kv", "head_dim", "slots", "dtype", "chunk_tokens", "rows"),
    [
        ([37, 20], 7, 1, 16, 3, torch.float32, 5, 16),  # chunks straddle the sequence boundary
        ([30], 14, 2, 16, 2, torch.float32, None, 32),  # one chunk, 4 tokens per step
        ([17, 33, 5], 2, 2, 32, 2, torch.float16, 7, 16),  # 1:1, sequences shorter than a block
        ([9, 0, 40, 1], 4, 2, 16, 3, torch.float32, 3, 16),  # an empty sequence, chunks of 3 tokens
    ],
)
def test_block_major_forward_matches_dense(seq_lens, heads_q, heads_kv, head_dim, slots, dtype, chunk_tokens, rows):
    """The block-major forward (partials per (token, group, slot), merged by log-sum-exp) equals masked dense
    attention in float64, chunked or not, and equals the query-tile forward through `selected_attention_fwd`."""
    from videonsa.ops.triton.selection import launch_fwd_by_block, selected_attention_fwd

    q, k, v, _, cu = packed(seq_lens, heads_q, heads_kv, head_dim, seed=21)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    idx = random_selection(cu, heads_kv, slots, 16, seed=21)
    scale = head_dim**-0.5
    dev = [x.to(DEVICE) for x in (q, k, v, idx, cu)]
    o, lse = launch_fwd_by_block(*dev, 16, scale, chunk_tokens=chunk_tokens,
                                 settings=SelectionSettings(by_block_rows=rows))
    o_ref, lse_ref = dense_selected(q.double(), k.double(), v.double(), idx, cu, 16, scale)
    atol = 2e-5 if dtype == torch.float32 else 3e-3
    assert_forward_matches(o, lse, o_ref, lse_ref, dtype, atol)
    o_api, lse_api = selected_attention_fwd(*dev, 16, scale, by_block=True)
    o_tiles, lse_tiles = selected_attention_fwd(*dev, 16, scale, by_block=False)
    torch.testing.assert_close(o_api, o_tiles, atol=atol, rtol=atol)
    torch.testing.assert_close(lse_api, lse_tiles, atol=atol, rtol=1e-4)
    # Lists cut into pieces of 2 triples (several programs per list) or left whole: the same numbers (each
    # triple's partial is computed alone; only a row's place in the tile changes, which numpy's matmul under
    # the interpreter may round differently).
    for split in (0, 2):
        pieces = SelectionSettings(by_block_rows=rows, by_block_split=split)
        o_split, lse_split = launch_fwd_by_block(*dev, 16, scale, chunk_tokens=chunk_tokens, settings=pieces)
        torch.testing.assert_close(o_split, o, atol=atol, rtol=atol, msg=f"split {split}")
        torch.testing.assert_close(lse_split, lse, atol=1e-5, rtol=1e-5, msg=f"split {split}")


@kernel_test
@pytest.mark.parametrize(
    ("seq_lens", "heads_q", "heads_kv", "head_dim", "slots", "dtype", "chunk_tokens", "rows"),
    [
        ([37, 20], 7, 1, 16, 3, torch.float32, 5, 16),  # chunks straddle the sequence boundary
        ([17, 33, 5], 2, 2, 32, 2, torch.float16, 7, 16),  # 1:1, sequences shorter than a block
        ([9, 0, 40, 1], 4, 2, 16, 3, torch.float32, 3, 16),  # an empty sequence, chunks of 3 tokens
    ],
)
def test_block_major_dq_matches_dense(seq_lens, heads_q, heads_kv, head_dim, slots, dtype, chunk_tokens, rows):
    """The block-major dq (a partial per (token, group, slot) from the program holding the block, summed per
    token) equals the float64 gradient of masked dense attention, chunked or not, pieces of 2 triples or whole
    lists, and equals the query-tile dq through `selected_attention_bwd`."""
    from videonsa.ops.triton.selection import launch_dq_by_block, selected_attention_bwd, selected_attention_fwd
    from videonsa.ops.triton.utils import row_dot

    q, k, v, do, cu = packed(seq_lens, heads_q, heads_kv, head_dim, seed=25)
    q, k, v, do = (x.to(dtype) for x in (q, k, v, do))
    idx = random_selection(cu, heads_kv, slots, 16, seed=25)
    scale = head_dim**-0.5
    dev = [x.to(DEVICE) for x in (q, k, v, idx, cu)]
    o, lse = selected_attention_fwd(*dev, 16, scale)
    leaf = q.double().requires_grad_()
    o_ref, _ = dense_selected(leaf, k.double(), v.double(), idx, cu, 16, scale)
    (o_ref * do.double()).sum().backward()
    delta = row_dot(o, do.to(DEVICE))
    atol = 4e-5 if dtype == torch.float32 else 4e-3
    for split in (2, 0):
        dq = launch_dq_by_block(dev[0], dev[1], dev[2], do.to(DEVICE), lse, delta, dev[3], dev[4], 16, scale,
                                chunk_tokens=chunk_tokens,
                                settings=SelectionSettings(by_block_rows=rows, by_block_split=split))
        assert dq.dtype == dtype
        torch.testing.assert_close(dq.cpu().double(), leaf.grad, atol=atol, rtol=atol, msg=f"split {split}")
    grads = {layout: selected_attention_bwd(*dev[:3], o, lse, do.to(DEVICE), *dev[3:], 16, scale, dq_by_block=layout)
             for layout in (True, False)}
    torch.testing.assert_close(grads[True][0], grads[False][0], atol=atol, rtol=atol)
    for a, b in zip(grads[True][1:], grads[False][1:], strict=True):  # dk, dv do not depend on dq's layout
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="tile_rows"):
        selected_attention_bwd(*dev[:3], o, lse, do.to(DEVICE), *dev[3:], 16, scale, dq_by_block=True, tile_rows=16)


@kernel_test
def test_block_major_forward_ignores_out_of_sequence_and_future_blocks() -> None:
    """Block ids past the token's sequence (no keys there) and future blocks of its own sequence (no key at or
    before the token) contribute nothing, exactly as in the query-tile forward."""
    from videonsa.ops.triton.selection import launch_fwd_by_block

    q, k, v, _, cu = packed([40, 24], 7, 1, 16, seed=22)
    q, k, v = (x.float() for x in (q, k, v))
    idx = random_selection(cu, 1, 3, 16, seed=22)
    idx[:40, 0, 2] = torch.where(idx[:40, 0, 2] < 0, 2, idx[:40, 0, 2])  # block 2 of sequence 0: future for t < 32
    idx[40:, 0, 2] = torch.where(idx[40:, 0, 2] < 0, 5, idx[40:, 0, 2])  # sequence 1 has 2 blocks
    o, lse = launch_fwd_by_block(*(x.to(DEVICE) for x in (q, k, v, idx, cu)), 16, 0.25, chunk_tokens=9)
    o_ref, lse_ref = dense_selected(q.double(), k.double(), v.double(), idx, cu, 16, 0.25)
    assert_forward_matches(o, lse, o_ref, lse_ref, q.dtype, atol=2e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("clustered", [False, True])
def test_gpu_block_major_forward_and_dq_7_to_1_varlen(clustered: bool) -> None:
    gpu_case([1000, 2600, 77, 400], 28, 4, 128, torch.bfloat16, clustered, by_block=True, dq_by_block=True)


@pytest.mark.gpu
def test_gpu_block_major_forward_never_waits_for_the_device() -> None:
    """The block-major forward sizes its lists and launches by bounds from the shapes, so the host queues the
    whole call without a synchronising operation (torch's sync debug mode turns any into an error; a small
    host tensor copied to the device would count)."""
    from videonsa.ops.triton.selection import launch_fwd_by_block

    gen = torch.Generator(device="cuda").manual_seed(3)
    cu = torch.tensor([0, 700, 2000], dtype=torch.int32, device="cuda")
    q = torch.randn(2000, 28, 128, device="cuda", dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(2000, 4, 128, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
    pos = torch.cat([torch.arange(700, device="cuda"), torch.arange(1300, device="cuda")])
    idx = torch.where(torch.arange(4, device="cuda") <= pos[:, None, None] // 64,
                      pos[:, None, None] // 64 - torch.arange(4, device="cuda"), -1).flip(-1)
    idx = idx.expand(2000, 4, 4).to(torch.int32).contiguous()
    launch_fwd_by_block(q, k, v, idx, cu, 64, 0.1, chunk_tokens=300)  # compile first
    torch.cuda.set_sync_debug_mode("error")
    try:
        launch_fwd_by_block(q, k, v, idx, cu, 64, 0.1, chunk_tokens=300)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_gpu_block_major_forward_and_dq_1_to_1_head_dim_64_fp16() -> None:
    gpu_case([3000], 4, 4, 64, torch.float16, clustered=True, by_block=True, dq_by_block=True)
