"""Sequence-parallel (Ulysses) training step of the Qwen2.5-VL-7B language model with VideoNSA attention, over
the N processes of torchrun: forward + backward time and peak memory per GPU at 64K and 128K tokens.

    torchrun --standalone --nproc_per_node 8 benchmarks/bench/bench_sequence_parallel.py --sp-size 4 \\
        --lengths 65536 131072
    torchrun --standalone --nproc_per_node 1 benchmarks/bench/bench_sequence_parallel.py --lengths 32768  # baseline
    torchrun --standalone --nproc_per_node 2 benchmarks/bench/bench_sequence_parallel.py --shape tiny --device cpu \\
        --lengths 512 --check-len 256 --steps 1   # CPU smoke test (gloo)

Random bf16 weights, identical on every rank; vision tokens are fed as embeddings (the vision tower is not
timed); gradient checkpointing of every decoder layer (`--no-checkpointing` to turn it off). The loss is the
mean square of the gathered last hidden state, so every parameter of the language model gets a gradient.
N must divide the 4 KV heads of the 7B shape (N = 1, 2 or 4; for 8 GPUs run two groups of 4 with
`--sp-size 4`, each group on the same batch, as data parallelism of 2 would).

First, unless `--check-len 0`, a correctness check at a short length: the sequence-parallel loss and the
group-mean gradients against the same model run whole on each rank (bf16, so within bf16 limits). Then one JSON
line per length and a table: median milliseconds per step (forward + backward, after one warm-up step) and
peak GiB allocated per GPU (weights and gradients included). Rank 0 writes
OUT/bench_sequence_parallel_<N>gpu.{jsonl,json,md} (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
from harness import Results, add_output_arguments, describe, environment, fmt, markdown_table, rel_error  # noqa: E402
from harness.models import qwen7b_config, random_model, video_prompt  # noqa: E402
from videonsa.models import disable_sequence_parallel, enable_sequence_parallel  # noqa: E402


def build_model(shape: str, layers: int, device: str, checkpointing: bool):
    """The 7B-shaped (or the test suite's tiny) VideoNSAModel in bf16, the same random weights on every rank."""
    torch.manual_seed(0)
    if shape == "tiny":
        from videonsa.testing import tiny_videonsa_config

        config = tiny_videonsa_config(num_layers=layers, max_position_embeddings=1 << 18)
    else:
        config = qwen7b_config(layers)
    model = random_model(config, device=device).train()
    for param in model.parameters():
        dist.broadcast(param.data, src=0)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def prompt(seq_len: int, hidden: int, device: str):
    """video_prompt's tensors, the same on every rank: inputs_embeds [1, T, hidden], token types [1, T],
    position ids [3, 1, T]."""
    embeds, token_type, positions = video_prompt(seq_len, hidden=hidden, device=device)
    dist.broadcast(embeds, src=0)
    return embeds, token_type, positions


def step(model, embeds, token_type, positions) -> torch.Tensor:
    """One forward + backward; returns the loss (mean square of the last hidden state, float32)."""
    hidden = model(
        inputs_embeds=embeds, mm_token_type_ids=token_type, position_ids=positions, use_cache=False
    ).last_hidden_state
    loss = hidden.float().square().mean()
    loss.backward()
    return loss.detach()


def check(model, seq_len: int, hidden: int, device: str, group) -> dict:
    """Sequence-parallel loss and group-mean gradients against the whole model on this rank: relative
    errors ||sp - whole|| / ||whole|| (the loss, and the worst over parameters)."""
    embeds, token_type, positions = prompt(seq_len, hidden, device)
    disable_sequence_parallel(model)
    model.zero_grad(set_to_none=True)
    whole_loss = step(model, embeds, token_type, positions)
    whole = {name: p.grad.float().clone() for name, p in model.named_parameters() if p.grad is not None}
    enable_sequence_parallel(model, group)
    model.zero_grad(set_to_none=True)
    sp_loss = step(model, embeds, token_type, positions)
    worst, worst_name = 0.0, ""
    for name, param in model.named_parameters():
        if name not in whole:
            continue
        grad = param.grad.float()
        dist.all_reduce(grad, group=group)
        grad /= dist.get_world_size(group)
        error = rel_error(grad, whole[name])  # inf when a gradient is not finite, so it is reported
        if error > worst:
            worst, worst_name = error, name
    model.zero_grad(set_to_none=True)
    loss_error = float((sp_loss - whole_loss).abs() / whole_loss.abs())
    return {"check_T": seq_len, "loss": float(whole_loss), "loss_rel_error": loss_error,
            "worst_grad_rel_error": worst, "worst_grad": worst_name}


def time_steps(model, embeds, token_type, positions, steps: int, device: str) -> tuple[float, float]:
    """Median milliseconds per step (after a warm-up step) and peak GiB allocated on this rank."""
    synchronize = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    step(model, embeds, token_type, positions)
    model.zero_grad(set_to_none=False)  # keep the gradient buffers: a training loop holds them too
    synchronize()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        dist.barrier()
        start = time.perf_counter()
        step(model, embeds, token_type, positions)
        synchronize()
        times.append((time.perf_counter() - start) * 1000)
        model.zero_grad(set_to_none=False)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")
    return statistics.median(times), peak


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[65536, 131072])
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--shape", choices=["7b", "tiny"], default="7b")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--sp-size", type=int, default=0, help="ranks per sequence-parallel group (default: all)")
    parser.add_argument("--check-len", type=int, default=8192, help="length of the correctness check (0: skip)")
    parser.add_argument("--no-checkpointing", action="store_true")
    add_output_arguments(parser)
    args = parser.parse_args(argv)

    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = "cpu"
    if args.device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = f"cuda:{torch.cuda.current_device()}"
    sp_size = args.sp_size or world
    if world % sp_size:
        raise SystemExit(f"--sp-size {sp_size} does not divide the {world} processes")
    groups = [dist.new_group(list(range(start, start + sp_size))) for start in range(0, world, sp_size)]
    group = groups[rank // sp_size]

    model = build_model(args.shape, args.layers, device, not args.no_checkpointing)
    hidden = model.config.text_config.hidden_size
    enable_sequence_parallel(model, group)
    env = environment()
    results = Results(f"bench_sequence_parallel_{world}gpu", args.out, env) if rank == 0 else None
    if args.check_len:
        row = check(model, args.check_len, hidden, device, group)
        if results is not None:
            results.row(row)
    for seq_len in args.lengths:
        embeds, token_type, positions = prompt(seq_len, hidden, device)
        ms, peak = time_steps(model, embeds, token_type, positions, args.steps, device)
        peaks = [None] * world
        dist.all_gather_object(peaks, peak)
        row = {"T": seq_len, "sp": sp_size, "ms": ms, "tokens_per_s_per_gpu": seq_len / sp_size / ms * 1000,
               "peak_gib_per_gpu": max(peaks)}
        if results is not None:
            results.row(row)
        del embeds

    if results is not None:
        results.write_json({"world": world, "sp_size": sp_size})
        lines = [[f"{row['T']:,}", fmt(row["ms"], 1), fmt(row["tokens_per_s_per_gpu"], 0),
                  fmt(row["peak_gib_per_gpu"], 1)] for row in results.rows if "T" in row]
        results.write_markdown(
            f"Sequence-parallel training step, {args.shape} ({args.layers} layers, bf16, checkpointing "
            f"{not args.no_checkpointing}), {world} processes in groups of {sp_size}; {describe(env)}\n\n"
            + markdown_table(["T", "ms/step", "tokens/s/GPU", "peak GiB/GPU"], lines))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
