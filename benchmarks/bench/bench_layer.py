"""The VideoNSA attention layer's non-attention overhead: one 7B-shaped layer's attention module in prefill, split
into its attention, its projections and rotary, and the rest (gates, vision/text split, packing, merge, casts).

    python benchmarks/bench/bench_layer.py --lengths 32768 131072            # GPU (H100): a few minutes
    python benchmarks/bench/bench_layer.py --device cpu --tiny --lengths 256  # smoke run, numbers mean nothing

Model: one decoder layer of Qwen2.5-VL-7B's language model (random weights, bf16, `harness.models`), prompt of 64
text tokens, T - 128 video tokens, 64 text tokens (`harness.models.video_prompt`), no KV cache, no grad. One model
forward per mode records what the attention module of layer 0 receives and hands on, so that every piece below is
timed on the very tensors (same layout, same dtype) the layer used:

* the module's inputs (hidden states, position embeddings, masks, the `videonsa_split`), by a forward pre-hook;
* nsa mode: the arguments of its `nsa_attention` call (packed vision q/k/v and gates) and of its
  `grouped_text_sdpa` call (text queries, all keys), by wrapping those two functions for that forward;
* dense mode: the arguments of its attention-backend call (transformers' SDPA function);
* o_proj's input, by a pre-hook.

Timed: the module (nsa, then dense), (a) `nsa_attention`, (b) `grouped_text_sdpa`, (c) the q/k/v projections and
o_proj, the rotary embedding, the gate MLP on the vision tokens, the dense backend's SDPA, and the token split's
construction (once per forward pass for all layers, so outside the module). Two measures of each (`Timer`):

* ms: `harness.bench` (CUDA events, synchronised, median) of `--inner` calls back to back, divided by `--inner`,
  so that the host's launch latency before a piece's first kernel, which inside the module hides behind the
  kernels before it, is not charged to every piece;
* kernel ms: the GPU time of one call's kernels (torch profiler), host gaps excluded; the overhead share from it
  says how much of the overhead is GPU work (gate MLP, copies) rather than the host keeping the GPU waiting.

Reported per length:

    attention = (a) + (b)            overhead = module - attention - projections - rotary
    overhead / attention             (the target: at most 10%)
    other glue = overhead - gates    (split gathers, packing, merge, casts)

and the same split for dense (module - SDPA - projections - rotary), so that the glue nsa adds over dense shows.
The projections and rotary are the same computation in both modes and are timed once. That the recorded calls are
the module's own: o_proj(merge((a), (b))) and o_proj(SDPA) are compared with the module's outputs (relative
error, expected 0); `operator_inputs_contiguous` in the JSON says whether (a) got contiguous tensors (else a
copy inside the operator, packing work, is counted as attention). `--flush-l2` zeroes 256 MiB before every timed
run, so each run's first call starts from a cold L2; by default a piece timed alone may find some of its inputs in
L2 (at these lengths every piece reads far more than the L2's 50 MB), which if anything overestimates the
overhead. Prefill only (no `--train`).

Writes OUT/bench_layer.{jsonl,json,md} (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
from harness import PROBE_LENGTHS, bench, describe, fmt, kernel_split, markdown_table, open_run, rel_error  # noqa: E402
from harness.models import qwen7b_config, random_model, video_prompt  # noqa: E402
from videonsa.layers import attention as layer_attention  # noqa: E402
from videonsa.layers import build_token_split  # noqa: E402
from videonsa.models import VideoNSAModel, set_attention_mode  # noqa: E402
from videonsa.models import modeling_videonsa as modeling  # noqa: E402

TARGET_PCT = 10.0  # the target: non-attention overhead at most this share of the layer's attention time
PROMPT_TEXT_TOKENS = 128  # `video_prompt`'s text: 64 tokens before the video, 64 after
Call = tuple[tuple[Any, ...], dict[str, Any]]


def recorder(fn: Callable, calls: list[Call]) -> Callable:
    """`fn` wrapped so that every call's (args, kwargs) is appended to `calls` before the call is made."""

    def recorded(*args: Any, **kwargs: Any) -> Any:
        calls.append((args, kwargs))
        return fn(*args, **kwargs)

    return recorded


@contextlib.contextmanager
def recording(namespace: Any, name: str) -> Iterator[list[Call]]:
    """Replace `namespace.name` by its `recorder` for the block; yields the recorded calls."""
    original = getattr(namespace, name)
    calls: list[Call] = []
    setattr(namespace, name, recorder(original, calls))
    try:
        yield calls
    finally:
        setattr(namespace, name, original)


class _RecordingBackends:
    """Stands in for transformers' attention-function registry as the model file queries it
    (`get_interface`), handing out the backend wrapped so that its calls are recorded; `backend` is the one
    last handed out, unwrapped."""

    def __init__(self, registry: Any, calls: list[Call]):
        self.registry, self.calls = registry, calls
        self.backend: Callable | None = None

    def get_interface(self, name: str, default: Callable) -> Callable:
        self.backend = self.registry.get_interface(name, default)
        return recorder(self.backend, self.calls)


def only_call(calls: list[Call], what: str) -> Call:
    if len(calls) != 1:
        raise RuntimeError(f"expected one call of {what} in the layer's forward, got {len(calls)}")
    return calls[0]


def capture(model: VideoNSAModel, prompt: tuple, mode: str) -> dict[str, Any]:
    """One forward of `model` in `mode`: layer 0's attention inputs (args, kwargs), output, o_proj input and the
    calls it made to its attention functions ("nsa_call", "text_call" for nsa; "backend_call" and the
    "backend" function it called for dense)."""
    set_attention_mode(model, mode)
    attn = model.language_model.layers[0].self_attn
    seen: dict[str, Any] = {}

    def keep(key: str, pick: Callable[..., Any]) -> Callable[..., None]:
        def hook(*hook_args: Any) -> None:  # returns None: the hooked module's inputs and output stay as they are
            seen[key] = pick(*hook_args)
        return hook

    hooks = [
        attn.register_forward_pre_hook(keep("inputs", lambda m, args, kwargs: (args, kwargs)), with_kwargs=True),
        attn.register_forward_hook(keep("output", lambda m, args, out: out[0])),
        attn.o_proj.register_forward_pre_hook(keep("o_input", lambda m, args: args[0])),
    ]
    embeds, token_type, positions = prompt
    backend_calls: list[Call] = []
    registry = qwen.ALL_ATTENTION_FUNCTIONS
    backends = _RecordingBackends(registry, backend_calls)
    try:
        with (recording(layer_attention, "nsa_attention") as nsa_calls,
              recording(modeling, "grouped_text_sdpa") as text_calls):
            qwen.ALL_ATTENTION_FUNCTIONS = backends
            model(inputs_embeds=embeds, mm_token_type_ids=token_type, position_ids=positions, use_cache=False)
    finally:
        qwen.ALL_ATTENTION_FUNCTIONS = registry
        for hook in hooks:
            hook.remove()
    if mode == "nsa":
        seen["nsa_call"] = only_call(nsa_calls, "nsa_attention")
        seen["text_call"] = only_call(text_calls, "grouped_text_sdpa")
    else:
        seen["backend_call"] = only_call(backend_calls, "the dense attention backend")
        seen["backend"] = backends.backend
    return seen


class Timer:
    """Times a piece two ways (see the module docstring). `ms`: `harness.bench` of `inner` calls back to back,
    per call, so that the host's launch latency before a piece's first kernel (which inside the module hides
    behind the kernels before it) is paid once per `inner` calls, not once per call. `kernel_ms`: the GPU time of
    one call's kernels (torch profiler), no host gaps at all. On a CPU (smoke runs only) `ms` is the wall clock
    and `kernel_ms` None."""

    def __init__(self, device: str, inner: int, flush_l2: bool, cpu_reps: int = 3):
        self.cuda, self.inner, self.flush_l2, self.cpu_reps = device.startswith("cuda"), inner, flush_l2, cpu_reps

    def ms(self, fn: Callable[[], object]) -> float:
        def repeated() -> None:
            for _ in range(self.inner):
                fn()

        if self.cuda:
            return bench(repeated, warmup=1, flush_l2=self.flush_l2) / self.inner
        repeated()
        times = []
        for _ in range(self.cpu_reps):
            start = time.perf_counter()
            repeated()
            times.append((time.perf_counter() - start) * 1e3 / self.inner)
        return statistics.median(times)

    def kernel_ms(self, fn: Callable[[], object]) -> float | None:
        return sum(kernel_split(fn, min_ms=0.0, name_width=10_000).values()) if self.cuda else None

    def time(self, row: dict[str, Any], pieces: dict[str, Callable[[], object]]) -> None:
        """row[NAME_ms] and row[NAME_kernel_ms] for each piece."""
        for name, fn in pieces.items():
            row[f"{name}_ms"], row[f"{name}_kernel_ms"] = self.ms(fn), self.kernel_ms(fn)


def measure(model: VideoNSAModel, prompt: tuple, timer: Timer) -> dict[str, Any]:
    """One length's row: every piece's ms, the overhead split for nsa and dense, and the recombination errors."""
    row: dict[str, Any] = {"T": prompt[0].shape[1], "video_tokens": int(prompt[1].gt(0).sum()), "inner": timer.inner}
    measure_nsa(model, prompt, timer, row)
    measure_dense(model, prompt, timer, row)
    for unit in ("_ms", "_kernel_ms"):
        if row["nsa_module" + unit] is not None:
            derive(row, unit)
    return row


def measure_nsa(model: VideoNSAModel, prompt: tuple, timer: Timer, row: dict[str, Any]) -> None:
    """The nsa-mode module and its pieces, on what one nsa forward recorded (a function, so that the recorded
    tensors are freed before the dense run)."""
    attn = model.language_model.layers[0].self_attn
    nsa = capture(model, prompt, "nsa")
    args, kwargs = nsa["inputs"]
    named = inspect.signature(attn.forward).bind(*args, **kwargs).arguments
    hidden, (cos, sin), split = named["hidden_states"], named["position_embeddings"], named["videonsa_split"]
    (nsa_args, nsa_kwargs), (text_args, text_kwargs), o_input = nsa["nsa_call"], nsa["text_call"], nsa["o_input"]
    batch, seq_len, _ = hidden.shape
    shape = (batch, seq_len, -1, attn.head_dim)
    # q and k as the module hands them to the rotary embedding: [B, H, T, D] views of the projections.
    query = attn.q_proj(hidden).view(shape).transpose(1, 2)
    key = attn.k_proj(hidden).view(shape).transpose(1, 2)
    timer.time(row, {
        "nsa_module": lambda: attn(*args, **kwargs),
        "nsa_operator": lambda: layer_attention.nsa_attention(*nsa_args, **nsa_kwargs),
        "text_attention": lambda: layer_attention.grouped_text_sdpa(*text_args, **text_kwargs),
        "qkv_proj": lambda: (attn.q_proj(hidden), attn.k_proj(hidden), attn.v_proj(hidden)),
        "o_proj": lambda: attn.o_proj(o_input),
        "rotary": lambda: qwen.apply_rotary_pos_emb(query, key, cos, sin),
        "gates": lambda: attn.gates(split.gather_vision(hidden)),
        "split_build": lambda: build_token_split(prompt[1] > 0),
    })
    # A strided q/k/v would make the operator copy it, a packing cost that (a) would then carry.
    row["operator_inputs_contiguous"] = all(t.is_contiguous() for t in nsa_args if isinstance(t, torch.Tensor))
    merged = split.merge(layer_attention.nsa_attention(*nsa_args, **nsa_kwargs),
                         layer_attention.grouped_text_sdpa(*text_args, **text_kwargs))
    row["nsa_recombined_rel_error"] = rel_error(attn.o_proj(merged.reshape(batch, seq_len, -1)), nsa["output"])


def measure_dense(model: VideoNSAModel, prompt: tuple, timer: Timer, row: dict[str, Any]) -> None:
    """The dense-mode module and its attention backend (SDPA), on what one dense forward recorded; the model is
    left in nsa mode."""
    attn = model.language_model.layers[0].self_attn
    dense = capture(model, prompt, "dense")
    args, kwargs = dense["inputs"]
    (backend_args, backend_kwargs), backend = dense["backend_call"], dense["backend"]
    try:
        timer.time(row, {
            "dense_module": lambda: attn(*args, **kwargs),
            "dense_sdpa": lambda: backend(*backend_args, **backend_kwargs),
        })
        output = backend(*backend_args, **backend_kwargs)[0].reshape(*dense["output"].shape[:2], -1)
        row["dense_recombined_rel_error"] = rel_error(attn.o_proj(output), dense["output"])
    finally:
        set_attention_mode(model, "nsa")


def derive(row: dict[str, Any], unit: str) -> None:
    """Adds the sums and shares of the pieces measured in `unit` ("_ms" or "_kernel_ms") to `row` (see the module
    docstring); the shares are "<name>_pct" for "_ms" and "<name>_kernel_pct" for "_kernel_ms"."""
    get = lambda name: row[name + unit]  # noqa: E731
    pct = "_pct" if unit == "_ms" else "_kernel_pct"
    row["projections" + unit] = get("qkv_proj") + get("o_proj")
    outside = get("projections") + get("rotary")
    row["nsa_attention" + unit] = get("nsa_operator") + get("text_attention")
    row["nsa_overhead" + unit] = get("nsa_module") - get("nsa_attention") - outside
    row["nsa_overhead" + pct] = 100 * get("nsa_overhead") / get("nsa_attention")
    row["nsa_glue" + unit] = get("nsa_overhead") - get("gates")
    row["nsa_glue" + pct] = 100 * get("nsa_glue") / get("nsa_attention")
    row["dense_overhead" + unit] = get("dense_module") - get("dense_sdpa") - outside
    row["dense_overhead" + pct] = 100 * get("dense_overhead") / get("dense_sdpa")
    row["overhead_over_dense" + unit] = get("nsa_overhead") - get("dense_overhead")
    row["target_met" + ("" if unit == "_ms" else "_kernel")] = row["nsa_overhead" + pct] <= TARGET_PCT


def share(row: dict[str, Any], pct: str, met: str | None = None) -> str:
    """A table cell "12.3%", with "(met)" / "(missed)" for the target when `met` names the row's flag."""
    if row.get(pct) is None:
        return "-"
    return f"{fmt(row[pct], 1)}%" + (f" ({'met' if row[met] else 'missed'})" if met else "")


def table(rows: list[dict[str, Any]], env: dict[str, Any], what: str) -> str:
    headers = ["T", "nsa module", "NSA op (a)", "text attn (b)", "q/k/v/o proj", "rotary", "gates", "other glue",
               "overhead", f"overhead / (a+b) (target <= {TARGET_PCT:g}%)", "same, GPU kernel time",
               "other glue / (a+b)", "dense module", "dense SDPA", "dense overhead", "dense overhead / SDPA",
               "nsa overhead - dense", "split build (per forward)"]
    lines = [[f"{r['T']:,}", *(fmt(r[k]) for k in ("nsa_module_ms", "nsa_operator_ms", "text_attention_ms",
                                                     "projections_ms", "rotary_ms", "gates_ms", "nsa_glue_ms",
                                                     "nsa_overhead_ms")),
              share(r, "nsa_overhead_pct", "target_met"), share(r, "nsa_overhead_kernel_pct", "target_met_kernel"),
              share(r, "nsa_glue_pct"),
              *(fmt(r[k]) for k in ("dense_module_ms", "dense_sdpa_ms", "dense_overhead_ms")),
              share(r, "dense_overhead_pct"), fmt(r["overhead_over_dense_ms"]), fmt(r["split_build_ms"])]
             for r in rows]
    errors = ", ".join(f"T={r['T']}: nsa {r['nsa_recombined_rel_error']:.1e}, "
                       f"dense {r['dense_recombined_rel_error']:.1e}" for r in rows)
    caption = (f"Attention module of one {what} layer in prefill, forward only: milliseconds per call (median, "
               f"{rows[0]['inner']} calls back to back per timed run). overhead = module - (a) - (b) - projections - "
               "rotary; other glue = overhead - gates (split gathers, packing, merge, casts); \"same, GPU kernel "
               "time\": the same share from the kernels' GPU time alone (no host gaps); split build runs once per "
               "forward pass for all layers, outside the module. Pieces recombined against the module's output "
               f"(relative error): {errors}. {describe(env)}")
    return caption + "\n\n" + markdown_table(headers, lines)


def checked_run_name(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The result files' name, "bench_layer", once the arguments are known to be usable; else exit with one line
    (argparse's usage error, status 2). `open_run` asks for the name before it writes any file, so a bad argument
    leaves no result files behind."""
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA GPU: run on the GPU machine, or pass --device cpu --tiny for a smoke run")
    if not args.device.startswith("cuda") and not args.tiny:
        parser.error("--device cpu needs --tiny (the 7B layer on a CPU would take hours)")
    if args.inner < 1:
        parser.error("--inner must be at least 1")
    if args.lengths is not None and min(args.lengths) <= PROMPT_TEXT_TOKENS:
        parser.error(f"--lengths must exceed {PROMPT_TEXT_TOKENS} tokens (the prompt's text; the rest is video)")
    return "bench_layer"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help=f"prompt lengths (default {' '.join(map(str, PROBE_LENGTHS))}; 256 with --tiny)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true",
                        help="the tests' tiny model instead of the 7B layer (a smoke run: the numbers mean nothing)")
    parser.add_argument("--inner", type=int, default=5,
                        help="calls of a piece back to back per timed run (default 5; the time is per call)")
    parser.add_argument("--flush-l2", action="store_true", help="zero 256 MiB of L2 before each timed run")
    args, results = open_run(parser, argv, lambda parsed: checked_run_name(parser, parsed))
    lengths = args.lengths or ([256] if args.tiny else PROBE_LENGTHS)
    if args.tiny:
        from videonsa.testing import tiny_videonsa_config

        config, what = tiny_videonsa_config(num_layers=1), "tiny"
    else:
        config, what = qwen7b_config(num_layers=1), "Qwen2.5-VL-7B-shaped (bf16, random weights)"
    model = random_model(config, device=args.device)
    timer = Timer(args.device, args.inner, args.flush_l2)
    hidden = config.text_config.hidden_size
    with torch.no_grad():
        for seq_len in lengths:
            prompt = video_prompt(seq_len, hidden=hidden, device=args.device)
            results.row(measure(model, prompt, timer))
            del prompt
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
    results.write_json({"target_pct": TARGET_PCT, "tiny": args.tiny})
    results.write_markdown(table(results.rows, results.env, what))


if __name__ == "__main__":
    main()
