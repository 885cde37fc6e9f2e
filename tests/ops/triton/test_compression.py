"""Compression-branch and top-k Triton kernels against the PyTorch reference, under the Triton interpreter.

Each case runs in a fresh Python process with TRITON_INTERPRET=1 (the variable must be set before any kernel
module is imported, and must not leak into GPU tests of the same pytest run); the process runs this file with
the case name and its parameters as JSON. Shapes are tiny so the whole file takes well under a minute of CPU.

bf16 is left to the GPU tests: under the Triton 3.9 interpreter tl.dot of bf16 operands returns garbage
(errors of 1e10 on a 16x16 product), while fp16 and fp32 are exact numpy products.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.abspath(__file__)


def run_interpreted(case: str, **params) -> None:
    """Run `case(**params)` from this file in a subprocess under TRITON_INTERPRET=1; fail with its output."""
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, HERE, case, json.dumps(params)], env=env, capture_output=True, text=True, timeout=900
    )
    if proc.returncode != 0:
        pytest.fail(f"{case}({params}) failed under the Triton interpreter:\n{proc.stdout}\n{proc.stderr[-6000:]}")


# ----------------------------------------------------------------------------------------------------------
# Cases (run inside the subprocess; torch and the kernels are imported there)


def _inputs(seq_lens, heads_q, heads_kv, head_dim, block_size, dtype_name, seed):
    """Packed float64 q [T,HQ,D], k/v [T,HKV,D], upstream gradient, cu_seqlens; keys get per-block offsets
    so that compressed keys (and hence block importances) differ clearly."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    total = sum(seq_lens)
    cu = torch.tensor([0, *torch.tensor(seq_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(total, heads_q, head_dim, generator=gen, dtype=torch.float64)
    k = torch.randn(total, heads_kv, head_dim, generator=gen, dtype=torch.float64)
    offsets = torch.randn(total // block_size + len(seq_lens), heads_kv, head_dim, generator=gen, dtype=torch.float64)
    k = k + 1.5 * offsets.repeat_interleave(block_size, 0)[:total]
    v = torch.randn(total, heads_kv, head_dim, generator=gen, dtype=torch.float64)
    do = torch.randn(total, heads_q, head_dim, generator=gen, dtype=torch.float64)
    dtype = getattr(torch, dtype_name)
    q, k, v = (x.to(dtype).double() for x in (q, k, v))  # both sides see the same rounded values
    return q, k, v, do, cu, dtype


def _reference(q, k, v, cu, block_size, block_count, init_blocks, local_blocks, scale):
    """nsa_parts_reference on packed float64 tensors (gates chosen so that o is o_cmp)."""
    import torch

    from videonsa.ops import nsa_parts_reference

    gates = [torch.ones(1, q.shape[0], q.shape[1], dtype=q.dtype)] + [torch.zeros(1, q.shape[0], q.shape[1],
                                                                                  dtype=q.dtype)] * 2
    return nsa_parts_reference(
        q[None], k[None], v[None], *gates, block_size=block_size, block_count=block_count, window_size=1,
        init_blocks=init_blocks, local_blocks=local_blocks, cu_seqlens=cu, scale=scale,
    )


def _rel(x, ref) -> float:
    x, ref = x.detach().double(), ref.detach().double()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def _settings(config):
    """`CompressionSettings` with the kernels' launches overridden by `config` ({"dkv": {"rows": 16, ...}}; the
    dK~/dV~ segment sizes as min_segment / max_segments under "dkv")."""
    from dataclasses import replace

    from videonsa.ops.triton.compression import COMPRESSION_SETTINGS

    settings = COMPRESSION_SETTINGS
    for name, override in (config or {}).items():
        override = dict(override)
        segments = {f"dkv_{key}": override.pop(key) for key in ("min_segment", "max_segments") if key in override}
        settings = replace(settings, **{name: replace(getattr(settings, name), **override)}, **segments)
    return settings


def case_compression(seq_lens, heads_q, heads_kv, head_dim, block_size, dtype, seed=0, config=None):
    """Pooling + compressed attention forward (o, lse) and backward (dq, dk, dv) against the reference.

    `config` overrides the kernels' launch settings (`_settings`: small tiles and segments reach code paths that
    the production sizes only reach at long lengths: several query segments per dK~/dV~ key tile).
    """
    import torch

    from videonsa.ops.triton.compression import (
        compressed_attention_bwd,
        compressed_attention_fwd,
        mean_pool_bwd,
        mean_pool_fwd,
    )

    settings = _settings(config)

    q, k, v, do, cu, dt = _inputs(seq_lens, heads_q, heads_kv, head_dim, block_size, dtype, seed)
    scale = head_dim**-0.5
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
    ref = _reference(qr, kr, vr, cu, block_size, 1, 0, 1, scale)
    (ref.o_cmp[0] * do).sum().backward()

    k_cmp, v_cmp, cu_cmp = mean_pool_fwd(k.to(dt), v.to(dt), cu, block_size)
    counts = [n // block_size for n in seq_lens]
    assert cu_cmp.tolist() == [0, *torch.tensor(counts).cumsum(0).tolist()], cu_cmp
    o, lse = compressed_attention_fwd(q.to(dt), k_cmp, v_cmp, cu, cu_cmp, block_size, scale, settings)
    assert o.dtype == dt and lse.dtype == torch.float32
    tol = 1e-6 if dt == torch.float32 else 2e-3
    assert _rel(o, ref.o_cmp[0]) < tol, ("o_cmp", _rel(o, ref.o_cmp[0]))
    ref_lse = ref.lse_cmp[0]
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), "lse -inf where no block is visible"
    finite = torch.isfinite(ref_lse)
    assert (lse[finite] - ref_lse[finite]).abs().max() < (1e-5 if dt == torch.float32 else 2e-3)
    # Queries that see no block have o_cmp exactly 0 (not NaN).
    assert torch.all(o[~finite] == 0)

    dq, dk_cmp, dv_cmp = compressed_attention_bwd(
        q.to(dt), k_cmp, v_cmp, o, lse, do.to(dt), cu, cu_cmp, block_size, scale, settings=settings
    )
    dk = torch.zeros(k.shape, dtype=torch.float32)
    dv = torch.zeros(v.shape, dtype=torch.float32)
    mean_pool_bwd(dk_cmp, dv_cmp, dk, dv, cu, cu_cmp, block_size)
    for name, got, want in (("dq", dq, qr.grad), ("dk", dk, kr.grad), ("dv", dv, vr.grad)):
        assert torch.isfinite(got).all(), name
        assert _rel(got, want) < 2 * tol, (name, _rel(got, want))

    # dq accumulation into an existing tensor and a caller-supplied delta give the same result.
    base = torch.randn(q.shape, dtype=torch.float32)
    acc = base.clone()
    delta = (do.to(dt).float() * o.float()).sum(-1)
    compressed_attention_bwd(
        q.to(dt), k_cmp, v_cmp, o, lse, do.to(dt), cu, cu_cmp, block_size, scale, dq=acc, delta=delta,
        settings=settings,
    )
    assert _rel(acc - base, dq.float()) < (1e-5 if dt == torch.float32 else 2e-3)


def case_compression_scaled(seq_lens, heads_q, heads_kv, head_dim, block_size, dtype, seed=0, config=None):
    """Backward with do_scale (the gated upstream gradient, never materialised) and the o-free delta kernel.

    The reference differentiates sum(o_cmp * do * do_scale) in float64; the kernels get do and do_scale apart.
    do_scale has both signs and magnitudes 0..1.5 per (token, head), so a kernel that ignores it, or applies
    it to the wrong rows, fails by far more than the tolerance. `config` overrides the launch settings as in
    `case_compression` (several query segments per dK~/dV~ key tile).
    """
    import torch

    from videonsa.ops.triton.compression import (
        compressed_attention_bwd,
        compressed_attention_delta,
        compressed_attention_fwd,
        mean_pool_bwd,
        mean_pool_fwd,
    )

    settings = _settings(config)

    q, k, v, do, cu, dt = _inputs(seq_lens, heads_q, heads_kv, head_dim, block_size, dtype, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    do_scale = torch.rand(q.shape[:2], generator=gen, dtype=torch.float64) * 2 - 0.5  # signs and magnitudes vary
    do_scale = do_scale.to(dt).double()
    do = do.to(dt).double()
    scale = head_dim**-0.5
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
    ref = _reference(qr, kr, vr, cu, block_size, 1, 0, 1, scale)
    (ref.o_cmp[0] * do * do_scale[:, :, None]).sum().backward()
    ref_o = ref.o_cmp[0].detach()
    tol = 1e-6 if dt == torch.float32 else 2e-3

    k_cmp, v_cmp, cu_cmp = mean_pool_fwd(k.to(dt), v.to(dt), cu, block_size)
    o, lse = compressed_attention_fwd(q.to(dt), k_cmp, v_cmp, cu, cu_cmp, block_size, scale, settings)
    finite = torch.isfinite(lse)
    assert not finite.all(), "test needs rows that see no block"

    # Delta from the recomputed o_cmp, plain and scaled, against float64 sum_d o_cmp * do.
    want = (ref_o * do).sum(-1)
    delta = compressed_attention_delta(q.to(dt), k_cmp, v_cmp, lse, do.to(dt), cu, cu_cmp, block_size, scale,
                                       settings=settings)
    assert delta.dtype == torch.float32 and delta.shape == want.shape
    assert torch.all(delta[~finite] == 0), "rows that see nothing give 0"
    assert _rel(delta, want) < tol, ("delta", _rel(delta, want))
    scaled = compressed_attention_delta(q.to(dt), k_cmp, v_cmp, lse, do.to(dt), cu, cu_cmp, block_size, scale,
                                        do_scale=do_scale.to(dt), settings=settings)
    assert _rel(scaled, want * do_scale) < tol, ("scaled delta", _rel(scaled, want * do_scale))

    # Backward with do_scale: once computing delta itself (from o), once with the delta kernel's (o not given).
    for name, kwargs in (("own delta", dict(delta=None)), ("given delta", dict(delta=scaled))):
        o_arg = o if kwargs["delta"] is None else None
        dq, dk_cmp, dv_cmp = compressed_attention_bwd(
            q.to(dt), k_cmp, v_cmp, o_arg, lse, do.to(dt), cu, cu_cmp, block_size, scale,
            do_scale=do_scale.to(dt), settings=settings, **kwargs,
        )
        dk = torch.zeros(k.shape, dtype=torch.float32)
        dv = torch.zeros(v.shape, dtype=torch.float32)
        mean_pool_bwd(dk_cmp, dv_cmp, dk, dv, cu, cu_cmp, block_size)
        for grad, got, ref_grad in (("dq", dq, qr.grad), ("dk", dk, kr.grad), ("dv", dv, vr.grad)):
            assert torch.isfinite(got).all(), (name, grad)
            assert _rel(got, ref_grad) < 2 * tol, (name, grad, _rel(got, ref_grad))


def _check_selection(indices, q, k, cu, lse, block_size, block_count, init_blocks, local_blocks, scale, tol):
    """indices int32 [T, HKV, S] is a valid top-k choice: format, forced blocks, and optimal up to `tol`.

    Scores are recomputed in float64 from q, k and the float64 reference lse. Returns the number of (token,
    group) rows whose choice is not the exact float64 optimum (allowed only within `tol`).
    """
    import torch

    from videonsa.ops.reference import compress_blocks

    heads_kv = k.shape[1]
    group = q.shape[1] // heads_kv
    inexact = 0
    for seq, (a, b) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist())):
        k_cmp = compress_blocks(k[a:b], block_size)
        scores = torch.einsum("thd,jhd->thj", q[a:b].view(b - a, heads_kv, group, -1).flatten(1, 2),
                              k_cmp.repeat_interleave(group, 1))
        probs = torch.exp(scale * scores - lse[a:b, :, None])
        importance = probs.view(b - a, heads_kv, group, -1).sum(2)  # [L, HKV, NB]
        for t in range(b - a):
            current, visible = t // block_size, (t + 1) // block_size
            forced = {j for j in range(current + 1) if j < init_blocks or j > current - local_blocks}
            for g in range(heads_kv):
                row = indices[a + t, g].tolist()
                chosen = [j for j in row if j >= 0]
                assert row == chosen + [-1] * (len(row) - len(chosen)), f"padding {row}"
                assert chosen == sorted(set(chosen)), f"not ascending/unique {row}"
                assert forced <= set(chosen), f"seq {seq} t {t}: forced {forced} missing in {row}"
                free = [j for j in range(visible) if j not in forced]
                picked = [j for j in chosen if j not in forced]
                assert all(j < visible for j in picked), f"invisible block chosen {row} at t={t}"
                want = min(block_count - len(forced), len(free))
                assert len(picked) == want, f"t={t}: {len(picked)} selected, expected {want}"
                rest = [j for j in free if j not in picked]
                if picked and rest:
                    worst_in = min(float(importance[t, g, j]) for j in picked)
                    best_out = max(float(importance[t, g, j]) for j in rest)
                    assert worst_in >= best_out - tol, f"t={t} g={g}: {worst_in} < {best_out} ({row})"
                    inexact += worst_in < best_out
    return inexact


def case_topk(seq_lens, heads_q, heads_kv, head_dim, block_size, block_count, init_blocks, local_blocks, dtype,
              seed=0):
    """select_blocks_topk against the float64 importance: valid, forced blocks present, optimal up to ties."""
    import torch

    from videonsa.ops.triton.compression import compressed_attention_fwd, mean_pool_fwd
    from videonsa.ops.triton.topk import select_blocks_topk

    q, k, v, _, cu, dt = _inputs(seq_lens, heads_q, heads_kv, head_dim, block_size, dtype, seed)
    scale = head_dim**-0.5
    ref = _reference(q, k, v, cu, block_size, block_count, init_blocks, local_blocks, scale)
    k_cmp, v_cmp, cu_cmp = mean_pool_fwd(k.to(dt), v.to(dt), cu, block_size)
    _, lse = compressed_attention_fwd(q.to(dt), k_cmp, v_cmp, cu, cu_cmp, block_size, scale)
    kwargs = dict(block_size=block_size, block_count=block_count, init_blocks=init_blocks,
                  local_blocks=local_blocks, scale=scale)
    indices = select_blocks_topk(q.to(dt), k_cmp, lse, cu, cu_cmp, method="bisect", **kwargs)
    assert indices.dtype == torch.int32 and indices.shape == (q.shape[0], heads_kv, block_count)
    # The sorting kernel (used where a key row does not fit registers) makes the very same choice.
    assert torch.equal(select_blocks_topk(q.to(dt), k_cmp, lse, cu, cu_cmp, method="sort", **kwargs), indices)
    tol = 1e-5 if dt == torch.float32 else 5e-3
    inexact = _check_selection(indices, q, k, cu, ref.lse_cmp[0].double(), block_size, block_count,
                               init_blocks, local_blocks, scale, tol)
    if dt == torch.float32:
        # Scores are well separated by construction: float32 must reproduce the reference choice exactly.
        assert inexact == 0 and torch.equal(indices, ref.block_indices[0]), "float32 selection differs"


def case_topk_ties(block_count, seed=0):
    """Equal scores go to the earlier block (the same key in every block makes every visible block tie)."""
    import torch

    from videonsa.ops.triton.compression import compressed_attention_fwd, mean_pool_fwd
    from videonsa.ops.triton.topk import select_blocks_topk

    gen = torch.Generator().manual_seed(seed)
    block_size, length = 16, 150
    cu = torch.tensor([0, length], dtype=torch.int32)
    # Small integers: every dot product is exact whatever the summation order, so the ties are exact too.
    q = torch.randint(-2, 3, (length, 4, 16), generator=gen).float()
    k = torch.randint(-2, 3, (1, 2, 16), generator=gen).float().expand(length, 2, 16).contiguous()
    k_cmp, v_cmp, cu_cmp = mean_pool_fwd(k, k, cu, block_size)
    _, lse = compressed_attention_fwd(q, k_cmp, v_cmp, cu, cu_cmp, block_size, 0.25)
    kwargs = dict(block_size=block_size, block_count=block_count, init_blocks=0, local_blocks=1, scale=0.25)
    indices = select_blocks_topk(q, k_cmp, lse, cu, cu_cmp, method="bisect", **kwargs)
    assert torch.equal(select_blocks_topk(q, k_cmp, lse, cu, cu_cmp, method="sort", **kwargs), indices)
    for t in range(length):
        current = t // block_size
        free = [j for j in range((t + 1) // block_size) if j != current][: block_count - 1]
        expected = sorted({current, *free})
        expected += [-1] * (block_count - len(expected))
        for g in range(2):
            assert indices[t, g].tolist() == expected, (t, indices[t, g].tolist(), expected)


# ----------------------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize(
    "params",
    [
        # 7:1 grouping, float32, varlen with lengths not a multiple of the block (and one shorter than a block).
        dict(seq_lens=[37, 100, 5], heads_q=14, heads_kv=2, head_dim=32, block_size=16, dtype="float32"),
        # 1:1, float16, head dim that is not a power of two.
        dict(seq_lens=[70, 64], heads_q=3, heads_kv=3, head_dim=24, block_size=8, dtype="float16"),
        # One sequence (no host syncs: sizes from shapes), several query segments per dK~/dV~ key tile.
        dict(seq_lens=[203], heads_q=14, heads_kv=2, head_dim=32, block_size=16, dtype="float32",
             config=dict(dkv=dict(rows=16, keys=4, min_segment=40, max_segments=8))),
        # Same on varlen inputs with fp16, 2:1.
        dict(seq_lens=[90, 17, 133], heads_q=4, heads_kv=2, head_dim=16, block_size=8, dtype="float16",
             config=dict(dkv=dict(rows=16, keys=2, min_segment=24, max_segments=8))),
    ],
    ids=["7to1-fp32-varlen", "1to1-fp16-d24", "one-seq-segments", "varlen-fp16-segments"],
)
def test_compression_matches_reference(params):
    run_interpreted("case_compression", **params)


@pytest.mark.parametrize(
    "params",
    [
        dict(seq_lens=[37, 100, 5], heads_q=14, heads_kv=2, head_dim=32, block_size=16, dtype="float32"),
        dict(seq_lens=[70, 64], heads_q=3, heads_kv=3, head_dim=24, block_size=8, dtype="float16"),
        # Several query segments per dK~/dV~ key tile, small dq tiles (many loop steps), one sequence.
        dict(seq_lens=[203], heads_q=14, heads_kv=2, head_dim=32, block_size=16, dtype="float32",
             config=dict(dkv=dict(rows=16, keys=4, min_segment=40, max_segments=8), dq=dict(rows=16, keys=4))),
        # Varlen fp16, several segments.
        dict(seq_lens=[90, 17, 133], heads_q=4, heads_kv=2, head_dim=16, block_size=8, dtype="float16",
             config=dict(dkv=dict(rows=16, keys=2, min_segment=24, max_segments=8))),
    ],
    ids=["7to1-fp32-varlen", "1to1-fp16-d24", "one-seq-segments", "varlen-fp16-segments"],
)
def test_compression_do_scale_and_delta(params):
    run_interpreted("case_compression_scaled", **params)


@pytest.mark.parametrize(
    "params",
    [
        dict(seq_lens=[150, 37], heads_q=14, heads_kv=2, head_dim=32, block_size=16, block_count=4,
             init_blocks=0, local_blocks=1, dtype="float32"),
        dict(seq_lens=[131], heads_q=6, heads_kv=2, head_dim=16, block_size=8, block_count=5,
             init_blocks=1, local_blocks=2, dtype="float16"),
        dict(seq_lens=[100, 50], heads_q=2, heads_kv=2, head_dim=16, block_size=8, block_count=3,
             init_blocks=2, local_blocks=0, dtype="float32"),
        # More slots than blocks: everything visible is taken, the rest is -1.
        dict(seq_lens=[90], heads_q=4, heads_kv=1, head_dim=16, block_size=8, block_count=40,
             init_blocks=0, local_blocks=1, dtype="float32"),
    ],
    ids=["7to1-fp32", "3to1-fp16-init1-local2", "1to1-init2-local0", "count-exceeds-blocks"],
)
def test_topk_selection(params):
    run_interpreted("case_topk", **params)


def test_topk_ties_go_to_earlier_block():
    run_interpreted("case_topk_ties", block_count=4)


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run through pytest (sets TRITON_INTERPRET=1)"
    globals()[sys.argv[1]](**json.loads(sys.argv[2]))
