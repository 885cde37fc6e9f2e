"""The building blocks of official mode (`videonsa.ops.official`) against direct computations on small inputs.

The top-k is checked against a plain-Python re-run of the original bitonic network, one row at a time, on
importance computed by explicit loops (with the original's lse layout and current-block rule).
"""

from __future__ import annotations

import math

import pytest
import torch

from videonsa.ops.official import (
    anticausal_compression,
    bitonic_block_order,
    causal_mean,
    dense_causal_attention_reference,
    mean_pool_blocks,
    next_power_of_two,
    original_topk_reference,
    selected_attention_reference,
    window_attention_reference,
)


def randn(*shape, seed: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


# ----------------------------------------------------------------------------------------------------------
# The network, one row, as plain Python loops


def network_one_row(importance: list[float], current: int, block_size: int) -> list[int]:
    """Candidate ids (block + 1, 0 = none) in the order the original network leaves them."""
    n_dims = block_size.bit_length() - 1

    def merge(x: list[float], ids: list[int], stage: int, order) -> None:
        for layer in range(stage):
            distance = 1 << (stage - layer - 1)
            for p in range(block_size):
                if p & distance:
                    continue
                partner = p | distance
                flip = bool((p >> stage) & 1) if order == 2 else bool(order)
                if (x[p] > x[partner]) != flip:
                    x[p], x[partner] = x[partner], x[p]
                    ids[p], ids[partner] = ids[partner], ids[p]

    best_x: list[float] = []
    best_ids: list[int] = []
    for first in range(0, current + 1, block_size):
        x = [importance[first + j] for j in range(block_size)]
        ids = [first + j + 1 if first + j <= current else 0 for j in range(block_size)]
        for stage in range(1, n_dims):
            merge(x, ids, stage, 2)
        if first:
            merge(x, ids, n_dims, False)
            half = block_size // 2
            x, ids = best_x[:half] + x[half:], best_ids[:half] + ids[half:]
        merge(x, ids, n_dims, True)
        best_x, best_ids = x, ids
    return best_ids


def test_network_matches_the_documented_tie_example() -> None:
    """64 candidates, current block 40, every earlier block tied below 16: blocks 8..11 and 13..40 win."""
    importance = torch.zeros(1, 64)
    importance[0, :40] = 3.0
    importance[0, 40] = 16.0
    order = bitonic_block_order(importance, torch.tensor([40]), 64)
    assert sorted((order[0, :32] - 1).tolist()) == [*range(8, 12), *range(13, 41)]
    assert order[0].tolist() == network_one_row(importance[0].tolist(), 40, 64)


@pytest.mark.parametrize("block_size", [4, 8, 64])
def test_network_rows_with_ties_and_several_chunks(block_size: int) -> None:
    gen = torch.Generator().manual_seed(block_size)
    width = 4 * block_size
    rows = 40
    # Few distinct values: many exact ties, including ties with the current block's 16.
    importance = torch.randint(0, 5, (rows, width), generator=gen).float() * 4.0
    current = torch.randint(0, width, (rows,), generator=gen)
    current[:3] = torch.tensor([0, block_size - 1, width - 1])
    block = torch.arange(width)
    importance = torch.where(block == current[:, None], 16.0, importance)
    importance = torch.where(block > current[:, None], 0.0, importance)
    order = bitonic_block_order(importance, current, block_size)
    for r in range(rows):
        expected = network_one_row(importance[r].tolist(), int(current[r]), block_size)
        assert order[r].tolist() == expected, f"row {r} (current block {int(current[r])})"


def test_network_running_merge_is_not_a_true_top_k() -> None:
    """The running merge keeps only the best half of earlier chunks: with 2 x 64 candidates the output holds
    32 of chunk 0's entries at most, even when chunk 0 holds the 64 best blocks."""
    importance = torch.cat([torch.arange(100.0, 164.0), torch.zeros(64)])[None]
    importance[0, 64] = 16.0  # current block 64 (the first of chunk 1)
    order = bitonic_block_order(importance, torch.tensor([64]), 64)
    chosen = (order[0] - 1).tolist()
    assert sorted(c for c in chosen if 0 <= c < 64) == list(range(32, 64))
    assert order[0].tolist() == network_one_row(importance[0].tolist(), 64, 64)


def test_network_inf_turns_its_partner_into_nan_like_the_kernel() -> None:
    """An infinite importance poisons its pair (y * 0 = NaN), as the original's arithmetic select does."""
    importance = torch.tensor([[math.inf, 1.0, 2.0, 16.0]])
    order = bitonic_block_order(importance, torch.tensor([3]), 4)
    assert sorted(order[0].tolist()) == [1, 2, 3, 4]  # still a permutation of the ids


# ----------------------------------------------------------------------------------------------------------
# Mean pooling and compression


@pytest.mark.parametrize("seq_len", [1, 8, 13])
def test_mean_pool_blocks_partial_last_block(seq_len: int) -> None:
    x = randn(2, seq_len, 3, 5, seed=seq_len)
    pooled = mean_pool_blocks(x, 4)
    assert pooled.shape == (2, -(-seq_len // 4), 3, 5)
    for c in range(pooled.shape[1]):
        torch.testing.assert_close(pooled[:, c], x[:, 4 * c : min(seq_len, 4 * c + 4)].mean(dim=1))


def test_mean_pool_blocks_sums_bf16_in_float32() -> None:
    x = randn(1, 64, 1, 4, seed=1).to(torch.bfloat16)
    expected = x.float().mean(dim=1).to(torch.bfloat16)
    assert torch.equal(mean_pool_blocks(x, 64)[:, 0], expected)


@pytest.mark.parametrize("seq_len", [13, 16])
def test_anticausal_compression_against_loops(seq_len: int) -> None:
    block, heads, heads_kv, dim = 4, 8, 2, 6
    q = randn(2, seq_len, heads, dim, seed=0)
    k, v = randn(2, seq_len, heads_kv, dim, seed=1), randn(2, seq_len, heads_kv, dim, seed=2)
    q[1, 3] = 0.0  # a zero query: uniform weights, lse = log(#visible blocks)
    k_cmp, v_cmp = mean_pool_blocks(k, block), mean_pool_blocks(v, block)
    scale = 0.37
    o, lse = anticausal_compression(q, k_cmp, v_cmp, block, scale)
    assert o.shape == q.shape and lse.shape == (2, heads, seq_len) and lse.is_contiguous()
    n_blocks = k_cmp.shape[1]
    for b in range(2):
        for t in range(seq_len):
            for h in range(heads):
                kv = h // (heads // heads_kv)
                visible = range(t // block, n_blocks)
                s = torch.stack([scale * q[b, t, h] @ k_cmp[b, c, kv] for c in visible])
                w = torch.softmax(s, 0)
                expected = sum(w[i] * v_cmp[b, c, kv] for i, c in enumerate(visible))
                torch.testing.assert_close(o[b, t, h], expected)
                torch.testing.assert_close(lse[b, h, t], torch.logsumexp(s, 0))
    assert torch.allclose(lse[1, :, 3], torch.tensor(math.log(n_blocks - 0), dtype=torch.float64))


def test_anticausal_compression_bf16_close_to_float64() -> None:
    q = randn(1, 40, 4, 16, seed=3).to(torch.bfloat16)
    k_cmp, v_cmp = (randn(1, 5, 2, 16, seed=s).to(torch.bfloat16) for s in (4, 5))
    o, lse = anticausal_compression(q, k_cmp, v_cmp, 8, 0.25)
    o64, lse64 = anticausal_compression(q.double(), k_cmp.double(), v_cmp.double(), 8, 0.25)
    assert o.dtype == torch.bfloat16 and lse.dtype == torch.float32
    torch.testing.assert_close(o.double(), o64, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(lse.double(), lse64, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Top-k


def topk_by_loops(q, k_cmp, lse, block_counts, block_size, scale, rows) -> dict[tuple[int, int, int], list[int]]:
    """Importance by explicit loops, then the one-row network; for the (b, t, i) in `rows`."""
    batch, seq_len, heads, _ = q.shape
    heads_kv = k_cmp.shape[2]
    group = heads // heads_kv
    slots = next_power_of_two(block_counts)
    flat = lse.contiguous().reshape(batch, -1)
    q_scaled = (q * scale).to(q.dtype).double()
    out = {}
    for b, t, i in rows:
        current = t // block_size
        width = (current // block_size + 1) * block_size
        importance = []
        for c in range(width):
            total = 0.0
            for g in range(group):
                h = i * group + g
                norm = float(flat[b, t * heads + h])  # the original reads [B, HP, T] as if it were [B, T, HP]
                if c < current:
                    total += math.exp(float(q_scaled[b, t, h] @ k_cmp[b, c, i].double()) - norm)
                elif c == current:
                    total += 1.0
            importance.append(total)
        out[(b, t, i)] = [x - 1 for x in network_one_row(importance, current, block_size)[:slots]]
    return out


@pytest.mark.parametrize(
    ("block_counts", "block_size", "seq_len"),
    [(3, 4, 70), (20, 32, 32 * 70 + 5), (33, 64, 64 * 66 + 17)],
)
def test_topk_against_loops(block_counts: int, block_size: int, seq_len: int) -> None:
    heads, heads_kv, dim = 8, 2, 4
    q = randn(1, seq_len, heads, dim, seed=block_counts)
    k = randn(1, seq_len, heads_kv, dim, seed=block_counts + 1)
    q[0, ::5] = 0.0  # zero queries: exactly tied earlier blocks
    k[0, : 2 * block_size] = 0.0  # two all-zero blocks: exact ties between them
    k_cmp = mean_pool_blocks(k, block_size)
    v_cmp = mean_pool_blocks(randn(1, seq_len, heads_kv, dim, seed=7), block_size)
    scale = dim**-0.5
    _, lse = anticausal_compression(q, k_cmp, v_cmp, block_size, scale)
    indices = original_topk_reference(q, k_cmp, lse, block_counts, block_size, scale)
    slots = next_power_of_two(block_counts)
    assert indices.shape == (1, seq_len, heads_kv, slots) and indices.dtype == torch.int32
    step = max(1, seq_len // 60)
    tokens = sorted({*range(0, seq_len, step), *range(seq_len - 3, seq_len), block_size * block_size})
    rows = [(0, t, i) for t in tokens if t < seq_len for i in range(heads_kv)]
    for (b, t, i), expected in topk_by_loops(q, k_cmp, lse, block_counts, block_size, scale, rows).items():
        assert indices[b, t, i].tolist() == expected, f"token {t}, group {i}"
    # Every listed block is at most the current one and appears once; -1 only for missing candidates.
    current = torch.arange(seq_len)[:, None, None] // block_size
    assert ((indices <= current) & (indices >= -1)).all()
    valid = indices[0, -1, 0][indices[0, -1, 0] >= 0]
    assert valid.unique().numel() == valid.numel()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_topk_zero_queries_tie_every_earlier_block_exactly(dtype) -> None:
    """A zero query scores every earlier block with the same sum of 16 heads' exp(-lse); the sums must be
    bit-equal (whatever order a vectorised reduction would use), so the network alone decides the ties."""
    seq_len, block = 164, 8
    q = torch.zeros(1, seq_len, 64, 8, dtype=dtype)
    k_cmp = randn(1, 21, 4, 8, seed=60).to(dtype)
    lse = randn(1, 64, seq_len, seed=61).to(dtype).abs() + 1.0
    indices = original_topk_reference(q, k_cmp, lse, 4, block, 0.35)
    flat = lse.reshape(seq_len, 64)
    for t in (137, 146, 163):
        current = t // block
        for i in range(4):
            tied = float(torch.exp(-flat[t, 16 * i : 16 * i + 16]).sum())
            width = (current // block + 1) * block
            row = [tied] * current + [16.0] + [0.0] * (width - current - 1)
            expected = [x - 1 for x in network_one_row(row, current, block)[:4]]
            assert indices[0, t, i].tolist() == expected, f"token {t}, group {i}"


def test_topk_float32_matches_float64_on_clear_margins() -> None:
    q = randn(1, 50, 4, 8, seed=11)
    k_cmp = randn(1, 7, 2, 8, seed=12) * 3
    lse = randn(1, 4, 50, seed=13)
    ref = original_topk_reference(q, k_cmp, lse, 4, 8, 0.5)
    got = original_topk_reference(q.float(), k_cmp.float(), lse.float(), 4, 8, 0.5)
    assert (ref == got).float().mean() > 0.99


def test_topk_rejects_more_slots_than_block_size() -> None:
    q, k_cmp, lse = torch.zeros(1, 8, 2, 4), torch.zeros(1, 1, 1, 4), torch.zeros(1, 2, 8)
    with pytest.raises(ValueError, match="block_counts=9 rounds up to 16"):
        original_topk_reference(q, k_cmp, lse, 9, 8, 1.0)
    with pytest.raises(ValueError, match="power of two"):
        original_topk_reference(q, k_cmp, lse, 2, 6, 1.0)


# ----------------------------------------------------------------------------------------------------------
# Selection, window, dense


def test_selected_attention_against_loops() -> None:
    block, heads, heads_kv, dim, seq_len = 4, 6, 2, 5, 19
    q = randn(2, seq_len, heads, dim, seed=20)
    k, v = randn(2, seq_len, heads_kv, dim, seed=21), randn(2, seq_len, heads_kv, dim, seed=22)
    gen = torch.Generator().manual_seed(23)
    indices = torch.randint(-1, 5, (2, seq_len, heads_kv, 3), generator=gen, dtype=torch.int32)
    for b, t, i in [(b, t, i) for b in range(2) for t in range(seq_len) for i in range(heads_kv)]:
        row = [x for x in dict.fromkeys(indices[b, t, i].tolist()) if x >= 0] or [t // block]
        indices[b, t, i] = torch.tensor((row + [-1] * 3)[:3])  # no duplicates, some blocks past t
        indices[b, t, i, 0] = t // block
    scale = 0.4
    o = selected_attention_reference(q, k, v, indices, block, scale)
    for b in range(2):
        for t in range(seq_len):
            for h in range(heads):
                kv = h // (heads // heads_kv)
                keys = [j for c in indices[b, t, kv].tolist() if 0 <= c * block <= t
                        for j in range(c * block, min(seq_len, c * block + block)) if j <= t]
                s = torch.stack([scale * q[b, t, h] @ k[b, j, kv] for j in keys])
                expected = torch.softmax(s, 0) @ v[b, keys, kv]
                torch.testing.assert_close(o[b, t, h], expected)


@pytest.mark.parametrize("window", [1, 3, 40])
def test_window_attention_against_loops(window: int) -> None:
    heads, heads_kv, dim, seq_len = 4, 2, 5, 23
    q = randn(1, seq_len, heads, dim, seed=30)
    k, v = randn(1, seq_len, heads_kv, dim, seed=31), randn(1, seq_len, heads_kv, dim, seed=32)
    o = window_attention_reference(q, k, v, window, 0.3)
    for t in range(seq_len):
        for h in range(heads):
            keys = list(range(max(0, t - window + 1), t + 1))
            s = 0.3 * k[0, keys, h // 2] @ q[0, t, h]
            torch.testing.assert_close(o[0, t, h], torch.softmax(s, 0) @ v[0, keys, h // 2])


def test_dense_causal_attention_against_loops() -> None:
    heads, heads_kv, dim, seq_len = 6, 2, 4, 17
    k, v = randn(seq_len, heads_kv, dim, seed=40), randn(seq_len, heads_kv, dim, seed=41)
    positions = torch.tensor([0, 1, 9, 16])
    q = randn(4, heads, dim, seed=42)
    o = dense_causal_attention_reference(q, positions, k, v, 0.5)
    for n, t in enumerate(positions.tolist()):
        for h in range(heads):
            s = 0.5 * k[: t + 1, h // 3] @ q[n, h]
            torch.testing.assert_close(o[n, h], torch.softmax(s, 0) @ v[: t + 1, h // 3])


def test_causal_mean() -> None:
    v = randn(2, 9, 3, 4, seed=50)
    out = causal_mean(v)
    for t in range(9):
        torch.testing.assert_close(out[:, t], v[:, : t + 1].mean(dim=1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_causal_mean_innermost_scan_matches(dtype) -> None:
    """The innermost-dim scan (what CUDA runs) gives the outer-dim scan's sums to float32 rounding."""
    from videonsa.ops.official import cumsum_over_tokens

    v = randn(2, 300, 3, 8, seed=51).to(dtype)
    outer = cumsum_over_tokens(v, torch.float32, innermost=False)
    inner = cumsum_over_tokens(v, torch.float32, innermost=True)
    assert inner.shape == outer.shape == v.shape
    torch.testing.assert_close(inner, outer, atol=1e-4, rtol=1e-6)
    assert causal_mean(v).is_contiguous() and causal_mean(v).dtype == dtype
