"""End-to-end prefill: the Qwen2.5-VL-7B language model (random weights, bf16) on prompts that are mostly video
tokens, VideoNSA (vision tokens sparse) against dense attention and the `official` mode (the released
checkpoint's original attention), in one run on one GPU.

    python benchmarks/bench/bench_e2e.py --lengths 32768 65536 131072 [--compare-baseline]
    python benchmarks/bench/bench_e2e.py --lengths 32768 --modes nsa official dense

Prompt: 64 text tokens, T - 128 video tokens (8 x 8 merged tokens per temporal patch, real M-RoPE position
ids), 64 text tokens; vision tokens are fed as embeddings (the vision tower is not timed), no KV cache. Prints
prefill milliseconds (median of --repeats after a warm-up) and peak memory per mode and length, and the speed-up
of each mode over dense. Writes OUT/bench_e2e.{jsonl,json,md} (see benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
from harness import PREFILL_LENGTHS, bench, describe, fmt, open_run  # noqa: E402
from harness import baseline as baselines  # noqa: E402
from harness.models import qwen7b_config, random_model, video_prompt  # noqa: E402
from harness.output import markdown_table  # noqa: E402
from videonsa.models import set_attention_mode  # noqa: E402


def time_prefill(model, embeds, token_type, positions, repeats: int) -> tuple[float, float]:
    """Median milliseconds of one prefill (no KV cache, hidden states only) and peak GiB allocated."""

    def prefill():
        return model(inputs_embeds=embeds, mm_token_type_ids=token_type, position_ids=positions, use_cache=False)

    with torch.no_grad():
        torch.cuda.reset_peak_memory_stats()
        ms = bench(prefill, warmup=1, reps=repeats)
    return ms, torch.cuda.max_memory_allocated() / 2**30


def metrics(rows: list[dict], modes: list[str]) -> dict[str, float]:
    """Flat metric names for the baseline comparison: e2e/T<T>/<mode>_ms and _peak_gib."""
    return {f"e2e/T{row['T']}/{mode}{field}": row[f"{mode}{field}"]
            for row in rows for mode in modes for field in ("_ms", "_peak_gib") if f"{mode}{field}" in row}


def table(rows: list[dict], modes: list[str], layers: int, env: dict) -> str:
    headers = ["T", *(f"{m} ms" for m in modes), *(f"{m} / dense" for m in modes if m != "dense"),
               "peak GiB (" + " / ".join(modes) + ")"]
    lines = []
    for row in rows:
        dense = row.get("dense_ms")
        speedups = [f"{dense / row[f'{m}_ms']:.2f}x" if dense and row.get(f"{m}_ms") else "-"
                    for m in modes if m != "dense"]
        lines.append([f"{row['T']:,}", *(fmt(row.get(f"{m}_ms"), 1) for m in modes), *speedups,
                      " / ".join(fmt(row.get(f"{m}_peak_gib"), 1) for m in modes)])
    caption = (f"Prefill, Qwen2.5-VL-7B language model ({layers} layers, random weights, bf16); dense / mode > 1: "
               f"the mode is faster; {describe(env)}")
    return caption + "\n\n" + markdown_table(headers, lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=PREFILL_LENGTHS)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=["nsa", "dense"], choices=["nsa", "dense", "official"])
    args, results = open_run(parser, argv, "bench_e2e", baseline=True, needs_cuda=True)
    env = results.env
    model = random_model(qwen7b_config(args.layers))
    for seq_len in args.lengths:
        embeds, token_type, positions = video_prompt(seq_len)
        row = {"T": seq_len, "video_tokens": int((token_type > 0).sum()), "layers": args.layers}
        for mode in args.modes:
            set_attention_mode(model, mode)
            row[f"{mode}_ms"], row[f"{mode}_peak_gib"] = time_prefill(model, embeds, token_type, positions,
                                                                      args.repeats)
        results.row(row)
    results.write_json()
    results.write_markdown(table(results.rows, args.modes, args.layers, env))
    baselines.finish(metrics(results.rows, args.modes), env, args, "bench_e2e")


if __name__ == "__main__":
    main()
