"""A 32K-token forward + backward of the reference stays far below the memory of one T x T score matrix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

SEQ_LEN = 32 * 1024
GIB = 1024**3
# One float32 T x T score matrix for a single head: what a dense implementation would hold per head.
DENSE_SCORES_BYTES = SEQ_LEN * SEQ_LEN * 4
PEAK_LIMIT_BYTES = 1 * GIB

# Runs in a fresh interpreter so that ru_maxrss is this run's peak alone. Besides the peak it checks a few
# parts at the far end of the sequence directly, where indices are large: the window branch (dense softmax
# over the last window_size keys) and the compression branch (softmax over all block means).
SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    from videonsa.ops import nsa_attention_parts

    torch.manual_seed(0)
    T, HQ, HKV, D = int(sys.argv[1]), 2, 1, 16
    peak_kib = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    q = torch.randn(1, T, HQ, D, requires_grad=True)
    k = torch.randn(1, T, HKV, D, requires_grad=True)
    v = torch.randn(1, T, HKV, D, requires_grad=True)
    gates = [torch.rand(1, T, HQ, requires_grad=True) for _ in range(3)]
    before_kib = peak_kib()

    # Half the default budget (16 blocks, window 128) keeps the run near a minute of CPU on 2 cores.
    parts = nsa_attention_parts(q, k, v, *gates, block_size=64, block_count=16, window_size=128,
                                backend="reference")
    parts.o.float().square().mean().backward()
    after_kib = peak_kib()

    scale, window, block = D ** -0.5, 128, 64
    errors = {}
    with torch.no_grad():
        for t in (T - 1, T - 1000):
            keys, values = k[0, t - window + 1 : t + 1, 0], v[0, t - window + 1 : t + 1, 0]
            swa = torch.softmax(scale * q[0, t] @ keys.T, dim=-1) @ values
            errors[f"o_swa@{t}"] = (swa - parts.o_swa[0, t]).abs().max().item()
            n_blocks = (t + 1) // block
            k_cmp = k[0, : n_blocks * block, 0].view(n_blocks, block, D).mean(1)
            v_cmp = v[0, : n_blocks * block, 0].view(n_blocks, block, D).mean(1)
            cmp = torch.softmax(scale * q[0, t] @ k_cmp.T, dim=-1) @ v_cmp
            errors[f"o_cmp@{t}"] = (cmp - parts.o_cmp[0, t]).abs().max().item()
    finite = all(bool(torch.isfinite(x).all()) for x in (parts.o, q.grad, k.grad, v.grad, *[g.grad for g in gates]))
    last_blocks = parts.block_indices[0, -1, 0].tolist()
    print(json.dumps({"before": before_kib * 1024, "after": after_kib * 1024, "finite": finite,
                      "errors": errors, "last_blocks": last_blocks}))
    """
)


@pytest.mark.slow
def test_32k_tokens_forward_backward_memory_stays_bounded() -> None:
    env = dict(os.environ)
    # glibc's adaptive mmap threshold keeps the freed multi-MB temporaries of every query chunk in its heap,
    # so without a fixed threshold RSS grows with T through the allocator's cache (2.5 GiB at 32K with the
    # default budget), not through live tensors (about 0.35 GiB).
    env["MALLOC_MMAP_THRESHOLD_"] = str(1024 * 1024)
    env.setdefault("OMP_NUM_THREADS", "2")
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(SEQ_LEN)], env=env, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])

    growth = report["after"] - report["before"]
    assert growth < PEAK_LIMIT_BYTES, f"peak RSS grew by {growth / GIB:.2f} GiB during forward + backward"
    assert growth < DENSE_SCORES_BYTES / 4
    assert report["finite"], "non-finite output or gradient"
    assert max(report["errors"].values()) < 1e-5, report["errors"]
    last_block = (SEQ_LEN - 1) // 64
    assert len(report["last_blocks"]) == 16 and report["last_blocks"][-1] == last_block
    assert -1 not in report["last_blocks"], "the last token has hundreds of blocks to choose from"
