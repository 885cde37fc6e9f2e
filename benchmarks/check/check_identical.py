"""Bit-identity of the NSA operator between two source trees: outputs and gradients must match exactly.

Each tree (`--old DIR`, `--new DIR`, each a `src/` root holding the `videonsa` package) runs the same fixed cases
in its own subprocess (PYTHONPATH=DIR, so the installed package does not interfere): forward and backward of
`videonsa.ops.nsa_attention` on the Triton kernels, inputs drawn from fixed seeds on the CPU and moved to the
device. The cases cover GQA 28/4 at head dim 128, 2K/8K/32K tokens, packed sequences (cu_seqlens) and a batch,
bf16 and fp32, `nsa_attention_parts` (the path that keeps every branch output), and the selection forced onto
each of its layouts (query tiles, block-major) through the planner's costs: `KernelSettings` where the tree has
it, the old module constants of `videonsa.ops.triton.selection` where it has those instead. Every case saves o
and the six input gradients; the parent reports, per case and tensor, the largest absolute difference (0
expected everywhere) and the time of one forward + backward in each tree (after a warm-up run).

The two trees' processes take the cases in lockstep (one case in the old tree, the same case in the new tree,
then the next; never both at once, so the times are not disturbed): each case's name is printed when it starts,
its verdict and times as soon as both trees have run it, and `--json` is rewritten (temp file + rename) after
every case with `"complete": false` until the last one, so a run cut short keeps the cases it finished. A case
that kills its tree's process is reported as failed there and the process is started again for the next case.

    python benchmarks/check/check_identical.py --old /tmp/old/src --new src                # the H100
    python benchmarks/check/check_identical.py --old /tmp/old/src --new src --device cpu   # tiny, interpreter

The old tree can be any commit's export (`git archive 838c0ea | tar -x -C /tmp/old`): only `nsa_attention`,
`nsa_attention_parts` and `NSAConfig` are used from it. `--device cpu` runs tiny shapes (float32, float16) under
the Triton interpreter. Exit status 1 when any tensor differs, a case fails in one tree only, or a tree's
process fails to start or runs past --timeout (seconds for each tree's start-up and cases together).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

# name: (sequence lengths (packed into one row) or [batch, T], dtype, path, layout)
#   path "attention": nsa_attention; "parts": nsa_attention_parts (loss on o and o_cmp).
#   layout "auto": the planner's choice; "tiles" / "by_block": both selection passes forced onto that layout.
GPU_CASES = {
    "2K-bf16": ([2048], "bfloat16", "attention", "auto"),
    "8K-bf16-varlen": ([3000, 77, 4000, 1115], "bfloat16", "attention", "auto"),
    "4Kx2-bf16-batch": ("batch", 2, 4096, "bfloat16", "attention", "auto"),
    "32K-bf16": ([32768], "bfloat16", "attention", "auto"),
    "8K-fp32": ([8192], "float32", "attention", "auto"),
    "2K-fp32-varlen": ([1000, 1048], "float32", "attention", "auto"),
    "8K-bf16-tiles": ([8192], "bfloat16", "attention", "tiles"),
    "8K-bf16-by_block": ([8192], "bfloat16", "attention", "by_block"),
    "32K-bf16-tiles": ([32768], "bfloat16", "attention", "tiles"),
    "32K-bf16-by_block": ([32768], "bfloat16", "attention", "by_block"),
    "8K-bf16-varlen-by_block": ([3000, 77, 4000, 1115], "bfloat16", "attention", "by_block"),
    "2K-bf16-parts": ([2048], "bfloat16", "parts", "auto"),
    "8K-fp32-varlen-parts": ([3000, 77, 4000, 1115], "float32", "parts", "auto"),
}
GPU_SHAPE = dict(heads_q=28, heads_kv=4, head_dim=128, block_size=64, block_count=32, window_size=256)

CPU_CASES = {
    "57-fp32-varlen": ([37, 20], "float32", "attention", "auto"),
    "40x2-fp16-batch": ("batch", 2, 40, "float16", "attention", "auto"),
    "57-fp32-varlen-tiles": ([37, 20], "float32", "attention", "tiles"),
    "57-fp32-varlen-by_block": ([37, 20], "float32", "attention", "by_block"),
    "57-fp32-varlen-parts": ([37, 20], "float32", "parts", "auto"),
}
CPU_SHAPE = dict(heads_q=4, heads_kv=2, head_dim=16, block_size=16, block_count=2, window_size=16)

GRADIENTS = ("q", "k", "v", "g_cmp", "g_slc", "g_swa")


# ----------------------------------------------------------------------------------------------------------
# Child: one tree, every case


def _inputs(case, shape: dict, device: str, seed: int):
    """q, k, v, gates [B, T, ...], upstream gradient, cu_seqlens (or None): drawn in float32 on the CPU from
    `seed`, then cast and moved, so that both trees see the very same values."""
    import torch

    if case[0] == "batch":
        _, batch, seq_len, dtype_name, *_ = case
        cu_seqlens = None
    else:
        lengths, dtype_name, *_ = case
        batch, seq_len = 1, sum(lengths)
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        cu_seqlens = torch.tensor(offsets, dtype=torch.int32, device=device)
    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(seed)
    hq, hkv, d = shape["heads_q"], shape["heads_kv"], shape["head_dim"]
    draw = lambda *s: torch.randn(*s, generator=gen).to(device=device, dtype=dtype)  # noqa: E731
    gate = lambda: torch.sigmoid(torch.randn(batch, seq_len, hq, generator=gen)).to(device=device, dtype=dtype)  # noqa: E731
    x = {"q": draw(batch, seq_len, hq, d), "k": draw(batch, seq_len, hkv, d), "v": draw(batch, seq_len, hkv, d),
         "g_cmp": gate(), "g_slc": gate(), "g_swa": gate()}
    return x, draw(batch, seq_len, hq, d), draw(batch, seq_len, hq, d), cu_seqlens


def _forced_layout(layout: str):
    """(keyword arguments for the operator, a function undoing module changes) that force both selection
    passes onto `layout`, or None where this tree offers no way to."""
    free = dict.fromkeys(("by_block_step_cost", "by_block_token_cost", "by_block_call_cost",
                          "dq_by_block_step_cost", "dq_by_block_token_cost", "dq_by_block_call_cost"), 0.0)
    priced_out = {"by_block_step_cost": 1e12, "dq_by_block_step_cost": 1e12}
    costs = free if layout == "by_block" else priced_out
    try:  # a tree with settings objects
        from dataclasses import replace

        from videonsa.ops.triton.selection import SELECTION_SETTINGS
        from videonsa.ops.triton_nsa import KernelSettings

        return {"settings": KernelSettings(selection=replace(SELECTION_SETTINGS, **costs))}, lambda: None
    except ImportError:
        pass
    from videonsa.ops.triton import selection as module  # a tree with module constants

    names = {name: name.upper() for name in costs}
    if not all(hasattr(module, constant) for constant in names.values()):
        return None
    saved = {constant: getattr(module, constant) for constant in names.values()}
    for name, constant in names.items():
        setattr(module, constant, costs[name])
    return {}, lambda: [setattr(module, constant, value) for constant, value in saved.items()]


def _run_case(case, shape: dict, device: str, seed: int):
    """(a function running one forward + backward and returning {name: tensor}, a function undoing the layout
    forcing), or (None, None) where the case's layout cannot be forced in this tree."""
    import videonsa.ops as ops

    x, do, do_cmp, cu_seqlens = _inputs(case, shape, device, seed)
    path, layout = case[-2], case[-1]
    budget = {k: shape[k] for k in ("block_size", "block_count", "window_size")}
    extra, undo = ({}, lambda: None) if layout == "auto" else (_forced_layout(layout) or (None, None))
    if extra is None:
        return None, None

    def forward(leaves: dict):
        kwargs = dict(**leaves, **budget, cu_seqlens=cu_seqlens)
        if extra:  # settings objects are taken by the Triton entry points themselves
            from videonsa.ops import triton_nsa

            fn = triton_nsa.nsa_parts_triton if path == "parts" else triton_nsa.nsa_attention_triton
            return fn(**kwargs, **extra)
        fn = ops.nsa_attention_parts if path == "parts" else ops.nsa_attention
        return fn(**kwargs, backend="triton")

    def call() -> dict:
        leaves = {k: v.detach().clone().requires_grad_() for k, v in x.items()}
        result = forward(leaves)
        if path == "parts":
            o = result.o
            named = {"o_cmp": result.o_cmp, "o_slc": result.o_slc, "o_swa": result.o_swa,
                     "block_indices": result.block_indices, "lse_cmp": result.lse_cmp}
            loss = (o.float() * do.float()).sum() + (result.o_cmp.float() * do_cmp.float()).sum()
        else:
            o, named = result, {}
            loss = (o.float() * do.float()).sum()
        loss.backward()
        out = {"o": o, **named, **{f"d{k}": v.grad for k, v in leaves.items()}}
        return {k: v.detach() for k, v in out.items()}

    return call, undo


# A child's lines for the parent start with this; anything else it prints (warnings) is only kept for errors.
PROTOCOL = "@check_identical"


def child(tree: str, device: str, cases: dict, shape: dict, out_dir: str, seed: int) -> None:
    """Announce the videonsa module, then run each case named on a line of stdin: its outcome goes to
    `out_dir/<case>.pt` ({"report": {...}, "results": {name: tensor} or None}) before "done <case>" is printed."""
    import torch

    import videonsa

    if not str(Path(videonsa.__file__).resolve()).startswith(str(Path(tree).resolve())):
        sys.exit(f"videonsa was imported from {videonsa.__file__}, not from {tree}")
    print(f"{PROTOCOL} module {videonsa.__file__}", flush=True)
    for line in sys.stdin:
        name = line.strip()
        if not name:
            continue
        report, tensors = _case_outcome(cases[name], shape, device, seed)
        saved = Path(out_dir) / f"{name}.pt"
        torch.save({"report": report, "results": tensors}, f"{saved}.tmp")
        os.replace(f"{saved}.tmp", saved)
        del tensors
        if device == "cuda":
            torch.cuda.empty_cache()
        print(f"{PROTOCOL} done {name}", flush=True)


def _case_outcome(case, shape: dict, device: str, seed: int) -> tuple[dict, dict | None]:
    """(report {"status", "ms"}, the case's tensors on the CPU or None): a warm-up run, then one timed run."""
    import torch

    call, undo = _run_case(case, shape, device, seed)
    if call is None:
        return {"status": "layout cannot be forced in this tree"}, None
    try:
        call()  # warm-up: compiles the kernels
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        tensors = call()
        if device == "cuda":
            torch.cuda.synchronize()
        elapsed_ms = (time.perf_counter() - start) * 1e3
    except Exception as error:  # reported per case; the other cases still run
        return {"status": f"failed: {type(error).__name__}: {error}"}, None
    finally:
        undo()
    return {"status": "ok", "ms": elapsed_ms}, {k: v.cpu() for k, v in tensors.items()}


# ----------------------------------------------------------------------------------------------------------
# Parent: run both trees, compare


class TreeFailure(Exception):
    """A tree's process cannot go on: it failed to start, or ran past --timeout."""


class TreeProcess:
    """One tree's child process, fed one case at a time; `timeout` seconds in all for its start-up and its cases
    (restarts included), counted only while the parent waits on it."""

    def __init__(self, label: str, tree: str, device: str, case_names: list[str], work_dir: str, seed: int,
                 timeout: float) -> None:
        self.label, self.tree, self.work_dir = label, tree, Path(work_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.time_left, self.timeout = float(timeout), timeout
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(tree).resolve()),
                                                                  os.environ.get("PYTHONPATH", "")]))
        if device == "cpu":
            self.env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
        self.command = [sys.executable, os.path.abspath(__file__), "--child", tree, "--device", device,
                        "--out-dir", str(self.work_dir), "--seed", str(seed), "--cases", *case_names]
        self.proc: subprocess.Popen | None = None
        self.module = ""

    def start(self) -> None:
        """Start the process (its imports run while the parent goes on); `module` is read by `wait_ready`."""
        self.stderr = open(self.work_dir / f"stderr-{time.monotonic_ns()}.txt", "w+")  # noqa: SIM115 (closed in close)
        self.proc = subprocess.Popen(self.command, env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True, bufsize=1)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.other_output: list[str] = []
        threading.Thread(target=self._read_stdout, args=(self.proc, self.lines), daemon=True).start()

    def wait_ready(self) -> None:
        """Wait for the child's module line; TreeFailure when it exits first or the time runs out."""
        line = self._protocol_line("start-up")
        if line is None:
            raise TreeFailure(f"{self.tree}: the cases failed to run (exit {self.proc.wait()}):\n{self._tails()}")
        self.module = line.removeprefix("module ")

    def run(self, name: str) -> tuple[dict, dict | None]:
        """Run case `name` in this tree: (its report {"status", "ms"}, its tensors {name: tensor} or None when it
        failed), as `_case_outcome` gives them in the child."""
        if self.proc is None:
            self.start()
            self.wait_ready()
        self.proc.stdin.write(name + "\n")
        self.proc.stdin.flush()
        line = self._protocol_line(f"case {name}")
        if line is None:  # the process died in this case: report it, and start afresh for the next one
            code = self.proc.wait()
            tails = self._tails()
            print(f"{self.label} tree, case {name}: the process exited (code {code}):\n{tails}", file=sys.stderr,
                  flush=True)
            self.close()
            last = tails.strip().splitlines()[-1] if tails.strip() else "no output"
            return {"status": f"failed: the process exited (code {code}): {last}"}, None
        if line != f"done {name}":
            raise TreeFailure(f"{self.tree}: its process answered {line!r} to case {name}")
        import torch

        saved = self.work_dir / f"{name}.pt"
        outcome = torch.load(saved, weights_only=False)
        saved.unlink()  # the tensors of a 32K case take gigabytes
        return outcome["report"], outcome["results"]

    def close(self, kill: bool = False) -> None:
        """End the process: at once with `kill`, else at the end of its input (killed if it has not within 30 s)."""
        if self.proc is None:
            return
        try:
            if kill:
                self.proc.kill()
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self.stderr.close()
        self.proc = None

    def _protocol_line(self, waiting_for: str) -> str | None:
        """The child's next protocol line without its prefix, None at the end of its output."""
        while True:
            started = time.monotonic()
            try:
                line = self.lines.get(timeout=max(self.time_left, 0.0))
            except queue.Empty:
                self.proc.kill()
                raise TreeFailure(f"{self.tree}: still running ({waiting_for}) after --timeout {self.timeout} s; "
                                  "the cases it finished are reported above") from None
            finally:
                self.time_left -= time.monotonic() - started
            if line is None:
                return None
            if line.startswith(PROTOCOL + " "):
                return line[len(PROTOCOL) + 1 :].rstrip("\n")
            self.other_output.append(line)

    def _tails(self) -> str:
        self.stderr.flush()
        self.stderr.seek(0)
        return "".join(self.other_output)[-4000:] + self.stderr.read()[-8000:]

    @staticmethod
    def _read_stdout(proc: subprocess.Popen, lines: queue.Queue) -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)


def max_abs_difference(a, b) -> float:
    """Largest |a - b| (float64), NaN where the tensors differ in shape, dtype or NaN placement; 0 when bitwise
    equal (NaNs in the same places count as equal)."""
    import torch

    if a.shape != b.shape or a.dtype != b.dtype:
        return float("nan")
    if a.dtype.is_floating_point:
        if not torch.equal(torch.isnan(a), torch.isnan(b)):
            return float("nan")
        a, b = torch.nan_to_num(a.double(), nan=0.0), torch.nan_to_num(b.double(), nan=0.0)
        both_inf = torch.isinf(a) & torch.isinf(b) & (a == b)
        diff = torch.where(both_inf, 0.0, (a - b).abs())
        return float(diff.max()) if diff.numel() else 0.0
    return float((a.long() - b.long()).abs().max()) if a.numel() else 0.0


def compare(name: str, old: tuple[dict, dict | None], new: tuple[dict, dict | None]) -> tuple[dict, bool]:
    """Case `name`'s row of the table from each tree's (report, tensors), and whether it passes: identical
    tensors, or a layout the old tree cannot force while the new one runs it."""
    (old_report, a), (new_report, b) = old, new
    row = {"case": name, "old_ms": old_report.get("ms"), "new_ms": new_report.get("ms")}
    if old_report.get("status") != "ok" or new_report.get("status") != "ok":
        row["status"] = f"old: {old_report.get('status')}; new: {new_report.get('status')}"
        skipped = "cannot be forced" in str(old_report.get("status"))
        return row, skipped and new_report.get("status") == "ok"
    diffs = {k: max_abs_difference(a[k], b[k]) for k in a if k in b}
    missing = sorted(set(a) ^ set(b))
    row["max_abs_diff"] = diffs
    row["status"] = "identical" if not missing and all(v == 0 for v in diffs.values()) else "DIFFERENT"
    if missing:
        row["missing"] = missing
    return row, row["status"] == "identical"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--old", help="src/ root of the reference tree (holds videonsa/)")
    parser.add_argument("--new", help="src/ root of the tree under test")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda: the real shapes; cpu: tiny shapes under the Triton interpreter")
    parser.add_argument("--cases", nargs="*", help="case names to run (default: all of the device's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the comparison to this JSON file (rewritten after every case)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per tree")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    all_cases, shape = (GPU_CASES, GPU_SHAPE) if args.device == "cuda" else (CPU_CASES, CPU_SHAPE)
    names = args.cases or list(all_cases)
    unknown = [n for n in names if n not in all_cases]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; the {args.device} cases are {list(all_cases)}")
    if args.child:
        child(args.child, args.device, {n: all_cases[n] for n in names}, shape, args.out_dir, args.seed)
        return 0
    if not args.old or not args.new:
        parser.error("--old and --new are required")
    for tree in (args.old, args.new):
        if not (Path(tree) / "videonsa" / "__init__.py").is_file():
            parser.error(f"{tree} is not a src/ root: no videonsa/__init__.py in it")

    json_path = Path(args.json) if args.json else None
    if json_path is not None and not json_path.parent.is_dir():
        parser.error(f"--json {args.json}: the folder {json_path.parent} does not exist")

    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # a `timeout` still ends the trees' processes
    rows, identical, finished = [], True, False
    with tempfile.TemporaryDirectory() as tmp:
        trees = {label: TreeProcess(label, tree, args.device, names, os.path.join(tmp, label), args.seed, args.timeout)
                 for label, tree in (("old", args.old), ("new", args.new))}
        try:
            for tree in trees.values():  # both import at once; the cases then run one tree at a time
                tree.start()
            for label, tree in trees.items():
                tree.wait_ready()
                print(f"{label}: videonsa from {tree.module}", flush=True)
            for number, name in enumerate(names, 1):
                print(f"{name}: running ({number}/{len(names)})", flush=True)
                outcome = {label: tree.run(name) for label, tree in trees.items()}
                row, same = compare(name, outcome["old"], outcome["new"])
                rows.append(row)
                identical &= same
                if json_path is not None:
                    write_json(json_path, args.device, identical, rows, complete=number == len(names))
                print(_row_lines(row), flush=True)
            finished = True
        except TreeFailure as failure:
            sys.exit(str(failure))
        finally:  # on a failure or a signal, the other tree's process is not left to finish its case
            for tree in trees.values():
                tree.close(kill=not finished)
    print()
    for row in rows:
        print(_row_lines(row))
    print("all identical" if identical else "DIFFERENCES FOUND")
    return 0 if identical else 1


def _row_lines(row: dict) -> str:
    """One case's line of the table (its verdict, largest difference and times), and a line per differing tensor."""
    timing = f"old {row['old_ms']:.1f} ms, new {row['new_ms']:.1f} ms" if row["old_ms"] and row["new_ms"] else ""
    worst = max(row.get("max_abs_diff", {}).values(), default=None)
    detail = f"max |diff| {worst:g}" if worst is not None else ""
    lines = [f"{row['case']:28s} {row['status']:10s} {detail:18s} {timing}"]
    if row["status"] == "DIFFERENT":
        lines += [f"    {k}: {v:g}" for k, v in row["max_abs_diff"].items() if v != 0]
    return "\n".join(lines)


def write_json(path: Path, device: str, identical: bool, rows: list[dict], complete: bool) -> None:
    """The comparison so far (temp file + rename, so a reader never sees half a file): "identical" covers the cases
    in "cases", and "complete" says whether those are all the cases asked for."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        json.dump({"device": device, "identical": identical, "complete": complete, "cases": rows}, handle, indent=1)
    os.replace(handle.name, path)


def _exit_on_sigterm(signum, frame) -> None:
    sys.exit(128 + signum)


if __name__ == "__main__":
    sys.exit(main())
