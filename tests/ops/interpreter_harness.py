"""Running Triton kernel tests on a CPU: the interpreter needs TRITON_INTERPRET=1 before Triton is first imported,
and must not leak into the other tests of the same pytest run. A kernel test file therefore runs itself once more
in a child pytest with the interpreter on (one process start for all its cases); in the parent its kernel tests
skip. On a CUDA machine every test runs directly on the GPU.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"


def kernels_runnable_here(kernel) -> bool:
    """True on a GPU, or when Triton itself (not only `kernel`) was imported under TRITON_INTERPRET=1."""
    if HAS_CUDA:
        return True
    import triton.language as tl

    return all(type(f).__name__ == "InterpretedFunction" for f in (tl.zeros, kernel))


def run_file_under_interpreter(path: str, min_passed: int) -> None:
    """Run the test file `path` in a child pytest with TRITON_INTERPRET=1; fail unless at least `min_passed`
    of its tests passed (so a file whose kernel tests all skipped cannot pass silently)."""
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.abspath(path)],
        env=env, capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout[-12000:]}\n{proc.stderr[-4000:]}"
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) >= min_passed, f"kernel tests did not run:\n{proc.stdout[-3000:]}"


def interpreter_tests(kernel, path: str, min_passed: int) -> tuple[pytest.MarkDecorator, Callable[[], None]]:
    """The two pieces every kernel test file needs: a `kernel_test` marker that skips a kernel test where `kernel`
    cannot run in this process, and a `test_under_interpreter` test that, exactly there, runs the file `path` in
    a child pytest under the interpreter and requires `min_passed` passed tests. Assign both at module level:

        kernel_test, test_under_interpreter = interpreter_tests(_kernel, __file__, min_passed=8)
    """
    runnable = kernels_runnable_here(kernel)
    kernel_test = pytest.mark.skipif(not runnable, reason="runs in the interpreter subprocess (test_under_interpreter)")

    @pytest.mark.skipif(runnable, reason="kernels run in this process")
    def test_under_interpreter() -> None:
        run_file_under_interpreter(path, min_passed=min_passed)

    return kernel_test, test_under_interpreter


def packed(seq_lens: list[int], heads_q: int, heads_kv: int, head_dim: int, seed: int):
    """float64 q [T,HQ,D], k/v [T,HKV,D], do [T,HQ,D] and int32 cu_seqlens [N+1]."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(seq_lens)
    q = torch.randn(total, heads_q, head_dim, generator=gen, dtype=torch.float64)
    k = torch.randn(total, heads_kv, head_dim, generator=gen, dtype=torch.float64)
    v = torch.randn(total, heads_kv, head_dim, generator=gen, dtype=torch.float64)
    do = torch.randn(total, heads_q, head_dim, generator=gen, dtype=torch.float64)
    cu = torch.tensor([0, *torch.tensor(seq_lens).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v, do, cu


def assert_matches_masked_dense(q, k, v, do, cu, o, grads, scale: float, allowed: Callable, tol: float = 1e-2) -> None:
    """Check a branch kernel's o and (dq, dk, dv) against float32 dense attention under a key mask, one
    sequence at a time (the GPU real-shape tests of the selection and window kernels).

    q, do: [T, HQ, D]; k, v: [T, HKV, D] (packed, cu_seqlens `cu`); o [T, HQ, D] and grads (dq, dk, dv) are the
    kernel's. allowed(a, b, pos) -> bool mask broadcastable to [L, HQ, L] (query, head, key) for the sequence
    occupying packed rows a..b, with pos = arange(b - a). Asserts no NaN and relative errors below tol.
    """
    group = q.shape[1] // k.shape[1]
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True):
        leaves = [x[a:b].float().requires_grad_() for x in (q, k, v)]
        mask = allowed(a, b, torch.arange(b - a, device=q.device))
        s = scale * torch.einsum("thd,shd->ths", leaves[0], leaves[1].repeat_interleave(group, dim=1))
        p = torch.softmax(s.masked_fill(~mask, -math.inf), dim=-1)
        o_ref = torch.einsum("ths,shd->thd", p, leaves[2].repeat_interleave(group, dim=1))
        (o_ref * do[a:b].float()).sum().backward()
        for name, got, want in (("o", o[a:b], o_ref), *zip(("dq", "dk", "dv"), [g[a:b] for g in grads],
                                                          [x.grad for x in leaves], strict=True)):
            assert not torch.isnan(got).any(), name
            err = float((got.float() - want).norm() / want.norm())
            assert err < tol, f"{name}: relative error {err:.2e}"
