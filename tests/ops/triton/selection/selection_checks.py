"""Shared by the selection tests: random selections, the masked dense reference and the forward/backward check."""

from __future__ import annotations

import math

import torch
from interpreter_harness import DEVICE, assert_matches_masked_dense, packed


def random_selection(cu: torch.Tensor, heads_kv: int, slots: int, block_size: int, seed: int) -> torch.Tensor:
    """int32 [T, HKV, S]: per token and group, the current block plus random earlier blocks (ascending, -1
    padded); neighbouring tokens sometimes share, sometimes not; a few rows select nothing at all."""
    gen = torch.Generator().manual_seed(seed)
    total = int(cu[-1])
    out = torch.full((total, heads_kv, slots), -1, dtype=torch.int32)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        for t in range(a, b):
            current = (t - a) // block_size
            for g in range(heads_kv):
                if (t * 7 + g) % 23 == 0:
                    continue  # nothing selected: o = 0, lse = -inf
                earlier = torch.randperm(current, generator=gen)[: slots - 1].tolist() if current else []
                chosen = sorted([*earlier, current])
                out[t, g, : len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
    return out


def dense_selected(q, k, v, block_indices, cu, block_size, scale):
    """Plain masked softmax attention (differentiable): returns o [T,HQ,D] and lse [T,HQ] (-inf: no key)."""
    total, heads_q, _ = q.shape
    heads_kv = k.shape[1]
    group = heads_q // heads_kv
    allowed = torch.zeros(total, heads_kv, total, dtype=torch.bool)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        for t in range(a, b):
            for g in range(heads_kv):
                for j in block_indices[t, g].tolist():
                    if j >= 0:
                        allowed[t, g, a + j * block_size : min(b, a + (j + 1) * block_size, t + 1)] = True
    allowed = allowed.repeat_interleave(group, dim=1)
    s = scale * torch.einsum("thd,shd->ths", q, k.repeat_interleave(group, dim=1))
    s = s.masked_fill(~allowed, -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.where(allowed, torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None]), 0.0)
    return torch.einsum("ths,shd->thd", p, v.repeat_interleave(group, dim=1)), lse


def assert_forward_matches(o, lse, o_ref, lse_ref, dtype: torch.dtype, atol: float) -> None:
    """o [T,HQ,D] (dtype) and lse float32 [T,HQ] equal the float64 reference; rows without keys: o = 0, lse = -inf."""
    assert o.dtype == dtype and lse.dtype == torch.float32
    assert torch.equal(torch.isinf(lse.cpu()), torch.isinf(lse_ref)), "rows without keys differ"
    assert bool((o.cpu()[torch.isinf(lse_ref)] == 0).all()), "rows without keys must give o = 0"
    finite = torch.isfinite(lse_ref)
    torch.testing.assert_close(lse.cpu().double()[finite], lse_ref[finite], atol=atol, rtol=1e-4)
    torch.testing.assert_close(o.cpu().double(), o_ref, atol=atol, rtol=atol)


def check_selection(seq_lens, heads_q, heads_kv, head_dim, block_size, slots, dtype, seed, **kwargs):
    """Forward and backward of the kernels against `dense_selected` in float64."""
    from videonsa.ops.triton.selection import selected_attention_bwd, selected_attention_fwd

    q, k, v, do, cu = packed(seq_lens, heads_q, heads_kv, head_dim, seed)
    q, k, v, do = (x.to(dtype).double() for x in (q, k, v, do))  # the reference sees the stored values
    idx = random_selection(cu, heads_kv, slots, block_size, seed)
    scale = head_dim**-0.5
    fwd_kwargs = {key: kwargs[key] for key in ("tile_rows",) if key in kwargs}
    dev = lambda x: x.to(DEVICE, dtype) if x.is_floating_point() else x.to(DEVICE)  # noqa: E731
    o, lse = selected_attention_fwd(dev(q), dev(k), dev(v), dev(idx), dev(cu), block_size, scale, **fwd_kwargs)
    grads = selected_attention_bwd(
        dev(q), dev(k), dev(v), o, lse, dev(do), dev(idx), dev(cu), block_size, scale, **kwargs
    )
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o_ref, lse_ref = dense_selected(*leaves, idx, cu, block_size, scale)
    (o_ref * do).sum().backward()

    atol = 2e-5 if dtype == torch.float32 else 3e-3
    assert_forward_matches(o, lse, o_ref, lse_ref, dtype, atol)
    for name, got, leaf in zip(("dq", "dk", "dv"), grads, leaves, strict=True):
        assert got.dtype == dtype and got.shape == leaf.shape, name
        torch.testing.assert_close(got.cpu().double(), leaf.grad, atol=2 * atol, rtol=2 * atol, msg=name)
    return idx, o


def gpu_case(
    seq_lens, heads_q, heads_kv, head_dim, dtype, clustered: bool, tile_rows=None, by_block=None, dq_by_block=None
) -> None:
    gen = torch.Generator(device="cuda").manual_seed(sum(seq_lens) + heads_q)
    total = sum(seq_lens)
    cu = torch.tensor([0, *torch.tensor(seq_lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    q = torch.randn(total, heads_q, head_dim, device="cuda", dtype=dtype, generator=gen)
    k = torch.randn(total, heads_kv, head_dim, device="cuda", dtype=dtype, generator=gen)
    v = torch.randn(total, heads_kv, head_dim, device="cuda", dtype=dtype, generator=gen)
    do = torch.randn(total, heads_q, head_dim, device="cuda", dtype=dtype, generator=gen)
    block_size, slots = 64, 32
    idx = torch.full((total, heads_kv, slots), -1, dtype=torch.int32, device="cuda")
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        pos = torch.arange(b - a, device="cuda")
        n_blocks = -(-(b - a) // block_size)
        base = torch.rand(heads_kv, n_blocks, device="cuda", generator=gen)
        noise = torch.rand(b - a, heads_kv, n_blocks, device="cuda", generator=gen)
        score = base + 0.3 * noise if clustered else noise
        block = torch.arange(n_blocks, device="cuda")
        score = torch.where((block[None, :] < (pos[:, None] + 1) // block_size)[:, None], score, -1.0)
        score = torch.where((block[None, :] == pos[:, None] // block_size)[:, None], 9.0, score)
        top = score.topk(min(slots, n_blocks), dim=-1)
        chosen = torch.where(top.values >= 0, top.indices, n_blocks).sort(dim=-1).values
        idx[a:b, :, : chosen.shape[-1]] = torch.where(chosen == n_blocks, -1, chosen).to(torch.int32)

    from videonsa.ops.triton.selection import selected_attention_bwd, selected_attention_fwd

    scale = head_dim**-0.5
    o, lse = selected_attention_fwd(q, k, v, idx, cu, block_size, scale, tile_rows=tile_rows, by_block=by_block)
    grads = selected_attention_bwd(q, k, v, o, lse, do, idx, cu, block_size, scale, tile_rows=tile_rows,
                                   dq_by_block=dq_by_block)
    # float32 reference on the same (rounded) values, one sequence at a time.
    group = heads_q // heads_kv

    def allowed(a, b, pos):  # the token's selected blocks, causal, shared by the heads of a group
        chosen = (idx[a:b].long()[:, :, :, None] == (pos // block_size)[None, None, None, :]).any(dim=2)
        return (chosen & (pos[None, None, :] <= pos[:, None, None])).repeat_interleave(group, dim=1)

    assert_matches_masked_dense(q, k, v, do, cu, o, grads, scale, allowed)
