"""Where the time of one VideoNSA decoder layer goes: a torch.profiler table of the GPU kernels of a 7B-shaped
one-layer prefill (random weights, bf16), nsa and dense, at one length.

    python benchmarks/probe/profile_layer.py --seq-len 131072 --rows 25
    python benchmarks/probe/profile_layer.py --seq-len 36864 --train      # training: fp32 weights, bf16
                                                                           # autocast, forward + backward,
                                                                           # frames as images
Prints the tables and writes them to OUT/profile_layer_<T>[_train].md (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
from harness import describe, open_run  # noqa: E402
from harness.models import qwen7b_config, random_model, video_prompt  # noqa: E402
from videonsa.models import set_attention_mode  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=131072)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--train", action="store_true", help="fp32 weights, bf16 autocast, forward + backward")
    args, results = open_run(parser, argv, lambda args: f"profile_layer_{args.seq_len}{'_train' if args.train else ''}")
    report = [f"One 7B-shaped layer, T={args.seq_len}; {describe(results.env)}"]
    model = random_model(qwen7b_config(num_layers=1), dtype=torch.float32 if args.train else torch.bfloat16)
    embeds, token_type, positions = video_prompt(args.seq_len)
    if args.train:
        # Frames fed as images, as the training recipe does: <|vision_start|> 64 image tokens <|vision_end|>.
        token_type[:, 64:-64] = torch.where(torch.arange(args.seq_len - 128, device="cuda") % 66 < 2, 0, 1)
        embeds = embeds.float().requires_grad_()
    for mode in ("nsa", "dense"):
        set_attention_mode(model, mode)

        def run():
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.train):
                out = model(inputs_embeds=embeds, mm_token_type_ids=token_type, position_ids=positions, use_cache=False)
            if args.train:
                out.last_hidden_state.float().square().mean().backward()

        with torch.set_grad_enabled(args.train):
            run()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                run()
                torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60)
        report.append(f"## {mode}, T={args.seq_len}, {'train' if args.train else 'prefill'}\n\n```\n{table}\n```")
    results.write_markdown("\n\n".join(report))


if __name__ == "__main__":
    main()
