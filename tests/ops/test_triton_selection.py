"""Selection-branch Triton kernels (`videonsa.ops.triton.selection`) against plain attention references.

Where there is no CUDA GPU the kernels run under the Triton interpreter, which needs TRITON_INTERPRET=1 before
Triton is first imported and must not leak into other tests of the same pytest run. So, in a process whose
kernels are not already interpreted, `test_under_interpreter` runs this file once more in a child pytest with
TRITON_INTERPRET=1 (one process start for all cases) and the other tests skip themselves in the parent.
On a CUDA machine every test runs directly on the GPU, plus the `gpu`-marked checks at real shapes.

Shapes are tiny (the interpreter runs each program in numpy); inputs are float32 or float16 (bf16 products are
not exact under the interpreter) and the reference is float64.
"""

from __future__ import annotations

import math

import pytest
import torch
from interpreter_harness import (
    DEVICE,
    assert_matches_masked_dense,
    kernels_runnable_here,
    packed,
    run_file_under_interpreter,
)

from videonsa.ops import nsa_parts_reference
from videonsa.ops.triton import selection

RUNNABLE = kernels_runnable_here(selection._slc_fwd_kernel)
kernel_test = pytest.mark.skipif(not RUNNABLE, reason="runs in the interpreter subprocess (test_under_interpreter)")


@pytest.mark.skipif(RUNNABLE, reason="kernels run in this process")
def test_under_interpreter() -> None:
    run_file_under_interpreter(__file__, min_passed=20)


def random_selection(cu: torch.Tensor, heads_kv: int, slots: int, block_size: int, seed: int) -> torch.Tensor:
    """int32 [T, HKV, S]: per token and group, the current block plus random earlier blocks (ascending, -1
    padded); neighbouring tokens sometimes share, sometimes not; a few rows select nothing at all."""
    gen = torch.Generator().manual_seed(seed)
    total = int(cu[-1])
    out = torch.full((total, heads_kv, slots), -1, dtype=torch.int32)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        for t in range(a, b):
            current = (t - a) // block_size
            for g in range(heads_kv):
                if (t * 7 + g) % 23 == 0:
                    continue  # nothing selected: o = 0, lse = -inf
                earlier = torch.randperm(current, generator=gen)[: slots - 1].tolist() if current else []
                chosen = sorted([*earlier, current])
                out[t, g, : len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
    return out


def dense_selected(q, k, v, block_indices, cu, block_size, scale):
    """Plain masked softmax attention (differentiable): returns o [T,HQ,D] and lse [T,HQ] (-inf: no key)."""
    total, heads_q, _ = q.shape
    heads_kv = k.shape[1]
    group = heads_q // heads_kv
    allowed = torch.zeros(total, heads_kv, total, dtype=torch.bool)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        for t in range(a, b):
            for g in range(heads_kv):
                for j in block_indices[t, g].tolist():
                    if j >= 0:
                        allowed[t, g, a + j * block_size : min(b, a + (j + 1) * block_size, t + 1)] = True
    allowed = allowed.repeat_interleave(group, dim=1)
    s = scale * torch.einsum("thd,shd->ths", q, k.repeat_interleave(group, dim=1))
    s = s.masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.where(allowed, torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None]), 0.0)
    return torch.einsum("ths,shd->thd", p, v.repeat_interleave(group, dim=1)), lse


def assert_forward_matches(o, lse, o_ref, lse_ref, dtype: torch.dtype, atol: float) -> None:
    """o [T,HQ,D] (dtype) and lse float32 [T,HQ] equal the float64 reference; rows without keys: o = 0, lse = -inf."""
    assert o.dtype == dtype and lse.dtype == torch.float32
    assert torch.equal(torch.isinf(lse.cpu()), torch.isinf(lse_ref)), "rows without keys differ"
    assert bool((o.cpu()[torch.isinf(lse_ref)] == 0).all()), "rows without keys must give o = 0"
    finite = torch.isfinite(lse_ref)
    torch.testing.assert_close(lse.cpu().double()[finite], lse_ref[finite], atol=atol, rtol=1e-4)
    torch.testing.assert_close(o.cpu().double(), o_ref, atol=atol, rtol=atol)


def check_selection(seq_lens, heads_q, heads_kv, head_dim, block_size, slots, dtype, seed, **kwargs):
    """Forward and backward of the kernels against `dense_selected` in float64."""
    from videonsa.ops.triton.selection import selected_attention_bwd, selected_attention_fwd

    q, k, v, do, cu = packed(seq_lens, heads_q, heads_kv, head_dim, seed)
    q, k, v, do = (x.to(dtype).double() for x in (q, k, v, do))  # the reference sees the stored values
    idx = random_selection(cu, heads_kv, slots, block_size, seed)
    scale = head_dim**-0.5
    fwd_kwargs = {key: kwargs[key] for key in ("tile_rows",) if key in kwargs}
    dev = lambda x: x.to(DEVICE, dtype) if x.is_floating_point() else x.to(DEVICE)  # noqa: E731
    o, lse = selected_attention_fwd(dev(q), dev(k), dev(v), dev(idx), dev(cu), block_size, scale, **fwd_kwargs)
    grads = selected_attention_bwd(
        dev(q), dev(k), dev(v), o, lse, dev(do), dev(idx), dev(cu), block_size, scale, **kwargs
    )
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o_ref, lse_ref = dense_selected(*leaves, idx, cu, block_size, scale)
    (o_ref * do).sum().backward()

    atol = 2e-5 if dtype == torch.float32 else 3e-3
    assert_forward_matches(o, lse, o_ref, lse_ref, dtype, atol)
    for name, got, leaf in zip(("dq", "dk", "dv"), grads, leaves, strict=True):
        assert got.dtype == dtype and got.shape == leaf.shape, name
        torch.testing.assert_close(got.cpu().double(), leaf.grad, atol=2 * atol, rtol=2 * atol, msg=name)
    return idx, o


# ----------------------------------------------------------------------------------------------------------
# Kernel tests (interpreter or GPU)


@kernel_test
def test_gqa_7_to_1_varlen_big_tiles_and_split_lists() -> None:
    """7 query heads per KV head, two packed sequences (lengths not multiples of the block), 64-row tiles
    (9 tokens), and dk/dv token lists cut into pieces of 5 (exercises the ordered partial-sum reduction) with
    32-row dk/dv steps (the default is 16)."""
    check_selection([37, 20], 7, 1, 16, 16, 3, torch.float32, seed=0, tile_rows=64, dkdv_split=5, dkdv_rows=32)


@kernel_test
def test_gqa_7_to_1_small_tiles() -> None:
    """16-row tiles (2 tokens x 7 heads) and two KV groups with different selections."""
    check_selection([30], 14, 2, 16, 16, 2, torch.float32, seed=1, tile_rows=16, dkdv_rows=16)


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
def test_union_kernel_matches_torch_oracle() -> None:
    from videonsa.ops.triton.selection import tiles_of, union_blocks, union_blocks_torch

    cu = torch.tensor([0, 50, 61, 120], dtype=torch.int32)
    idx = random_selection(cu, 2, 4, 16, seed=5).to(DEVICE)
    for tokens in (1, 9, 40):  # 40 tokens need two bitmask words
        tiles = tiles_of(cu.to(DEVICE), tokens)
        want = union_blocks_torch(idx, tiles, tokens)
        got = union_blocks(idx, tiles, tokens)
        assert torch.equal(got[1], want[1]), tokens
        used = torch.arange(want[0].shape[-1], device=DEVICE) < want[1][..., None]
        assert torch.equal(torch.where(used, got[0], -1), torch.where(used, want[0], -1)), tokens
        assert torch.equal(got[2], want[2]), tokens
        # A strided sample of the tiles (what plan_tiles passes) gives the rows of those tiles.
        every_other = tiles[::2]
        assert torch.equal(union_blocks(idx, every_other, tokens)[1], want[1][::2]), tokens


@kernel_test
def test_planner_sample_counts_the_union_steps_of_every_8th_tile() -> None:
    """`sample_selection` (what the planners weigh): per tile height, the union entries of every 8th tile per
    token of those tiles, and the used slots per token of the first height's windows, as the torch oracle
    counts them on the same tiles (one sequence, so windows are tiles; 300 tokens end in a short tile)."""
    from videonsa.ops.triton.selection import sample_selection, tiles_of, union_blocks_torch

    cu = torch.tensor([0, 300], dtype=torch.int32)
    idx = random_selection(cu, 2, 4, 16, seed=6)
    sample = sample_selection(idx.to(DEVICE), 7, [64, 16])
    assert sample.tokens == 300 and set(sample.steps_per_token) == {64, 16}
    for block_m, tokens in ((64, 9), (16, 2)):
        tiles = tiles_of(cu.to(DEVICE), tokens)[::8].cpu()
        count = union_blocks_torch(idx, tiles, tokens)[1]
        assert sample.steps_per_token[block_m] == pytest.approx(int(count.sum()) / int(tiles[:, 1].sum()))
    tiles = tiles_of(cu.to(DEVICE), 9)[::8].cpu()
    rows = torch.cat([torch.arange(int(a), int(a) + int(n)) for a, n in tiles[:, :2].tolist()])
    assert sample.used_per_token == pytest.approx(int((idx[rows] >= 0).sum()) / rows.numel())


@kernel_test
def test_tile_height_follows_selection_overlap() -> None:
    """Tokens that all pick the same blocks get tall tiles; tokens with disjoint picks get 16-row tiles."""
    from videonsa.ops.triton.selection import plan_tiles

    cu = torch.tensor([0, 36], dtype=torch.int32, device=DEVICE)
    same = torch.tensor([0, 1], dtype=torch.int32).expand(36, 1, 2).contiguous().to(DEVICE)
    disjoint = (2 * torch.arange(36)[:, None, None] + torch.arange(2)).to(torch.int32).to(DEVICE)
    assert plan_tiles(same, cu, 7).block_m == 64
    assert plan_tiles(disjoint, cu, 7).block_m == 16
    assert plan_tiles(disjoint, cu, 7, tile_rows=128).block_m == 128
    # A caller's step-cost table (the dq kernel has its own) decides: 16-row steps priced 10x dearer than
    # 64-row ones make even disjoint selections take 64-row tiles; the candidates list is honoured.
    assert plan_tiles(disjoint, cu, 7, step_cost={64: 1.0, 16: 10.0}).block_m == 64
    assert plan_tiles(same, cu, 7, step_cost={64: 1.0, 16: 1.0}, candidates=(16, 32)).block_m == 32


@kernel_test
def test_backward_is_deterministic() -> None:
    from videonsa.ops.triton.selection import selected_attention_bwd, selected_attention_fwd

    q, k, v, do, cu = packed([40], 7, 1, 16, seed=6)
    idx = random_selection(cu, 1, 3, 16, seed=6).to(DEVICE)
    q, k, v, do, cu = (x.float().to(DEVICE) if x.is_floating_point() else x.to(DEVICE) for x in (q, k, v, do, cu))
    o, lse = selected_attention_fwd(q, k, v, idx, cu, 16, 0.25, tile_rows=64)
    first = selected_attention_bwd(q, k, v, o, lse, do, idx, cu, 16, 0.25, tile_rows=64, dkdv_split=7)
    second = selected_attention_bwd(q, k, v, o, lse, do, idx, cu, 16, 0.25, tile_rows=64, dkdv_split=7)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


@kernel_test
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_backward_do_scale_and_given_delta(dtype: torch.dtype) -> None:
    """do_scale [T, HQ] (a per-row gate) applied inside the kernels gives the gradients of
    sum(o * do * do_scale): checked against the float64 reference, with delta derived from o and with a
    caller-given delta (o = None), and dq/dk/dv must differ from the unscaled ones (the factor is used)."""
    from videonsa.ops.triton.selection import row_dot, selected_attention_bwd, selected_attention_fwd

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
            tile_rows=tile_rows, dq_by_block=by_block, dkdv_split=6, do_scale=dev(gate),
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
    o, lse = launch_fwd_by_block(*dev, 16, scale, chunk_tokens=chunk_tokens, rows=rows)
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
        o_split, lse_split = launch_fwd_by_block(*dev, 16, scale, chunk_tokens=chunk_tokens, rows=rows, split=split)
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
    from videonsa.ops.triton.selection import (
        launch_dq_by_block,
        row_dot,
        selected_attention_bwd,
        selected_attention_fwd,
    )

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
                                chunk_tokens=chunk_tokens, rows=rows, split=split)
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
    grads = selected_attention_bwd(*dev[:3], o, lse, do.to(DEVICE), *dev[3:], 16, 0.25, tile_rows=16, dkdv_rows=16,
                                   dkdv_split=5)
    leaves = [x.double().requires_grad_() for x in (q, k, v)]
    o_ref, lse_ref = dense_selected(*leaves, idx, cu, 16, 0.25)
    (o_ref * do.double()).sum().backward()
    assert_forward_matches(o, lse, o_ref.detach(), lse_ref.detach(), q.dtype, atol=2e-5)
    for name, got, leaf in zip(("dq", "dk", "dv"), grads, leaves, strict=True):
        torch.testing.assert_close(got.cpu().double(), leaf.grad, atol=4e-5, rtol=4e-5, msg=name)


@kernel_test
def test_forward_layout_follows_cost_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """`plan_forward` weighs the query tiles' union steps against the block-major cost: disjoint selections go
    block-major when its per-token cost is low, shared ones stay on tall tiles; blocks over 64 keys never go
    block-major; the explicit switches are honoured."""
    from videonsa.ops.triton import selection as slc

    cu = torch.tensor([0, 36], dtype=torch.int32, device=DEVICE)
    same = torch.tensor([0, 1], dtype=torch.int32).expand(36, 1, 2).contiguous().to(DEVICE)
    disjoint = (2 * torch.arange(36)[:, None, None] + torch.arange(2)).to(torch.int32).to(DEVICE)
    monkeypatch.setattr(slc, "BY_BLOCK_TOKEN_COST", 0.0)
    monkeypatch.setattr(slc, "BY_BLOCK_CALL_COST", 0.0)
    # 2 slots per token in steps of 9 tokens (64 rows / 7 heads) at 20 ns: 4.4 ns per token, above "same" on
    # 64-row tiles (2 blocks per 9 tokens x 7.09 = 1.6), below "disjoint" on 16-row tiles (2 x 4.64 = 9.3).
    monkeypatch.setattr(slc, "BY_BLOCK_STEP_COST", 20.0)
    assert slc.plan_forward(disjoint, cu, 7, 16) is None
    assert slc.plan_forward(same, cu, 7, 16).block_m == 64
    assert slc.plan_forward(disjoint, cu, 7, 128).block_m == 16
    monkeypatch.setattr(slc, "BY_BLOCK_TOKEN_COST", 1e6)
    assert slc.plan_forward(disjoint, cu, 7, 16).block_m == 16
    monkeypatch.setattr(slc, "BY_BLOCK_TOKEN_COST", 0.0)
    monkeypatch.setattr(slc, "BY_BLOCK_CALL_COST", 36e3)  # 1000 ns per token of this 36-token call
    assert slc.plan_forward(disjoint, cu, 7, 16).block_m == 16
    q, k, v = torch.zeros(8, 2, 16), torch.zeros(8, 1, 16), torch.zeros(8, 1, 16)
    idx = torch.zeros(8, 1, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="tile_rows"):
        slc.selected_attention_fwd(q, k, v, idx, torch.tensor([0, 8], dtype=torch.int32), 16, 0.25,
                                   tile_rows=16, by_block=True)
    with pytest.raises(ValueError, match="block_size <= 64"):
        slc.selected_attention_fwd(q, k, v, idx, torch.tensor([0, 8], dtype=torch.int32), 128, 0.25,
                                   by_block=True)


@kernel_test
def test_dq_layout_follows_its_own_cost_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """`plan_dq` weighs the dq kernels' costs (DQ_TILE_STEP_COST against DQ_BY_BLOCK_*), not the forward's."""
    from videonsa.ops.triton import selection as slc

    cu = torch.tensor([0, 36], dtype=torch.int32, device=DEVICE)
    same = torch.tensor([0, 1], dtype=torch.int32).expand(36, 1, 2).contiguous().to(DEVICE)
    disjoint = (2 * torch.arange(36)[:, None, None] + torch.arange(2)).to(torch.int32).to(DEVICE)
    for name in ("DQ_BY_BLOCK_TOKEN_COST", "DQ_BY_BLOCK_CALL_COST"):
        monkeypatch.setattr(slc, name, 0.0)
    monkeypatch.setattr(slc, "DQ_BY_BLOCK_STEP_COST", 20.0)  # 4.4 ns per token, as in the forward's test
    monkeypatch.setattr(slc, "BY_BLOCK_STEP_COST", 1e6)  # the forward's block-major cost plays no part
    assert slc.plan_dq(disjoint, cu, 7, 16) is None
    assert slc.plan_forward(disjoint, cu, 7, 16).block_m == 16
    assert slc.plan_dq(same, cu, 7, 16).block_m == 64
    assert slc.plan_dq(disjoint, cu, 7, 128).block_m == 16  # blocks over 64 keys: query tiles only
    monkeypatch.setattr(slc, "DQ_BY_BLOCK_TOKEN_COST", 1e6)
    assert slc.plan_dq(disjoint, cu, 7, 16).block_m == 16


@kernel_test
def test_block_lists_sort_triples_by_chunk_block_group() -> None:
    """Every used (token, group, slot) triple lands exactly once in the list of (its chunk, its global block,
    its group), tokens ascending; unused slots, ids past the sequence and ids of blocks after the token are
    left out."""
    from videonsa.ops.triton.selection import block_lists

    cu = torch.tensor([0, 40, 64], dtype=torch.int32)
    idx = random_selection(cu, 2, 3, 16, seed=23)
    idx[45, 1, 0] = 7  # sequence 1 has 2 blocks: dropped
    idx[50, 0, 1] = 1  # token 50 is in block 0 of sequence 1: block 1 starts after it, dropped
    idx[60, 0, 1] = 1  # token 60 is in block 1: kept
    for n_blocks, padded in ((5, 5), (None, 64 // 16 + 2)):  # the real count (3 + 2 blocks), or the bound
        lists = block_lists(idx.to(DEVICE), cu.to(DEVICE), 16, chunk_tokens=10, n_blocks=n_blocks)
        for name in ("offsets", "pairs", "block_indices"):
            setattr(lists, name, getattr(lists, name).cpu())
        assert lists.n_chunks == 7 and lists.n_blocks == padded
        assert int(lists.block_indices[45, 1, 0]) == -1 and int(lists.block_indices[50, 0, 1]) == -1
        assert int(lists.block_indices[60, 0, 1]) == 1
        seen = []
        for chunk in range(lists.n_chunks):
            for block in range(lists.n_blocks):
                for group in range(2):
                    pos = (chunk * lists.n_blocks + block) * 2 + group
                    triples = lists.pairs[lists.offsets[pos] : lists.offsets[pos + 1]].long()
                    tokens = triples // (2 * 3)
                    assert bool((tokens[1:] > tokens[:-1]).all())
                    for triple in triples.tolist():
                        t, g, slot = triple // 6, (triple // 3) % 2, triple % 3
                        seq = int(t >= 40)
                        assert (t // 10, g) == (chunk, group)
                        assert int(idx[t, g, slot]) + (3 if seq else 0) == block
                        assert int(idx[t, g, slot]) <= (t - 40 * seq) // 16
                        seen.append(triple)
        used = (lists.block_indices >= 0).reshape(-1).nonzero().flatten().tolist()
        assert sorted(seen) == used


@kernel_test
@pytest.mark.parametrize("split", [0, 1, 3, 512])
@pytest.mark.parametrize("seqlens", [[40, 24], [64], [5, 0, 30, 1], [0, 7, 0]])
def test_block_major_items_cover_each_list_in_pieces(split: int, seqlens: list[int]) -> None:
    """The forward's work items: each non-empty list's triples exactly once, in pieces of at most `split`
    (0: whole lists), grouped by chunk (the per-chunk bounds), longest first within a chunk, and never more
    than the launch bound (`grid`) of their chunk."""
    from videonsa.ops.triton.selection import block_lists, by_block_items

    cu = torch.tensor([0, *seqlens], dtype=torch.int32).cumsum(0).to(torch.int32)
    lists = block_lists(random_selection(cu, 2, 3, 16, seed=24).to(DEVICE), cu.to(DEVICE), 16, chunk_tokens=10)
    work = by_block_items(lists, 2, split)
    items, bounds, offsets = work.items.cpu(), work.bounds.tolist(), lists.offsets.cpu()
    per_chunk = lists.n_blocks * 2
    assert bounds[0] == 0 and len(bounds) == lists.n_chunks + 1 and len(work.grid) == lists.n_chunks
    assert items.shape[0] == sum(work.grid) >= bounds[-1]
    covered = torch.zeros(lists.pairs.numel(), dtype=torch.int64)
    for chunk in range(lists.n_chunks):
        chunk_items = items[bounds[chunk] : bounds[chunk + 1]]
        assert chunk_items.shape[0] <= work.grid[chunk]
        lengths = chunk_items[:, 2] - chunk_items[:, 1]
        assert bool((lengths > 0).all()) and bool((lengths[1:] <= lengths[:-1]).all())
        if split:
            assert bool((lengths <= split).all())
        for owner, start, end in chunk_items.tolist():
            lst = chunk * per_chunk + owner
            assert offsets[lst] <= start < end <= offsets[lst + 1]
            covered[start:end] += 1
    n_used = int(offsets[-1])  # the unused slots trail the lists in `pairs`
    assert bool((covered[:n_used] == 1).all()) and bool((covered[n_used:] == 0).all())
    if split == 0:  # whole lists: one item per non-empty list
        assert bounds[-1] == int((offsets[1:] > offsets[:-1]).sum())


@kernel_test
def test_tiles_never_straddle_sequences() -> None:
    from videonsa.ops.triton.selection import tiles_of

    cu = torch.tensor([0, 5, 5 + 18, 5 + 18 + 1], dtype=torch.int32, device=DEVICE)
    tiles = tiles_of(cu, 9).tolist()
    assert tiles == [[0, 5, 0, 5], [5, 9, 5, 23], [14, 9, 5, 23], [23, 1, 23, 24]]
    # With a bound on the count (no host sync): the same tiles, then empty rows.
    assert tiles_of(cu, 9, max_tiles=6).tolist() == tiles + [[24, 0, 24, 24]] * 2
    # Empty sequences (first, inner, last) own no tile.
    cu = torch.tensor([0, 0, 3, 3, 13, 13], dtype=torch.int32, device=DEVICE)
    assert tiles_of(cu, 4).tolist() == [[0, 3, 0, 3], [3, 4, 3, 13], [7, 4, 3, 13], [11, 2, 3, 13]]
    assert tiles_of(cu, 4, max_tiles=5).tolist()[4] == [13, 0, 13, 13]
    # int64 offsets and a strided view read the same (the kernels take a contiguous int32 copy).
    assert tiles_of(cu.long(), 4).tolist() == tiles_of(cu, 4).tolist()
    strided = torch.stack([cu, cu], dim=1)[:, 0]
    assert tiles_of(strided, 4).tolist() == tiles_of(cu, 4).tolist()


@kernel_test
@pytest.mark.parametrize("split", [4, 1, 100])
def test_split_lists_cover_every_list_once(split: int) -> None:
    """dk/dv work items: every list (empty ones too) in pieces of at most `split` tokens, longest first; the
    pieces of a list cut in several get consecutive partial slots, in list order; the rows past the real
    items (the launch is a bound) are never counted; the partial count reaches the host."""
    from videonsa.ops.triton.selection import split_lists

    lengths = [0, 3, 10, 1, 16]
    offsets = torch.tensor([0, *lengths]).cumsum(0).to(DEVICE)
    work = split_lists(offsets, split, n_triples=40)  # a bound above the 30 listed tokens
    n_items = int(work.n_items)
    assert work.items.shape[0] == len(lengths) + 40 // split >= n_items
    items = work.items[:n_items].cpu()
    piece_lengths = (items[:, 2] - items[:, 1]).tolist()
    assert piece_lengths == sorted(piece_lengths, reverse=True), "longest pieces first"
    expected, parts, next_part = [], {}, 0
    for lst, length in enumerate(lengths):
        start = int(offsets[lst])
        cuts = list(range(start, start + length, split)) or [start]
        for j, a in enumerate(cuts):
            expected.append((lst, a, min(a + split, start + length)))
            if len(cuts) > 1:
                parts[(lst, a)] = next_part + j
        next_part += len(cuts) if len(cuts) > 1 else 0
    assert sorted((o, a, e) for o, a, e, _ in items.tolist()) == expected
    for o, a, _, part in items.tolist():
        assert part == parts.get((o, a), -1), "unsplit lists write their final result directly"
    assert work.n_parts.tolist() == [next_part]
    assert work.pieces.tolist() == [max(1, -(-n // split)) for n in lengths]
    assert work.part_end.tolist()[-1] == next_part


def test_host_copy_reads_the_values_at_copy_time() -> None:
    from videonsa.ops.triton.host import HostCopy

    x = torch.tensor([3, 1, 4])
    copy = HostCopy(x)
    x.add_(10)  # later writes to the source do not reach the copy
    assert copy.tolist() == [3, 1, 4]
    assert HostCopy(torch.tensor(7)).tolist() == 7


@kernel_test
def test_layout_chosen_ahead_gives_the_planned_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """`choose_layout` started early and resolved later makes the same choice as `plan_forward` / `plan_dq`,
    and the kernels run with it give the same outputs; a choice for another pass or selection is refused."""
    from videonsa.ops.triton import selection as slc

    cu = torch.tensor([0, 36], dtype=torch.int32, device=DEVICE)
    disjoint = (2 * torch.arange(36)[:, None, None] + torch.arange(2)).to(torch.int32).to(DEVICE)
    for name in ("BY_BLOCK_TOKEN_COST", "BY_BLOCK_CALL_COST", "DQ_BY_BLOCK_TOKEN_COST", "DQ_BY_BLOCK_CALL_COST"):
        monkeypatch.setattr(slc, name, 0.0)
    monkeypatch.setattr(slc, "BY_BLOCK_STEP_COST", 20.0)  # block-major for the forward (see the test above)
    monkeypatch.setattr(slc, "DQ_BY_BLOCK_STEP_COST", 1e6)  # query tiles for dq
    assert slc.choose_layout(disjoint, cu, 7, 16).resolve() is slc.plan_forward(disjoint, cu, 7, 16) is None
    assert slc.choose_layout(disjoint, cu, 7, 16, dq=True).resolve().block_m == slc.plan_dq(disjoint, cu, 7, 16).block_m

    gen = torch.Generator().manual_seed(5)
    q = torch.randn(36, 7, 16, generator=gen).to(DEVICE)
    k, v, do = (torch.randn(36, 1, 16, generator=gen).to(DEVICE) for _ in range(3))
    do = torch.randn(36, 7, 16, generator=gen).to(DEVICE)
    idx = (disjoint % 3).clamp(max=1).to(torch.int32)  # blocks 0 and 1 of the 16-token blocks
    o, lse = slc.selected_attention_fwd(q, k, v, idx, cu, 16, 0.25)
    o2, lse2 = slc.selected_attention_fwd(q, k, v, idx, cu, 16, 0.25, layout=slc.choose_layout(idx, cu, 7, 16))
    assert torch.equal(o, o2) and torch.equal(lse, lse2)
    grads = slc.selected_attention_bwd(q, k, v, o, lse, do, idx, cu, 16, 0.25)
    grads2 = slc.selected_attention_bwd(q, k, v, o, lse, do, idx, cu, 16, 0.25,
                                        dq_layout=slc.choose_layout(idx, cu, 7, 16, dq=True))
    assert all(torch.equal(a, b) for a, b in zip(grads, grads2, strict=True))
    with pytest.raises(ValueError, match="chosen for the dq pass"):
        slc.selected_attention_fwd(q, k, v, idx, cu, 16, 0.25, layout=slc.choose_layout(idx, cu, 7, 16, dq=True))
    with pytest.raises(ValueError, match="chosen for block_indices"):
        slc.selected_attention_fwd(q[:20], k[:20], v[:20], idx[:20], torch.tensor([0, 20], dtype=torch.int32,
                                   device=DEVICE), 16, 0.25, layout=slc.choose_layout(idx, cu, 7, 16))
    with pytest.raises(ValueError, match="forced layout"):
        slc.selected_attention_fwd(q, k, v, idx, cu, 16, 0.25, by_block=True, layout=slc.choose_layout(idx, cu, 7, 16))


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


# ----------------------------------------------------------------------------------------------------------
# GPU: real shapes


def _gpu_case(
    seq_lens, heads_q, heads_kv, head_dim, dtype, clustered: bool, tile_rows=None, by_block=None, dq_by_block=None
) -> None:
    gen = torch.Generator(device="cuda").manual_seed(sum(seq_lens) + heads_q)
    total = sum(seq_lens)
    cu = torch.tensor([0, *torch.tensor(seq_lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    q = torch.randn(total, heads_q, head_dim, device="cuda", dtype=dtype, generator=gen)
    k = torch.randn(total, heads_kv, head_dim, device="cuda", dtype=dtype, generator=gen)
    v = torch.randn(total, heads_kv, head_dim, device="cuda", dtype=dtype, generator=gen)
    do = torch.randn(total, heads_q, head_dim, device="cuda", dtype=dtype, generator=gen)
    block_size, slots = 64, 32
    idx = torch.full((total, heads_kv, slots), -1, dtype=torch.int32, device="cuda")
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        pos = torch.arange(b - a, device="cuda")
        n_blocks = -(-(b - a) // block_size)
        base = torch.rand(heads_kv, n_blocks, device="cuda", generator=gen)
        noise = torch.rand(b - a, heads_kv, n_blocks, device="cuda", generator=gen)
        score = base + 0.3 * noise if clustered else noise
        block = torch.arange(n_blocks, device="cuda")
        score = torch.where((block[None, :] < (pos[:, None] + 1) // block_size)[:, None], score, -1.0)
        score = torch.where((block[None, :] == pos[:, None] // block_size)[:, None], 9.0, score)
        top = score.topk(min(slots, n_blocks), dim=-1)
        chosen = torch.where(top.values >= 0, top.indices, n_blocks).sort(dim=-1).values
        idx[a:b, :, : chosen.shape[-1]] = torch.where(chosen == n_blocks, -1, chosen).to(torch.int32)

    from videonsa.ops.triton.selection import selected_attention_bwd, selected_attention_fwd

    scale = head_dim**-0.5
    o, lse = selected_attention_fwd(q, k, v, idx, cu, block_size, scale, tile_rows=tile_rows, by_block=by_block)
    grads = selected_attention_bwd(q, k, v, o, lse, do, idx, cu, block_size, scale, tile_rows=tile_rows,
                                   dq_by_block=dq_by_block)
    # float32 reference on the same (rounded) values, one sequence at a time.
    group = heads_q // heads_kv

    def allowed(a, b, pos):  # the token's selected blocks, causal, shared by the heads of a group
        chosen = (idx[a:b].long()[:, :, :, None] == (pos // block_size)[None, None, None, :]).any(dim=2)
        return (chosen & (pos[None, None, :] <= pos[:, None, None])).repeat_interleave(group, dim=1)

    assert_matches_masked_dense(q, k, v, do, cu, o, grads, scale, allowed)


@pytest.mark.gpu
@pytest.mark.parametrize("clustered", [False, True])
@pytest.mark.parametrize("tile_rows", [None, 16, 64])
def test_gpu_real_shapes_7_to_1_varlen(clustered: bool, tile_rows: int | None) -> None:
    """64 rows: the dq kernel's own launch (8 warps at D=128), 16 rows: the randn-selection path."""
    _gpu_case([1000, 2600, 77, 400], 28, 4, 128, torch.bfloat16, clustered, tile_rows=tile_rows)


@pytest.mark.gpu
@pytest.mark.parametrize("clustered", [False, True])
def test_gpu_block_major_forward_and_dq_7_to_1_varlen(clustered: bool) -> None:
    _gpu_case([1000, 2600, 77, 400], 28, 4, 128, torch.bfloat16, clustered, by_block=True, dq_by_block=True)


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
    _gpu_case([3000], 4, 4, 64, torch.float16, clustered=True, by_block=True, dq_by_block=True)


@pytest.mark.gpu
@pytest.mark.parametrize("tile_rows", [16, 64, 128])
def test_gpu_1_to_1_head_dim_64_fp16(tile_rows: int) -> None:
    _gpu_case([3000], 4, 4, 64, torch.float16, clustered=True, tile_rows=tile_rows)
