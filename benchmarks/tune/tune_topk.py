"""Time launch settings of the top-k kernels (`videonsa.ops.triton.topk`) and check they choose identically.

For each length and input kind (randn: every token's top-k an independent draw; structured: trained-like, see
`harness.make_inputs`) it builds the compressed keys and lse as the operator does, runs the sorting kernel as the
oracle, then each variant of the bisection kernel: one JSON line per variant (CUDA-event median ms, equal to the
sorting kernel or not), written to OUT/tune_topk.jsonl (benchmarks/README.md).

    python benchmarks/tune/tune_topk.py --lengths 32768 131072 --tokens 4 8 16 --warps 0 8 16

--variants takes explicit launch settings instead of the tokens x warps product, each a comma-separated list of
`TopkSettings` fields by short name (tokens, warps (0: the default rule), chunk, stages, pps = programs_per_sm,
regrow = register_row_blocks, rowchunk = row_chunk):

    python benchmarks/tune/tune_topk.py --lengths 131072 --no-sort-timing --variants stages=2 stages=3 pps=1
    python benchmarks/tune/tune_topk.py --lengths 262144 --inputs randn --variants regrow=4096 regrow=2048,rowchunk=512
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
from harness import INPUT_KINDS, PROBE_LENGTHS, bench, open_run  # noqa: E402
from harness.operator import compress, packed_inputs, select_blocks  # noqa: E402

# Kernel internals: the top-k launch settings (the only ones used here).
from videonsa.ops.triton.topk import TopkSettings  # noqa: E402

# Launch settings of the bisection kernel (`TopkSettings` fields) and their short names on the command line and
# in the output rows.
_SHORT = {"tokens": "tokens", "warps": "warps", "chunk": "chunk", "stages": "stages", "programs_per_sm": "pps",
          "register_row_blocks": "regrow", "row_chunk": "rowchunk"}


def parse_variant(text: str) -> dict:
    """'tokens=8,pps=1' -> {"tokens": 8, "programs_per_sm": 1} (integers)."""
    long = {short: name for name, short in _SHORT.items()}
    out = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key not in long or not value.lstrip("-").isdigit():
            raise SystemExit(f"--variants: {item!r} is not KEY=INTEGER with KEY one of {sorted(long)}")
        out[long[key]] = int(value)
    if "warps" in out:
        out["warps"] = out["warps"] or None  # 0: the default rule
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=PROBE_LENGTHS)
    parser.add_argument("--tokens", type=int, nargs="+", default=[8],
                        help="TopkSettings.tokens values (tokens per tile of the bisection kernel)")
    parser.add_argument("--warps", type=int, nargs="+", default=[0],
                        help="TopkSettings.warps values (0: the default rule)")
    parser.add_argument("--variants", nargs="+", default=None, help="explicit variants, e.g. tokens=8,stages=3")
    parser.add_argument("--inputs", nargs="+", default=list(INPUT_KINDS), choices=INPUT_KINDS)
    parser.add_argument("--no-sort-timing", action="store_true", help="run the sorting kernel once, untimed")
    args, results = open_run(parser, argv, "tune_topk")
    if args.variants:
        variants = [("sort", {})] + [("bisect", parse_variant(v)) for v in args.variants]
    else:
        variants = [("sort", {})] + [("bisect", dict(tokens=t, warps=w or None))
                                     for w in args.warps for t in args.tokens]
    for seq_len in args.lengths:
        for kind in args.inputs:
            x = packed_inputs(seq_len, structured=kind == "structured")
            c = compress(x)
            want = select_blocks(x, c, method="sort")
            for method, overrides in variants:
                label = dict(T=seq_len, inputs=kind, method=method, **{_SHORT[n]: v for n, v in overrides.items()})

                settings = TopkSettings(**overrides)

                def run(method=method, x=x, c=c, settings=settings):
                    return select_blocks(x, c, method=method, settings=settings)

                try:
                    got = run()
                    equal = bool(torch.equal(got, want))
                    timed = not (method == "sort" and args.no_sort_timing)
                    ms = bench(run) if timed else None
                    row = dict(label, ms=ms, equal_to_sort=equal)
                except Exception as exc:  # noqa: BLE001 - a variant that fails to compile or run is reported
                    row = dict(label, error=repr(exc)[:300])
                results.row(row)
            del x, c, want
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
