"""The original VideoNSA top-k in Triton (`videonsa.ops.triton.official_topk`) against the PyTorch emulation
`videonsa.ops.official.original_topk_reference`: same block ids in the same slots.

Kernels run under the Triton interpreter where there is no CUDA GPU (see interpreter_harness), in float32 and
float16 (bf16 tl.dot is wrong in the Triton 3.9 interpreter); on a GPU the same cases run directly, and one
bf16 case at the model's shape is added.

How exact agreement is judged. Both sides compute every importance in float32 from the same rounded q*scale,
but in different summation orders (tl.dot / BLAS / torch.einsum over D, and the sum over the G heads), and on
the GPU tl.exp is an approximation; a float32 importance can therefore differ by a few ulps between the two.
The network is a fixed comparator network, so such a difference can only change the output of a row where two
candidates are that close (a near tie), and then only by trading candidates of (nearly) equal importance: the
importance in each output slot stays within the same few ulps. `_assert_same_choice` therefore requires equal
ids in every row, except rows that contain a near tie (two candidates whose float64 importances differ, but by
at most `rtol`) and whose slots, slot by slot, hold importances within `rtol` of the reference's. Exact ties
(zero query heads, zero compressed keys: the tie-breaking the network decides) are identical float32 values on
both sides and get no tolerance: a row whose candidates tie exactly must match id for id.
"""

from __future__ import annotations

import pytest
import torch
from interpreter_harness import DEVICE, HAS_CUDA, interpreter_tests

from videonsa.ops import official
from videonsa.ops.official import anticausal_compression, mean_pool_blocks, original_topk_reference
from videonsa.ops.triton import official_topk
from videonsa.ops.triton.official_topk import DEFAULT_LAUNCH, OfficialTopkLaunch, original_topk_triton

kernel_test, test_under_interpreter = interpreter_tests(official_topk._original_topk_kernel, __file__, min_passed=14)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------------------
# Helpers


def _importance64(q, k_cmp, lse, block_size: int, scale: float) -> torch.Tensor:
    """float64 importance [B, T, HKV, NB] of every candidate block, written independently of both sides:
    p = exp(s - lse_used) before the current block, 1 at it, 0 after; lse_used = lse read as [B, T, HP]."""
    batch, length, heads, dim = q.shape
    n_blocks, heads_kv = k_cmp.shape[1], k_cmp.shape[2]
    rows = (q * scale).to(q.dtype).double().view(batch, length, heads_kv, heads // heads_kv, dim)
    scores = torch.einsum("btigd,bcid->btigc", rows, k_cmp.double())
    used = lse.contiguous().view(batch, length, heads_kv, heads // heads_kv, 1).double()
    block = torch.arange(n_blocks, device=q.device)
    current = (torch.arange(length, device=q.device) // block_size)[None, :, None, None, None]
    p = torch.where(block < current, torch.exp(scores - used), (block == current).double())
    return p.sum(dim=3)


def _assert_same_choice(got: torch.Tensor, want: torch.Tensor, importance: torch.Tensor, block_size: int,
                        rtol: float, exact_rows: torch.Tensor | None = None) -> int:
    """Equal ids, up to near ties (see the module docstring). Returns how many rows differed (all explained).

    got, want: int32 [B, T, HKV, S]; importance: float64 [B, T, HKV, NB]; exact_rows: bool [B, T, HKV] rows
    that must match exactly whatever their importances."""
    got, want, importance = got.cpu(), want.cpu(), importance.cpu()
    assert got.dtype == torch.int32 and got.shape == want.shape, (got.dtype, got.shape, want.shape)
    differ = (got != want).any(-1)
    if exact_rows is not None:
        bad = (differ & exact_rows.cpu()).nonzero()[:3].tolist()
        assert not bad, f"rows (b, t, group) {bad} differ although their candidates tie exactly"
    with_empty = torch.cat([torch.zeros_like(importance[..., :1]), importance], dim=-1)  # index id + 1
    for b, t, i in differ.nonzero().tolist():
        row = with_empty[b, t, i]
        v_got, v_want = row[got[b, t, i].long() + 1], row[want[b, t, i].long() + 1]
        slots_close = bool(((v_got - v_want).abs() <= rtol * torch.maximum(v_got, v_want)).all())
        seen = torch.sort(importance[b, t, i, : t // block_size + 1]).values
        gaps = seen[1:] - seen[:-1]
        near_tie = bool(((gaps > 0) & (gaps <= rtol * seen[1:])).any())
        assert slots_close and near_tie, (
            f"row (b={b}, t={t}, group={i}) differs without a near tie: got {got[b, t, i].tolist()}, "
            f"want {want[b, t, i].tolist()}"
        )
    count = int(differ.sum())
    assert count <= 1 + differ.numel() // 100, f"{count} of {differ.numel()} rows differ (near ties)"
    return count


def _random_inputs(batch: int, length: int, heads: int, heads_kv: int, dim: int, block_size: int, seed: int,
                   text_every: int = 0, zero_block_every: int = 0):
    """float32 q [B, T, HP, D], k_cmp [B, NB, HKV, D], lse [B, HP, T]. Every `text_every`-th token has zero
    query heads (a text token of the mixed path), every `zero_block_every`-th compressed key is zero (an
    all-text block): both give exactly tied importances. q is scaled so that earlier blocks often outrank the
    current block's G."""
    gen = torch.Generator().manual_seed(seed)
    n_blocks = -(-length // block_size)
    q = 2.0 * torch.randn(batch, length, heads, dim, generator=gen)
    k_cmp = torch.randn(batch, n_blocks, heads_kv, dim, generator=gen)
    lse = 0.5 * torch.randn(batch, heads, length, generator=gen) + 2.0
    if text_every:
        q[:, ::text_every] = 0
    if zero_block_every:
        k_cmp[:, 1::zero_block_every] = 0
    return q, k_cmp, lse


def _zero_query_rows(q: torch.Tensor, heads_kv: int) -> torch.Tensor:
    """bool [B, T, HKV]: groups whose query heads are all zero (every earlier block ties exactly)."""
    batch, length, heads, dim = q.shape
    return (q.view(batch, length, heads_kv, heads // heads_kv * dim) == 0).all(-1)


def _run_case(q, k_cmp, lse, block_counts: int, block_size: int, launch: OfficialTopkLaunch, dtype: torch.dtype,
              rtol: float) -> tuple[torch.Tensor, int]:
    """Round the inputs to `dtype`, run the kernel on DEVICE and the reference on the CPU, compare."""
    q, k_cmp = q.to(dtype), k_cmp.to(dtype)
    scale = q.shape[-1] ** -0.5
    got = original_topk_triton(q.to(DEVICE), k_cmp.to(DEVICE), lse.to(DEVICE), block_counts, block_size, scale,
                               launch)
    want = original_topk_reference(q, k_cmp, lse, block_counts, block_size, scale)
    importance = _importance64(q, k_cmp, lse, block_size, scale)
    differing = _assert_same_choice(got, want, importance, block_size, rtol,
                                    exact_rows=_zero_query_rows(q, k_cmp.shape[2]))
    return want, differing


# ----------------------------------------------------------------------------------------------------------
# Interpreter / GPU cases


CASES = {
    # Partial last block (150 = 9*16 + 6), block_counts 3 -> 4 slots, a partial last token tile, float32,
    # groups of 32 heads (the 3B's padded grouping) with the default launch (4 tokens per program there).
    "partial-block-counts3-g32-fp32": dict(shape=(1, 150, 64, 2, 32), block_size=16, block_counts=3,
                                           dtype="float32", launch=DEFAULT_LAUNCH),
    # block_counts 20 -> 32 slots (more slots than blocks: trailing -1), 4 groups, float16, 16-token tiles.
    "counts20-4groups-fp16": dict(shape=(1, 200, 64, 4, 16), block_size=32, block_counts=20, dtype="float16",
                                  launch=OfficialTopkLaunch(tokens_per_program=16, max_rows=256, num_warps=4)),
    # Running merge over 3 chunks of 16 candidates, B = 2, text tokens and zero blocks (exact ties), float16.
    "running-merge-ties-b2-fp16": dict(shape=(2, 560, 32, 2, 16), block_size=16, block_counts=5, dtype="float16",
                                       text_every=3, zero_block_every=2,
                                       launch=OfficialTopkLaunch(tokens_per_program=16, max_rows=256, num_warps=8)),
    # S = 64 = block_size with 66 blocks (the running merge drops candidates: not a true top-64), ties too.
    "s64-66-blocks-fp32": dict(shape=(1, 4200, 16, 1, 16), block_size=64, block_counts=34, dtype="float32",
                               text_every=5, zero_block_every=3,
                               launch=OfficialTopkLaunch(tokens_per_program=64, max_rows=1024, num_warps=8)),
    # Groups of 4 heads, block_size 8: the tile is too small for tl.dot (products summed in float32), 1 token
    # per program.
    "small-group-no-dot-fp16": dict(shape=(1, 40, 8, 2, 8), block_size=8, block_counts=3, dtype="float16",
                                    text_every=4, zero_block_every=2,
                                    launch=OfficialTopkLaunch(tokens_per_program=1, num_warps=1)),
}


@kernel_test
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name: str) -> None:
    case = CASES[name]
    batch, length, heads, heads_kv, dim = case["shape"]
    q, k_cmp, lse = _random_inputs(batch, length, heads, heads_kv, dim, case["block_size"], seed=len(name),
                                   text_every=case.get("text_every", 0),
                                   zero_block_every=case.get("zero_block_every", 0))
    want, _ = _run_case(q, k_cmp, lse, case["block_counts"], case["block_size"], case["launch"],
                        DTYPES[case["dtype"]], rtol=1e-5)
    slots = official.next_power_of_two(case["block_counts"])
    assert want.shape == (batch, length, heads_kv, slots)
    if name.startswith("s64"):
        # The quirk this case is for: tokens of block 65 see 66 blocks but keep fewer than 64.
        assert bool((want[0, -1] == -1).any()), "expected empty slots after the running merge"


@kernel_test
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_mixed_path_ties_match_reference(dtype: str) -> None:
    """The eval's situation: 28 heads padded to 64 as [q, q, zeros], q and k zero at text tokens, k_cmp the
    block means and lse from the anti-causal compression. Text tokens tie every earlier block exactly, and the
    network alone decides which they get (docs/official-mode.md)."""
    gen = torch.Generator().manual_seed(7 if dtype == "float32" else 8)
    length, heads_kv, dim, block_size = 200, 4, 16, 16
    vision = torch.ones(length, dtype=torch.bool)
    vision[:20] = vision[90:97] = vision[170:] = False  # text prefix, a caption, the question
    q28 = torch.randn(1, length, 28, dim, generator=gen) * vision[None, :, None, None]
    k = torch.randn(1, length, heads_kv, dim, generator=gen) * vision[None, :, None, None]
    q = torch.cat([q28, q28, torch.zeros(1, length, 8, dim)], dim=2).to(DTYPES[dtype])
    k_cmp = mean_pool_blocks(k.to(DTYPES[dtype]), block_size)
    _, lse = anticausal_compression(q, k_cmp, k_cmp, block_size, dim**-0.5)
    _, differing = _run_case(q.float(), k_cmp.float(), lse, 5, block_size,
                             OfficialTopkLaunch(tokens_per_program=16, num_warps=8), DTYPES[dtype], rtol=1e-5)
    assert _zero_query_rows(q, heads_kv)[0, ~vision].all()  # the text rows were compared exactly


@kernel_test
def test_empty_sequence() -> None:
    q = torch.zeros(1, 0, 16, 16, device=DEVICE)
    k_cmp = torch.zeros(1, 0, 1, 16, device=DEVICE)
    lse = torch.zeros(1, 16, 0, device=DEVICE)
    assert original_topk_triton(q, k_cmp, lse, 3, 16, 0.25).shape == (1, 0, 1, 4)


@pytest.mark.parametrize(("change", "message"), [
    (dict(block_counts=17), "block_counts=17"),
    (dict(block_size=24), "power of two"),
    (dict(heads_kv=3), "power of two"),
    (dict(lse_shape=(1, 40, 16)), "lse must be"),
    (dict(blocks=5), "does not fit"),
])
def test_bad_settings_raise(change: dict, message: str) -> None:
    heads_kv = change.get("heads_kv", 1)
    q = torch.zeros(1, 40, 16, 16)
    k_cmp = torch.zeros(1, change.get("blocks", 3), heads_kv, 16)
    lse = torch.zeros(change.get("lse_shape", (1, q.shape[2], 40)))
    with pytest.raises(ValueError, match=message):
        original_topk_triton(q, k_cmp, lse, change.get("block_counts", 3), change.get("block_size", 16), 0.25)


def test_launch_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="tokens_per_program"):
        OfficialTopkLaunch(tokens_per_program=3)
    with pytest.raises(ValueError, match="max_rows"):
        OfficialTopkLaunch(max_rows=96)
    with pytest.raises(ValueError, match="num_warps"):
        OfficialTopkLaunch(num_warps=0)
    launch = OfficialTopkLaunch(tokens_per_program=16, max_rows=128)
    # tokens per program: at most tokens_per_program, block_size, and max_rows // G (at least 1)
    assert [launch.tokens_for(g, 64) for g in (4, 16, 32, 256)] == [16, 8, 4, 1]
    assert launch.tokens_for(4, 2) == 2


# ----------------------------------------------------------------------------------------------------------
# GPU, the model's shape


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_model_shape_bf16_matches_reference() -> None:
    """T = 8192 (128 blocks: the running merge at block_counts 32), 28 heads padded to 64, 4 KV heads, D = 128,
    bf16, the mixed path's zeros; kernel and reference both on the GPU. bf16 rounding happens identically on
    both sides (q*scale rounded to bf16, bf16 inputs), so only float32 summation order and tl.exp's
    approximation differ: ids equal up to near ties within 1e-4 (relative), text rows exactly."""
    gen = torch.Generator(device="cuda").manual_seed(11)
    length, heads_kv, dim, block_size = 8192, 4, 128, 64
    vision = torch.ones(length, dtype=torch.bool, device="cuda")
    vision[:30] = vision[4000:4010] = vision[-40:] = False
    q28 = torch.randn(1, length, 28, dim, generator=gen, device="cuda") * vision[None, :, None, None]
    k = 3 * torch.randn(1, length, heads_kv, dim, generator=gen, device="cuda") * vision[None, :, None, None]
    q = torch.cat([q28, q28, torch.zeros_like(q28[:, :, :8])], dim=2).bfloat16()
    k_cmp = mean_pool_blocks(k.bfloat16(), block_size)
    scale = dim**-0.5
    _, lse = anticausal_compression(q, k_cmp, k_cmp, block_size, scale)
    got = original_topk_triton(q, k_cmp, lse, 32, block_size, scale)
    want = original_topk_reference(q, k_cmp, lse, 32, block_size, scale)
    importance = _importance64(q, k_cmp, lse, block_size, scale)
    exact = _zero_query_rows(q, heads_kv)
    assert bool(exact[0, ~vision].all())
    _assert_same_choice(got, want, importance, block_size, rtol=1e-4, exact_rows=exact)
