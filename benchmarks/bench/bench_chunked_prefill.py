"""Chunked prefill of long video prompts: the Qwen2.5-VL-7B model (random weights, bf16) through
`VideoNSAForConditionalGeneration` with a KV cache, one chunk at a time, on one GPU; checked against one pass.

    python benchmarks/bench/bench_chunked_prefill.py                                   # 32K .. 512K, auto chunk
    python benchmarks/bench/bench_chunked_prefill.py --lengths 131072 --chunks 8192 32768 65536 --one-pass
    python benchmarks/bench/bench_chunked_prefill.py --vision 7b --lengths 65536         # the 7B tower too
    python benchmarks/bench/bench_chunked_prefill.py --modes nsa dense --lengths 32768 131072 262144 --one-pass

First a check at --check-length tokens: the chunked prefill (an odd chunk size, so chunk boundaries fall inside
NSA blocks) against one pass: the last position's logits and every layer's cached k and v (max abs difference,
relative error). Then, per length and chunk size: prefill seconds (input ids in, the KV cache and the last logits
out, the vision tower included), tokens/s, peak GiB allocated, and the memory model's estimate
(`videonsa.inference.memory`: weights + tokens x resident + chunk x working) for that run; with --one-pass also
the one-pass prefill at each length (OOM recorded as such); the fastest of --repeats prefills counts. After each
length, --answer-tokens greedy tokens through model.generate with the automatic chunk: seconds to the first token,
decoding tokens/s. --modes nsa dense times dense attention through the same chunked path on the same model and
inputs. Writes OUT/bench_chunked_prefill.{jsonl,json,md}.

Prompt: `harness.models.video_inputs` (64 text tokens, T - 130 video tokens between the vision markers, 64 text
tokens; pixels and grids for the vision tower). --vision tiny (default) uses the test suite's
tiny tower with the 7B's output width so that the GPU's memory goes to the language model; --vision 7b the 7B's.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
from harness import describe, fmt, open_run  # noqa: E402
from harness.models import qwen7b_config, random_model, video_inputs  # noqa: E402
from harness.output import markdown_table  # noqa: E402
from videonsa.inference.memory import PrefillMemory, free_memory  # noqa: E402
from videonsa.models import VideoNSAForConditionalGeneration, set_attention_mode  # noqa: E402
from videonsa.models.chunked_prefill import CACHE_KWARG, prefill_in_chunks  # noqa: E402
from videonsa.models.kv_cache import preallocated_cache  # noqa: E402

LENGTHS = [32768, 131072, 262144, 524288]
def start_measuring() -> None:
    """Settle the GPU and reset its peak: what follows is measured from an empty allocator cache."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def prefill(model, inputs, chunk: int | None):
    """One prefill with a fresh cache: (seconds, peak GiB, cache, last logits [1, 1, V])."""
    start_measuring()
    cache = DynamicCache(config=model.config.text_config)
    started = time.perf_counter()
    with torch.no_grad(), prefill_in_chunks(model, chunk):
        logits = model(**inputs, **{CACHE_KWARG: cache}, use_cache=True, logits_to_keep=1).logits
    torch.cuda.synchronize()
    return time.perf_counter() - started, torch.cuda.max_memory_allocated() / 2**30, cache, logits


class TokenClock:
    """A generate() streamer that notes when each put arrives: the prompt's first, then one per new token."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        torch.cuda.synchronize()
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def answer(model, inputs, chunk: int | None, tokens: int) -> dict:
    """Prefill (chunked as `chunk`) and `tokens` greedy new tokens through model.generate, as `videonsa ask`
    does: prefill seconds (to the first new token), decode tokens/s after it, peak GiB of the whole call."""
    start_measuring()
    clock = TokenClock()
    started = time.perf_counter()
    cache = preallocated_cache(model.config, inputs["input_ids"].shape[1] + tokens)  # as `ask` does
    with torch.inference_mode(), prefill_in_chunks(model, chunk):
        out = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                             streamer=clock, pad_token_id=0, **{CACHE_KWARG: cache})
    new = out.shape[1] - inputs["input_ids"].shape[1]
    first, last = clock.times[1], clock.times[-1]
    return {"answer_tokens": new, "prefill_to_first_token_s": round(first - started, 3),
            "decode_tokens_per_s": round((new - 1) / (last - first), 1) if new > 1 else None,
            "answer_peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def check(model, length: int) -> dict:
    """Chunked (chunk length // 4 + 37) against one pass: last logits and the KV cache."""
    inputs = video_inputs(length)
    _, _, one_cache, one_logits = prefill(model, inputs, None)
    chunk = length // 4 + 37
    _, _, cache, logits = prefill(model, inputs, chunk)
    worst_kv = max(
        max((a.keys.float() - b.keys.float()).abs().max().item(), (a.values.float() - b.values.float()).abs().max()
            .item())
        for a, b in zip(cache.layers, one_cache.layers, strict=True)
    )
    diff = (logits.float() - one_logits.float()).abs().max().item()
    return {"kind": "check", "T": length, "chunk": chunk, "logits_max_abs": diff,
            "logits_rel": diff / one_logits.float().abs().max().item(), "kv_max_abs": worst_kv,
            "same_argmax": bool(logits.argmax(-1).eq(one_logits.argmax(-1)).all())}


def estimate_gib(memory: PrefillMemory, tokens: int, chunk: int | None) -> float:
    working = tokens if chunk is None else min(chunk, tokens)
    return (memory.weight_bytes + tokens * memory.resident_per_token + working * memory.working_per_token) / 2**30


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=LENGTHS)
    parser.add_argument("--chunks", type=int, nargs="+", default=None,
                        help="chunk sizes to time (default: the memory model's automatic choice per length)")
    parser.add_argument("--one-pass", action="store_true", help="also time the one-pass prefill (OOM noted)")
    parser.add_argument("--check-length", type=int, default=16384, help="length of the chunked-vs-one-pass check")
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--modes", nargs="+", choices=["nsa", "dense"], default=["nsa"],
                        help="attention modes, timed one after the other on the same model and inputs")
    parser.add_argument("--vision", choices=["tiny", "7b"], default="tiny")
    parser.add_argument("--answer-tokens", type=int, default=16,
                        help="after the automatic-chunk prefill of each length, generate this many tokens (0: none)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="prefills per length and chunk; the fastest counts (the first compiles kernels)")
    parser.add_argument("--memory-gib", type=float, default=None,
                        help="cap this process's GPU memory (e.g. 80 to stand for an H100 on a larger card)")
    args, results = open_run(parser, argv, "bench_chunked_prefill", needs_cuda=True)
    if args.memory_gib:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_gib * 2**30 / total))
    env = results.env
    config = qwen7b_config(args.layers, vision=args.vision)
    model = random_model(config, cls=VideoNSAForConditionalGeneration)
    # harness.models.video_inputs makes bfloat16 pixels, as ask holds them for a bf16 model.
    memory = PrefillMemory.from_config(model.config.to_dict(), torch.bfloat16)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    memory = PrefillMemory(weights, memory.resident_per_token, memory.working_per_token)
    for mode in args.modes:
        set_attention_mode(model, mode)
        if args.check_length:
            results.row(check(model, args.check_length) | {"mode": mode})
        for length in args.lengths:
            time_length(model, mode, length, memory, args, results)
    results.write_json()
    write_tables(results, args, describe(env))


def time_length(model, mode: str, length: int, memory: PrefillMemory, args, results) -> None:
    """The rows of one prompt length in one mode: each chunk size (and one pass with --one-pass), then the answer."""
    inputs = video_inputs(length)
    tokens = inputs["input_ids"].shape[1]
    free = free_memory(torch.device("cuda"))
    # A chunk at least as long as the prompt is one pass (the model runs it so).
    automatic = memory.chunk_for(tokens, free)
    chunks = [c if c is not None and c < tokens else None for c in args.chunks or [automatic]]
    for chunk in dict.fromkeys(([None] if args.one_pass else []) + chunks):
        row = {"kind": "prefill", "T": tokens, "chunk": chunk or "one pass", "mode": mode,
               "estimate_gib": round(estimate_gib(memory, tokens, chunk), 2)}
        try:
            runs = [prefill(model, inputs, chunk)[:2] for _ in range(max(1, args.repeats))]
            seconds, peak = min(run[0] for run in runs), max(run[1] for run in runs)
            row |= {"seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds), "peak_gib": round(peak, 2)}
        except torch.cuda.OutOfMemoryError:
            row |= {"seconds": None, "peak_gib": "OOM"}
        results.row(row)
    if args.answer_tokens:
        row = {"kind": "answer", "T": tokens, "chunk": automatic or "one pass", "mode": mode}
        try:
            row |= answer(model, inputs, automatic, args.answer_tokens)
        except torch.cuda.OutOfMemoryError:
            row |= {"answer_peak_gib": "OOM"}
        results.row(row)


def write_tables(results, args, environment: str) -> None:
    """OUT/bench_chunked_prefill.md: the prefill rows, then the answers, every mode."""
    lines = [[r["mode"], f"{r['T']:,}", str(r["chunk"]), fmt(r.get("seconds"), 2), str(r.get("tokens_per_s", "-")),
              str(r.get("peak_gib")), fmt(r["estimate_gib"], 1)] for r in results.rows if r["kind"] == "prefill"]
    answers = [[r["mode"], f"{r['T']:,}", str(r["chunk"]), fmt(r.get("prefill_to_first_token_s"), 2),
                str(r.get("decode_tokens_per_s", "-")), str(r.get("answer_peak_gib"))]
               for r in results.rows if r["kind"] == "answer"]
    cap = f", memory capped at {args.memory_gib:g} GiB" if args.memory_gib else ""
    caption = (f"Chunked prefill, Qwen2.5-VL-7B language model ({args.layers} layers, random weights, bf16, "
               f"{args.vision} vision tower{cap}; best of {max(1, args.repeats)}); {environment}")
    table = markdown_table(["mode", "T", "chunk", "s", "tokens/s", "peak GiB", "model GiB"], lines)
    if answers:
        table += "\n\nPrefill and a greedy answer through model.generate:\n\n" + markdown_table(
            ["mode", "T", "chunk", "s to first token", "decode tokens/s", "peak GiB"], answers)
    results.write_markdown(caption + "\n\n" + table)


if __name__ == "__main__":
    main()
