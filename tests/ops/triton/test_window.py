"""Sliding-window Triton kernels (`videonsa.ops.triton.window`) against plain attention references.

Runs like tests/ops/test_triton_selection.py: directly on a CUDA GPU, otherwise once in a child pytest under
TRITON_INTERPRET=1 (`test_under_interpreter`), with tiny float32 / float16 shapes and float64 references.
"""

from __future__ import annotations

import math

import pytest
import torch
from interpreter_harness import (
    DEVICE,
    assert_matches_masked_dense,
    interpreter_tests,
    packed,
)

from videonsa.ops import nsa_parts_reference
from videonsa.ops.triton import window
from videonsa.ops.triton.window import WindowSettings

kernel_test, test_under_interpreter = interpreter_tests(window._swa_fwd_kernel, __file__, min_passed=8)


def dense_window(q, k, v, cu, window, scale):
    """Plain masked softmax attention over keys t-window+1..t of the same sequence; returns o and lse."""
    total, heads_q, _ = q.shape
    group = heads_q // k.shape[1]
    allowed = torch.zeros(total, total, dtype=torch.bool)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        for t in range(a, b):
            allowed[t, max(a, t - window + 1) : t + 1] = True
    s = scale * torch.einsum("thd,shd->ths", q, k.repeat_interleave(group, dim=1))
    s = s.masked_fill(~allowed[:, None, :], -math.inf)
    return torch.einsum("ths,shd->thd", torch.softmax(s, -1), v.repeat_interleave(group, 1)), s.logsumexp(-1)


def check_window(seq_lens, heads_q, heads_kv, head_dim, window, dtype, seed, **kwargs) -> None:
    from videonsa.ops.triton.window import window_attention_bwd, window_attention_fwd

    q, k, v, do, cu = packed(seq_lens, heads_q, heads_kv, head_dim, seed)
    q, k, v, do = (x.to(dtype).double() for x in (q, k, v, do))  # the reference sees the stored values
    scale = head_dim**-0.5
    fwd_kwargs = kwargs = dict(settings=WindowSettings(**kwargs))
    dev = lambda x: x.to(DEVICE, dtype) if x.is_floating_point() else x.to(DEVICE)  # noqa: E731
    o, lse = window_attention_fwd(dev(q), dev(k), dev(v), dev(cu), window, scale, **fwd_kwargs)
    grads = window_attention_bwd(dev(q), dev(k), dev(v), o, lse, dev(do), dev(cu), window, scale, **kwargs)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o_ref, lse_ref = dense_window(*leaves, cu, window, scale)
    (o_ref * do).sum().backward()

    atol = 2e-5 if dtype == torch.float32 else 3e-3
    assert o.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(lse.cpu().double(), lse_ref.detach(), atol=atol, rtol=1e-4)
    torch.testing.assert_close(o.cpu().double(), o_ref, atol=atol, rtol=atol)
    for name, got, leaf in zip(("dq", "dk", "dv"), grads, leaves, strict=True):
        assert got.dtype == dtype and got.shape == leaf.shape, name
        torch.testing.assert_close(got.cpu().double(), leaf.grad, atol=2 * atol, rtol=2 * atol, msg=name)


@kernel_test
def test_gqa_7_to_1_varlen() -> None:
    """Two packed sequences, window longer than one key step, 64-row query tiles (9 tokens x 7 heads)."""
    check_window([37, 20], 7, 1, 16, 20, torch.float32, seed=0, query_rows=64, key_step=16, dkdv_rows=16)


@kernel_test
def test_gqa_7_to_1_default_tiles_two_groups() -> None:
    check_window([50], 14, 2, 16, 8, torch.float32, seed=1, key_step=16)


@kernel_test
def test_window_of_one_and_window_longer_than_sequence() -> None:
    check_window([19, 3], 4, 2, 32, 1, torch.float32, seed=2, key_step=16)
    check_window([19, 3], 4, 2, 32, 100, torch.float32, seed=3, key_step=16)


@kernel_test
def test_mha_1_to_1_short_sequences_fp16() -> None:
    check_window([17, 33, 5], 2, 2, 16, 8, torch.float16, seed=4, query_rows=16, key_step=16, dkdv_rows=16)


@kernel_test
def test_forward_matches_project_reference() -> None:
    """o_swa of `nsa_parts_reference` equals the kernel output."""
    from videonsa.ops.triton.window import window_attention_fwd

    q, k, v, _, cu = packed([40, 26], 7, 1, 16, seed=5)
    o, _ = window_attention_fwd(
        q.float().to(DEVICE), k.float().to(DEVICE), v.float().to(DEVICE), cu.to(DEVICE), 12, 0.25,
        settings=WindowSettings(key_step=16),
    )
    gates = torch.zeros(1, q.shape[0], 7, dtype=torch.float64)
    parts = nsa_parts_reference(
        q[None], k[None], v[None], gates, gates, gates, block_size=16, block_count=2, window_size=12,
        cu_seqlens=cu, scale=0.25,
    )
    torch.testing.assert_close(o.cpu().double(), parts.o_swa[0], atol=2e-5, rtol=2e-5)


def check_lean_interfaces(seq_lens, heads_q, heads_kv, head_dim, window, dtype, seed, **kwargs) -> None:
    """The lean NSA path's entry points against the dense reference on fresh inputs:

    * forward with fold_into: x <- a * x + b * o_swa in place (and lse as usual);
    * window_attention_delta == sum_d do * o_swa;
    * backward with o=None, delta and do_scale given, accumulating into given dq, dk, dv: the results are the
      given values plus the gradients of sum(o_swa * do * do_scale).
    """
    from videonsa.ops.triton.window import window_attention_bwd, window_attention_delta, window_attention_fwd

    q, k, v, do, cu = packed(seq_lens, heads_q, heads_kv, head_dim, seed)
    gen = torch.Generator().manual_seed(seed + 100)
    x0, dq0 = (torch.randn(q.shape, generator=gen, dtype=torch.float64) for _ in range(2))
    a, b, c = (torch.rand(q.shape[:2], generator=gen, dtype=torch.float64) for _ in range(3))
    q, k, v, do, x0, dq0, a, b, c = (t.to(dtype).double() for t in (q, k, v, do, x0, dq0, a, b, c))
    scale = head_dim**-0.5
    dev = lambda x: x.to(DEVICE, dtype) if x.is_floating_point() else x.to(DEVICE)  # noqa: E731
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o_ref, lse_ref = dense_window(*leaves, cu, window, scale)
    (o_ref * do * c[..., None]).sum().backward()
    atol = 2e-5 if dtype == torch.float32 else 3e-3

    fwd_kwargs = kwargs = dict(settings=WindowSettings(**kwargs))
    buf = dev(x0)
    out, lse = window_attention_fwd(dev(q), dev(k), dev(v), dev(cu), window, scale, fold_into=buf,
                                    fold_scale=dev(a), gate=dev(b), **fwd_kwargs)
    assert out.data_ptr() == buf.data_ptr(), "fold_into must be updated in place"
    want = a[..., None] * x0 + b[..., None] * o_ref.detach()
    torch.testing.assert_close(out.cpu().double(), want, atol=atol, rtol=atol)
    torch.testing.assert_close(lse.cpu().double(), lse_ref.detach(), atol=atol, rtol=1e-4)
    # fold_scale None means a factor of 1
    out1, _ = window_attention_fwd(dev(q), dev(k), dev(v), dev(cu), window, scale, fold_into=dev(x0),
                                   gate=dev(b), **fwd_kwargs)
    torch.testing.assert_close(out1.cpu().double(), x0 + b[..., None] * o_ref.detach(), atol=atol, rtol=atol)

    dot = window_attention_delta(dev(q), dev(k), dev(v), lse, dev(do), dev(cu), window, scale, **fwd_kwargs)
    assert dot.dtype == torch.float32 and dot.shape == q.shape[:2]
    dot_ref = (do * o_ref.detach()).sum(-1)
    torch.testing.assert_close(dot.cpu().double(), dot_ref, atol=4 * atol, rtol=4 * atol)

    dq_buf = dev(dq0)
    dk0, dv0 = (torch.randn(k.shape, generator=gen, dtype=torch.float64).to(dtype).double() for _ in range(2))
    dk_buf, dv_buf = dev(dk0), dev(dv0)
    delta = dot * dev(c).float()
    dq, dk, dv = window_attention_bwd(dev(q), dev(k), dev(v), None, lse, dev(do), dev(cu), window, scale,
                                      delta=delta, do_scale=dev(c), dq=dq_buf, dk=dk_buf, dv=dv_buf, **kwargs)
    assert dq.data_ptr() == dq_buf.data_ptr(), "dq must be accumulated in place"
    assert dk.data_ptr() == dk_buf.data_ptr() and dv.data_ptr() == dv_buf.data_ptr(), "dk/dv in place"
    for name, got, want in (("dq", dq, dq0 + leaves[0].grad), ("dk", dk, dk0 + leaves[1].grad),
                            ("dv", dv, dv0 + leaves[2].grad)):
        torch.testing.assert_close(got.cpu().double(), want, atol=2 * atol, rtol=2 * atol, msg=name)
    # o given instead of delta: the same gradients (delta formed inside, scaled by do_scale)
    o_plain, _ = window_attention_fwd(dev(q), dev(k), dev(v), dev(cu), window, scale, **fwd_kwargs)
    grads = window_attention_bwd(dev(q), dev(k), dev(v), o_plain, lse, dev(do), dev(cu), window, scale,
                                 do_scale=dev(c), **kwargs)
    for name, got, want in zip(("dq", "dk", "dv"), grads, [x.grad for x in leaves], strict=True):
        torch.testing.assert_close(got.cpu().double(), want, atol=2 * atol, rtol=2 * atol, msg=name)


@kernel_test
def test_lean_interfaces_7_to_1_varlen() -> None:
    check_lean_interfaces([37, 20], 7, 1, 16, 20, torch.float32, seed=7, query_rows=64, key_step=16,
                          dkdv_rows=16)


@kernel_test
def test_lean_interfaces_1_to_1_fp16() -> None:
    check_lean_interfaces([17, 5], 2, 2, 32, 8, torch.float16, seed=8, query_rows=16, key_step=16, dkdv_rows=16)


@kernel_test
def test_backward_is_deterministic() -> None:
    from videonsa.ops.triton.window import window_attention_bwd, window_attention_fwd

    q, k, v, do, cu = packed([45], 7, 1, 16, seed=6)
    q, k, v, do, cu = (x.float().to(DEVICE) if x.is_floating_point() else x.to(DEVICE) for x in (q, k, v, do, cu))
    steps = WindowSettings(key_step=16)
    o, lse = window_attention_fwd(q, k, v, cu, 20, 0.25, settings=steps)
    first = window_attention_bwd(q, k, v, o, lse, do, cu, 20, 0.25, settings=steps)
    second = window_attention_bwd(q, k, v, o, lse, do, cu, 20, 0.25, settings=steps)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_bad_inputs_are_rejected() -> None:
    from videonsa.ops.triton.window import window_attention_fwd

    cu = torch.tensor([0, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match="incompatible"):
        window_attention_fwd(torch.zeros(8, 3, 16), torch.zeros(8, 2, 16), torch.zeros(8, 2, 16), cu, 4, 0.25)
    with pytest.raises(ValueError, match="window_size"):
        window_attention_fwd(torch.zeros(8, 4, 16), torch.zeros(8, 2, 16), torch.zeros(8, 2, 16), cu, 0, 0.25)


@pytest.mark.gpu
@pytest.mark.parametrize(("heads_q", "heads_kv", "head_dim", "dtype"), [
    (28, 4, 128, torch.bfloat16), (4, 4, 64, torch.float16),
])
def test_gpu_real_shapes_varlen(heads_q: int, heads_kv: int, head_dim: int, dtype: torch.dtype) -> None:
    from videonsa.ops.triton.window import window_attention_bwd, window_attention_fwd

    seq_lens, window = [1000, 2600, 77, 400], 256
    gen = torch.Generator(device="cuda").manual_seed(heads_q)
    total = sum(seq_lens)
    cu = torch.tensor([0, *torch.tensor(seq_lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    q = torch.randn(total, heads_q, head_dim, device="cuda", dtype=dtype, generator=gen)
    k = torch.randn(total, heads_kv, head_dim, device="cuda", dtype=dtype, generator=gen)
    v = torch.randn(total, heads_kv, head_dim, device="cuda", dtype=dtype, generator=gen)
    do = torch.randn(total, heads_q, head_dim, device="cuda", dtype=dtype, generator=gen)
    scale = head_dim**-0.5
    o, lse = window_attention_fwd(q, k, v, cu, window, scale)
    grads = window_attention_bwd(q, k, v, o, lse, do, cu, window, scale)

    def allowed(a, b, pos):  # the last `window` keys up to the query itself
        diff = pos[:, None] - pos[None, :]
        return ((diff >= 0) & (diff < window))[:, None, :]

    assert_matches_masked_dense(q, k, v, do, cu, o, grads, scale, allowed)
