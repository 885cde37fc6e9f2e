"""What one VideoNSA decoder layer keeps for its backward, nsa against dense: the tensors autograd saves during a
training forward (fp32 weights, bf16 autocast on CUDA), grouped by the source line that saved them.

    python benchmarks/probe/probe_saved_tensors.py --seq-len 36864              # 7B shape, frames as images
    TRITON_INTERPRET=1 python benchmarks/probe/probe_saved_tensors.py --shape tiny --device cpu --seq-len 640

The layer's backward holds all of them at once (with gradient checkpointing: while that layer is recomputed), so
their sum is what a mode adds to the peak of a training step per layer. Each storage counts once (views and
tensors saved twice share it); tensors saved inside a checkpointed region are recomputed, not kept, and do not
appear. On a CPU set TRITON_INTERPRET=1 so that the operator's Triton path (what a GPU runs) saves its tensors,
not the reference's. Writes OUT/probe_saved_tensors_<T>.md (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import collections
import sys
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
from harness import describe, open_run  # noqa: E402
from harness.models import qwen7b_config, random_model, video_prompt  # noqa: E402
from videonsa.models import set_attention_mode  # noqa: E402

# Source files whose lines name a saved tensor (the innermost frame of these in the stack that saved it).
NAMED_SOURCES = ("/videonsa/", "/transformers/models/")


def saving_line() -> str:
    """file:line and code of the innermost package or model frame on the stack (who saved the tensor)."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        if any(source in frame.filename for source in NAMED_SOURCES):
            return f"{Path(frame.filename).name}:{frame.lineno} {(frame.line or '').strip()[:70]}"
    return "?"


def saved_by_line(model, inputs: dict, autocast: bool) -> collections.Counter:
    """Bytes of each unique storage saved for the backward of one training forward, keyed by (line, shape, dtype);
    the weights (saved by every linear, resident anyway) left out."""
    seen = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}
    saved: collections.Counter = collections.Counter()

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            saved[(saving_line(), tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."))] += storage.nbytes()
        return tensor

    device_type = inputs["inputs_embeds"].device.type
    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor),
        torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast),
    ):
        model(**inputs, use_cache=False)
    return saved


def build(shape: str, device: str, seq_len: int):
    """(one-layer model in training mode, its inputs): the 7B shape with frames as images (64 tokens between two
    text markers, as the training recipe feeds them), or a tiny model whose NSA budget is the default's."""
    if shape == "7b":
        model = random_model(qwen7b_config(num_layers=1), device=device, dtype=torch.float32)
        embeds, token_type, positions = video_prompt(seq_len, device=device)
        token_type[:, 64:-64] = torch.where(torch.arange(seq_len - 128, device=device) % 66 < 2, 0, 1)
        inputs = dict(inputs_embeds=embeds.float(), mm_token_type_ids=token_type, position_ids=positions)
    else:
        from videonsa import testing

        model = testing.tiny_model(hidden_size=256, num_heads=4, num_kv_heads=2, intermediate_size=512,
                                   num_layers=1, block_size=64, block_counts=4, window_size=128).model.to(device)
        token_type = torch.zeros(1, seq_len, dtype=torch.long, device=device)
        token_type[:, 32:-32] = 2
        inputs = dict(inputs_embeds=torch.randn(1, seq_len, 256, device=device), mm_token_type_ids=token_type)
    inputs["inputs_embeds"].requires_grad_()
    return model.train(), inputs


def table(saved: collections.Counter, rows: int) -> str:
    lines = [f"{nbytes / 2**20:10.1f} MiB  {str(shape):24s} {dtype:9s} {line}"
             for (line, shape, dtype), nbytes in saved.most_common(rows)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=36864)
    parser.add_argument("--shape", choices=["7b", "tiny"], default="7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rows", type=int, default=20, help="largest saved tensors listed per mode")
    args, results = open_run(parser, argv, lambda args: f"probe_saved_tensors_{args.seq_len}")
    model, inputs = build(args.shape, args.device, args.seq_len)
    report = [f"One {args.shape}-shaped layer, T={args.seq_len}, training forward; {describe(results.env)}"]
    totals = {}
    for mode in ("nsa", "dense"):
        set_attention_mode(model, mode)
        saved = saved_by_line(model, inputs, autocast=args.device == "cuda")
        totals[mode] = sum(saved.values())
        report.append(f"## {mode}: {totals[mode] / 2**20:,.1f} MiB of activations saved for the backward\n\n```\n"
                      f"{table(saved, args.rows)}\n```")
    report.append(f"nsa - dense: {(totals['nsa'] - totals['dense']) / 2**20:+,.1f} MiB")
    results.write_markdown("\n\n".join(report))
    results.row({"T": args.seq_len, "shape": args.shape, **{f"{mode}_saved_mib": totals[mode] / 2**20
                                                            for mode in totals}})


if __name__ == "__main__":
    main()
