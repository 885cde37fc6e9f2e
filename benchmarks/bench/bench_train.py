"""Training step time and peak memory at a 36K-token context, VideoNSA against dense attention, in one run.

The model has Qwen2.5-VL-7B's shape (full 32-block vision tower, 7B language-model layers, of which `--layers`
are kept so that weights, gradients and AdamW state fit one GPU) with random weights. Each step is the paper's
recipe through `videonsa.training`'s Trainer: fp32 weights with bf16 autocast, AdamW, gradient clipping 1.0,
gradient checkpointing, everything trained, batch 1. The sample is synthetic and built directly as tensors (no
PyAV, no files): frames of 224 x 224 fed as images, 64 tokens each, as many as fit `--seq-len` with a short
question and a 32-token answer.

    python benchmarks/bench/bench_train.py --layers 4 --seq-len 36864 [--compare-baseline]
    (on an 80 GB card, --layers 4 is close to the limit: about 43 GB of weights, gradients and AdamW state plus
    about 25 GB of checkpointed vision-tower activations for 140K patches; use --layers 2 if it runs out)
    python benchmarks/bench/bench_train.py --shape tiny --device cpu --seq-len 2048 --steps 2   # smoke test

Prints one JSON line per mode and a table: median milliseconds per optimizer step (after warm-up), tokens per
second per process, peak GPU memory (allocated, whole run including weights and optimizer state). Under torchrun
with `--strategy` (zero2, zero3, fsdp2) the same script measures multi-GPU training; sample i is identical in
every run, so a run on N GPUs with `--grad-accum 1` sees the same samples per step as one GPU with `--grad-accum N`
and its losses should match.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
from harness import Results, add_output_arguments, describe, environment, fmt, markdown_table  # noqa: E402
from harness import baseline as baselines  # noqa: E402
from harness.shapes import QWEN2_5_VL_7B_TEXT, QWEN2_5_VL_7B_VISION  # noqa: E402
from videonsa.models import VideoNSAConfig, VideoNSAForConditionalGeneration  # noqa: E402
from videonsa.training.collator import VideoChatCollator  # noqa: E402
from videonsa.training.config import TrainableSettings, load_config  # noqa: E402
from videonsa.training.model_setup import set_trainable  # noqa: E402
from videonsa.training.trainer import VideoNSATrainer, training_arguments  # noqa: E402

# Qwen2.5-VL-7B-Instruct's token ids.
QWEN_IDS = {"endoftext": 151643, "im_start": 151644, "im_end": 151645, "vision_start": 151652,
            "vision_end": 151653, "image_pad": 151655, "video_pad": 151656}
FRAME_SIDE = 224  # 50,176 pixels: 16 x 16 patches, 64 tokens per frame
TOKENS_PER_FRAME = (FRAME_SIDE // 28) ** 2
TEXT_BEFORE, TEXT_AFTER, ANSWER = 48, 24, 32  # system + question tokens, tokens after the clip, answer tokens


def model_config(shape: str, layers: int, vision_layers: int, mode: str) -> VideoNSAConfig:
    """VideoNSA config of the 7B shape (first `layers` decoder layers) or the test suite's tiny one."""
    if shape == "tiny":
        from videonsa.testing import tiny_videonsa_config

        return tiny_videonsa_config(num_layers=layers, attention_mode=mode, max_position_embeddings=1 << 17)
    text = {**QWEN2_5_VL_7B_TEXT, "num_hidden_layers": layers, "attention_mode": mode,
            "bos_token_id": QWEN_IDS["endoftext"], "eos_token_id": QWEN_IDS["im_end"],
            "pad_token_id": QWEN_IDS["endoftext"]}
    vision = {**QWEN2_5_VL_7B_VISION, "depth": vision_layers,
              "fullatt_block_indexes": [i for i in QWEN2_5_VL_7B_VISION["fullatt_block_indexes"] if i < vision_layers]
              or [vision_layers - 1]}
    config = VideoNSAConfig(
        text_config=text, vision_config=vision, image_token_id=QWEN_IDS["image_pad"],
        video_token_id=QWEN_IDS["video_pad"], vision_start_token_id=QWEN_IDS["vision_start"],
        vision_end_token_id=QWEN_IDS["vision_end"], tie_word_embeddings=False,
    )
    config._attn_implementation = "sdpa"
    return config


class SyntheticClipChat(Dataset):
    """`length` samples shaped like `VideoChatDataset` output, frames fed as images, random per index.

    Layout: [text_before][<vision_start> 64 x <image_pad> <vision_end>] x frames [text_after][answer <im_end>];
    labels on the answer and <im_end> only. Frames are random uint8 224 x 224 images. Sample i is the same in
    every process and every run, so runs with the same global batch see the same data.
    """

    def __init__(self, config: VideoNSAConfig, frames: int, length: int) -> None:
        self.config, self.frames, self.length = config, frames, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        config, frames = self.config, self.frames
        generator = torch.Generator().manual_seed(index)
        vocab = config.text_config.vocab_size
        image, start, end = config.image_token_id, config.vision_start_token_id, config.vision_end_token_id
        text_vocab = QWEN_IDS["endoftext"] if vocab > QWEN_IDS["endoftext"] else 256  # ids below the specials

        def text(count: int) -> torch.Tensor:
            return torch.randint(0, text_vocab, (count,), generator=generator)

        frame_tokens = torch.tensor([start, *[image] * TOKENS_PER_FRAME, end])
        answer = torch.cat([text(ANSWER), torch.tensor([config.text_config.eos_token_id])])
        ids = torch.cat([text(TEXT_BEFORE), frame_tokens.repeat(frames), text(TEXT_AFTER), answer])
        labels = torch.full_like(ids, -100)
        labels[-len(answer):] = answer
        return {
            "input_ids": ids,
            "labels": labels,
            "mm_token_type_ids": (ids == image).long(),
            "vision_frames": torch.randint(0, 256, (frames, FRAME_SIDE, FRAME_SIDE, 3), dtype=torch.uint8,
                                           generator=generator),
            "image_grid_thw": torch.tensor([[1, FRAME_SIDE // 14, FRAME_SIDE // 14]] * frames),
            "data_stats": torch.zeros(4, dtype=torch.long),
        }


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step, synchronised with the device so queued kernels are counted."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.times: list[float] = []
        self.losses: list[float] = []
        self._start = 0.0

    def _sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.times.append(1000 * (time.perf_counter() - self._start))


def build_model(config: VideoNSAConfig, device: str) -> VideoNSAForConditionalGeneration:
    """Random fp32 weights built directly on `device` (the recipe keeps fp32 weights under bf16 autocast)."""
    torch.manual_seed(0)
    with torch.device(device):
        model = VideoNSAForConditionalGeneration(config)
    return model.train()


def build_trainer(config: VideoNSAConfig, dataset: Dataset, output_dir: str, *, max_steps: int, grad_accum: int,
                  device: str, strategy: str = "auto", callbacks: list[TrainerCallback] | None = None,
                  trainer_class: type[VideoNSATrainer] = VideoNSATrainer) -> VideoNSATrainer:
    """The recipe's Trainer (bf16 autocast on CUDA, checkpointing, AdamW, clipping) on a fresh random model.

    Checkpoints are never saved (`output_dir` only holds the Trainer's run files); one loss is logged per step.
    `trainer_class` lets a probe add instrumentation to the same Trainer.
    """
    recipe = load_config(None, {
        "strategy": strategy,
        "trainer.output_dir": output_dir, "trainer.max_steps": max_steps,
        "trainer.gradient_accumulation_steps": grad_accum, "trainer.save_strategy": "no",
        "trainer.logging_steps": 1, "trainer.dataloader_num_workers": 0, "trainer.disable_tqdm": True,
        "trainer.bf16": device == "cuda", "trainer.use_cpu": device == "cpu",
    })
    training_args = training_arguments(recipe)  # first: it binds this process to its GPU
    model = build_model(config, training_args.device)
    set_trainable(model, TrainableSettings())  # everything, as the recipe (gates not in dense mode)
    return trainer_class(
        model=model, args=training_args, train_dataset=dataset,
        data_collator=VideoChatCollator(pad_token_id=config.text_config.pad_token_id),
        callbacks=callbacks or [],
    )


def run_mode(args: argparse.Namespace, mode: str, frames: int) -> dict:
    """Train `args.warmup + args.steps` steps in `mode`; step times, peak memory, losses."""
    config = model_config(args.shape, args.layers, args.vision_layers, mode)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dataset = SyntheticClipChat(config, frames, length=(args.warmup + args.steps) * args.grad_accum * world)
    row = {"mode": mode, "T": len(dataset[0]["input_ids"]), "frames": frames, "processes": world}
    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    timer = StepTimer(args.device)
    trainer = None
    try:
        with tempfile.TemporaryDirectory() as output_dir:
            trainer = build_trainer(config, dataset, output_dir, max_steps=args.warmup + args.steps,
                                    grad_accum=args.grad_accum, device=args.device, strategy=args.strategy,
                                    callbacks=[timer])
            trainer.train()
            row["losses"] = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    except torch.cuda.OutOfMemoryError as error:
        row["error"] = f"out of memory: {str(error).splitlines()[0]}"
    finally:
        trainer = None  # noqa: F841 (release the model and optimizer before the next mode)
        gc.collect()
    measured = timer.times[args.warmup:]
    if measured:
        row["step_ms"] = statistics.median(measured)
        row["tokens_per_s_per_process"] = row["T"] * args.grad_accum / (row["step_ms"] / 1000)
    if args.device == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def frames_for(seq_len: int) -> int:
    """Frames of 64 tokens (+2 markers) that fit `seq_len` with the question and answer."""
    text = TEXT_BEFORE + TEXT_AFTER + ANSWER + 1
    return max(1, (seq_len - text) // (TOKENS_PER_FRAME + 2))


def add_step_arguments(parser: argparse.ArgumentParser, layers: int) -> None:
    """The model and sample options of a training-step run (this script and probe/profile_train.py)."""
    parser.add_argument("--seq-len", type=int, default=36864, help="tokens per sample (frames fill it)")
    parser.add_argument("--layers", type=int, default=layers, help="language-model decoder layers (7B has 28)")
    parser.add_argument("--vision-layers", type=int, default=32, help="vision tower blocks (7B has 32)")
    parser.add_argument("--modes", nargs="+", default=["nsa", "dense"], choices=["nsa", "dense"])
    parser.add_argument("--shape", choices=["7b", "tiny"], default="7b")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")


def check_device(args: argparse.Namespace) -> None:
    """Exit with one line when --device cuda has no GPU to run on."""
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device (use --device cpu --shape tiny for a smoke test)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_step_arguments(parser, layers=4)
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per mode")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation, allocator)")
    parser.add_argument("--grad-accum", type=int, default=1, help="samples per optimizer step (recipe: 4)")
    parser.add_argument("--strategy", default="auto", help="auto | ddp | zero2 | zero3 | fsdp2 (under torchrun)")
    add_output_arguments(parser, baseline=True)
    args = parser.parse_args()
    check_device(args)

    frames = frames_for(args.seq_len)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    env = environment()
    results = Results("bench_train", args.out, env) if rank0 else None
    for mode in args.modes:
        row = run_mode(args, mode, frames)
        if results is not None:
            results.row(row)
    if results is None:
        return

    from videonsa.ops import available_backends

    rows = results.rows
    results.write_json({"args": {k: str(v) for k, v in vars(args).items()}})
    caption = (f"Training step, Qwen2.5-VL-7B shape ({args.shape}, {args.layers} LM layers, {args.vision_layers} "
               f"vision blocks, random weights), {frames} frames x {TOKENS_PER_FRAME} tokens as images, batch 1 x "
               f"{args.grad_accum}, fp32 weights{' + bf16 autocast' if args.device == 'cuda' else ''}, AdamW, "
               f"gradient checkpointing; process 0 of {rows[0]['processes']}; NSA backends {available_backends()}; "
               f"{describe(env)}")
    lines = [[row["mode"], row["T"], row.get("error") or fmt(row.get("step_ms"), 0),
              fmt(row.get("tokens_per_s_per_process"), 0), fmt(row.get("peak_gib"), 1)] for row in rows]
    text = caption + "\n\n" + markdown_table(["mode", "T", "step ms", "tokens/s/GPU", "peak GiB"], lines)
    timed = {row["mode"]: row["step_ms"] for row in rows if "step_ms" in row}
    if {"nsa", "dense"} <= timed.keys():
        text += f"\n\nVideoNSA step is {timed['dense'] / timed['nsa']:.2f}x as fast as dense"
    results.write_markdown(text)
    baselines.finish(metrics(rows), env, args, "bench_train")


def metrics(rows: list[dict]) -> dict[str, float]:
    """Flat metric names for the baseline comparison: train/T<T>/<mode>/step_ms and peak_gib."""
    return {f"train/T{row['T']}/{row['mode']}/{field}": row[field]
            for row in rows for field in ("step_ms", "peak_gib") if field in row}


if __name__ == "__main__":
    main()
