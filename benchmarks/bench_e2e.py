"""End-to-end prefill: the Qwen2.5-VL-7B language model (random weights, bf16) on prompts that are mostly video
tokens, VideoNSA (vision tokens sparse) against dense attention and the `official` mode (the released
checkpoint's original attention), in one run on one GPU.

    python benchmarks/bench_e2e.py --lengths 32768 65536 131072 --out results/e2e.json
    python benchmarks/bench_e2e.py --lengths 32768 --modes nsa official dense

Vision tokens are fed as embeddings (the vision tower is not timed). Prints a table: prefill milliseconds and
peak memory per mode and length, and the speed-up of VideoNSA over dense.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shapes import qwen7b_config, random_model, video_prompt  # noqa: E402
from videonsa.models import set_attention_mode  # noqa: E402


def time_prefill(model, embeds, token_type, positions, repeats: int) -> tuple[float, float]:
    """Median milliseconds of one prefill (no KV cache, hidden states only) and peak GiB allocated."""
    def prefill():
        return model(inputs_embeds=embeds, mm_token_type_ids=token_type, position_ids=positions, use_cache=False)

    with torch.no_grad():
        prefill()  # warm-up: kernel compilation, autotuning
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            prefill()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
    return statistics.median(times), torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32768, 65536, 131072])
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", nargs="+", default=["nsa", "dense"], choices=["nsa", "dense", "official"])
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()

    model = random_model(qwen7b_config(args.layers))
    rows = []
    for seq_len in args.lengths:
        embeds, token_type, positions = video_prompt(seq_len)
        row = {"T": seq_len, "video_tokens": int((token_type > 0).sum())}
        for mode in args.modes:
            set_attention_mode(model, mode)
            ms, peak = time_prefill(model, embeds, token_type, positions, args.repeats)
            row[f"{mode}_ms"], row[f"{mode}_peak_gib"] = ms, peak
        rows.append(row)
        print(json.dumps(row), flush=True)

    device = torch.cuda.get_device_name()
    versions = f"torch {torch.__version__}"
    print(f"\nPrefill, Qwen2.5-VL-7B language model ({args.layers} layers, random weights, bf16), {device}, {versions}")
    print(f"{'T':>8} {'nsa ms':>10} {'dense ms':>10} {'official ms':>12} {'dense/nsa':>10} {'official/nsa':>13} "
          f"{'nsa GiB':>9} {'dense GiB':>10} {'official GiB':>13}")
    for row in rows:
        get = lambda key: row.get(key, float("nan"))  # noqa: B023
        print(f"{row['T']:>8} {get('nsa_ms'):>10.1f} {get('dense_ms'):>10.1f} {get('official_ms'):>12.1f} "
              f"{get('dense_ms') / get('nsa_ms'):>9.2f}x {get('official_ms') / get('nsa_ms'):>12.2f}x "
              f"{get('nsa_peak_gib'):>9.1f} {get('dense_peak_gib'):>10.1f} {get('official_peak_gib'):>13.1f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        summary = {"device": device, "versions": versions, "layers": args.layers, "rows": rows}
        args.out.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
