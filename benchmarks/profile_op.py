"""Where the NSA operator's GPU time goes: torch.profiler self-CUDA time per kernel of one `nsa_attention`
forward + backward (the Triton path), on the inputs of `bench_ops.py` (randn and structured), per length.

    python benchmarks/profile_op.py [--lengths 32768 131072] [--inputs randn structured] [--rows 30]

Prints one profiler table per (length, inputs) after two warm-up steps. B=1, HQ=28, HKV=4, D=128, bf16 and the
VideoNSA defaults, as in bench_ops.py.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_ops import make_inputs  # noqa: E402
from videonsa.ops.triton_nsa import nsa_attention_triton  # noqa: E402


def profile_step(seq_len: int, structured: bool, rows: int) -> str:
    x = make_inputs(seq_len, structured=structured)
    leaves = {name: t.detach().clone().requires_grad_() for name, t in x.items()}
    do = torch.randn_like(x["q"])
    for _ in range(2):  # compile and warm the caches
        nsa_attention_triton(**leaves).backward(do)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        o = nsa_attention_triton(**leaves)
        torch.cuda.synchronize()
        o.backward(do)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--inputs", nargs="+", choices=["randn", "structured"], default=["randn", "structured"])
    parser.add_argument("--rows", type=int, default=30)
    args = parser.parse_args()
    for seq_len in args.lengths:
        for kind in args.inputs:
            print(f"=== T={seq_len} structured={kind == 'structured'}", flush=True)
            print(profile_step(seq_len, kind == "structured", args.rows), flush=True)


if __name__ == "__main__":
    main()
