"""Property-based tests of the NSA operator over shapes and settings nobody chose in advance."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nsa_checks import Case, compare_with_naive, make_inputs, reference_parts

PART_NAMES = ("o", "o_cmp", "o_slc", "o_swa", "block_indices", "lse_cmp")
FEW = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def cases(draw: st.DrawFn, max_len: int = 24) -> Case:
    """Random small shapes, NSA settings and packing (batched or cu_seqlens)."""
    kv_heads = draw(st.integers(1, 2))
    group = draw(st.sampled_from([1, 2, 3, 7]))
    init_blocks, local_blocks = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    block_count = init_blocks + local_blocks + draw(st.integers(0 if init_blocks + local_blocks else 1, 3))
    packed = draw(st.booleans())
    seq_lens = draw(st.lists(st.integers(1, max_len // 2), min_size=1, max_size=4)) if packed else None
    return Case(
        batch=draw(st.integers(1, 2)),
        seq_len=draw(st.integers(1, max_len)),
        q_heads=kv_heads * group,
        kv_heads=kv_heads,
        head_dim=draw(st.integers(1, 6)),
        block_size=draw(st.integers(1, 6)),
        block_count=block_count,
        window_size=draw(st.integers(1, 12)),
        init_blocks=init_blocks,
        local_blocks=local_blocks,
        seq_lens=seq_lens,
        scale=draw(st.one_of(st.none(), st.floats(0.1, 2.0))),
    )


@FEW
@given(case=cases(), seed=st.integers(0, 2**16))
def test_matches_naive_in_float64(case: Case, seed: int) -> None:
    compare_with_naive(case, torch.float64, seed=seed)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(), seed=st.integers(0, 2**16))
def test_matches_naive_in_float32(case: Case, seed: int) -> None:
    compare_with_naive(case, torch.float32, seed=seed)


@FEW
@given(case=cases(max_len=40), cut=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_outputs_do_not_depend_on_later_tokens(case: Case, cut: float, seed: int) -> None:
    """Changing every input at positions >= p leaves all parts of positions < p unchanged (causality)."""
    cut_at = int(cut * case.seq_len)
    inputs = make_inputs(case, torch.float64, seed=seed)
    changed = make_inputs(case, torch.float64, seed=seed + 1)
    mixed = {
        name: torch.cat([inputs[name].detach()[:, :cut_at], changed[name].detach()[:, cut_at:]], dim=1)
        for name in inputs
    }
    with torch.no_grad():
        before = reference_parts(**inputs, **case.settings())
        after = reference_parts(**mixed, **case.settings())
    for name in PART_NAMES:
        torch.testing.assert_close(
            getattr(after, name)[:, :cut_at], getattr(before, name)[:, :cut_at], atol=1e-12, rtol=0,
            msg=lambda m, n=name: f"{n}: {m}",
        )


@FEW
@given(
    num_seqs=st.integers(1, 3),
    seq_len=st.integers(1, 30),
    case=cases(),
    seed=st.integers(0, 2**16),
)
def test_packing_equal_lengths_matches_batching(num_seqs: int, seq_len: int, case: Case, seed: int) -> None:
    """N sequences as a batch [N, L] and packed with cu_seqlens [1, N*L] give the same parts and gradients."""
    batched_case = Case(**{**case.__dict__, "seq_lens": None, "batch": num_seqs, "seq_len": seq_len})
    batched = make_inputs(batched_case, torch.float64, seed=seed)
    packed = {
        name: x.detach().reshape(1, num_seqs * seq_len, *x.shape[2:]).clone().requires_grad_()
        for name, x in batched.items()
    }
    packed_case = Case(**{**batched_case.__dict__, "seq_lens": [seq_len] * num_seqs})
    batched_parts = reference_parts(**batched, **batched_case.settings())
    packed_parts = reference_parts(**packed, **packed_case.settings())
    for name in PART_NAMES:
        got = getattr(packed_parts, name).detach().reshape(getattr(batched_parts, name).shape)
        torch.testing.assert_close(got, getattr(batched_parts, name).detach(), atol=1e-12, rtol=1e-12)
    gen = torch.Generator().manual_seed(seed)
    upstream = torch.randn(batched_parts.o.shape, generator=gen, dtype=torch.float64)
    (batched_parts.o * upstream).sum().backward()
    (packed_parts.o * upstream.reshape(packed_parts.o.shape)).sum().backward()
    for name, x in batched.items():
        torch.testing.assert_close(packed[name].grad.reshape(x.shape), x.grad, atol=1e-12, rtol=1e-10)
