"""Shared helpers for comparing an NSA implementation with the naive one in `naive_nsa`.

`make_inputs` builds random leaf tensors; `compare_with_naive` runs an implementation and the naive operator on
the same values, forward and backward, and asserts they agree. Kernel tests can pass their own `implementation`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from naive_nsa import NaiveParts, forced_blocks, naive_nsa, sequence_spans
from torch import Tensor

from videonsa.ops import NSAParts, nsa_attention, nsa_attention_parts

INPUT_NAMES = ("q", "k", "v", "g_cmp", "g_slc", "g_swa")

# (atol, rtol) of outputs and gradients against the float64 naive result, by the implementation's dtype.
TOLERANCES = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-5, 1e-4),
    torch.bfloat16: (4e-2, 4e-2),
    torch.float16: (5e-3, 5e-3),
}
# Importance scores closer than this may legitimately be ranked differently by a lower-precision implementation.
NEAR_TIE = {torch.float64: 0.0, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}


@dataclass
class Case:
    """One operator call: shapes, NSA settings and packing."""

    batch: int = 1
    seq_len: int = 24
    q_heads: int = 2
    kv_heads: int = 1
    head_dim: int = 8
    block_size: int = 4
    block_count: int = 3
    window_size: int = 6
    init_blocks: int = 0
    local_blocks: int = 1
    seq_lens: list[int] | None = None  # packed sequence lengths (cu_seqlens); then batch is 1
    scale: float | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.seq_lens is not None:
            self.batch, self.seq_len = 1, sum(self.seq_lens)

    def settings(self) -> dict:
        """Keyword arguments of `nsa_attention` (cu_seqlens included)."""
        cu_seqlens = None
        if self.seq_lens is not None:
            cu_seqlens = torch.tensor([0, *torch.tensor(self.seq_lens).cumsum(0).tolist()], dtype=torch.int32)
        return dict(
            block_size=self.block_size,
            block_count=self.block_count,
            window_size=self.window_size,
            init_blocks=self.init_blocks,
            local_blocks=self.local_blocks,
            cu_seqlens=cu_seqlens,
            scale=self.scale,
        )


def make_inputs(case: Case, dtype: torch.dtype, seed: int = 0) -> dict[str, Tensor]:
    """Random q [B,T,HQ,D], k/v [B,T,HKV,D] and gates in [0,1] [B,T,HQ] as leaves that require grad.

    Keys get a random offset per block so that blocks differ clearly in importance (plain noise averaged over
    a block makes every compressed key nearly zero and the ranking a coin toss).
    """
    gen = torch.Generator().manual_seed(seed)
    b, t, hq, hkv, d = case.batch, case.seq_len, case.q_heads, case.kv_heads, case.head_dim
    block_offset = torch.randn(b, -(-t // case.block_size), hkv, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, t, hkv, d, generator=gen, dtype=torch.float64)
    k = k + 1.5 * block_offset.repeat_interleave(case.block_size, dim=1)[:, :t]
    tensors = {
        "q": torch.randn(b, t, hq, d, generator=gen, dtype=torch.float64),
        "k": k,
        "v": torch.randn(b, t, hkv, d, generator=gen, dtype=torch.float64),
        "g_cmp": torch.rand(b, t, hq, generator=gen, dtype=torch.float64),
        "g_slc": torch.rand(b, t, hq, generator=gen, dtype=torch.float64),
        "g_swa": torch.rand(b, t, hq, generator=gen, dtype=torch.float64),
    }
    return {name: x.to(dtype).requires_grad_() for name, x in tensors.items()}


def detached_copies(inputs: dict[str, Tensor], dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Fresh leaves with the same values (optionally cast), so two implementations get separate gradients."""
    return {
        name: x.detach().to(dtype or x.dtype).clone().requires_grad_() for name, x in inputs.items()
    }


def assert_selection_equivalent(
    got: Tensor, naive: NaiveParts, case: Case, near_tie: float
) -> bool:
    """Check an implementation's block_indices [B,T,HKV,S] against the naive choice.

    Exact agreement is required except where the naive importance scores of the swapped blocks lie within
    `near_tie` of each other. Forced blocks must always be present. Returns True when the choices are identical.
    """
    assert got.dtype == torch.int32, got.dtype
    assert got.shape == naive.block_indices.shape, (got.shape, naive.block_indices.shape)
    got = got.long()
    if torch.equal(got, naive.block_indices):
        return True
    assert near_tie > 0, "block selection differs from the naive one in float64"
    for row, start, end in sequence_spans(case.batch, case.seq_len, case.settings()["cu_seqlens"]):
        for position in range(start, end):
            current_block = (position - start) // case.block_size
            forced = forced_blocks(current_block, case.init_blocks, case.local_blocks)
            for g in range(got.shape[2]):
                got_list = got[row, position, g].tolist()
                chosen = [j for j in got_list if j >= 0]
                assert got_list == sorted(chosen) + [-1] * (len(got_list) - len(chosen)), got_list
                expected = {j for j in naive.block_indices[row, position, g].tolist() if j >= 0}
                where = f"(row {row}, token {position - start} of its sequence, kv head {g})"
                assert forced <= set(chosen), f"forced blocks {forced} missing from {chosen} {where}"
                assert len(chosen) == len(expected), f"{chosen} vs naive {sorted(expected)} {where}"
                swapped = set(chosen) ^ expected
                scores = naive.block_scores[row, position, g]
                swapped_scores = [float(scores[j]) for j in swapped]
                assert all(math.isfinite(s) for s in swapped_scores), f"invisible block chosen {where}"
                if swapped_scores:
                    spread = max(swapped_scores) - min(swapped_scores)
                    assert spread <= near_tie, (
                        f"selection {chosen} vs naive {sorted(expected)} {where}: scores {swapped_scores}"
                    )
    return False


def assert_close(name: str, got: Tensor, expected: Tensor, atol: float, rtol: float) -> None:
    """torch.testing.assert_close in float64 with a message naming the tensor."""
    torch.testing.assert_close(
        got.double(), expected.double(), atol=atol, rtol=rtol, equal_nan=False, msg=lambda m: f"{name}: {m}"
    )


Implementation = Callable[..., NSAParts]


def reference_parts(*args, **kwargs) -> NSAParts:
    """The public parts entry point with the reference backend forced, whatever the environment says."""
    return nsa_attention_parts(*args, **kwargs, backend="reference")


def reference_attention(*args, **kwargs) -> Tensor:
    """The public `nsa_attention` with the reference backend forced, whatever the environment says."""
    return nsa_attention(*args, **kwargs, backend="reference")


def compare_with_naive(
    case: Case,
    dtype: torch.dtype,
    seed: int = 0,
    implementation: Implementation = reference_parts,
    check_grads: bool = True,
) -> tuple[NSAParts, NaiveParts]:
    """Run `implementation` in `dtype` and the naive operator on the same values; assert forward and grads match.

    Checks o, o_cmp, o_slc, o_swa (dtype and values), block_indices (exact in float64, up to near-ties
    otherwise), lse_cmp (float32, -inf in the same places) and the gradients of q, k, v and the three gates
    for a random upstream gradient of o.
    """
    atol, rtol = TOLERANCES[dtype]
    inputs = make_inputs(case, dtype, seed)
    naive_inputs = detached_copies(inputs, torch.float64)
    settings = case.settings()

    parts = implementation(**inputs, **settings)
    naive = naive_nsa(**naive_inputs, **settings)
    same_choice = assert_selection_equivalent(parts.block_indices, naive, case, NEAR_TIE[dtype])
    if not same_choice:  # compare the attention given the implementation's own (legitimately different) choice
        naive_inputs = detached_copies(inputs, torch.float64)
        naive = naive_nsa(**naive_inputs, **settings, selection=parts.block_indices)

    shape = (case.batch, case.seq_len, case.q_heads, case.head_dim)
    for name in ("o", "o_cmp", "o_slc", "o_swa"):
        got = getattr(parts, name)
        assert got.dtype == dtype, f"{name} dtype {got.dtype}"
        assert tuple(got.shape) == shape, f"{name} shape {tuple(got.shape)}"
        assert_close(name, got, getattr(naive, name), atol, rtol)
    assert parts.lse_cmp.dtype == torch.float32
    assert torch.equal(torch.isinf(parts.lse_cmp), torch.isinf(naive.lse_cmp)), "lse_cmp -inf positions differ"
    finite = torch.isfinite(naive.lse_cmp)
    lse_tol = max(atol, 1e-5)  # lse_cmp is float32 whatever the input dtype
    assert_close("lse_cmp", parts.lse_cmp[finite], naive.lse_cmp[finite], lse_tol, max(rtol, 1e-5))

    if check_grads:
        gen = torch.Generator().manual_seed(seed + 1)
        upstream = torch.randn(shape, generator=gen, dtype=torch.float64)
        (parts.o.double() * upstream).sum().backward()
        (naive.o * upstream).sum().backward()
        for name in INPUT_NAMES:
            got = inputs[name].grad
            assert got is not None, f"no gradient reached {name}"
            assert got.dtype == dtype
            assert_close(f"grad {name}", got, naive_inputs[name].grad, atol, rtol)
    return parts, naive
