"""`videonsa analyze latency`: per-branch time of the NSA operator against context length, dense attention beside it.

For every length T (1K to 128K tokens by default on the GPU) random inputs of one sequence at the 7B head shape
(HQ 28, HKV 4, D 128; `--heads`, `--dim`) are made and timed (docs/analysis.md, "Latency"):

* the branches, each on the intermediates the operator itself computes: compression (mean pooling and the
  attention over block means; in the reference this softmax is also the top-k's score), top-k (the block
  choice), selection, sliding window, gated sum; and with `--backward` their backward passes (top-k has none);
* the whole operator through its public entry point, `videonsa.ops.nsa_attention` (forward without gradients,
  as in a prefill; with `--backward`, forward with gradients then the backward alone);
* dense causal attention, PyTorch's `scaled_dot_product_attention` with K/V repeated to every query head, in the
  same run as the baseline.

On a GPU the branches are the Triton kernels (`videonsa.ops.triton`), timed with `triton.testing.do_bench`
(CUDA events around each call, the GPU synchronised, cache flushed between calls; the median); on the CPU they
are the PyTorch reference's steps (`videonsa.ops.reference`), timed with a wall clock (median of `--repeats`
calls after one warm-up). `DIR/latency.json` is rewritten after every length; `latency_forward.png` (and
`latency_backward.png`) stack the branches against length, with the whole operator and dense attention as lines.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from videonsa.errors import UserError
from videonsa.ops.config import NSAConfig

HELP = "per-branch forward (and backward) time of the NSA operator from 1K to 128K tokens, dense attention beside it"
BRANCHES: tuple[str, ...] = ("compression", "topk", "selection", "window", "gating")
BACKWARD_BRANCHES: tuple[str, ...] = ("compression", "selection", "window", "gating")
BRANCH_LABELS = {
    "compression": "compression (+ top-k scores)",
    "topk": "top-k choice",
    "selection": "selection",
    "window": "sliding window",
    "gating": "gated sum",
}
GPU_LENGTHS = tuple(1024 << i for i in range(8))  # 1K .. 128K
CPU_LENGTHS = (1024, 2048, 4096)  # the reference gathers every selected key: slow at the 7B shape
# Elements one query chunk of the reference's steps may hold (scores, gathered keys): bounds CPU memory.
_CHUNK_ELEMENTS = 1 << 25


# ----------------------------------------------------------------------------------------------------------
# Options


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The latency flags (--out, --device and --dtype come from analysis.common)."""
    parser.add_argument("--lengths", type=int, nargs="+", metavar="N",
                        help="sequence lengths in tokens (default 1K..128K on cuda, 1K 2K 4K on cpu)")
    parser.add_argument("--heads", type=int, nargs=2, default=[28, 4], metavar=("HQ", "HKV"),
                        help="query and key/value heads (default 28 4, Qwen2.5-VL-7B)")
    parser.add_argument("--dim", type=int, default=128, help="head dimension (default 128)")
    parser.add_argument("--block-size", type=int, default=NSAConfig.block_size,
                        help=f"NSA block size (default {NSAConfig.block_size})")
    parser.add_argument("--block-count", type=int, default=NSAConfig.block_count,
                        help=f"blocks each query selects (default {NSAConfig.block_count})")
    parser.add_argument("--window", type=int, default=NSAConfig.window_size,
                        help=f"sliding-window size in tokens (default {NSAConfig.window_size})")
    parser.add_argument("--backward", action="store_true", help="time the backward passes too")
    parser.add_argument("--no-dense", dest="dense", action="store_false",
                        help="leave out the dense attention baseline")
    parser.add_argument("--backend", choices=("auto", "triton", "reference"), default="auto",
                        help="auto (default: Triton kernels on cuda, the reference elsewhere), triton or reference")
    parser.add_argument("--repeats", type=int, default=3, help="CPU: timed calls per measurement (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="random inputs' seed (default 0)")


@dataclass(frozen=True)
class LatencySettings:
    """What one latency run measures. lengths ascending; backend "triton" or "reference" (resolved)."""

    lengths: tuple[int, ...]
    heads_q: int = 28
    heads_kv: int = 4
    head_dim: int = 128
    block_size: int = NSAConfig.block_size
    block_count: int = NSAConfig.block_count
    window_size: int = NSAConfig.window_size
    init_blocks: int = NSAConfig.init_blocks
    local_blocks: int = NSAConfig.local_blocks
    backward: bool = False
    dense: bool = True
    backend: str = "reference"
    repeats: int = 3
    seed: int = 0

    def nsa_kwargs(self) -> dict[str, int]:
        return {"block_size": self.block_size, "block_count": self.block_count, "window_size": self.window_size,
                "init_blocks": self.init_blocks, "local_blocks": self.local_blocks}


def settings_from_args(args: argparse.Namespace, device) -> LatencySettings:
    """The run's settings from the flags; one-line `UserError`s naming the flag at fault."""
    from videonsa.ops.nsa import available_backends, triton_supports

    lengths = args.lengths or (GPU_LENGTHS if device.type == "cuda" else CPU_LENGTHS)
    if any(length < 1 for length in lengths):
        raise UserError(f"--lengths: lengths must be positive, got {min(lengths)}")
    heads_q, heads_kv = args.heads
    if heads_q < 1 or heads_kv < 1 or heads_q % heads_kv:
        raise UserError(f"--heads {heads_q} {heads_kv}: HQ must be a positive multiple of HKV")
    if args.dim < 1:
        raise UserError(f"--dim must be positive, got {args.dim}")
    if args.repeats < 1:
        raise UserError(f"--repeats must be at least 1, got {args.repeats}")
    try:
        NSAConfig(args.block_size, args.block_count, args.window)
    except ValueError as error:
        flags = {"block_size": "--block-size", "block_count": "--block-count", "window_size": "--window"}
        message = str(error).removeprefix("nsa_attention: ")
        for name, flag in flags.items():
            message = message.replace(f"{name}=", f"{flag} ").replace(f"{name} ", f"{flag} ")
        raise UserError(message) from None
    backend = args.backend
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and "triton" in available_backends() else "reference"
    if backend == "triton":
        if device.type != "cuda":
            raise UserError("--backend triton needs --device cuda (the kernels run on the GPU)")
        if "triton" not in available_backends():
            raise UserError("--backend triton: Triton or its kernels cannot be imported here")
        if not triton_supports(args.block_size):
            raise UserError(f"--block-size {args.block_size}: the Triton kernels need a power of two >= 16")
    return LatencySettings(
        lengths=tuple(sorted(set(lengths))), heads_q=heads_q, heads_kv=heads_kv, head_dim=args.dim,
        block_size=args.block_size, block_count=args.block_count, window_size=args.window,
        backward=args.backward, dense=args.dense, backend=backend, repeats=args.repeats, seed=args.seed,
    )


# ----------------------------------------------------------------------------------------------------------
# Inputs and timers


def make_inputs(length: int, settings: LatencySettings, device, dtype, seed: int) -> dict[str, Any]:
    """Random inputs of one sequence: q [1, T, HQ, D], k/v [1, T, HKV, D] (unit normal), gates [1, T, HQ] in
    [0, 1]."""
    import torch

    # Drawn on the device itself: at 128K tokens a CPU draw and copy would take longer than the timings.
    generator = torch.Generator(device=device).manual_seed(seed)
    shape_q = (1, length, settings.heads_q, settings.head_dim)
    shape_kv = (1, length, settings.heads_kv, settings.head_dim)

    def draw(shape, uniform=False):
        sample = torch.rand if uniform else torch.randn
        return sample(shape, generator=generator, device=device).to(dtype)

    gates = (1, length, settings.heads_q)
    return {"q": draw(shape_q), "k": draw(shape_kv), "v": draw(shape_kv),
            "g_cmp": draw(gates, True), "g_slc": draw(gates, True), "g_swa": draw(gates, True)}


Timer = Callable[[Callable[[], Any]], float]


def cpu_timer(repeats: int) -> Timer:
    """Median wall-clock milliseconds of `repeats` calls after one warm-up call."""

    def measure(fn: Callable[[], Any]) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times)

    return measure


def cuda_timer() -> Timer:
    """Median milliseconds from `triton.testing.do_bench`: CUDA events around each call, the GPU synchronised,
    the L2 cache flushed between calls, warm-up calls first."""
    from triton.testing import do_bench

    def measure(fn: Callable[[], Any]) -> float:
        return float(do_bench(fn, warmup=25, rep=100, return_mode="median"))

    return measure


def _clear(tensors) -> None:
    for tensor in tensors:
        tensor.grad = None


def _backward_of(output, grad, leaves) -> Callable[[], None]:
    """A call running `output`'s backward with `grad` again and again (the graph kept), leaves' grads cleared."""

    def run() -> None:
        _clear(leaves)
        output.backward(grad, retain_graph=True)

    return run


# ----------------------------------------------------------------------------------------------------------
# The branches, on the reference's steps


def _chunk_spans(length: int, per_query: int, chunk_elements: int) -> list[tuple[int, int]]:
    chunk = max(1, min(length, chunk_elements // max(1, per_query)))
    return [(start, min(length, start + chunk)) for start in range(0, length, chunk)]


class ReferenceBranches:
    """The PyTorch reference's steps (`videonsa.ops.reference`) one branch at a time, over one sequence.

    q [T, HQ, D], k/v [T, HKV, D], gates [T, HQ]; each step runs in query chunks as the reference does, so its
    memory stays bounded. `run_all` gives the parts of `nsa_parts_reference` (a test checks they agree).
    """

    def __init__(self, config, scale: float, chunk_elements: int = _CHUNK_ELEMENTS) -> None:
        self.config = config
        self.scale = scale
        self.chunk_elements = chunk_elements  # the most elements one query chunk's score matrix may hold

    def compression(self, q, k, v):
        """o_cmp [T, HQ, D] and the top-k scores (compression softmax summed per KV group) [T, HKV, NB]."""
        import torch

        from videonsa.ops.reference import _masked_softmax, compress_blocks

        length, heads_q, head_dim = q.shape
        heads_kv = k.shape[1]
        k_cmp, v_cmp = compress_blocks(k, self.config.block_size), compress_blocks(v, self.config.block_size)
        outputs, scores_out = [], []
        for start, end in _chunk_spans(length, heads_q * max(1, k_cmp.shape[0]), self.chunk_elements):
            pos = torch.arange(start, end, device=q.device)
            qg = q[start:end].view(end - start, heads_kv, heads_q // heads_kv, head_dim)
            visible = torch.arange(k_cmp.shape[0], device=q.device) < ((pos + 1) // self.config.block_size)[:, None]
            scores = self.scale * torch.einsum("cgsd,jgd->cgsj", qg, k_cmp)
            probs, _ = _masked_softmax(scores, visible[:, None, None, :])
            outputs.append(torch.einsum("cgsj,jgd->cgsd", probs, v_cmp).reshape(end - start, heads_q, head_dim))
            scores_out.append(probs.detach().sum(dim=2))
        return torch.cat(outputs), torch.cat(scores_out)

    def topk(self, importance, length: int):
        """Block indices long [T, HKV, block_count] from the scores (`select_blocks`)."""
        import torch

        from videonsa.ops.reference import select_blocks

        chosen = []
        per_query = importance.shape[1] * max(1, importance.shape[2]) * 4
        for start, end in _chunk_spans(length, per_query, self.chunk_elements):
            pos = torch.arange(start, end, device=importance.device)
            chosen.append(select_blocks(importance[start:end], pos, length, self.config))
        return torch.cat(chosen)

    def selection(self, q, k, v, indices):
        """o_slc [T, HQ, D]: causal attention over each query's selected blocks."""
        import torch

        from videonsa.ops.reference import _attend_selected

        length, heads_q, head_dim = q.shape
        heads_kv = k.shape[1]
        group = heads_q // heads_kv
        per_query = heads_kv * self.config.block_count * self.config.block_size * (2 * head_dim + group)
        outputs = []
        for start, end in _chunk_spans(length, per_query, self.chunk_elements):
            pos = torch.arange(start, end, device=q.device)
            qg = q[start:end].view(end - start, heads_kv, group, head_dim)
            out = _attend_selected(qg, k, v, indices[start:end], pos, self.config.block_size, self.scale)
            outputs.append(out.reshape(end - start, heads_q, head_dim))
        return torch.cat(outputs)

    def window(self, q, k, v):
        """o_swa [T, HQ, D]: causal attention over the last window_size keys."""
        import torch

        from videonsa.ops.reference import _masked_softmax

        length, heads_q, head_dim = q.shape
        heads_kv = k.shape[1]
        group = heads_q // heads_kv
        window = self.config.window_size
        outputs = []
        chunk_guess = min(length, 1024)
        for start, end in _chunk_spans(length, heads_q * (window + chunk_guess), self.chunk_elements):
            pos = torch.arange(start, end, device=q.device)
            lo = max(0, start - window + 1)
            key_pos = torch.arange(lo, end, device=q.device)
            allowed = (key_pos[None, :] <= pos[:, None]) & (key_pos[None, :] > pos[:, None] - window)
            qg = q[start:end].view(end - start, heads_kv, group, head_dim)
            scores = self.scale * torch.einsum("cgsd,kgd->cgsk", qg, k[lo:end])
            probs, _ = _masked_softmax(scores, allowed[:, None, None, :])
            outputs.append(torch.einsum("cgsk,kgd->cgsd", probs, v[lo:end]).reshape(end - start, heads_q, head_dim))
        return torch.cat(outputs)

    @staticmethod
    def gating(o_cmp, o_slc, o_swa, g_cmp, g_slc, g_swa):
        """o = g_cmp * o_cmp + g_slc * o_slc + g_swa * o_swa; o_x [T, HQ, D], g_x [T, HQ]."""
        return g_cmp[..., None] * o_cmp + g_slc[..., None] * o_slc + g_swa[..., None] * o_swa

    def run_all(self, q, k, v, g_cmp, g_slc, g_swa) -> dict[str, Any]:
        """Every step in order: o, o_cmp, o_slc, o_swa [T, HQ, D] and block_indices [T, HKV, block_count]."""
        o_cmp, importance = self.compression(q, k, v)
        indices = self.topk(importance, q.shape[0])
        o_slc = self.selection(q, k, v, indices)
        o_swa = self.window(q, k, v)
        o = self.gating(o_cmp, o_slc, o_swa, g_cmp, g_slc, g_swa)
        return {"o": o, "o_cmp": o_cmp, "o_slc": o_slc, "o_swa": o_swa, "block_indices": indices,
                "importance": importance}


@dataclass
class BranchCalls:
    """Zero-argument calls to time: forward and backward per branch name."""

    forward: dict[str, Callable[[], Any]] = field(default_factory=dict)
    backward: dict[str, Callable[[], Any]] = field(default_factory=dict)


def reference_calls(x: dict[str, Any], settings: LatencySettings) -> BranchCalls:
    """The reference's branch calls on `x` (from `make_inputs`), each on the intermediates the steps before it
    made; backward calls run each branch's autograd graph (built once) again."""
    import torch

    config = NSAConfig(**settings.nsa_kwargs())
    steps = ReferenceBranches(config, settings.head_dim**-0.5)
    # The reference computes in float32 (float64 for float64 inputs) whatever the input dtype: so do its steps.
    compute = torch.float64 if x["q"].dtype == torch.float64 else torch.float32
    names = ("q", "k", "v", "g_cmp", "g_slc", "g_swa")
    q, k, v, g_cmp, g_slc, g_swa = (x[name][0].to(compute) for name in names)
    length = q.shape[0]
    with torch.no_grad():
        parts = steps.run_all(q, k, v, g_cmp, g_slc, g_swa)
    indices, importance = parts["block_indices"], parts["importance"]
    calls = BranchCalls()
    calls.forward = {
        "compression": lambda: _no_grad(steps.compression, q, k, v),
        "topk": lambda: _no_grad(steps.topk, importance, length),
        "selection": lambda: _no_grad(steps.selection, q, k, v, indices),
        "window": lambda: _no_grad(steps.window, q, k, v),
        "gating": lambda: _no_grad(steps.gating, parts["o_cmp"], parts["o_slc"], parts["o_swa"], g_cmp, g_slc,
                                   g_swa),
    }
    if settings.backward:
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        grad = torch.randn_like(q)
        branch_outputs = {
            "compression": steps.compression(*leaves)[0],
            "selection": steps.selection(*leaves, indices),
            "window": steps.window(*leaves),
        }
        for name, output in branch_outputs.items():
            calls.backward[name] = _backward_of(output, grad, leaves)
        gate_leaves = [t.detach().clone().requires_grad_() for t in
                       (parts["o_cmp"], parts["o_slc"], parts["o_swa"], g_cmp, g_slc, g_swa)]
        calls.backward["gating"] = _backward_of(steps.gating(*gate_leaves), grad, gate_leaves)
    return calls


def _no_grad(fn, *args):
    import torch

    with torch.no_grad():
        return fn(*args)


# ----------------------------------------------------------------------------------------------------------
# The branches, on the Triton kernels


def triton_calls(x: dict[str, Any], settings: LatencySettings) -> BranchCalls:
    """The Triton kernels of each branch on `x`, each on the intermediates the operator computes (as
    benchmarks/bench/bench_ops.py separates them)."""
    import torch

    from videonsa.ops.triton.compression import (
        compressed_attention_bwd,
        compressed_attention_fwd,
        mean_pool_bwd,
        mean_pool_fwd,
    )
    from videonsa.ops.triton.selection import selected_attention_bwd, selected_attention_fwd
    from videonsa.ops.triton.topk import select_blocks_topk
    from videonsa.ops.triton.utils import pack
    from videonsa.ops.triton.window import window_attention_bwd, window_attention_fwd
    from videonsa.ops.triton_nsa import gate_bwd, gate_fwd

    b, scale = settings.block_size, settings.head_dim**-0.5
    q, cu = pack(x["q"].contiguous(), None)
    k, _ = pack(x["k"].contiguous(), None)
    v, _ = pack(x["v"].contiguous(), None)
    gates = [pack(x[name].contiguous(), None)[0] for name in ("g_cmp", "g_slc", "g_swa")]

    def compression():
        k_cmp, v_cmp, cu_cmp = mean_pool_fwd(k, v, cu, b)
        return compressed_attention_fwd(q, k_cmp, v_cmp, cu, cu_cmp, b, scale)

    k_cmp, v_cmp, cu_cmp = mean_pool_fwd(k, v, cu, b)
    o_cmp, lse_cmp = compression()

    def topk():
        return select_blocks_topk(q, k_cmp, lse_cmp, cu, cu_cmp, block_size=b, block_count=settings.block_count,
                                  init_blocks=settings.init_blocks, local_blocks=settings.local_blocks, scale=scale)

    indices = topk()
    o_slc, lse_slc = selected_attention_fwd(q, k, v, indices, cu, b, scale)
    o_swa, lse_swa = window_attention_fwd(q, k, v, cu, settings.window_size, scale)
    calls = BranchCalls()
    calls.forward = {
        "compression": compression,
        "topk": topk,
        "selection": lambda: selected_attention_fwd(q, k, v, indices, cu, b, scale),
        "window": lambda: window_attention_fwd(q, k, v, cu, settings.window_size, scale),
        "gating": lambda: gate_fwd(o_cmp, o_slc, o_swa, *gates),
    }
    if settings.backward:
        do = torch.randn_like(q)
        do_cmp, do_slc, do_swa, *_gate_grads, delta = gate_bwd(do, o_cmp, o_slc, o_swa, *gates)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)

        def compression_bwd():
            _, dk_cmp, dv_cmp = compressed_attention_bwd(q, k_cmp, v_cmp, o_cmp, lse_cmp, do_cmp, cu, cu_cmp, b,
                                                         scale, dq=dq, delta=delta)
            mean_pool_bwd(dk_cmp, dv_cmp, dk, dv, cu, cu_cmp, b)

        calls.backward = {
            "compression": compression_bwd,
            "selection": lambda: selected_attention_bwd(q, k, v, o_slc, lse_slc, do_slc, indices, cu, b, scale),
            "window": lambda: window_attention_bwd(q, k, v, o_swa, lse_swa, do_swa, cu, settings.window_size, scale),
            "gating": lambda: gate_bwd(do, o_cmp, o_slc, o_swa, *gates),
        }
    return calls


# ----------------------------------------------------------------------------------------------------------
# The whole operator and the dense baseline


def operator_calls(x: dict[str, Any], settings: LatencySettings) -> BranchCalls:
    """`nsa_attention` (the public entry point) forward without gradients, and with `backward` its backward
    after a forward with gradients; keys "nsa"."""
    import torch

    from videonsa.ops import nsa_attention

    kwargs = {**settings.nsa_kwargs(), "backend": settings.backend}
    calls = BranchCalls()
    calls.forward["nsa"] = lambda: _no_grad(lambda: nsa_attention(**x, **kwargs))
    if settings.backward:
        leaves = {name: tensor.detach().clone().requires_grad_() for name, tensor in x.items()}
        output = nsa_attention(**leaves, **kwargs)
        calls.backward["nsa"] = _backward_of(output, torch.randn_like(output), list(leaves.values()))
    return calls


def dense_calls(x: dict[str, Any], settings: LatencySettings) -> BranchCalls:
    """Dense causal attention (`scaled_dot_product_attention`, K/V repeated to the query heads); key "dense"."""
    import torch
    import torch.nn.functional as F

    group = settings.heads_q // settings.heads_kv
    q = x["q"].transpose(1, 2)
    k = x["k"].repeat_interleave(group, dim=2).transpose(1, 2)
    v = x["v"].repeat_interleave(group, dim=2).transpose(1, 2)
    calls = BranchCalls()
    calls.forward["dense"] = lambda: _no_grad(F.scaled_dot_product_attention, q, k, v, None, 0.0, True)
    if settings.backward:
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        output = F.scaled_dot_product_attention(*leaves, is_causal=True)
        calls.backward["dense"] = _backward_of(output, torch.randn_like(output), leaves)
    return calls


# ----------------------------------------------------------------------------------------------------------
# One length, the run, the files


def measure_length(length: int, settings: LatencySettings, device, dtype, timer: Timer) -> dict[str, Any]:
    """One row of latency.json: milliseconds per branch, the whole operator and dense attention at `length`."""
    import torch

    x = make_inputs(length, settings, device, dtype, settings.seed + length)
    branch_calls = triton_calls(x, settings) if settings.backend == "triton" else reference_calls(x, settings)
    row: dict[str, Any] = {"length": length}
    row["forward_ms"] = {name: timer(branch_calls.forward[name]) for name in BRANCHES}
    row["forward_branches_ms"] = sum(row["forward_ms"].values())
    operator = operator_calls(x, settings)
    row["nsa_forward_ms"] = timer(operator.forward["nsa"])
    if settings.backward:
        row["backward_ms"] = {name: timer(branch_calls.backward[name]) for name in BACKWARD_BRANCHES}
        row["backward_branches_ms"] = sum(row["backward_ms"].values())
        row["nsa_backward_ms"] = timer(operator.backward["nsa"])
    del branch_calls, operator
    if settings.dense:
        dense = dense_calls(x, settings)
        row["dense_forward_ms"] = timer(dense.forward["dense"])
        if settings.backward:
            row["dense_backward_ms"] = timer(dense.backward["dense"])
        del dense
    row["compression_share"] = row["forward_ms"]["compression"] / row["forward_branches_ms"]
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def environment(device, dtype, settings: LatencySettings) -> dict[str, Any]:
    """The machine, versions and timing method recorded with the numbers."""
    import platform

    import torch

    info: dict[str, Any] = {"device": str(device), "dtype": str(dtype).removeprefix("torch."),
                            "torch": torch.__version__, "backend": settings.backend}
    if device.type == "cuda":
        import triton

        info["gpu"] = torch.cuda.get_device_name(device)
        info["triton"] = triton.__version__
        info["timing"] = "triton.testing.do_bench median (CUDA events, synchronised)"
    else:
        info["cpu"] = platform.processor() or platform.machine()
        info["threads"] = torch.get_num_threads()
        info["timing"] = f"wall clock, median of {settings.repeats} calls after one warm-up"
    return info


def latency_record(settings: LatencySettings, info: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """latency.json: the settings, the environment and one row per length measured so far."""
    return {
        "analysis": "latency",
        "summary": _overview(settings, info, rows),
        "settings": {**asdict(settings), "lengths": list(settings.lengths)},
        "environment": info,
        "branches": list(BRANCHES),
        "backward_branches": list(BACKWARD_BRANCHES) if settings.backward else [],
        "rows": rows,
        "complete": len(rows) == len(settings.lengths),
    }


def _overview(settings: LatencySettings, info: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The report's table: where it ran and the longest length's numbers."""
    overview: dict[str, Any] = {
        "device": info.get("gpu") or info["device"],
        "backend": settings.backend,
        "shape": f"HQ {settings.heads_q}, HKV {settings.heads_kv}, D {settings.head_dim}, {info['dtype']}",
        "lengths": f"{len(rows)} of {len(settings.lengths)} measured",
    }
    if rows:
        last = rows[-1]
        overview["longest"] = last["length"]
        overview["longest_forward_ms"] = last["forward_ms"]
        overview["longest_nsa_forward_ms"] = last["nsa_forward_ms"]
        overview["longest_compression_share"] = last["compression_share"]
        if "dense_forward_ms" in last:
            overview["longest_dense_over_nsa_forward"] = last["dense_forward_ms"] / last["nsa_forward_ms"]
    return overview


def plot_latency(out_dir: Path, rows: list[dict[str, Any]], direction: str) -> Path:
    """latency_<direction>.png: left, the branches' milliseconds as stacked bars per length, with the whole
    operator and dense attention as lines; right, each branch's share of the branch total per length."""
    import numpy as np

    from videonsa.analysis.common import new_figure, save_figure

    names = BRANCHES if direction == "forward" else BACKWARD_BRANCHES
    labels = [_tokens(row["length"]) for row in rows]
    positions = np.arange(len(rows))
    times = np.array([[row[f"{direction}_ms"][name] for row in rows] for name in names])
    figure = new_figure(11.0, 4.4)
    absolute, shares = figure.subplots(1, 2)
    bottom = np.zeros(len(rows))
    share_bottom = np.zeros(len(rows))
    totals = times.sum(axis=0)
    for name, values in zip(names, times):
        absolute.bar(positions, values, bottom=bottom, label=BRANCH_LABELS[name], width=0.7)
        shares.bar(positions, 100 * values / totals, bottom=share_bottom, label=BRANCH_LABELS[name], width=0.7)
        bottom += values
        share_bottom += 100 * values / totals
    absolute.plot(positions, [row[f"nsa_{direction}_ms"] for row in rows], "k-o", markersize=3,
                  label="nsa_attention (whole)")
    if all(f"dense_{direction}_ms" in row for row in rows):
        absolute.plot(positions, [row[f"dense_{direction}_ms"] for row in rows], "r--o", markersize=3,
                      label="dense attention (SDPA)")
    for axes in (absolute, shares):
        axes.set_xticks(positions, labels=labels)
        axes.set_xlabel("sequence length (tokens)")
    absolute.set_ylabel("milliseconds")
    absolute.set_title(f"NSA {direction} time per branch")
    absolute.legend(fontsize=8, loc="upper left")
    shares.set_ylabel("% of the branches' time")
    shares.set_ylim(0, 100)
    shares.set_title("share of each branch")
    return save_figure(figure, out_dir, f"latency_{direction}.png")


def _tokens(length: int) -> str:
    return f"{length // 1024}K" if length % 1024 == 0 else str(length)


def run(args: argparse.Namespace) -> int:
    """`videonsa analyze latency`: time every length, rewriting latency.json after each; then the plots."""
    import torch

    from videonsa.analysis.common import finish_run, prepare_out_dir, write_json
    from videonsa.inference.model_files import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    settings = settings_from_args(args, device)
    out_dir = prepare_out_dir(args.out)
    timer = cuda_timer() if device.type == "cuda" else cpu_timer(settings.repeats)
    info = environment(device, dtype, settings)
    rows: list[dict[str, Any]] = []
    for length in settings.lengths:
        with torch.inference_mode(False):
            row = measure_length(length, settings, device, dtype, timer)
        rows.append(row)
        write_json(out_dir, "latency", latency_record(settings, info, rows))
        print(describe_row(row), flush=True)
    written = [out_dir / "latency.json", plot_latency(out_dir, rows, "forward")]
    if settings.backward:
        written.append(plot_latency(out_dir, rows, "backward"))
    written.append(finish_run(out_dir))
    for path in written:
        print(f"wrote  {path}")
    return 0


def describe_row(row: dict[str, Any]) -> str:
    """One line per length: the branches, the operator and dense attention in milliseconds."""
    parts = ", ".join(f"{name} {ms:.3g}" for name, ms in row["forward_ms"].items())
    line = f"{_tokens(row['length'])}: forward {parts}; nsa {row['nsa_forward_ms']:.3g} ms"
    if "dense_forward_ms" in row:
        line += f", dense {row['dense_forward_ms']:.3g} ms"
    if "nsa_backward_ms" in row:
        line += f"; backward nsa {row['nsa_backward_ms']:.3g} ms"
        if "dense_backward_ms" in row:
            line += f", dense {row['dense_backward_ms']:.3g} ms"
    return line


__all__ = [
    "BRANCHES",
    "HELP",
    "LatencySettings",
    "ReferenceBranches",
    "add_arguments",
    "latency_record",
    "measure_length",
    "reference_calls",
    "run",
    "triton_calls",
]
