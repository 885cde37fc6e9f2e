"""Compression-branch kernels on one GPU: correctness against a float32 PyTorch oracle, then timings.

    python benchmarks/tune/tune_compression.py [--out DIR] [--lengths 32768 131072]
        [--check-lengths 8192] [--baseline-rev REV] [--parts check time sweep]

Shape (`harness.shapes`): HQ=28, HKV=4, D=128, bf16, block 64, one sequence (plus a packed varlen batch in the
check).

1. Check (every length of --check-lengths, and lengths [3000, 77, 5000]): `mean_pool_fwd`,
   `compressed_attention_fwd` (o, lse), `compressed_attention_bwd` (dq, dK~, dV~) plain and with `do_scale`,
   and `compressed_attention_delta`, against float32 autograd of the masked softmax over the compressed keys.
   Relative errors ||x - ref|| / ||ref||; bf16 passes below 2e-2 (measured kernels give ~3e-3).
2. Timing (each length): median CUDA-event milliseconds of the compression forward (pooling + attention, the
   host work included, as a caller sees it), the backward, and the self CUDA time of each kernel from
   torch.profiler; the same for the code of git revision --baseline-rev when `git` and the revision are there
   (its module is written under OUT and imported from there), in the same run.
   With `compressed_attention_delta` in the module, also the lean backward with do_scale: delta kernel, then
   dq and dK~/dV~ with do_scale and the given delta (o not read), as `bwd_scaled_ms` and its kernels.
3. dK~/dV~ launch variants (`SWEEP_DKV`, lean backward with do_scale) and delta kernel launch variants
   (`SWEEP_DELTA`) and forward attention launch variants (`SWEEP_FWD`) timed at the longest length, each
   checked against the default.

Prints JSON lines as it goes and writes OUT/tune_compression.{jsonl,json} (benchmarks/README.md); exits 1 if a
check of the current code fails. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
from harness import (  # noqa: E402
    BLOCK,
    DTYPE,
    HKV,
    HQ,
    PROBE_LENGTHS,
    D,
    Results,
    bench,
    kernel_split,
    open_run,
    rel_error,
)

# Kernel internals: the compression module (its entry points and launch settings), the only ones used here.
from videonsa.ops.triton import compression as C  # noqa: E402

DEVICE = "cuda"
RESULTS: Results | None = None  # set by main()
# dK~/dV~ launches, timed with do_scale (the lean path); min_segment / max_segments set the segments.
SWEEP_DKV = [
    dict(rows=32, keys=128, warps=8, stages=3),
    dict(rows=32, keys=128, warps=8, stages=2),
    dict(rows=32, keys=128, warps=8, stages=3, min_segment=2048, max_segments=32),
]
# Delta kernel launches (sm_90 reports: 128x64 w8 s2 112 registers / 128 KB shared, 128x32 80 / 96 KB,
# 64x32 w4 72 / 64 KB, 128x64 s3 160 KB).
SWEEP_DELTA = [
    dict(rows=128, keys=64, warps=8, stages=2),
    dict(rows=128, keys=32, warps=8, stages=2),
    dict(rows=128, keys=32, warps=8, stages=3),
    dict(rows=64, keys=32, warps=4, stages=2),
    dict(rows=128, keys=64, warps=8, stages=3),
]
# Forward kernel launches (sm_90 reports: 128x64 w8 s2/s3 203 registers, 96/128 KB shared; 128x128 s2 244,
# 160 KB; 128x32 s3 203, 80 KB; 64x64 w4 s3 222, 112 KB; all without spills).
SWEEP_FWD = [
    dict(rows=128, keys=64, warps=8, stages=2),
    dict(rows=128, keys=64, warps=8, stages=3),
    dict(rows=128, keys=128, warps=8, stages=2),
    dict(rows=128, keys=32, warps=8, stages=3),
    dict(rows=64, keys=64, warps=4, stages=3),
]


def emit(record: dict) -> dict:
    return RESULTS.row(record)


def make(seq_lens: list[int], seed: int) -> dict:
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    total = sum(seq_lens)
    cu = torch.tensor([0, *torch.tensor(seq_lens).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=DEVICE, dtype=torch.float32).to(DTYPE)

    return dict(q=randn(total, HQ, D), k=randn(total, HKV, D), v=randn(total, HKV, D), do=randn(total, HQ, D),
                do_scale=(torch.rand(total, HQ, generator=gen, device=DEVICE) * 2 - 0.5).to(DTYPE), cu=cu)


def oracle(x: dict, scale: float) -> dict:
    """float32 autograd of the compression branch per sequence: o, lse, dq, dk_cmp, dv_cmp (scaled do too)."""
    out = {key: [] for key in ("o", "lse", "dq", "dk", "dv", "dq_s", "dk_s", "dv_s")}
    bounds = x["cu"].tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        n = b - a
        nb = n // BLOCK
        q = x["q"][a:b].float().requires_grad_()
        kc = x["k"][a:a + nb * BLOCK].float().view(nb, BLOCK, HKV, D).mean(1).to(DTYPE).float().requires_grad_()
        vc = x["v"][a:a + nb * BLOCK].float().view(nb, BLOCK, HKV, D).mean(1).to(DTYPE).float().requires_grad_()
        s = torch.einsum("thd,jhd->thj", q, kc.repeat_interleave(HQ // HKV, 1)) * scale
        visible = torch.arange(nb, device=DEVICE)[None, :] < (torch.arange(n, device=DEVICE)[:, None] + 1) // BLOCK
        s = s.masked_fill(~visible[:, None, :], float("-inf"))
        lse = torch.logsumexp(s, -1)
        p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)[..., None])
        o = torch.einsum("thj,jhd->thd", p, vc.repeat_interleave(HQ // HKV, 1))
        do = x["do"][a:b].float()
        for suffix, grad in (("", do), ("_s", do * x["do_scale"][a:b].float()[..., None])):
            dq, dk, dv = torch.autograd.grad(o, (q, kc, vc), grad, retain_graph=True)
            out["dq" + suffix].append(dq)
            out["dk" + suffix].append(dk)
            out["dv" + suffix].append(dv)
        out["o"].append(o.detach())
        out["lse"].append(lse.detach())
    return {key: torch.cat(val) for key, val in out.items()}


rel = rel_error


def check(mod, seq_lens: list[int], scale: float) -> dict:
    x = make(seq_lens, seed=len(seq_lens) + sum(seq_lens))
    ref = oracle(x, scale)
    q, k, v, do, dos, cu = (x[key] for key in ("q", "k", "v", "do", "do_scale", "cu"))
    k_cmp, v_cmp, cu_cmp = mod.mean_pool_fwd(k, v, cu, BLOCK)
    o, lse = mod.compressed_attention_fwd(q, k_cmp, v_cmp, cu, cu_cmp, BLOCK, scale)
    dq, dk, dv = mod.compressed_attention_bwd(q, k_cmp, v_cmp, o, lse, do, cu, cu_cmp, BLOCK, scale)
    errors = dict(o=rel(o, ref["o"]), lse=rel(lse, ref["lse"]), dq=rel(dq, ref["dq"]), dk=rel(dk, ref["dk"]),
                  dv=rel(dv, ref["dv"]))
    if hasattr(mod, "compressed_attention_delta"):
        delta = mod.compressed_attention_delta(q, k_cmp, v_cmp, lse, do, cu, cu_cmp, BLOCK, scale, do_scale=dos)
        want = (ref["o"] * do.float()).sum(-1) * dos.float()
        errors["delta_scaled"] = rel(delta, want)
        dq_s, dk_s, dv_s = mod.compressed_attention_bwd(q, k_cmp, v_cmp, None, lse, do, cu, cu_cmp, BLOCK, scale,
                                                        delta=delta, do_scale=dos)
        errors.update(dq_scaled=rel(dq_s, ref["dq_s"]), dk_scaled=rel(dk_s, ref["dk_s"]),
                      dv_scaled=rel(dv_s, ref["dv_s"]))
    # Deterministic backward: bitwise equal on a repeat.
    again = mod.compressed_attention_bwd(q, k_cmp, v_cmp, o, lse, do, cu, cu_cmp, BLOCK, scale)
    repeat = all(torch.equal(a, b) for a, b in zip(again, (dq, dk, dv)))
    ok = repeat and all(err < 2e-2 for err in errors.values())
    return dict(errors=errors, bitwise_repeat=repeat, ok=ok)


def kernel_ms(fn) -> dict:
    """Self CUDA milliseconds of the 12 most expensive kernels of one call of fn (after a warm-up)."""
    return dict(list(kernel_split(fn, min_ms=0.0).items())[:12])


def timings(mod, seq_len: int, scale: float) -> dict:
    x = make([seq_len], seed=7)
    q, k, v, do, dos, cu = (x[key] for key in ("q", "k", "v", "do", "do_scale", "cu"))
    k_cmp, v_cmp, cu_cmp = mod.mean_pool_fwd(k, v, cu, BLOCK)
    o, lse = mod.compressed_attention_fwd(q, k_cmp, v_cmp, cu, cu_cmp, BLOCK, scale)

    def fwd():
        kc, vc, cc = mod.mean_pool_fwd(k, v, cu, BLOCK)
        return mod.compressed_attention_fwd(q, kc, vc, cu, cc, BLOCK, scale)

    def bwd():
        return mod.compressed_attention_bwd(q, k_cmp, v_cmp, o, lse, do, cu, cu_cmp, BLOCK, scale)

    out = dict(fwd_ms=bench(fwd), bwd_ms=bench(bwd), fwd_kernels=kernel_ms(fwd), bwd_kernels=kernel_ms(bwd))
    if hasattr(mod, "compressed_attention_delta"):
        def bwd_scaled():  # the lean path: delta kernel, then dq and dK~/dV~ with do_scale (o never read)
            delta = mod.compressed_attention_delta(q, k_cmp, v_cmp, lse, do, cu, cu_cmp, BLOCK, scale, do_scale=dos)
            return mod.compressed_attention_bwd(q, k_cmp, v_cmp, None, lse, do, cu, cu_cmp, BLOCK, scale,
                                                delta=delta, do_scale=dos)

        out.update(bwd_scaled_ms=bench(bwd_scaled), bwd_scaled_kernels=kernel_ms(bwd_scaled))
    return out


def load_revision(rev: str, out_dir: Path):
    """The compression module of git revision `rev`, written under out_dir and imported; None if unavailable."""
    try:
        text = subprocess.run(["git", "show", f"{rev}:src/videonsa/ops/triton/compression.py"], check=True,
                              capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        emit({"baseline": rev, "skipped": f"git show failed: {exc}"[:200]})
        return None
    path = out_dir / f"compression_{rev}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(f"compression_{rev}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # triton.jit resolves globals through the module
    spec.loader.exec_module(mod)
    return mod


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=PROBE_LENGTHS)
    parser.add_argument("--check-lengths", type=int, nargs="+", default=[8192])
    parser.add_argument("--baseline-rev", default="11bec3c")
    parser.add_argument("--parts", nargs="+", default=["check", "time", "sweep"],
                        choices=["check", "time", "sweep"], help="each part compiles its own kernels: split runs")
    global RESULTS
    args, RESULTS = open_run(parser, argv, "tune_compression")
    scale = D**-0.5
    result: dict = dict(checks=[], timings=[], sweep=[])
    modules = [("new", C)]
    wants_base = args.baseline_rev and {"check", "time"} & set(args.parts)
    base = load_revision(args.baseline_rev, RESULTS.directory) if wants_base else None
    if base is not None:
        modules.append((f"base_{args.baseline_rev}", base))

    for seq_lens in [[n] for n in args.check_lengths] + [[3000, 77, 5000]] if "check" in args.parts else []:
        for name, mod in modules:
            result["checks"].append(emit(dict(code=name, seq_lens=seq_lens, **check(mod, seq_lens, scale))))
    for seq_len in args.lengths if "time" in args.parts else []:
        for name, mod in modules:
            result["timings"].append(emit(dict(code=name, T=seq_len, **timings(mod, seq_len, scale))))

    if "sweep" in args.parts:
        seq_len = max(args.lengths)
        x = make([seq_len], seed=3)
        q, k, v, do, dos, cu = (x[key] for key in ("q", "k", "v", "do", "do_scale", "cu"))
        k_cmp, v_cmp, cu_cmp = C.mean_pool_fwd(k, v, cu, BLOCK)
        o, lse = C.compressed_attention_fwd(q, k_cmp, v_cmp, cu, cu_cmp, BLOCK, scale)
        delta = C.compressed_attention_delta(q, k_cmp, v_cmp, lse, do, cu, cu_cmp, BLOCK, scale, do_scale=dos)

        def lean_bwd(settings=C.COMPRESSION_SETTINGS):
            return C.compressed_attention_bwd(q, k_cmp, v_cmp, None, lse, do, cu, cu_cmp, BLOCK, scale,
                                              delta=delta, do_scale=dos, settings=settings)

        def delta_only(settings=C.COMPRESSION_SETTINGS):
            return (C.compressed_attention_delta(q, k_cmp, v_cmp, lse, do, cu, cu_cmp, BLOCK, scale, do_scale=dos,
                                                 settings=settings),)

        def fwd_only(settings=C.COMPRESSION_SETTINGS):
            return C.compressed_attention_fwd(q, k_cmp, v_cmp, cu, cu_cmp, BLOCK, scale, settings)

        for part, variants, run, key in (("dkv", SWEEP_DKV, lean_bwd, "dkv"), ("delta", SWEEP_DELTA, delta_only,
                                          "delta"), ("fwd", SWEEP_FWD, fwd_only, "_cmp_fwd")):
            want = run()
            for variant in variants:
                launch = {name: value for name, value in variant.items() if name in ("rows", "keys", "warps", "stages")}
                segments = {f"dkv_{name}": variant[name] for name in ("min_segment", "max_segments") if name in variant}
                settings = replace(C.COMPRESSION_SETTINGS, **{part: replace(getattr(C.COMPRESSION_SETTINGS, part),
                                                                            **launch)}, **segments)
                fn = partial(run, settings)
                try:
                    got = fn()
                    pairs = list(zip(got[1:], want[1:])) if part == "dkv" else list(zip(got, want))
                    agrees = all(rel(a, b) < 1e-2 for a, b in pairs)
                    kernels = kernel_ms(fn)
                    ms = sum(val for name, val in kernels.items() if key in name)
                    record = dict(T=seq_len, part=part, variant=variant, kernel_ms=round(ms, 3), agrees=agrees)
                except Exception as exc:  # noqa: BLE001 - a variant that fails to compile or run is reported
                    record = dict(T=seq_len, part=part, variant=variant, error=f"{type(exc).__name__}: {exc}"[:300])
                result["sweep"].append(emit(record))

    RESULTS.write_json(result)
    failed = [c for c in result["checks"] if c["code"] == "new" and not c["ok"]]
    print(json.dumps({"all_checks_ok": not failed}))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
