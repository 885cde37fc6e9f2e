"""The selection layout planner (`videonsa.ops.triton.selection.plan`): block unions, the sample, the cost
model and layouts chosen ahead.

Without a GPU the kernels run under the Triton interpreter in a child pytest (`test_under_interpreter`, see
tests/ops/interpreter_harness.py); shapes are tiny, inputs float32 or float16, the reference float64.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from interpreter_harness import DEVICE, interpreter_tests
from selection_checks import random_selection

from videonsa.ops.triton.selection import SelectionSettings
from videonsa.ops.triton.selection.tiles import _slc_fwd_kernel

kernel_test, test_under_interpreter = interpreter_tests(_slc_fwd_kernel, __file__, min_passed=6)


@kernel_test
def test_union_kernel_matches_torch_oracle() -> None:
    from videonsa.ops.triton.selection import union_blocks, union_blocks_torch
    from videonsa.ops.triton.utils import tiles_of

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
    from videonsa.ops.triton.selection import sample_selection, union_blocks_torch
    from videonsa.ops.triton.utils import tiles_of

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
    assert plan_tiles(disjoint, cu, 7, settings=SelectionSettings(tile_step_cost={64: 1.0, 16: 10.0})).block_m == 64
    candidates = SelectionSettings(tile_step_cost={64: 1.0, 16: 1.0}, tile_candidates=(16, 32))
    assert plan_tiles(same, cu, 7, settings=candidates).block_m == 32
    # dq is priced by its own table.
    dq_costs = SelectionSettings(dq_tile_step_cost={64: 1.0, 16: 10.0})
    assert plan_tiles(disjoint, cu, 7, dq=True, settings=dq_costs).block_m == 64
    assert plan_tiles(disjoint, cu, 7, settings=dq_costs).block_m == 16


@kernel_test
def test_forward_layout_follows_cost_model() -> None:
    """`plan_forward` weighs the query tiles' union steps against the block-major cost: disjoint selections go
    block-major when its per-token cost is low, shared ones stay on tall tiles; blocks over 64 keys never go
    block-major; the explicit switches are honoured."""
    from videonsa.ops.triton import selection as slc

    cu = torch.tensor([0, 36], dtype=torch.int32, device=DEVICE)
    same = torch.tensor([0, 1], dtype=torch.int32).expand(36, 1, 2).contiguous().to(DEVICE)
    disjoint = (2 * torch.arange(36)[:, None, None] + torch.arange(2)).to(torch.int32).to(DEVICE)
    # 2 slots per token in steps of 9 tokens (64 rows / 7 heads) at 20 ns: 4.4 ns per token, above "same" on
    # 64-row tiles (2 blocks per 9 tokens x 7.09 = 1.6), below "disjoint" on 16-row tiles (2 x 4.64 = 9.3).
    cheap = slc.SelectionSettings(by_block_step_cost=20.0, by_block_token_cost=0.0, by_block_call_cost=0.0)
    assert slc.plan_forward(disjoint, cu, 7, 16, cheap) is None
    assert slc.plan_forward(same, cu, 7, 16, cheap).block_m == 64
    assert slc.plan_forward(disjoint, cu, 7, 128, cheap).block_m == 16
    assert slc.plan_forward(disjoint, cu, 7, 16, replace(cheap, by_block_token_cost=1e6)).block_m == 16
    per_call = replace(cheap, by_block_call_cost=36e3)  # 1000 ns per token of this 36-token call
    assert slc.plan_forward(disjoint, cu, 7, 16, per_call).block_m == 16
    q, k, v = torch.zeros(8, 2, 16), torch.zeros(8, 1, 16), torch.zeros(8, 1, 16)
    idx = torch.zeros(8, 1, 1, dtype=torch.int32)
    with pytest.raises(ValueError, match="tile_rows"):
        slc.selected_attention_fwd(q, k, v, idx, torch.tensor([0, 8], dtype=torch.int32), 16, 0.25,
                                   tile_rows=16, by_block=True)
    with pytest.raises(ValueError, match="block_size <= 64"):
        slc.selected_attention_fwd(q, k, v, idx, torch.tensor([0, 8], dtype=torch.int32), 128, 0.25,
                                   by_block=True)


@kernel_test
def test_dq_layout_follows_its_own_cost_model() -> None:
    """`plan_dq` weighs the dq kernels' costs (dq_tile_step_cost against dq_by_block_*), not the forward's."""
    from videonsa.ops.triton import selection as slc

    cu = torch.tensor([0, 36], dtype=torch.int32, device=DEVICE)
    same = torch.tensor([0, 1], dtype=torch.int32).expand(36, 1, 2).contiguous().to(DEVICE)
    disjoint = (2 * torch.arange(36)[:, None, None] + torch.arange(2)).to(torch.int32).to(DEVICE)
    cheap = slc.SelectionSettings(
        dq_by_block_step_cost=20.0,  # 4.4 ns per token, as in the forward's test
        dq_by_block_token_cost=0.0, dq_by_block_call_cost=0.0,
        by_block_step_cost=1e6,  # the forward's block-major cost plays no part
    )
    assert slc.plan_dq(disjoint, cu, 7, 16, cheap) is None
    assert slc.plan_forward(disjoint, cu, 7, 16, cheap).block_m == 16
    assert slc.plan_dq(same, cu, 7, 16, cheap).block_m == 64
    assert slc.plan_dq(disjoint, cu, 7, 128, cheap).block_m == 16  # blocks over 64 keys: query tiles only
    assert slc.plan_dq(disjoint, cu, 7, 16, replace(cheap, dq_by_block_token_cost=1e6)).block_m == 16


@kernel_test
def test_layout_chosen_ahead_gives_the_planned_result() -> None:
    """`choose_layout` started early and resolved later makes the same choice as `plan_forward` / `plan_dq`,
    and the kernels run with it give the same outputs; a choice for another pass or selection is refused."""
    from videonsa.ops.triton import selection as slc

    cu = torch.tensor([0, 36], dtype=torch.int32, device=DEVICE)
    disjoint = (2 * torch.arange(36)[:, None, None] + torch.arange(2)).to(torch.int32).to(DEVICE)
    s = slc.SelectionSettings(
        by_block_token_cost=0.0, by_block_call_cost=0.0, dq_by_block_token_cost=0.0, dq_by_block_call_cost=0.0,
        by_block_step_cost=20.0,  # block-major for the forward (see the test above)
        dq_by_block_step_cost=1e6,  # query tiles for dq
    )
    assert slc.choose_layout(disjoint, cu, 7, 16, settings=s).resolve() is slc.plan_forward(disjoint, cu, 7, 16, s)
    assert slc.plan_forward(disjoint, cu, 7, 16, s) is None
    dq_plan = slc.choose_layout(disjoint, cu, 7, 16, dq=True, settings=s).resolve()
    assert dq_plan.block_m == slc.plan_dq(disjoint, cu, 7, 16, s).block_m

    gen = torch.Generator().manual_seed(5)
    q = torch.randn(36, 7, 16, generator=gen).to(DEVICE)
    k, v, do = (torch.randn(36, 1, 16, generator=gen).to(DEVICE) for _ in range(3))
    do = torch.randn(36, 7, 16, generator=gen).to(DEVICE)
    idx = (disjoint % 3).clamp(max=1).to(torch.int32)  # blocks 0 and 1 of the 16-token blocks
    o, lse = slc.selected_attention_fwd(q, k, v, idx, cu, 16, 0.25, settings=s)
    ahead = slc.choose_layout(idx, cu, 7, 16, settings=s)
    o2, lse2 = slc.selected_attention_fwd(q, k, v, idx, cu, 16, 0.25, layout=ahead, settings=s)
    assert torch.equal(o, o2) and torch.equal(lse, lse2)
    grads = slc.selected_attention_bwd(q, k, v, o, lse, do, idx, cu, 16, 0.25, settings=s)
    grads2 = slc.selected_attention_bwd(q, k, v, o, lse, do, idx, cu, 16, 0.25, settings=s,
                                        dq_layout=slc.choose_layout(idx, cu, 7, 16, dq=True, settings=s))
    assert all(torch.equal(a, b) for a, b in zip(grads, grads2, strict=True))
    with pytest.raises(ValueError, match="chosen for the dq pass"):
        slc.selected_attention_fwd(q, k, v, idx, cu, 16, 0.25, layout=slc.choose_layout(idx, cu, 7, 16, dq=True))
    with pytest.raises(ValueError, match="chosen for block_indices"):
        slc.selected_attention_fwd(q[:20], k[:20], v[:20], idx[:20], torch.tensor([0, 20], dtype=torch.int32,
                                   device=DEVICE), 16, 0.25, layout=slc.choose_layout(idx, cu, 7, 16))
    with pytest.raises(ValueError, match="forced layout"):
        slc.selected_attention_fwd(q, k, v, idx, cu, 16, 0.25, by_block=True, layout=slc.choose_layout(idx, cu, 7, 16))
