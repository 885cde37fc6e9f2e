"""The Triton forward for queries that end a longer key sequence (chunked prefill) against the one-pass kernels
and the reference (docs/operator.md, "Queries that end a longer key sequence").

Runs directly on a CUDA GPU, otherwise once in a child pytest under TRITON_INTERPRET=1 (`test_under_interpreter`),
with tiny float32 shapes (block size 16, the kernels' smallest).
"""

from __future__ import annotations

import pytest
import torch
from interpreter_harness import DEVICE, interpreter_tests

from videonsa.ops import nsa_attention, nsa_attention_parts, nsa_parts_reference
from videonsa.ops.triton import compression

kernel_test, test_under_interpreter = interpreter_tests(compression._cmp_fwd_kernel, __file__, min_passed=9)

SETTINGS = dict(block_size=16, block_count=3, window_size=24, init_blocks=0, local_blocks=1)
PARTS = ("o", "o_cmp", "o_slc", "o_swa")


def _offsets(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


def _inputs(batch: int, length: int, heads_q: int, heads_kv: int, head_dim: int = 16, seed: int = 0):
    """float32 q, k, v [batch, length, H, D] and gates [batch, length, HQ]; keys get a random offset per block so
    that block importances differ clearly (fewer near ties)."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(batch, length, heads_kv, head_dim, generator=gen)
    k += 1.5 * torch.randn(batch, length // 16 + 1, heads_kv, head_dim, generator=gen).repeat_interleave(16, 1)[
        :, :length
    ]
    x = {
        "q": torch.randn(batch, length, heads_q, head_dim, generator=gen),
        "k": k,
        "v": torch.randn(batch, length, heads_kv, head_dim, generator=gen),
        **{g: torch.rand(batch, length, heads_q, generator=gen) for g in ("g_cmp", "g_slc", "g_swa")},
    }
    return {n: t.to(DEVICE) for n, t in x.items()}


def _queries(x: dict[str, torch.Tensor], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """q and the gates restricted to `rows` of dim 1; k and v whole."""
    return {n: (t if n in ("k", "v") else t[:, rows]) for n, t in x.items()}


def _check_chunk(x, rows, settings, chunk_settings, tol=2e-5) -> None:
    """The chunked Triton call against the rows of the one-pass Triton call and against the reference given
    the kernel's block choice; `nsa_attention` (the lean path) against the parts' o."""
    with torch.no_grad():
        full = nsa_attention_parts(**x, **settings, backend="triton")
        chunk_inputs = _queries(x, rows)
        parts = nsa_attention_parts(**chunk_inputs, **chunk_settings, backend="triton")
        lean = nsa_attention(**chunk_inputs, **chunk_settings, backend="triton")
        ref = nsa_parts_reference(
            **{n: t.double() for n, t in chunk_inputs.items()}, **chunk_settings, block_indices=parts.block_indices
        )
    assert torch.equal(parts.block_indices, full.block_indices[:, rows]), "chunk chose other blocks than one pass"
    for name in PARTS:
        got = getattr(parts, name)
        assert got.shape == chunk_inputs["q"].shape and got.dtype == torch.float32, name
        torch.testing.assert_close(got, getattr(full, name)[:, rows], atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")  # noqa: B023
        torch.testing.assert_close(got.double(), getattr(ref, name), atol=tol, rtol=tol, msg=lambda m: f"{name} vs ref: {m}")  # noqa: B023,E501
    finite = torch.isfinite(full.lse_cmp[:, rows])
    assert torch.equal(torch.isfinite(parts.lse_cmp), finite)
    torch.testing.assert_close(parts.lse_cmp[finite], full.lse_cmp[:, rows][finite], atol=tol, rtol=tol)
    torch.testing.assert_close(lean, parts.o, atol=tol, rtol=tol)


DENSE = {
    # (batch, Tk, HQ, HKV, queries)
    "gqa_inside_block": (2, 75, 4, 2, 21),
    "at_block_boundary": (1, 96, 2, 1, 32),
    "ratio7_one_query": (1, 70, 7, 1, 1),
    "all_queries": (2, 50, 4, 2, 50),
}


@kernel_test
@pytest.mark.parametrize("name", list(DENSE))
def test_dense_batch_chunk_equals_one_pass(name: str) -> None:
    batch, length, heads_q, heads_kv, n_queries = DENSE[name]
    x = _inputs(batch, length, heads_q, heads_kv, seed=len(name))
    rows = torch.arange(length - n_queries, length, device=DEVICE)
    _check_chunk(x, rows, SETTINGS, SETTINGS)


@kernel_test
@pytest.mark.parametrize("local_blocks,init_blocks", [(1, 0), (2, 1)])
def test_packed_chunks_of_uneven_sequences(local_blocks: int, init_blocks: int) -> None:
    lengths, counts = [40, 83, 16, 57], [9, 35, 16, 1]
    settings = dict(SETTINGS, local_blocks=local_blocks, init_blocks=init_blocks, block_count=4)
    x = _inputs(1, sum(lengths), 7, 1, seed=3)
    ends = _offsets(lengths)[1:].tolist()
    rows = torch.cat([torch.arange(end - n, end) for end, n in zip(ends, counts)]).to(DEVICE)
    full_settings = dict(settings, cu_seqlens=_offsets(lengths))
    chunk_settings = dict(settings, cu_seqlens=_offsets(counts), cu_seqlens_k=_offsets(lengths))
    _check_chunk(x, rows, full_settings, chunk_settings)


@kernel_test
def test_chunks_rebuild_the_one_pass_output() -> None:
    """Consecutive chunks over the keys up to their ends (a chunk end inside a block, one on a block boundary)
    give the one-pass output."""
    x = _inputs(1, 90, 4, 2, seed=5)
    with torch.no_grad():
        full = nsa_attention(**x, **SETTINGS, backend="triton")
        pieces, start = [], 0
        for end in (23, 48, 90):
            chunk = {n: (t[:, :end] if n in ("k", "v") else t[:, start:end]) for n, t in x.items()}
            pieces.append(nsa_attention(**chunk, **SETTINGS, backend="triton"))
            start = end
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=2e-5, rtol=2e-5)


@kernel_test
@pytest.mark.parametrize("by_block", [False, True], ids=["query_tiles", "block_major"])
def test_selection_layouts_take_longer_keys(by_block: bool) -> None:
    """Both selection layouts (query tiles with their union planner, block-major with its lists) for packed
    chunks, against the reference's attention over the same blocks."""
    from videonsa.ops.reference import _attend_selected
    from videonsa.ops.triton.selection import selected_attention_fwd

    lengths, counts = [50, 37, 64], [20, 37, 5]
    x = _inputs(1, sum(lengths), 4, 2, seed=7)
    cu_q, cu_k = _offsets(counts), _offsets(lengths)
    ends = cu_k[1:].tolist()
    rows = torch.cat([torch.arange(end - n, end) for end, n in zip(ends, counts)]).to(DEVICE)
    q, k, v = x["q"][0, rows], x["k"][0], x["v"][0]
    gen = torch.Generator().manual_seed(1)
    indices = torch.full((rows.numel(), 2, 3), -1, dtype=torch.int32)
    for n, (a, length) in enumerate(zip(cu_q[:-1].tolist(), lengths)):
        for i in range(counts[n]):
            own = (length - counts[n] + i) // 16
            picks = sorted({own, *torch.randint(0, own + 1, (2,), generator=gen).tolist()})
            indices[a + i, :, : len(picks)] = torch.tensor(picks, dtype=torch.int32)
    indices = indices.to(DEVICE)
    scale = 16**-0.5
    with torch.no_grad():
        o, lse = selected_attention_fwd(q, k, v, indices, cu_q, 16, scale, by_block=by_block, cu_seqlens_k=cu_k)
    for n, (a, b) in enumerate(zip(cu_q[:-1].tolist(), cu_q[1:].tolist())):
        ka, kb = cu_k[n].item(), cu_k[n + 1].item()
        pos = torch.arange(kb - ka - (b - a), kb - ka, device=DEVICE)
        want = _attend_selected(
            q[a:b].double().view(b - a, 2, 2, 16), k[ka:kb].double(), v[ka:kb].double(), indices[a:b].long(), pos,
            16, scale,
        ).reshape(b - a, 4, 16)
        torch.testing.assert_close(o[a:b].double(), want, atol=2e-5, rtol=2e-5)
    assert torch.isfinite(lse).all()


@kernel_test
def test_topk_sort_and_wide_rows_agree_on_chunks() -> None:
    """The top-k's sorting oracle and its bisection with key rows counted from the scratch in chunks (rows wider
    than `register_row_blocks`) choose the same blocks for chunked queries as the default launch."""
    from videonsa.ops.triton.compression import compressed_attention_fwd, mean_pool_fwd
    from videonsa.ops.triton.topk import TopkSettings, select_blocks_topk

    lengths, counts = [160, 75], [40, 12]
    x = _inputs(1, sum(lengths), 2, 1, seed=11)
    cu_q, cu_k = _offsets(counts), _offsets(lengths)
    ends = cu_k[1:].tolist()
    rows = torch.cat([torch.arange(end - n, end) for end, n in zip(ends, counts)]).to(DEVICE)
    q, k, v = x["q"][0, rows], x["k"][0], x["v"][0]
    scale = 16**-0.5
    with torch.no_grad():
        k_cmp, v_cmp, cu_cmp = mean_pool_fwd(k, v, cu_k, 16)
        _, lse = compressed_attention_fwd(q, k_cmp, v_cmp, cu_q, cu_cmp, 16, scale, cu_seqlens_k=cu_k)
        common = dict(block_size=16, block_count=3, init_blocks=1, local_blocks=1, scale=scale, cu_seqlens_k=cu_k)
        default = select_blocks_topk(q, k_cmp, lse, cu_q, cu_cmp, **common)
        oracle = select_blocks_topk(q, k_cmp, lse, cu_q, cu_cmp, method="sort", **common)
        wide = TopkSettings(register_row_blocks=4, row_chunk=4, chunk=16)
        chunked_rows = select_blocks_topk(q, k_cmp, lse, cu_q, cu_cmp, method="bisect", settings=wide, **common)
        one_pass_lse = compressed_attention_fwd(x["q"][0], k_cmp, v_cmp, cu_k, cu_cmp, 16, scale)[1]
        one_pass = select_blocks_topk(x["q"][0], k_cmp, one_pass_lse, cu_k, cu_cmp, **{**common, "cu_seqlens_k": None})
    assert torch.equal(default, oracle)
    assert torch.equal(default, chunked_rows)
    assert torch.equal(default, one_pass[rows])


@kernel_test
def test_queries_as_long_as_keys_run_the_one_pass_kernels_bit_for_bit() -> None:
    x = _inputs(1, 61, 4, 2, seed=2)
    cu = _offsets([25, 36])
    with torch.no_grad():
        plain = nsa_attention_parts(**x, **SETTINGS, cu_seqlens=cu, backend="triton")
        same = nsa_attention_parts(**x, **SETTINGS, cu_seqlens=cu, cu_seqlens_k=cu.clone(), backend="triton")
    for name in (*PARTS, "block_indices", "lse_cmp"):
        assert torch.equal(getattr(plain, name), getattr(same, name)), name


@kernel_test
@pytest.mark.parametrize("entry", [nsa_attention, nsa_attention_parts], ids=["attention", "parts"])
def test_backward_of_chunked_queries_is_refused(entry) -> None:
    x = _inputs(1, 40, 2, 1)
    chunk = {n: t.clone().requires_grad_() for n, t in _queries(x, torch.arange(30, 40, device=DEVICE)).items()}
    out = entry(**chunk, **SETTINGS, backend="triton")
    o = out if isinstance(out, torch.Tensor) else out.o
    with pytest.raises(NotImplementedError, match="no backward for chunked queries"):
        o.sum().backward()



@pytest.mark.gpu
@pytest.mark.parametrize("structured", [False, True], ids=["randn", "structured"])
def test_gpu_7b_layer_chunks_equal_one_pass(structured: bool) -> None:
    """The 7B layer shape (HQ=28, HKV=4, D=128, bf16, default budget) at 16K in chunks of 4K plus the last token
    alone: each chunk's o equals the one-pass rows up to bf16 rounding, with the same blocks
    (benchmarks/check/check_chunked_gpu.py does this at 128K with timings)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    length = 16384
    shape = dict(device="cuda", generator=gen)
    k = torch.randn(1, length, 4, 128, **shape)
    q = torch.randn(1, length, 28, 128, **shape)
    if structured:  # neighbouring tokens choose mostly the same blocks, as in trained models
        k += 1.5 * torch.randn(1, length // 64, 4, 128, **shape).repeat_interleave(64, 1)
        q = 0.5 * q + torch.randn(1, length // 256, 28, 128, **shape).repeat_interleave(256, 1)
    x = {"q": q, "k": k, "v": torch.randn(1, length, 4, 128, **shape),
         **{g: torch.rand(1, length, 28, **shape) for g in ("g_cmp", "g_slc", "g_swa")}}
    x = {n: t.bfloat16() for n, t in x.items()}
    with torch.no_grad():
        full = nsa_attention_parts(**x, backend="triton")
        for start, end in [(0, 4096), (4096, 8192), (8192, 12288), (12288, length), (length - 1, length)]:
            chunk = {n: (t[:, :end] if n in ("k", "v") else t[:, start:end]) for n, t in x.items()}
            parts = nsa_attention_parts(**chunk, backend="triton")
            same = (parts.block_indices == full.block_indices[:, start:end]).all(-1).float().mean()
            assert float(same) >= 0.999, (start, float(same))
            diff = (parts.o.float() - full.o[:, start:end].float()).abs()
            assert float(diff.max()) <= 0.05 and float(diff.mean()) <= 1e-3, (start, float(diff.max()))
