"""Shared code of the benchmark scripts: timing, shapes, inputs, environment, output files and baselines.

Scripts under `benchmarks/{bench,tune,probe,check}/` put `benchmarks/` on `sys.path` and import from here
(see `benchmarks/README.md`). `harness.operator` (kernel internals) is imported only by the scripts that time
single kernels, so that the others do not depend on `videonsa.ops` internals.
"""

from harness.compare import rel_error
from harness.env import describe, environment, git_commit
from harness.inputs import INPUT_KINDS, make_inputs, selection_sharing
from harness.output import Results, add_output_arguments, fmt, markdown_table, open_run, results_root
from harness.shapes import (
    BLOCK,
    BUDGET,
    COUNT,
    DTYPE,
    HKV,
    HQ,
    INIT,
    LOCAL,
    OPERATOR_LENGTHS,
    PREFILL_LENGTHS,
    PROBE_LENGTHS,
    WINDOW,
    D,
    flop_floors_ms,
    nsa_flops,
)
from harness.timing import GiB, bench, kernel_split, matmul_tflops, peak_gib

__all__ = [
    "BLOCK", "BUDGET", "COUNT", "D", "DTYPE", "GiB", "HKV", "HQ", "INIT", "INPUT_KINDS", "LOCAL", "OPERATOR_LENGTHS",
    "PREFILL_LENGTHS", "PROBE_LENGTHS", "WINDOW", "Results", "add_output_arguments", "bench", "describe",
    "environment", "flop_floors_ms", "fmt", "git_commit", "kernel_split", "make_inputs", "markdown_table",
    "matmul_tflops", "nsa_flops", "open_run", "peak_gib", "rel_error", "results_root", "selection_sharing",
]
