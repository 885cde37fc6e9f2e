"""`official_attention` (the original VideoNSA evaluation attention, docs/official-mode.md) against the naive
float64 oracle in `naive_official.py`, a second reading of the same specification.

The top-k's sorting network is as wide as a block (64 at the eval's block size), so the regimes of the eval
(S = 32 = half the width, S = 64 = the whole width with more than 64 blocks) appear here at block sizes 8 and
16 with a few hundred tokens; the top-k alone is also run at block size 64 past 64 blocks.
"""

from __future__ import annotations

import pytest
import torch
from naive_official import (
    mean_pool,
    naive_compression,
    naive_official_attention,
    naive_topk,
    next_power_of_two,
    original_topk_row,
)

DTYPE = torch.float64


def official_attention(*args, **kwargs):
    from videonsa.layers.official import official_attention as library_function

    return library_function(*args, **kwargs)


def layout(*runs: tuple[str, int]) -> list[bool]:
    """Token types from runs such as ("text", 10), ("vision", 50): True = vision."""
    return [kind == "vision" for kind, count in runs for _ in range(count)]


def with_holes(types: list[bool], positions: list[int]) -> list[bool]:
    """The same layout with the tokens at `positions` classified text (vision tokens the position rule
    misreads)."""
    types = list(types)
    for p in positions:
        types[p] = False
    return types


def make_inputs(
    layouts: list[list[bool]], query_heads: int, kv_heads: int, head_dim: int, *, seed: int, q_scale: float = 1.0
) -> dict[str, torch.Tensor]:
    """Random q [B, T, HQ, D], k, v [B, T, HKV, D], gate logits [B, T, HQ, 3] and is_vision [B, T]."""
    generator = torch.Generator().manual_seed(seed)
    batch, length = len(layouts), len(layouts[0])

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=DTYPE)

    return dict(
        q=randn(batch, length, query_heads, head_dim) * q_scale,
        k=randn(batch, length, kv_heads, head_dim),
        v=randn(batch, length, kv_heads, head_dim),
        is_vision=torch.tensor(layouts, dtype=torch.bool),
        gate_logits=randn(batch, length, query_heads, 3),
    )


T10_V80_T11 = layout(("text", 10), ("vision", 80), ("text", 11))  # 101 tokens: a partial last block
SEVERAL_RUNS = layout(("text", 20), ("vision", 40), ("text", 24), ("vision", 50), ("text", 30))
LONG_VIDEO = layout(("text", 12), ("vision", 270), ("text", 18))  # 300 tokens
LONG_VIDEO_PARTIAL = layout(("text", 5), ("vision", 270), ("text", 15))  # 290 tokens

# (name, layouts, HQ, HKV, D, block_size, block_counts, window_size, q_scale)
LAYER_CASES = [
    ("partial_last_block", [T10_V80_T11], 28, 4, 8, 8, 3, 12, 1.0),
    ("text_ties_several_text_runs", [SEVERAL_RUNS], 28, 4, 8, 8, 4, 10, 1.0),
    ("block_counts_3_is_4_slots_width_16", [LONG_VIDEO_PARTIAL], 28, 4, 8, 16, 3, 20, 2.0),
    ("block_counts_20_is_32_slots", [LONG_VIDEO], 28, 4, 8, 32, 20, 40, 2.0),
    # S = the network's width past several chunks (the eval's block_counts 33..64 past 64 blocks).
    ("whole_width_many_chunks", [LONG_VIDEO], 28, 4, 8, 8, 6, 16, 3.0),
    ("whole_width_16_two_chunks", [LONG_VIDEO_PARTIAL], 28, 4, 8, 16, 9, 24, 3.0),
    # S = half the width past several chunks (the eval's block_counts 32 past 64 blocks).
    ("half_width_many_chunks", [LONG_VIDEO], 28, 4, 8, 8, 3, 16, 3.0),
    ("eval_block_size_64", [layout(("text", 9), ("vision", 180), ("text", 11))], 28, 4, 8, 64, 32, 70, 1.0),
    (
        "misclassified_vision_tokens",
        [with_holes(layout(("text", 8), ("vision", 100), ("text", 10)), [8, 9, 30, 61, 62, 63, 64, 107])],
        28, 4, 8, 8, 3, 12, 2.0,
    ),
    (
        "batch_two_vision_layouts",
        [layout(("text", 10), ("vision", 60), ("text", 10)), layout(("text", 30), ("vision", 30), ("text", 20))],
        28, 4, 8, 8, 4, 12, 2.0,
    ),
    # The path is chosen over the whole batch: an all-text and an all-vision sample together take the mixed path.
    ("batch_all_text_with_all_vision", [[False] * 70, [True] * 70], 28, 4, 8, 8, 3, 12, 2.0),
    ("tiny_model_heads", [layout(("text", 10), ("vision", 50), ("text", 10))], 4, 2, 16, 4, 2, 8, 1.0),
    ("tiny_model_heads_whole_width", [T10_V80_T11], 4, 2, 16, 4, 4, 8, 2.0),
    ("heads_fill_all_64", [T10_V80_T11], 32, 8, 8, 8, 3, 12, 1.0),
    ("all_vision_pure_nsa", [[True] * 101], 28, 4, 8, 8, 3, 12, 2.0),
    ("all_vision_pure_nsa_batch_2", [[True] * 45, [True] * 45], 4, 2, 16, 4, 3, 8, 2.0),
    ("all_text_dense", [[False] * 60, [False] * 60], 28, 4, 8, 8, 3, 12, 1.0),
]


@pytest.mark.parametrize(
    "layouts, query_heads, kv_heads, head_dim, block_size, block_counts, window_size, q_scale",
    [case[1:] for case in LAYER_CASES],
    ids=[case[0] for case in LAYER_CASES],
)
def test_official_attention_matches_the_naive_oracle(
    layouts, query_heads, kv_heads, head_dim, block_size, block_counts, window_size, q_scale
):
    inputs = make_inputs(layouts, query_heads, kv_heads, head_dim, seed=len(layouts[0]) + block_size, q_scale=q_scale)
    settings = dict(block_size=block_size, block_counts=block_counts, window_size=window_size)
    expected = naive_official_attention(**inputs, **settings)
    actual = official_attention(**inputs, **settings)
    assert actual.shape == expected.shape
    assert actual.dtype == DTYPE
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    "layouts",
    [[layout(("text", 10), ("vision", 50), ("text", 10))], [[True] * 45], [[False] * 30]],
    ids=["mixed", "all_vision", "all_text"],
)
def test_scale_and_gate_temperature_are_those_given(layouts):
    """A softmax scale and gate temperature other than the defaults (D ** -0.5, 0.3), on each of the three
    paths: the cases above and the model (whose scale and temperature are the defaults) cannot tell."""
    inputs = make_inputs(layouts, 4, 2, 16, seed=7, q_scale=2.0)
    settings = dict(block_size=4, block_counts=2, window_size=8, scale=0.6, gate_temperature=0.7)
    expected = naive_official_attention(**inputs, **settings)
    torch.testing.assert_close(official_attention(**inputs, **settings), expected, rtol=0, atol=1e-10)
    default = naive_official_attention(**inputs, block_size=4, block_counts=2, window_size=8)
    assert not torch.allclose(expected, default, rtol=0, atol=1e-3)


def test_text_tokens_get_half_gates_and_the_dense_part_in_the_mixed_path():
    """Changing a text token's gate logits changes nothing (its gates are 0.5 whatever the logits), changing a
    vision token's changes its output; and the mixed path differs from the pure ones on the same tensors."""
    types = layout(("text", 10), ("vision", 40), ("text", 10))
    inputs = make_inputs([types], 4, 2, 16, seed=3)
    settings = dict(block_size=4, block_counts=2, window_size=8)
    base = official_attention(**inputs, **settings)
    for position, is_vision in ((55, False), (20, True)):
        changed = dict(inputs, gate_logits=inputs["gate_logits"].clone())
        changed["gate_logits"][0, position] += 5.0
        output = official_attention(**changed, **settings)
        differs = not torch.allclose(output[0, position], base[0, position], rtol=0, atol=1e-12)
        assert differs == is_vision
    vision_only = dict(inputs, is_vision=torch.ones_like(inputs["is_vision"]))
    all_vision = official_attention(**vision_only, **settings)
    torch.testing.assert_close(all_vision, naive_official_attention(**vision_only, **settings), rtol=0, atol=1e-10)
    assert not torch.allclose(all_vision, base)


@pytest.mark.parametrize(
    "bad, shape_named",
    [
        (dict(query_heads=40, kv_heads=4), "(1, 28, 40, 8)"),  # 2 * HQ > 64
        (dict(query_heads=6, kv_heads=3), "(1, 28, 3, 8)"),  # 64 not a multiple of HKV
        (dict(short_k=True), "(1, 27, 2, 8)"),
        (dict(short_v=True), "(1, 27, 2, 8)"),
        (dict(short_is_vision=True), "(1, 27)"),
        (dict(two_gates=True), "(1, 28, 4, 2)"),
        (dict(wide_k=True), "(1, 28, 2, 16)"),
    ],
    ids=["too_many_heads", "kv_heads_not_dividing_64", "short_k", "short_v", "short_is_vision", "two_gates", "wide_k"],
)
def test_official_attention_refuses_bad_inputs(bad, shape_named):
    """One ValueError line naming the offending shape."""
    query_heads, kv_heads = bad.get("query_heads", 4), bad.get("kv_heads", 2)
    inputs = make_inputs([layout(("text", 6), ("vision", 16), ("text", 6))], query_heads, kv_heads, 8, seed=0)
    if bad.get("short_k"):
        inputs["k"] = inputs["k"][:, :-1]
        inputs["v"] = inputs["v"][:, :-1]
    if bad.get("short_v"):
        inputs["v"] = inputs["v"][:, :-1]
    if bad.get("short_is_vision"):
        inputs["is_vision"] = inputs["is_vision"][:, :-1]
    if bad.get("two_gates"):
        inputs["gate_logits"] = inputs["gate_logits"][..., :2]
    if bad.get("wide_k"):
        inputs["k"] = torch.cat([inputs["k"], inputs["k"]], dim=-1)
    with pytest.raises(ValueError) as error:
        official_attention(**inputs, block_size=4, block_counts=2, window_size=8)
    message = str(error.value).strip()
    assert "\n" not in message
    assert shape_named in message


def test_official_attention_in_float32_matches_the_oracle():
    """float32 inputs give a float32 result equal to the float64 oracle's to float32 precision (the cases
    hold no near-ties, so both pick the same blocks)."""
    inputs = make_inputs([SEVERAL_RUNS], 28, 4, 8, seed=11)
    settings = dict(block_size=8, block_counts=4, window_size=10)
    expected = naive_official_attention(**inputs, **settings)
    actual = official_attention(**{k: v.float() if v.is_floating_point() else v for k, v in inputs.items()}, **settings)
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual.double(), expected, rtol=0, atol=2e-5)


# ----------------------------------------------------------------------------------------------------------
# The building blocks
# ----------------------------------------------------------------------------------------------------------


def test_mean_pool_blocks_matches_the_oracle_with_a_partial_last_block():
    from videonsa.ops.official import mean_pool_blocks

    x = torch.randn(2, 29, 3, 5, dtype=DTYPE, generator=torch.Generator().manual_seed(0))
    expected = mean_pool(x, 8)
    assert expected.shape == (2, 4, 3, 5)
    torch.testing.assert_close(expected[:, 3], x[:, 24:].mean(dim=1), rtol=0, atol=0)
    torch.testing.assert_close(mean_pool_blocks(x, 8), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_anticausal_compression_matches_the_oracle(dtype):
    """Outputs [B, T, 64, D] and the natural-log lse laid out [B, 64, T] contiguous (float32 from float32
    inputs, as the original's; float64 inputs may keep float64)."""
    from videonsa.ops.official import anticausal_compression

    generator = torch.Generator().manual_seed(1)
    q = torch.randn(2, 45, 64, 8, dtype=DTYPE, generator=generator)
    q[:, 3] = 0  # zero queries: the plain mean of the visible blocks, lse = log(#visible)
    q[:, :, 56:] = 0
    k_cmp, v_cmp = (torch.randn(2, 6, 4, 8, dtype=DTYPE, generator=generator) for _ in range(2))
    expected_o, expected_lse = naive_compression(q, k_cmp, v_cmp, 8, 8**-0.5)
    o, lse = anticausal_compression(q.to(dtype), k_cmp.to(dtype), v_cmp.to(dtype), 8, 8**-0.5)
    assert lse.shape == (2, 64, 45) and lse.is_contiguous()
    assert lse.dtype == torch.float32 if dtype == torch.float32 else lse.dtype in (torch.float32, torch.float64)
    tolerance = 1e-10 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(o.double(), expected_o, rtol=0, atol=tolerance)
    lse_tolerance = 1e-10 if lse.dtype == torch.float64 else 2e-6
    torch.testing.assert_close(lse.double(), expected_lse, rtol=0, atol=lse_tolerance)
    # Token 3 (zero query) in block 0 sees all 6 blocks.
    torch.testing.assert_close(lse[:, 60, 3].double(), torch.full((2,), 6.0, dtype=DTYPE).log(), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# The top-k alone, and the sorting network itself
# ----------------------------------------------------------------------------------------------------------


def tied_topk_inputs(
    length: int, block_size: int, *, seed: int, kv_heads: int = 4, head_dim: int = 4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [1, T, 64, D], k_cmp [1, NB, HKV, D], lse float32 [1, 64, T] full of exact ties: q and k are small
    multiples of 1/2 (every dot product exact), one token in four has q = 0 (a text query), blocks repeat
    earlier blocks or are zero (all-text blocks)."""
    generator = torch.Generator().manual_seed(seed)
    blocks = -(-length // block_size)
    q = torch.randint(-2, 3, (1, length, 64, head_dim), generator=generator).to(DTYPE) / 2
    q[:, torch.randperm(length, generator=generator)[: length // 4]] = 0
    q[:, :, 56:] = 0
    k_cmp = torch.randint(-2, 3, (1, blocks, kv_heads, head_dim), generator=generator).to(DTYPE) / 2
    for c in range(1, blocks):
        choice = int(torch.randint(0, 3, (), generator=generator))
        if choice == 0:
            k_cmp[:, c] = k_cmp[:, int(torch.randint(0, c, (), generator=generator))]
        elif choice == 1:
            k_cmp[:, c] = 0
    lse = (torch.rand(1, 64, length, generator=generator, dtype=DTYPE) * 4 - 1).to(torch.float32)
    return q, k_cmp, lse


@pytest.mark.parametrize(
    "length, block_size, block_counts",
    [(200, 8, 8), (200, 8, 3), (203, 16, 16), (203, 16, 5), (77, 4, 1), (150, 32, 20)],
)
def test_original_topk_reference_matches_the_network_on_tied_rows(length, block_size, block_counts):
    from videonsa.ops.official import original_topk_reference

    q, k_cmp, lse = tied_topk_inputs(length, block_size, seed=length + block_counts)
    scale = q.shape[-1] ** -0.5
    expected = naive_topk(q, k_cmp, lse, block_counts, block_size, scale)
    actual = original_topk_reference(q, k_cmp, lse, block_counts, block_size, scale)
    assert actual.dtype == torch.int32
    assert actual.shape == (1, length, 4, next_power_of_two(block_counts))
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("block_counts", [32, 40])
def test_original_topk_reference_past_64_blocks_at_block_size_64(block_counts):
    """The eval's block size with 71 blocks: S = 32 (exact top-32) and S = 64 (the running merge keeps only the
    best 32 of earlier chunks); rows sampled on both sides of block 64."""
    from videonsa.ops.official import original_topk_reference

    length = 64 * 70 + 9
    q, k_cmp, lse = tied_topk_inputs(length, 64, seed=block_counts)
    q[:, :, :56] *= 2  # larger scores: earlier blocks often outrank the current one's 16.0
    scale = q.shape[-1] ** -0.5
    rows = sorted({*range(0, length, 211), *range(64 * 64 - 70, length, 29), length - 1})
    expected = naive_topk(q, k_cmp, lse, block_counts, 64, scale, tokens=rows)
    actual = original_topk_reference(q, k_cmp, lse, block_counts, 64, scale)
    assert torch.equal(actual[:, rows], expected[:, rows])


def test_network_reproduces_the_documented_tie_example():
    """64-wide network, current block 40 (score 16), blocks 0..39 exactly tied below it, 32 slots: the set
    is {8..11, 13..40}, decided by the network alone."""
    picked = original_topk_row([3.5] * 40 + [16.0], block_size=64, selected=32)
    assert picked[0] == 40
    assert sorted(picked) == [*range(8, 12), *range(13, 41)]


def test_network_is_an_exact_top_half_width_and_not_a_top_whole_width():
    generator = torch.Generator().manual_seed(5)
    for _ in range(200):
        width = int(2 ** torch.randint(2, 5, (), generator=generator))
        count = int(torch.randint(1, 5 * width, (), generator=generator))
        values = (torch.randint(1, 7, (count,), generator=generator) / 2).tolist()  # > 0: no tie with empty slots
        for selected in (1, width // 2):
            picked = original_topk_row(values, width, selected)
            assert sorted((values[i] for i in picked if i >= 0), reverse=True) == sorted(values, reverse=True)[
                :selected
            ]
    # S = width past one chunk: only the best half of each earlier chunk survives. Eight 9s in chunk 0, eight
    # 1s in chunk 1, a 2 in chunk 2: four 9s, the 2 and three empty slots, not the true top-8 (eight 9s).
    values = [9.0] * 8 + [1.0] * 8 + [2.0]
    picked = original_topk_row(values, 8, 8)
    assert sorted((values[i] for i in picked if i >= 0), reverse=True) == [9.0] * 4 + [2.0]
    assert picked.count(-1) == 3 and 16 in picked
