"""Per-key attention mass from the operator's parts against a dense softmax computed directly (short sequences)."""

from __future__ import annotations

import pytest
import torch
from dense_branches import compressed_values, dense_probabilities

from videonsa.analysis.attention_mass import branch_key_mass
from videonsa.ops import nsa_attention_parts

CASES = [
    # (T, HQ, HKV, D, block_size, block_count, window, init_blocks)
    (37, 4, 2, 8, 4, 3, 6, 0),
    (29, 6, 3, 4, 5, 2, 7, 1),  # block size not a power of two, an incomplete last block, a forced first block
    (16, 2, 2, 8, 4, 8, 32, 0),  # more block slots than blocks, window longer than the sequence
]


def inputs(seq_len, heads_q, heads_kv, dim, seed):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(seq_len, heads_q, dim, generator=generator, dtype=torch.float64) * 1.5
    k = torch.randn(seq_len, heads_kv, dim, generator=generator, dtype=torch.float64) * 1.5
    v = torch.randn(seq_len, heads_kv, dim, generator=generator, dtype=torch.float64)
    return q, k, v


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("chunk_elements", [1 << 24, 64])
def test_key_mass_equals_the_dense_softmax(case, chunk_elements):
    seq_len, heads_q, heads_kv, dim, block_size, block_count, window, init_blocks = case
    q, k, v = inputs(seq_len, heads_q, heads_kv, dim, seed=seq_len)
    gates = [torch.rand(1, seq_len, heads_q, dtype=torch.float64) for _ in range(3)]
    budget = dict(block_size=block_size, block_count=block_count, window_size=window, init_blocks=init_blocks)
    parts = nsa_attention_parts(q[None], k[None], v[None], *gates, backend="reference", **budget)
    scale = dim**-0.5
    masses = branch_key_mass(q, k, parts.block_indices[0], parts.lse_cmp[0], block_size=block_size,
                             window_size=window, scale=scale, chunk_elements=chunk_elements)
    dense = dense_probabilities(q, k, parts.block_indices[0], block_size, window, scale)
    group = heads_q // heads_kv
    values = {"cmp": compressed_values(v, block_size), "slc": v, "swa": v}
    outputs = {"cmp": parts.o_cmp[0], "slc": parts.o_slc[0], "swa": parts.o_swa[0]}
    for branch, (probs, mask) in dense.items():
        # The dense matrices are the operator's own branches: they reproduce its branch outputs.
        reproduced = torch.einsum("thk,khd->thd", probs, values[branch].repeat_interleave(group, dim=1))
        torch.testing.assert_close(reproduced, outputs[branch], msg=branch)
        torch.testing.assert_close(masses[branch].mass, probs.sum(0), msg=branch)
        torch.testing.assert_close(masses[branch].audience, mask.sum(0).double(), msg=branch)
    assert masses["cmp"].mass.shape == (heads_q, seq_len // block_size)


def test_each_query_hands_out_its_whole_probability():
    """Summed over keys, a branch's mass is the number of queries that attend to anything."""
    q, k, v = inputs(50, 4, 2, 8, seed=1)
    gates = [torch.rand(1, 50, 4, dtype=torch.float64) for _ in range(3)]
    parts = nsa_attention_parts(q[None], k[None], v[None], *gates, block_size=4, block_count=3, window_size=6)
    masses = branch_key_mass(q, k, parts.block_indices[0], parts.lse_cmp[0], block_size=4, window_size=6,
                             scale=8**-0.5, chunk_elements=100)
    torch.testing.assert_close(masses["swa"].mass.sum(1), torch.full((4,), 50.0, dtype=torch.float64))
    torch.testing.assert_close(masses["slc"].mass.sum(1), torch.full((4,), 50.0, dtype=torch.float64))
    # Compression: queries 0..2 see no complete block.
    torch.testing.assert_close(masses["cmp"].mass.sum(1), torch.full((4,), 47.0, dtype=torch.float64))
    share = masses["swa"].share()
    assert bool((share >= 0).all()) and bool((share <= 1).all())


def test_float32_inputs_accumulate_in_float64():
    q, k, v = (x.float() for x in inputs(40, 2, 1, 8, seed=2))
    gates = [torch.rand(1, 40, 2) for _ in range(3)]
    parts = nsa_attention_parts(q[None], k[None], v[None], *gates, block_size=4, block_count=2, window_size=5)
    masses = branch_key_mass(q, k, parts.block_indices[0], parts.lse_cmp[0], block_size=4, window_size=5,
                             scale=8**-0.5)
    for mass in masses.values():
        assert mass.mass.dtype == torch.float64
    reference = branch_key_mass(q.double(), k.double(), parts.block_indices[0], parts.lse_cmp[0], block_size=4,
                                window_size=5, scale=8**-0.5)
    for branch in masses:
        torch.testing.assert_close(masses[branch].mass, reference[branch].mass, atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_key_mass_from_the_triton_parts_on_the_gpu():
    """The masses from the Triton operator's parts (its selected blocks and lse, bf16 inputs) against dense
    float64 softmaxes over the same selection."""
    seq_len, heads_q, heads_kv, dim = 1000, 28, 4, 128
    q, k, v = (x.cuda() for x in inputs(seq_len, heads_q, heads_kv, dim, seed=5))
    q, k, v = (x * 0.3 for x in (q, k, v))
    gates = [torch.rand(1, seq_len, heads_q, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    budget = dict(block_size=64, block_count=4, window_size=128)
    parts = nsa_attention_parts(*(x[None].bfloat16() for x in (q, k, v)), *gates, backend="triton", **budget)
    q16, k16 = q.bfloat16(), k.bfloat16()
    masses = branch_key_mass(q16, k16, parts.block_indices[0], parts.lse_cmp[0], block_size=64, window_size=128,
                             scale=dim**-0.5)
    dense = dense_probabilities(q16.double().cpu(), k16.double().cpu(), parts.block_indices[0].cpu(), 64, 128,
                                dim**-0.5)
    for branch, (probs, mask) in dense.items():
        torch.testing.assert_close(masses[branch].mass.cpu(), probs.sum(0), atol=2e-2, rtol=2e-3, msg=branch)
        torch.testing.assert_close(masses[branch].audience.cpu(), mask.sum(0).double(), msg=branch)
