"""The NSA operator (`videonsa.ops`, reference backend forced) against the naive token-by-token NSA.

Every test compares forward parts and all gradients with `naive_nsa`, or checks a property of the design
(docs/operator.md) directly: tie-breaking, where gradients may and may not flow, short sequences.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from naive_nsa import naive_nsa
from nsa_checks import (
    Case,
    compare_with_naive,
    detached_copies,
    make_inputs,
    reference_attention,
    reference_parts,
)

from videonsa.ops import nsa_parts_reference

CASES = {
    "ratio1": Case(q_heads=2, kv_heads=2, block_size=4, block_count=3, window_size=5, seq_len=29),
    "ratio2_init1_local1": Case(
        q_heads=4, kv_heads=2, block_size=8, block_count=2, window_size=16, init_blocks=1, seq_len=37
    ),
    "ratio7_nsa_paper_forcing": Case(
        q_heads=7, kv_heads=1, block_size=4, block_count=4, window_size=3, init_blocks=1, local_blocks=2,
        seq_len=26,
    ),
    "ratio7_two_groups_init2_local0": Case(
        q_heads=14, kv_heads=2, head_dim=4, block_size=5, block_count=3, window_size=7, init_blocks=2,
        local_blocks=0, seq_len=23,
    ),
    "pure_top_k": Case(q_heads=3, kv_heads=1, block_size=3, block_count=2, local_blocks=0, seq_len=20),
    "all_slots_forced": Case(block_size=4, block_count=3, local_blocks=3, seq_len=22),
    "more_slots_than_blocks": Case(block_size=4, block_count=16, window_size=4, seq_len=21),
    "block_size_1": Case(block_size=1, block_count=3, window_size=2, init_blocks=1, seq_len=12),
    "window_1": Case(q_heads=4, kv_heads=2, block_size=3, window_size=1, seq_len=17),
    "window_longer_than_sequence": Case(block_size=6, block_count=2, window_size=100, seq_len=25),
    "batch_2": Case(batch=2, q_heads=4, kv_heads=2, block_size=4, seq_len=18, init_blocks=1),
    "shorter_than_one_block": Case(batch=2, seq_len=5, block_size=8, window_size=3),
    "packed_short_and_uneven": Case(
        seq_lens=[3, 17, 8, 1, 12], q_heads=4, kv_heads=2, block_size=4, init_blocks=1
    ),
    "packed_ratio7": Case(
        seq_lens=[9, 2, 14], q_heads=7, kv_heads=1, head_dim=4, block_size=3, block_count=3, window_size=4,
        local_blocks=2,
    ),
    "custom_scale": Case(q_heads=2, kv_heads=1, block_size=4, seq_len=19, scale=0.9),
    "videonsa_like_budget": Case(
        q_heads=2, kv_heads=1, head_dim=16, block_size=16, block_count=4, window_size=32, seq_len=90
    ),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case_name", list(CASES))
def test_matches_naive_forward_and_gradients(case_name: str, dtype: torch.dtype) -> None:
    compare_with_naive(CASES[case_name], dtype, seed=len(case_name))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize(
    "case_name", ["ratio7_nsa_paper_forcing", "packed_short_and_uneven", "batch_2"]
)
def test_half_precision_inputs_give_same_dtype_close_to_float64(case_name: str, dtype: torch.dtype) -> None:
    parts, _ = compare_with_naive(CASES[case_name], dtype, seed=3)
    assert parts.o.dtype == dtype
    assert parts.block_indices.dtype == torch.int32 and parts.lse_cmp.dtype == torch.float32


def test_given_block_indices_replace_the_top_k_choice() -> None:
    """`nsa_parts_reference(block_indices=...)` (used by kernel tests) attends exactly the given blocks."""
    case = CASES["packed_ratio7"]
    inputs = make_inputs(case, torch.float64, seed=15)
    own = reference_parts(**inputs, **case.settings())
    again = nsa_parts_reference(**inputs, **case.settings(), block_indices=own.block_indices)
    assert torch.equal(again.o, own.o) and torch.equal(again.block_indices, own.block_indices)

    # Another valid choice: keep only the first selected block of every query.
    other = torch.full_like(own.block_indices, -1)
    other[..., 0] = own.block_indices[..., 0]
    given = nsa_parts_reference(**inputs, **case.settings(), block_indices=other)
    naive = naive_nsa(**detached_copies(inputs), **case.settings(), selection=other)
    assert torch.equal(given.block_indices, other)
    torch.testing.assert_close(given.o_slc, naive.o_slc, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(given.o, naive.o, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("chunk_elements", [1, 3000])
def test_query_chunking_does_not_change_the_result(chunk_elements: int) -> None:
    """The reference processes queries in chunks (one query per chunk with a budget of 1 element); chunk
    boundaries must not change anything, forward or backward."""
    chunked = partial(nsa_parts_reference, chunk_elements=chunk_elements)
    compare_with_naive(CASES["packed_short_and_uneven"], torch.float64, seed=11, implementation=chunked)
    compare_with_naive(CASES["ratio2_init1_local1"], torch.float64, seed=12, implementation=chunked)


def test_no_grad_path_matches_autograd_path() -> None:
    case = CASES["packed_ratio7"]
    inputs = make_inputs(case, torch.float64, seed=5)
    with_grad = reference_parts(**inputs, **case.settings())
    with torch.no_grad():
        without_grad = reference_parts(**inputs, **case.settings())
    for name in ("o", "o_cmp", "o_slc", "o_swa", "block_indices", "lse_cmp"):
        assert torch.equal(getattr(with_grad, name).detach(), getattr(without_grad, name)), name


def test_nsa_attention_returns_the_parts_gated_sum() -> None:
    case = CASES["ratio2_init1_local1"]
    inputs = make_inputs(case, torch.float32, seed=6)
    o = reference_attention(**inputs, **case.settings())
    parts = reference_parts(**inputs, **case.settings())
    torch.testing.assert_close(o, parts.o, atol=0, rtol=0)
    gates = [inputs[name].unsqueeze(-1) for name in ("g_cmp", "g_slc", "g_swa")]
    gated = gates[0] * parts.o_cmp + gates[1] * parts.o_slc + gates[2] * parts.o_swa
    torch.testing.assert_close(parts.o, gated, atol=1e-6, rtol=1e-5)


def _periodic_keys_case() -> tuple[Case, dict[str, torch.Tensor]]:
    """Keys repeat with period block_size, so every compressed key and every importance score is equal.

    q and k hold small integers so that every dot product is exact whatever the summation order: a BLAS
    kernel may otherwise round the same dot product differently in different output columns, and the
    "equal" scores would differ in the last bit.
    """
    case = Case(q_heads=2, kv_heads=1, block_size=4, block_count=3, local_blocks=1, seq_len=28)
    inputs = make_inputs(case, torch.float64, seed=7)
    gen = torch.Generator().manual_seed(7)
    one_block = torch.randint(-3, 4, (1, case.block_size, 1, case.head_dim), generator=gen)
    periodic = one_block.repeat(1, case.seq_len // case.block_size, 1, 1)
    inputs["k"] = periodic.double().requires_grad_()
    inputs["q"] = torch.randint(-3, 4, inputs["q"].shape, generator=gen).double().requires_grad_()
    return case, inputs


def test_ties_go_to_the_earlier_block() -> None:
    case, inputs = _periodic_keys_case()
    parts = reference_parts(**inputs, **case.settings())
    for t in range(case.seq_len):
        current = t // case.block_size
        visible = [j for j in range(case.seq_len // case.block_size) if (j + 1) * case.block_size <= t + 1]
        earliest_others = [j for j in visible if j != current][: case.block_count - 1]
        expected = sorted({current, *earliest_others})
        expected += [-1] * (case.block_count - len(expected))
        assert parts.block_indices[0, t, 0].tolist() == expected, t
    naive = naive_nsa(**detached_copies(inputs), **case.settings())
    assert torch.equal(parts.block_indices.long(), naive.block_indices)


def test_sequence_shorter_than_one_block() -> None:
    """No complete block: compression is zero with lse -inf; with the window covering the whole sequence the
    selection branch (current block only) equals the window branch."""
    case = Case(batch=2, q_heads=4, kv_heads=2, seq_len=6, block_size=8, window_size=8, block_count=2)
    inputs = make_inputs(case, torch.float32, seed=8)
    parts = reference_parts(**inputs, **case.settings())
    assert torch.all(parts.o_cmp == 0)
    assert torch.all(parts.lse_cmp == float("-inf"))
    assert torch.all(parts.block_indices[..., 0] == 0) and torch.all(parts.block_indices[..., 1:] == -1)
    torch.testing.assert_close(parts.o_slc, parts.o_swa, atol=1e-6, rtol=1e-5)

    nothing_forced = dict(case.settings(), local_blocks=0)
    parts = reference_parts(**inputs, **nothing_forced)
    assert torch.all(parts.block_indices == -1)
    assert torch.all(parts.o_slc == 0)


def test_first_tokens_of_a_packed_sequence_see_no_earlier_sequence() -> None:
    """Packing must isolate sequences: the result for one sequence does not depend on its neighbours."""
    case = CASES["packed_short_and_uneven"]
    inputs = make_inputs(case, torch.float64, seed=9)
    packed = reference_parts(**inputs, **case.settings())
    start = 0
    for length in case.seq_lens:
        alone = {name: x.detach()[:, start : start + length] for name, x in inputs.items()}
        single = reference_parts(**alone, **dict(case.settings(), cu_seqlens=None))
        for name in ("o", "o_cmp", "o_slc", "o_swa", "block_indices", "lse_cmp"):
            torch.testing.assert_close(
                getattr(packed, name)[:, start : start + length].detach(), getattr(single, name), atol=1e-12,
                rtol=1e-12, msg=lambda m, n=name: f"{n}: {m}",
            )
        start += length


def test_selection_choice_carries_no_gradient() -> None:
    """With only the selection branch on, one query's output sends gradient to the keys and values of its
    selected blocks only, although every visible block's key shaped the scores that made the choice."""
    case = Case(q_heads=2, kv_heads=1, block_size=4, block_count=2, local_blocks=1, seq_len=32)
    for query_position in (13, 22, 31):
        inputs = make_inputs(case, torch.float64, seed=10 + query_position)
        with torch.no_grad():
            inputs["g_cmp"].zero_()
            inputs["g_swa"].zero_()
            inputs["g_slc"].fill_(1.0)
        parts = reference_parts(**inputs, **case.settings())
        parts.o[0, query_position].pow(2).sum().backward()

        attended = torch.zeros(case.seq_len, dtype=torch.bool)
        for j in parts.block_indices[0, query_position, 0].tolist():
            attended[j * case.block_size : min(query_position + 1, (j + 1) * case.block_size)] = True
        assert (~attended[: query_position + 1]).sum() >= case.block_size, "some visible block is unchosen"
        for name in ("k", "v"):
            grad = inputs[name].grad[0, :, 0].abs().sum(dim=-1)
            assert torch.all(grad[~attended] == 0), f"{name} gradient leaked through the block choice"
            assert torch.all(grad[attended] > 0), f"{name} gradient missing for attended keys"


def test_gradients_flow_through_compression_into_keys_and_values() -> None:
    """With only the compression branch on, every key and value of a complete block gets gradient (through
    the block means) and the trailing incomplete block gets none."""
    case = Case(q_heads=3, kv_heads=1, block_size=5, block_count=2, seq_len=23)
    inputs = make_inputs(case, torch.float64, seed=13)
    with torch.no_grad():
        inputs["g_cmp"].fill_(1.0)
        inputs["g_slc"].zero_()
        inputs["g_swa"].zero_()
    o = reference_attention(**inputs, **case.settings())
    o.pow(2).sum().backward()
    complete = (case.seq_len // case.block_size) * case.block_size
    for name in ("k", "v"):
        grad = inputs[name].grad[0, :, 0].abs().sum(dim=-1)
        assert torch.all(grad[:complete] > 0), f"no gradient into {name} through the compressed blocks"
        assert torch.all(grad[complete:] == 0), f"gradient into {name} of the incomplete last block"
    # Queries that see no block, or only one (softmax over one score is constant), get no gradient.
    q_grad = inputs["q"].grad[0].abs().sum(dim=(-1, -2))
    sees_two_blocks = 2 * case.block_size - 1
    assert torch.all(q_grad[:sees_two_blocks] == 0) and torch.all(q_grad[sees_two_blocks:] > 0)


def test_gradcheck_with_a_stable_block_choice() -> None:
    """Finite differences agree with autograd for every input (the choice of blocks is piecewise constant,
    so this holds where no score is near a tie; checked first)."""
    case = Case(q_heads=2, kv_heads=1, head_dim=3, block_size=3, block_count=2, window_size=4, seq_len=13)
    inputs = make_inputs(case, torch.float64, seed=14)
    naive = naive_nsa(**detached_copies(inputs), **case.settings())
    scores = naive.block_scores[0, :, 0]
    for t in range(case.seq_len):
        visible = scores[t][torch.isfinite(scores[t])].sort().values
        if len(visible) > 1:
            assert (visible[1:] - visible[:-1]).min() > 1e-3, "near-tie: pick another seed"

    settings = case.settings()

    def operator(*tensors: torch.Tensor) -> torch.Tensor:
        return reference_attention(*tensors, **settings)

    ordered = tuple(inputs[name] for name in ("q", "k", "v", "g_cmp", "g_slc", "g_swa"))
    # fast_mode compares random projections u^T J v, which any wrong Jacobian entry changes (almost surely).
    assert torch.autograd.gradcheck(operator, ordered, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)
