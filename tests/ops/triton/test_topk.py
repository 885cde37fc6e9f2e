"""The top-k kernels (`videonsa.ops.triton.topk`) against exact oracles.

`select_blocks_topk(method="bisect")` finds each row's S-th largest key by bisection, the row in registers or, for
rows wider than `TopkSettings.register_row_blocks`, counted chunk by chunk from the scratch rows. Every case runs
several launch settings (tokens per tile, score chunk, the chunked selection with narrow chunks) and requires the
very same int32 output as the sorting kernel, and the reference's choice where float32 scores are well separated.

Kernels run under the Triton interpreter where there is no CUDA GPU (see interpreter_harness); inputs are
float32 / float16 (bf16 products are not exact under the interpreter); shapes are tiny.
"""

from __future__ import annotations

import pytest
import torch
from interpreter_harness import DEVICE, interpreter_tests
from test_compression import _check_selection, _inputs, _reference

from videonsa.ops.triton import topk
from videonsa.ops.triton.compression import compressed_attention_fwd, mean_pool_fwd
from videonsa.ops.triton.topk import TopkSettings

kernel_test, test_under_interpreter = interpreter_tests(topk._topk_bisect_kernel, __file__, min_passed=8)
# The default launch, 16-token tiles, 16-block score chunks (several per row even on these tiny sequences), and
# the chunked selection of rows too wide for registers forced on every row, 16 columns at a time (several per
# row) and 64 (one, at most the row).
SETTINGS = (
    TopkSettings(), TopkSettings(tokens=16), TopkSettings(chunk=16),
    TopkSettings(chunk=16, register_row_blocks=0, row_chunk=16), TopkSettings(register_row_blocks=0, row_chunk=64),
)


def _all_settings_equal(q, k, cu, block_size, kwargs) -> torch.Tensor:
    """Run the sorting kernel and the bisection kernel with every launch setting; all must agree. Returns the
    choice int32 [T, HKV, S]."""
    k_cmp, v_cmp, cu_cmp = mean_pool_fwd(k, k, cu, block_size)
    _, lse = compressed_attention_fwd(q, k_cmp, v_cmp, cu, cu_cmp, block_size, kwargs["scale"])
    want = topk.select_blocks_topk(q, k_cmp, lse, cu, cu_cmp, method="sort", block_size=block_size, **kwargs)
    for settings in SETTINGS:
        got = topk.select_blocks_topk(q, k_cmp, lse, cu, cu_cmp, method="bisect", settings=settings,
                                      block_size=block_size, **kwargs)
        assert got.dtype == torch.int32 and got.shape == want.shape
        mismatch = (got != want).any(-1).nonzero()[:3].tolist()
        assert torch.equal(got, want), f"{settings}: rows {mismatch} differ from the sort"
    return want


CASES = [
    # 7:1, float32, varlen (one sequence shorter than a block), 1 local block, no init.
    dict(seq_lens=[110, 21, 5], heads_q=14, heads_kv=2, head_dim=32, block_size=4, block_count=8, init_blocks=0,
         local_blocks=1, dtype="float32"),
    # 3:1, float16, init and local blocks forced, block_count not a power of two.
    dict(seq_lens=[120], heads_q=6, heads_kv=2, head_dim=64, block_size=4, block_count=6, init_blocks=1,
         local_blocks=2, dtype="float16"),
    # 1:1, head dim 128, more slots than most rows have candidates (rows with fewer candidates than slots).
    dict(seq_lens=[90, 60], heads_q=2, heads_kv=2, head_dim=128, block_size=8, block_count=12, init_blocks=2,
         local_blocks=1, dtype="float32"),
]


@kernel_test
@pytest.mark.parametrize("params", CASES, ids=["7to1-fp32-varlen", "3to1-fp16-init-local", "1to1-d128-few"])
def test_bisection_matches_sort_and_reference(params):
    """Random rows: identical to the sorting kernel with every launch setting; float32 = the float64 reference's
    choice."""
    q, k, v, _, cu, dt = _inputs(seed=1, **{n: params[n] for n in ("seq_lens", "heads_q", "heads_kv", "head_dim",
                                                                      "block_size")}, dtype_name=params["dtype"])
    scale = params["head_dim"] ** -0.5
    kwargs = dict(block_count=params["block_count"], init_blocks=params["init_blocks"],
                  local_blocks=params["local_blocks"], scale=scale)
    got = _all_settings_equal(q.to(dt).to(DEVICE), k.to(dt).to(DEVICE), cu.to(DEVICE), params["block_size"], kwargs)
    ref = _reference(q, k, v, cu, params["block_size"], params["block_count"], params["init_blocks"],
                     params["local_blocks"], scale)
    tol = 1e-5 if dt == torch.float32 else 5e-3
    inexact = _check_selection(got.cpu(), q, k, cu, ref.lse_cmp[0].double(), params["block_size"],
                               params["block_count"], params["init_blocks"], params["local_blocks"], scale, tol)
    if dt == torch.float32:
        assert inexact == 0 and torch.equal(got.cpu(), ref.block_indices[0]), "float32 choice differs"


def _tie_oracle(length: int, block_size: int, block_count: int, init: int, local: int,
                strength: torch.Tensor) -> list[list[list[int]]]:
    """Expected choice [T][HKV] when every query head sees block j with the same per-block score order:
    strength [NB, HKV] ranks the blocks (equal strength = equal score, bit for bit); ties to the earlier block."""
    out = []
    for t in range(length):
        current, visible = t // block_size, (t + 1) // block_size
        forced = {j for j in range(current + 1) if j < init or j > current - local}
        rows = []
        for g in range(strength.shape[1]):
            free = sorted((j for j in range(visible) if j not in forced), key=lambda j: (-float(strength[j, g]), j))
            chosen = sorted(forced | set(free[: max(block_count - len(forced), 0)]))
            rows.append(chosen + [-1] * (block_count - len(chosen)))
        out.append(rows)
    return out


@kernel_test
@pytest.mark.parametrize(("levels", "init_local"), [(1, (0, 1)), (2, (1, 2)), (3, (0, 1))])
def test_many_equal_keys_ties_to_earlier_block(levels, init_local):
    """Blocks take only `levels` distinct compressed keys (a block's key is one of a few integer vectors), so
    whole runs of keys are equal and ties straddle the threshold; ties must go to the earlier block."""
    gen = torch.Generator().manual_seed(levels)
    block_size, length, heads_kv, block_count = 4, 120, 2, 7
    init, local = init_local
    n_blocks = length // block_size
    # Query heads all equal to one small-integer vector per group: every dot product is an exact integer,
    # so equal keys give bit-identical scores and distinct ones are far apart.
    q_vec = torch.randint(-2, 3, (heads_kv, 16), generator=gen).float()
    q = q_vec.repeat_interleave(3, 0)[None].expand(length, 3 * heads_kv, 16).contiguous()
    protos = torch.randint(-2, 3, (levels, heads_kv, 16), generator=gen).float()
    which = torch.randint(0, levels, (n_blocks,), generator=gen)
    k = protos[which].repeat_interleave(block_size, 0)  # [T, HKV, 16]: constant within each block
    strength = torch.einsum("jgd,gd->jg", protos[which], q_vec)
    kwargs = dict(block_count=block_count, init_blocks=init, local_blocks=local, scale=0.25)
    cu = torch.tensor([0, length], dtype=torch.int32)
    got = _all_settings_equal(q.to(DEVICE), k.to(DEVICE), cu.to(DEVICE), block_size, kwargs)
    want = _tie_oracle(length, block_size, block_count, init, local, strength)
    assert got.cpu().tolist() == want


@kernel_test
@pytest.mark.parametrize("slots", [9, 200])
def test_more_slots_than_blocks_and_empty_rows(slots):
    """block_count above the number of blocks: every visible block is chosen, the rest -1 (also tokens that see
    no complete block)."""
    q, k, _, _, cu, dt = _inputs([20, 3], 4, 2, 16, 4, "float32", seed=3)
    kwargs = dict(block_count=slots, init_blocks=0, local_blocks=1, scale=0.25)
    got = _all_settings_equal(q.float().to(DEVICE), k.float().to(DEVICE), cu.to(DEVICE), 4, kwargs).cpu()
    for seq, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)):
        for t in range(b - a):
            blocks = sorted(set(range((t + 1) // 4)) | {t // 4})
            assert got[a + t, 0].tolist() == blocks + [-1] * (slots - len(blocks)), (seq, t)
