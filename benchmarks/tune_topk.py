"""Time the top-k kernels (`videonsa.ops.triton.topk`) against each other and check they choose identically.

For each length and input kind (randn: every token's top-k an independent draw; structured: bench_ops'
make_inputs(structured=True)) it builds the compressed keys and lse as the operator does, runs the sorting
kernel as the oracle, then each variant: prints one JSON line per variant (CUDA-event median ms, equal to the
sorting kernel or not) and appends it to $OUT/tune_topk.jsonl when OUT is set.

    PYTHONPATH=src python benchmarks/tune_topk.py --lengths 32768 131072 --widths 0 128 --tokens 8 16

--variants takes explicit launch settings instead of the widths x tokens x warps product, each a comma-separated
list of CONFIG overrides (cand = candidates, tokens = bisect_tokens, warps = bisect_warps, chunk = bisect_chunk,
stages = bisect_stages, pps = programs_per_sm, half = bisect_half, score = score_only, regrow =
register_row_blocks, rowchunk = row_chunk, bracket = bisect_bracket). A score=1 variant runs
the score pass alone (the selection compiled out, nothing written): its time against the same variant without
score=1 splits the kernel's time between the score pass and the selection; its output is not compared.

    PYTHONPATH=src python benchmarks/tune_topk.py --lengths 131072 --no-sort-timing \
        --variants cand=0 cand=0,score=1 cand=0,stages=3 cand=0,chunk=128
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from bench_ops import BLOCK, COUNT, INIT, LOCAL, D, bench, make_inputs
from videonsa.ops.triton import topk as topk_module
from videonsa.ops.triton.compression import compressed_attention_fwd, mean_pool_fwd
from videonsa.ops.triton.packing import pack

# CONFIG keys of the bisection kernel and their short names on the command line and in the output rows.
_SHORT = {"candidates": "cand", "bisect_tokens": "tokens", "bisect_warps": "warps", "bisect_chunk": "chunk",
          "bisect_stages": "stages", "programs_per_sm": "pps", "score_only": "score", "bisect_half": "half",
          "bisect_early_exit": "exit", "register_row_blocks": "regrow", "row_chunk": "rowchunk",
          "bisect_bracket": "bracket"}


def _parse_variant(text: str) -> dict:
    """'cand=0,chunk=128' -> {"candidates": 0, "bisect_chunk": 128} (CONFIG overrides; integers)."""
    long = {short: name for name, short in _SHORT.items()}
    out = {}
    for item in text.split(","):
        key, value = item.split("=")
        if key not in long:
            raise SystemExit(f"unknown variant key {key!r}; known: {sorted(long)}")
        out[long[key]] = int(value)
    if "bisect_warps" in out:
        out["bisect_warps"] = out["bisect_warps"] or None  # 0: the default rule
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 131072])
    parser.add_argument("--widths", type=int, nargs="+", default=[0, 64, 128, 256],
                        help="CONFIG['candidates'] values of the bisection kernel (0: the full-width path only)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[8],
                        help="CONFIG['bisect_tokens'] values (tokens per tile of the bisection kernel)")
    parser.add_argument("--warps", type=int, nargs="+", default=[0],
                        help="CONFIG['bisect_warps'] values (0: the default rule)")
    parser.add_argument("--variants", nargs="+", default=None,
                        help="explicit variants, e.g. cand=0,chunk=128,stages=3 or cand=0,score=1 (see above)")
    parser.add_argument("--inputs", nargs="+", default=["randn", "structured"], choices=["randn", "structured"])
    parser.add_argument("--no-sort-timing", action="store_true", help="run the sorting kernel once, untimed")
    args = parser.parse_args()
    out_dir = os.environ.get("OUT")
    scale = D**-0.5
    saved = dict(topk_module.CONFIG)
    for seq_len in args.lengths:
        for kind in args.inputs:
            x = make_inputs(seq_len, structured=kind == "structured")
            q, cu = pack(x["q"], None)
            k, _ = pack(x["k"], None)
            v, _ = pack(x["v"], None)
            k_cmp, v_cmp, cu_cmp = mean_pool_fwd(k, v, cu, BLOCK)
            _, lse = compressed_attention_fwd(q, k_cmp, v_cmp, cu, cu_cmp, BLOCK, scale)
            del x, k, v

            def run(method: str, q=q, k_cmp=k_cmp, lse=lse, cu=cu, cu_cmp=cu_cmp):
                return topk_module.select_blocks_topk(q, k_cmp, lse, cu, cu_cmp, block_size=BLOCK,
                                                      block_count=COUNT, init_blocks=INIT, local_blocks=LOCAL,
                                                      scale=scale, method=method)

            want = run("sort")
            if args.variants:
                variants = [("sort", {})] + [("bisect", _parse_variant(v)) for v in args.variants]
            else:
                variants = [("sort", {})] + [
                    ("bisect", dict(candidates=w, bisect_tokens=t, bisect_warps=nw or None))
                    for nw in args.warps for t in args.tokens for w in args.widths]
            for method, overrides in variants:
                topk_module.CONFIG.update(overrides)
                score_only = bool(overrides.get("score_only"))
                label = dict(T=seq_len, inputs=kind, method=method + ("-score-only" if score_only else ""),
                             **{_SHORT[n]: v for n, v in overrides.items() if n != "score_only"})
                try:
                    got = run(method)
                    # score-only launches write no output: nothing to compare
                    equal = None if score_only else bool(torch.equal(got, want))
                    ms = None if (method == "sort" and args.no_sort_timing) else bench(lambda m=method: run(m))
                    row = dict(label, ms=ms, equal_to_sort=equal)
                except Exception as exc:  # a variant that fails to compile or run is reported, not fatal
                    row = dict(label, error=repr(exc)[:300])
                finally:
                    topk_module.CONFIG.update(saved)
                print(json.dumps(row), flush=True)
                if out_dir:
                    with open(os.path.join(out_dir, "tune_topk.jsonl"), "a") as f:
                        f.write(json.dumps(row) + "\n")
            del q, k_cmp, lse, want
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
