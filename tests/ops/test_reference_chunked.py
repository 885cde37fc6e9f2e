"""Queries that end a longer key sequence (chunked prefill), reference backend: every part equals the rows of the
one-pass call over the whole sequence, forward and backward (docs/operator.md, "Queries that end a longer key
sequence"), and misuse of the new arguments fails with one clear line."""

from __future__ import annotations

import pytest
import torch
from nsa_checks import Case, make_inputs

from videonsa.ops import nsa_attention, nsa_attention_parts

GATES = ("g_cmp", "g_slc", "g_swa")
PARTS = ("o", "o_cmp", "o_slc", "o_swa", "lse_cmp")


def _offsets(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)


def _last_rows(lengths: list[int], query_counts: list[int]) -> torch.Tensor:
    """Packed row indices of the last query_counts[i] tokens of each sequence of `lengths`."""
    starts = _offsets(lengths).tolist()
    rows = [torch.arange(end - n, end) for end, n in zip(starts[1:], query_counts)]
    return torch.cat(rows)


def _chunk_inputs(inputs: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """Fresh leaves: q and the gates restricted to packed `rows` (dim 1), k and v whole."""
    chunk = {}
    for name, x in inputs.items():
        x = x.detach()
        chunk[name] = (x if name in ("k", "v") else x[:, rows]).clone().requires_grad_()
    return chunk


def _assert_parts_equal_rows(chunk_parts, full_parts, rows: torch.Tensor, tol: float) -> None:
    for name in PARTS:
        got, want = getattr(chunk_parts, name), getattr(full_parts, name)[:, rows]
        assert got.shape == want.shape, (name, got.shape, want.shape)
        torch.testing.assert_close(got, want, atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")  # noqa: B023
    assert torch.equal(chunk_parts.block_indices, full_parts.block_indices[:, rows]), "block_indices differ"


def _check_identity(case: Case, query_counts: list[int], dtype: torch.dtype, seed: int = 0) -> None:
    """One-pass call over `case` vs a call with only the last query_counts[i] queries of each sequence."""
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    inputs = make_inputs(case, dtype, seed)
    settings = case.settings()
    lengths = case.seq_lens if case.seq_lens is not None else [case.seq_len]
    if case.seq_lens is None:  # dense batch: the same query count for every row
        rows = torch.arange(case.seq_len - query_counts[0], case.seq_len)
    else:
        rows = _last_rows(lengths, query_counts)
        settings["cu_seqlens_k"] = settings["cu_seqlens"]
        settings["cu_seqlens"] = _offsets(query_counts)
    chunk = _chunk_inputs(inputs, rows)

    full = nsa_attention_parts(**inputs, **case.settings(), backend="reference")
    parts = nsa_attention_parts(**chunk, **settings, backend="reference")
    _assert_parts_equal_rows(parts, full, rows, tol)
    o = nsa_attention(**{n: x.detach() for n, x in chunk.items()}, **settings, backend="reference")
    torch.testing.assert_close(o, parts.o, atol=0, rtol=0)

    # Backward: a loss on the chunk's rows gives the one-pass gradients of those rows (q, gates) and of the
    # keys and values, which earlier queries (weight 0 in this loss) do not change.
    upstream = torch.randn(parts.o.shape, generator=torch.Generator().manual_seed(seed + 7), dtype=dtype)
    (parts.o * upstream).sum().backward()
    full_upstream = torch.zeros_like(full.o)
    full_upstream[:, rows] = upstream
    (full.o * full_upstream).sum().backward()
    for name, x in chunk.items():
        want = inputs[name].grad if name in ("k", "v") else inputs[name].grad[:, rows]
        torch.testing.assert_close(x.grad, want, atol=tol, rtol=tol, msg=lambda m: f"grad {name}: {m}")  # noqa: B023


DENSE = {
    # (case, queries per row): block size 4 unless said; Tk % b != 0 leaves a partial last block.
    "gqa_inside_block": (Case(batch=2, q_heads=4, kv_heads=2, block_size=4, seq_len=27, init_blocks=1), [6]),
    "at_block_boundary": (Case(batch=1, q_heads=2, kv_heads=1, block_size=4, seq_len=28), [12]),
    "first_query_ends_block": (Case(batch=1, q_heads=2, kv_heads=1, block_size=4, seq_len=26), [15]),
    "one_query": (Case(batch=2, q_heads=7, kv_heads=1, block_size=4, block_count=4, seq_len=23, local_blocks=2), [1]),
    "all_queries": (Case(batch=2, q_heads=4, kv_heads=2, block_size=4, seq_len=21), [21]),
    "window_reaches_before_chunk": (Case(block_size=8, window_size=20, block_count=2, seq_len=41), [9]),
    "chunk_inside_first_block": (Case(block_size=8, seq_len=6), [3]),
}

PACKED = {
    "uneven": (Case(seq_lens=[13, 25, 7, 18], q_heads=4, kv_heads=2, block_size=4, init_blocks=1), [5, 8, 7, 1]),
    "ratio7_boundaries": (
        Case(seq_lens=[16, 24, 9], q_heads=7, kv_heads=1, head_dim=4, block_size=4, local_blocks=2, block_count=4),
        [8, 4, 9],
    ),
    "one_query_each": (Case(seq_lens=[11, 30], q_heads=2, kv_heads=1, block_size=4), [1, 1]),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", list(DENSE))
def test_dense_batch_chunk_equals_one_pass_rows(name: str, dtype: torch.dtype) -> None:
    case, counts = DENSE[name]
    _check_identity(case, counts, dtype)


@pytest.mark.parametrize("name", list(PACKED))
def test_packed_chunk_equals_one_pass_rows(name: str) -> None:
    case, counts = PACKED[name]
    _check_identity(case, counts, torch.float64, seed=3)


def test_chunks_together_rebuild_the_one_pass_output() -> None:
    """Consecutive chunks (each over the keys up to its end) give the whole one-pass output; chunk ends fall on
    a block boundary, inside a block and at the end."""
    case = Case(batch=1, q_heads=4, kv_heads=2, block_size=4, block_count=3, window_size=6, seq_len=30)
    inputs = {n: x.detach() for n, x in make_inputs(case, torch.float64, seed=5).items()}
    full = nsa_attention(**inputs, **case.settings(), backend="reference")
    pieces, start = [], 0
    for end in (8, 13, 14, 30):
        chunk = {n: (x[:, :end] if n in ("k", "v") else x[:, start:end]) for n, x in inputs.items()}
        pieces.append(nsa_attention(**chunk, **case.settings(), backend="reference"))
        start = end
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-12, rtol=1e-12)


def test_cu_seqlens_k_equal_to_cu_seqlens_is_the_plain_call() -> None:
    case = Case(seq_lens=[9, 14], q_heads=2, kv_heads=1, block_size=4)
    inputs = {n: x.detach() for n, x in make_inputs(case, torch.float32).items()}
    settings = case.settings()
    plain = nsa_attention(**inputs, **settings, backend="reference")
    same = nsa_attention(**inputs, **settings, cu_seqlens_k=settings["cu_seqlens"].clone(), backend="reference")
    assert torch.equal(plain, same)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_no_queries_give_empty_parts(backend: str) -> None:
    """A call without queries (T = 0) returns empty parts on every backend (the kernels cannot launch empty
    grids: the reference answers), and backward reaches the keys with zero gradients."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 0, 2, 16, generator=gen, requires_grad=True)
    k, v = (torch.randn(2, 40, 1, 16, generator=gen, requires_grad=True) for _ in range(2))
    gates = [torch.rand(2, 0, 2, generator=gen) for _ in GATES]
    parts = nsa_attention_parts(q, k, v, *gates, block_size=16, block_count=2, window_size=8, backend=backend)
    assert parts.o.shape == (2, 0, 2, 16) and parts.block_indices.shape == (2, 0, 1, 2)
    parts.o.sum().backward()
    assert torch.equal(k.grad, torch.zeros_like(k))


def _call(q_len: int, k_len: int, **extra) -> None:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, q_len, 2, 4, generator=gen)
    k, v = torch.randn(2, 1, k_len, 1, 4, generator=gen)
    gates = [torch.rand(1, q_len, 2, generator=gen) for _ in GATES]
    nsa_attention(q, k, v, *gates, block_size=4, block_count=2, window_size=4, backend="reference", **extra)


def _cu(*offsets: int) -> torch.Tensor:
    return torch.tensor(offsets, dtype=torch.int32)


MISUSES = {
    "fewer_keys_than_queries": (dict(q_len=6, k_len=5), r"k must be \[B=1, T=6, HKV, D=4\] \(or longer in T"),
    "cu_seqlens_k_alone": (dict(q_len=6, k_len=9, cu_seqlens_k=_cu(0, 9)), r"cu_seqlens_k needs cu_seqlens"),
    "packed_keys_longer_without_cu_seqlens_k": (
        dict(q_len=6, k_len=9, cu_seqlens=_cu(0, 6)), r"k has 9 packed keys but q 6 packed queries"
    ),
    "offsets_of_other_sequences": (
        dict(q_len=6, k_len=9, cu_seqlens=_cu(0, 2, 6), cu_seqlens_k=_cu(0, 9)),
        r"cu_seqlens_k has 2 entries but cu_seqlens 3",
    ),
    "sequence_with_too_few_keys": (
        dict(q_len=6, k_len=9, cu_seqlens=_cu(0, 4, 6), cu_seqlens_k=_cu(0, 3, 9)),
        r"sequence 0 has 4 queries \(cu_seqlens\) but only 3 keys \(cu_seqlens_k\)",
    ),
    "cu_seqlens_k_short_of_keys": (
        dict(q_len=6, k_len=9, cu_seqlens=_cu(0, 6), cu_seqlens_k=_cu(0, 8)), r"cu_seqlens_k ends at 8"
    ),
    "cu_seqlens_k_repeated": (
        dict(q_len=6, k_len=9, cu_seqlens=_cu(0, 3, 6), cu_seqlens_k=_cu(0, 0, 9)),
        r"cu_seqlens_k must be strictly increasing",
    ),
    "cu_seqlens_k_float": (
        dict(q_len=6, k_len=9, cu_seqlens=_cu(0, 6), cu_seqlens_k=torch.tensor([0.0, 9.0])),
        r"cu_seqlens_k must be an integer tensor",
    ),
}


@pytest.mark.parametrize("misuse", list(MISUSES))
def test_chunked_misuse_raises_one_clear_line(misuse: str) -> None:
    kwargs, message = MISUSES[misuse]
    with pytest.raises(ValueError, match=message) as raised:
        _call(**kwargs)
    assert str(raised.value).startswith("nsa_attention:") and "\n" not in str(raised.value)


def test_gates_follow_the_queries_not_the_keys() -> None:
    gen = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 3, 2, 4, generator=gen), torch.randn(1, 8, 1, 4), torch.randn(1, 8, 1, 4)
    gates = [torch.rand(1, 8, 2) for _ in GATES]
    with pytest.raises(ValueError, match=r"g_cmp must be \[B, T, HQ\]=\[1, 3, 2\]"):
        nsa_attention(q, k, v, *gates, block_size=4, block_count=2, window_size=4, backend="reference")
