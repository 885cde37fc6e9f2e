"""Compile the official mode's Triton kernels for an H100 ahead of time (no GPU needed); report registers, spills
and shared memory per kernel and launch.

    python benchmarks/check/compile_report.py                        # default launches, 7B shape, bf16
    python benchmarks/check/compile_report.py --sweep compression    # also the grid bench_official.py times
    python benchmarks/check/compile_report.py --sweep topk --json out.json   # 40 launches: ~10 min, 2 busy cores

With a Triton that is not the GPU machine's (e.g. the interpreter's 3.9 here), run it from an environment with
the GPU machine's Triton (3.6) and borrow torch from another one with --site (appended to sys.path, so the
environment's own triton still wins):

    TRITON36_VENV/bin/python benchmarks/check/compile_report.py \\
        --site TORCH_SITE_PACKAGES      # the site-packages folder of an environment that has torch

How: each launcher (`anticausal_compression_triton`, `original_topk_triton`) is called on meta tensors of the
requested shape with its kernel replaced by a recorder, so the arguments, constexprs and launch options are
exactly the launcher's. Each argument is then specialised as Triton's JIT would at launch (ints divisible by 16
get tt.divisibility 16, ints equal to 1 become constexprs, 16-byte aligned pointers get tt.divisibility 16:
without these the compiler cannot vectorise or pipeline the loads), the kernel is compiled with
`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`, and the PTX goes through Triton's own
ptxas with its flags plus -v. Columns: regs (per thread), spill (bytes stored / loaded), stack (frame bytes),
smem (the dynamic shared memory Triton reserves; flagged above sm_90's 227 KiB per block, where the launch
itself fails), mma (wgmma or mma.sync instructions in the PTX).

Exit status 1 when a default launch fails to compile, spills or needs too much shared memory.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import itertools
import json
import re
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TARGET_CAPABILITY = 90  # H100
SHARED_LIMIT = 232448  # bytes of shared memory one block may use on sm_90 (227 KiB); a launch above it fails


@dataclass
class Report:
    kernel: str
    launch: dict
    default: bool
    compiled: bool = False
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack_bytes: int | None = None
    shared_bytes: int | None = None
    mma: str = ""
    error: str = ""
    constexprs: dict = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        return self.compiled and not self.spill_stores and not self.spill_loads and not self.over_shared

    @property
    def over_shared(self) -> bool:
        return bool(self.shared_bytes and self.shared_bytes > SHARED_LIMIT)


# ----------------------------------------------------------------------------------------------------------
# Capturing a launcher's kernel call


class _RecordedLaunch:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kwargs)` records the call."""

    def __init__(self) -> None:
        self.calls: list[tuple[tuple, dict]] = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


@contextmanager
def _recording(module, name: str):
    kernel = getattr(module, name)
    recorder = _RecordedLaunch()
    setattr(module, name, recorder)
    try:
        yield kernel, recorder
    finally:
        setattr(module, name, kernel)


def _specialise(kernel, args: tuple, kwargs: dict):
    """(signature, constexprs, attrs, options) as Triton's JIT builds them for this call on a CUDA device."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    kwargs = dict(kwargs)
    options = {key: kwargs.pop(key) for key in ("num_warps", "num_stages", "num_ctas") if key in kwargs}
    bound = inspect.signature(kernel.fn).bind(*args, **kwargs)
    bound.apply_defaults()
    signature, constexprs, attrs = {}, {}, {}
    for index, (param, (name, value)) in enumerate(zip(kernel.params, bound.arguments.items(), strict=True)):
        if param.is_constexpr:
            signature[name] = "constexpr"
            constexprs[(index,)] = value
            continue
        kind, spec = native_specialize_impl(CUDABackend, value, param.is_const, not param.do_not_specialize,
                                            not param.do_not_specialize_on_alignment)
        signature[name] = kind
        if kind == "constexpr":  # an int equal to 1
            constexprs[(index,)] = value
        elif isinstance(spec, str):
            attrs[(index,)] = CUDABackend.parse_attr(spec)
    return signature, constexprs, attrs, options


# ----------------------------------------------------------------------------------------------------------
# Compiling and reading ptxas


def _ptxas_stats(ptx: str) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    ptxas = get_ptxas(TARGET_CAPABILITY).path
    with tempfile.TemporaryDirectory() as scratch:
        source = Path(scratch) / "kernel.ptx"
        source.write_text(ptx)
        done = subprocess.run([ptxas, "-lineinfo", "-v", f"--gpu-name={sm_arch_from_capability(TARGET_CAPABILITY)}",
                               str(source), "-o", str(Path(scratch) / "kernel.o")], capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"ptxas failed: {done.stderr.strip()[-400:]}")
    log = done.stderr

    def number(pattern: str) -> int | None:
        found = re.search(pattern, log)
        return int(found.group(1)) if found else None

    return {"registers": number(r"Used (\d+) registers"), "spill_stores": number(r"(\d+) bytes spill stores"),
            "spill_loads": number(r"(\d+) bytes spill loads"), "stack_bytes": number(r"(\d+) bytes stack frame")}


def compile_call(name: str, kernel, args: tuple, kwargs: dict, launch: dict, default: bool) -> Report:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs, options = _specialise(kernel, args, kwargs)
    shown = {kernel.arg_names[path[0]]: value for path, value in constexprs.items()}
    report = Report(name, launch, default, constexprs=shown)
    try:
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs),
                                  target=GPUTarget("cuda", TARGET_CAPABILITY, 32), options=options)
        ptx = compiled.asm["ptx"]
        for key, value in _ptxas_stats(ptx).items():
            setattr(report, key, value)
    except Exception as error:  # noqa: BLE001 - a launch that does not compile is a result to report
        report.error = (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
        return report
    report.compiled = True
    report.shared_bytes = compiled.metadata.shared
    report.mma = ", ".join(f"{op} {ptx.count(op)}" for op in ("wgmma.mma_async", "mma.sync") if op in ptx)
    return report


# ----------------------------------------------------------------------------------------------------------
# The kernels at the requested shape


def meta_query_and_compressed_keys(shape: argparse.Namespace):
    """Shape-only ("meta") q [B, T, HP, D] and compressed keys [B, ceil(T / block_size), HKV, D] in shape.dtype:
    enough for a launcher to pick its launch and record the kernel call, no memory."""
    import torch

    dtype = getattr(torch, shape.dtype)
    q = torch.empty(shape.batch, shape.length, shape.heads, shape.dim, dtype=dtype, device="meta")
    n_blocks = -(-shape.length // shape.block_size)
    k_cmp = torch.empty(shape.batch, n_blocks, shape.heads_kv, shape.dim, dtype=dtype, device="meta")
    return q, k_cmp


def compression_reports(shape: argparse.Namespace, launches, default_launch) -> list[Report]:
    """The compression kernel per launch, gated (what official mode runs) and, for the default, ungated."""
    import torch

    from videonsa.ops.triton import official_compression as module

    q, k_cmp = meta_query_and_compressed_keys(shape)
    gate = torch.empty(3, shape.batch * shape.length, shape.heads, dtype=q.dtype, device="meta")[0]
    gate = gate.view(q.shape[:3])  # as gated_branch_sum passes it
    reports = []
    for launch in launches:
        for gated in (True, False) if launch == default_launch else (True,):
            with _recording(module, "_anticausal_compression_kernel") as (kernel, recorder):
                module.anticausal_compression_triton(q, k_cmp, k_cmp, shape.block_size, shape.dim**-0.5,
                                                     gate=gate if gated else None, launch=launch)
            (args, kwargs), = recorder.calls
            name = "compression" + ("+gate" if gated else "")
            reports.append(compile_call(name, kernel, args, kwargs, asdict(launch), launch == default_launch))
            print_row(reports[-1])
    return reports


def topk_reports(shape: argparse.Namespace, launches, default_launch) -> list[Report]:
    """The official top-k kernel per launch."""
    import torch

    from videonsa.ops.triton import official_topk as module

    q, k_cmp = meta_query_and_compressed_keys(shape)
    lse = torch.empty(shape.batch, shape.heads, shape.length, dtype=torch.float32, device="meta")
    reports = []
    for launch in launches:
        with _recording(module, "_original_topk_kernel") as (kernel, recorder):
            module.original_topk_triton(q, k_cmp, lse, shape.block_counts, shape.block_size, shape.dim**-0.5,
                                        launch=launch)
        (args, kwargs), = recorder.calls
        reports.append(compile_call("topk", kernel, args, kwargs, asdict(launch), launch == default_launch))
        print_row(reports[-1])
    return reports


def compression_launches(sweep: bool):
    from videonsa.ops.triton.official_compression import DEFAULT_LAUNCH, CompressionLaunch

    if not sweep:
        return [DEFAULT_LAUNCH], DEFAULT_LAUNCH
    # the grid `bench_official.py --compression-sweep` times
    grid = [CompressionLaunch(rows=rows, block_n=block_n, num_warps=warps, num_stages=stages)
            for rows, block_n, warps, stages in itertools.product((64, 128, 256), (32, 64, 128), (4, 8), (2, 3))]
    return [DEFAULT_LAUNCH] + [launch for launch in grid if launch != DEFAULT_LAUNCH], DEFAULT_LAUNCH


def topk_launches(sweep: bool, group: int):
    from videonsa.ops.triton.official_topk import DEFAULT_LAUNCH, OfficialTopkLaunch

    if not sweep:
        return [DEFAULT_LAUNCH], DEFAULT_LAUNCH
    # the grid `tune_official_topk.py --sweep` times (its default --tokens / --warps / --stages)
    grid = [OfficialTopkLaunch(tokens_per_program=t, max_rows=max(128, t * group), num_warps=w, num_stages=s)
            for t, w, s in itertools.product((1, 2, 4, 8, 16), (1, 2, 4, 8), (1, 2))]
    return [DEFAULT_LAUNCH] + [launch for launch in grid if launch != DEFAULT_LAUNCH], DEFAULT_LAUNCH


# ----------------------------------------------------------------------------------------------------------
# Output


def print_row(report: Report) -> None:
    launch = " ".join(f"{key}={value}" for key, value in report.launch.items())
    mark = "*" if report.default else " "
    if not report.compiled:
        print(f"{mark}{report.kernel:17s} {launch:55s} FAILED: {report.error}", flush=True)
        return
    spill = f"{report.spill_stores}/{report.spill_loads}"
    print(f"{mark}{report.kernel:17s} {launch:55s} regs={report.registers:<4d} spill={spill:9s} "
          f"stack={report.stack_bytes:<5d} smem={report.shared_bytes:<6d} {report.mma}"
          f"{'  OVER the 227 KiB shared memory limit: fails at launch' if report.over_shared else ''}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", nargs="+", choices=("compression", "topk"), default=["compression", "topk"])
    parser.add_argument("--sweep", nargs="*", choices=("compression", "topk"), default=[],
                        help="also compile every launch the benchmarks sweep for these kernels")
    parser.add_argument("--length", type=int, default=32768, help="tokens T (default 32768)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=64, help="padded query heads HP (official mode: 64)")
    parser.add_argument("--heads-kv", type=int, default=4)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--block-counts", type=int, default=32)
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--site", action="append", default=[], metavar="DIR",
                        help="a site-packages directory appended to sys.path (e.g. to borrow torch)")
    parser.add_argument("--json", type=Path, help="also write the reports as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.extend(args.site)
    if importlib.util.find_spec("videonsa") is None:
        sys.path.insert(0, str(ROOT / "src"))
    import triton

    print(f"triton {triton.__version__}, target sm_{TARGET_CAPABILITY}, {args.dtype}, B={args.batch} "
          f"T={args.length} HP={args.heads} HKV={args.heads_kv} D={args.dim} block_size={args.block_size} "
          f"block_counts={args.block_counts}  (* = default launch; spill = bytes stored/loaded)", flush=True)
    reports: list[Report] = []
    if "compression" in args.kernels:
        reports += compression_reports(args, *compression_launches("compression" in args.sweep))
    if "topk" in args.kernels:
        reports += topk_reports(args, *topk_launches("topk" in args.sweep, args.heads // args.heads_kv))
    if args.json:
        payload = {"triton": triton.__version__, "capability": TARGET_CAPABILITY, "shape": {
            key: value for key, value in vars(args).items() if key not in ("site", "json", "sweep", "kernels")},
            "reports": [asdict(report) for report in reports]}
        sys.path.insert(0, str(ROOT / "benchmarks"))  # the shared harness, imported once the paths are set
        from harness.output import write_json

        write_json(args.json, json.loads(json.dumps(payload, default=str)))
    bad_defaults = [report for report in reports if report.default and not report.clean]
    return 1 if bad_defaults else 0


if __name__ == "__main__":
    sys.exit(main())
