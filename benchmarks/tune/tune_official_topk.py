"""Time the official-mode top-k kernel (`videonsa.ops.triton.official_topk`) and check its choice.

Inputs are the eval's situation at the 7B shape: 28 query heads padded to 64 as [q, q, zeros], 4 KV heads,
D = 128, bf16, mostly vision tokens with text at the start, in the middle and at the end (q, k zero there),
k_cmp the block means and lse the anti-causal compression's (both from `videonsa.ops.official`), block_size 64,
block_counts 32. One JSON line per (length, launch setting): CUDA-event median ms, and how many (token, group)
rows choose differently from the default setting (and, with --check, from `original_topk_reference`; with
--original, from the original fla kernel, which is timed too). Rows go to OUT/tune_official_topk.jsonl
(benchmarks/README.md).

    python benchmarks/tune/tune_official_topk.py --lengths 32768 131072
    python benchmarks/tune/tune_official_topk.py --lengths 32768 --sweep --check
    python benchmarks/tune/tune_official_topk.py --lengths 32768 --original /path/to/lmms-eval

--sweep times every tokens_per_program x num_warps x num_stages of --tokens/--warps/--stages. --original DIR
takes the directory that holds the original repository's `fla` package (lmms-eval/ of VideoNSA; fla 0.3.1,
needs a Triton that still has make_block_ptr, e.g. 3.6). A differing row is one where two candidates are
within float32 rounding of each other (the kernels sum in different orders); `max_slot_rel` is the largest
relative importance difference between the two choices, slot by slot, over the differing rows (float64).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import sys
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
from harness import BLOCK, COUNT, HKV, HQ, PROBE_LENGTHS, D, Results, bench, open_run  # noqa: E402
from videonsa.ops.official import (  # noqa: E402
    PADDED_HEADS,
    anticausal_compression,
    mean_pool_blocks,
    original_topk_reference,
)
from videonsa.ops.triton.official_topk import DEFAULT_LAUNCH, OfficialTopkLaunch, original_topk_triton  # noqa: E402


def make_inputs(length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """q [1, T, 64, D] bf16, k_cmp [1, NB, 4, D] bf16, lse float32 [1, 64, T], scale."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    vision = torch.ones(length, dtype=torch.bool, device="cuda")
    vision[:30] = vision[length // 2: length // 2 + 12] = vision[-40:] = False
    mask = vision[None, :, None, None]
    q28 = torch.randn(1, length, HQ, D, generator=gen, device="cuda", dtype=torch.bfloat16) * mask
    k = torch.randn(1, length, HKV, D, generator=gen, device="cuda", dtype=torch.bfloat16) * mask
    q = torch.cat([q28, q28, torch.zeros_like(q28[:, :, :8])], dim=2)
    k_cmp = mean_pool_blocks(k, BLOCK)
    scale = D**-0.5
    _, lse = anticausal_compression(q, k_cmp, k_cmp, BLOCK, scale)
    return q, k_cmp, lse, scale


def importance_rows(q, k_cmp, lse, scale: float, rows: torch.Tensor) -> torch.Tensor:
    """float64 importance [R, NB] of the (b, t, group) rows `rows` [R, 3] (the definition, independently)."""
    heads = q.shape[2]
    group = heads // k_cmp.shape[2]
    b, t, i = rows.unbind(1)
    heads_of = i[:, None] * group + torch.arange(group, device=q.device)  # [R, G]
    qs = (q[b[:, None], t[:, None], heads_of] * scale).to(q.dtype).double()  # [R, G, D]
    s = torch.einsum("rgd,rcd->rgc", qs, k_cmp[b, :, i].double())  # k_cmp[b, :, i]: [R, NB, D]
    used = lse.contiguous().view(lse.shape[0], -1, heads)[b[:, None], t[:, None], heads_of].double()  # [R, G]
    block = torch.arange(k_cmp.shape[1], device=q.device)
    current = (t // BLOCK)[:, None, None]
    p = torch.where(block < current, torch.exp(s - used[..., None]), (block == current).double())
    return p.sum(1)


def compare(got: torch.Tensor, want: torch.Tensor, q, k_cmp, lse, scale: float) -> dict:
    """Rows that differ and the largest slot-by-slot relative importance difference among them."""
    rows = (got != want).any(-1).nonzero()
    if rows.numel() == 0:
        return {"rows_differing": 0, "max_slot_rel": 0.0}
    imp = importance_rows(q, k_cmp, lse, scale, rows)
    imp = torch.cat([torch.zeros_like(imp[:, :1]), imp], dim=1)  # indexed by id + 1 (id -1: an empty slot)
    b, t, i = rows.unbind(1)
    v_got = imp.gather(1, got[b, t, i].long() + 1)
    v_want = imp.gather(1, want[b, t, i].long() + 1)
    rel = ((v_got - v_want).abs() / torch.maximum(v_got, v_want).clamp_min(1e-300)).max()
    return {"rows_differing": int(len(rows)), "max_slot_rel": float(rel)}


def load_original(directory: str):
    """The original fla 0.3.1 `parallel_nsa_topk` from DIR/fla, without running fla/__init__ (model imports)."""
    sys.path.insert(0, directory)
    for name in ("fla", "fla.ops"):
        module = types.ModuleType(name)
        module.__path__ = [os.path.join(directory, *name.split("."))]
        sys.modules.setdefault(name, module)
    from fla.ops.nsa.parallel import parallel_nsa_topk

    return parallel_nsa_topk


def bench_length(length: int, settings: list[OfficialTopkLaunch], check: bool, original, results: Results) -> None:
    """Every launch setting at one length (one JSON line each), then the optional checks and the baseline."""
    emit, info = results.row, {}
    q, k_cmp, lse, scale = make_inputs(length)
    shape = {"T": length, "HP": q.shape[2], "HKV": HKV, "D": D, "block_size": BLOCK, "block_counts": COUNT}
    default = original_topk_triton(q, k_cmp, lse, COUNT, BLOCK, scale, DEFAULT_LAUNCH)
    for launch in settings:
        run = functools.partial(original_topk_triton, q, k_cmp, lse, COUNT, BLOCK, scale, launch)
        try:
            ms = bench(run)
        except Exception as error:  # a setting the compiler or the card cannot take (e.g. out of resources)
            emit({**info, **shape, "launch": launch.__dict__, "error": repr(error)[:300]})
            continue
        row = {**info, **shape, "launch": launch.__dict__, "ms": round(ms, 4)}
        if launch != DEFAULT_LAUNCH:
            row["vs_default"] = compare(run(), default, q, k_cmp, lse, scale)
        emit(row)
    if check:
        want = original_topk_reference(q, k_cmp, lse, COUNT, BLOCK, scale)
        emit({**info, **shape, "check": "original_topk_reference",
              "vs_default": compare(default, want, q, k_cmp, lse, scale)})
    if original is not None:
        run_original = functools.partial(original, q, k_cmp, lse, COUNT, BLOCK, scale)
        ms = bench(run_original)
        emit({**info, **shape, "baseline": "original fla parallel_nsa_topk", "ms": round(ms, 4),
              "vs_default": compare(default, run_original(), q, k_cmp, lse, scale)})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=PROBE_LENGTHS)
    parser.add_argument("--sweep", action="store_true", help="time every --tokens x --warps x --stages setting")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--warps", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--check", action="store_true", help="compare the default with original_topk_reference")
    parser.add_argument("--original", metavar="DIR", help="also time and compare the original fla kernel")
    args, results = open_run(parser, argv, "tune_official_topk")

    settings = [DEFAULT_LAUNCH]
    if args.sweep:
        group = PADDED_HEADS // HKV
        swept = [OfficialTopkLaunch(tokens_per_program=t, max_rows=max(128, t * group), num_warps=w, num_stages=s)
                 for t, w, s in itertools.product(args.tokens, args.warps, args.stages)]
        settings += [launch for launch in swept if launch != DEFAULT_LAUNCH]
    original = load_original(args.original) if args.original else None
    for length in args.lengths:
        bench_length(length, settings, args.check, original, results)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
