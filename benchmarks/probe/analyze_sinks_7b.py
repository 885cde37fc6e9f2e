"""`videonsa analyze sinks` (and `gates`) at 64K+ vision tokens on a Qwen2.5-VL-7B-shaped random model (one GPU).

    python benchmarks/probe/analyze_sinks_7b.py --out DIR [--frames 512] [--pixels 200704] [--layers 28] [--gates]

The text model has the 7B shape (hidden 3584, 28 query / 4 KV heads of 128, MLP 18944, `--layers` layers) with
random weights, built directly on the GPU in bfloat16 (no 15 GB checkpoint written and read back); the vision
tower is the tiny one of `videonsa.testing` (its cost is not what is measured). `--model` names a tiny checkpoint
with the same tokenizer, processor and vision geometry, whose small files plan the frames and build the prompt;
its weights are never loaded: the 7B-shaped model stands in for them. The subcommand's own `run` then does
everything else exactly as `videonsa analyze sinks --attention nsa` does: frame planning and decoding of a
synthetic video, one prefill with the layer hooks, the per-key masses from the operator's parts, DIR/sinks.json,
the plots and DIR/report.html.

Tokens: the planner sizes 448x448 frames (`--pixels 200704`) to 256 tokens per temporal patch (two frames), so
512 frames give 65,536 vision tokens and 1024 frames 131,072. Prints the wall time of the run and the peak GPU
memory; the numbers of the analysis are in DIR/sinks.json.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
from harness.shapes import HKV, HQ, QWEN2_5_VL_7B_TEXT  # noqa: E402
from videonsa import testing  # noqa: E402
from videonsa.analysis import common  # noqa: E402
from videonsa.cli import build_parser  # noqa: E402
from videonsa.video import synthetic  # noqa: E402

SHAPE_7B = dict(hidden_size=QWEN2_5_VL_7B_TEXT["hidden_size"], num_heads=HQ, num_kv_heads=HKV,
                intermediate_size=QWEN2_5_VL_7B_TEXT["intermediate_size"])


def build_model(layers: int, max_positions: int):
    """A random VideoNSA model with the 7B text shape, made on the GPU in bfloat16, and its config."""
    from videonsa.models import VideoNSAForConditionalGeneration

    config = testing.tiny_videonsa_config(
        num_layers=layers, max_position_embeddings=max_positions, block_size=64, block_counts=32, window_size=256,
        **SHAPE_7B,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = VideoNSAForConditionalGeneration(config).to(torch.bfloat16)
    return model.eval(), config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="run folder")
    parser.add_argument("--frames", type=int, default=512, help="frames of the synthetic video (default 512: 64K)")
    parser.add_argument("--pixels", type=int, default=200_704, help="pixels per frame (default 448x448)")
    parser.add_argument("--layers", type=int, default=28, help="text layers (default 28, as the 7B)")
    parser.add_argument("--gates", action="store_true", help="also run `analyze gates` on the same video")
    options = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="analyze-7b-"))
    video = synthetic.write_video(work / "long.mp4", frame_count=options.frames, fps=4, width=448, height=448)
    tokens = options.frames // 2 * (options.pixels // 28**2)
    model, _ = build_model(options.layers, max_positions=tokens + 4096)
    folder = testing.save_tiny_checkpoint(work / "files", max_position_embeddings=tokens + 4096)

    opened_with_weights = common.open_analysis_model

    def open_prebuilt(args):
        opened = opened_with_weights(args)
        opened.model = model  # AnalysisModel.load returns it: no weights are read
        return opened

    common.open_analysis_model = open_prebuilt
    budget = str(tokens + 4096)
    analyses = ["sinks", "gates"] if options.gates else ["sinks"]
    for analysis in analyses:
        argv = ["analyze", analysis, "--out", options.out, "--model", str(folder), "--attention", "nsa",
                "--device", "cuda", "--dtype", "bfloat16", "--video", str(video), "--fps", "4",
                "--pixels", str(options.pixels), "--budget", budget]
        args = build_parser().parse_args(argv)
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        start = time.perf_counter()
        code = args.func(args)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() / 2**30
        print(f"{analysis}: exit {code}, {seconds:.1f} s (decoding, prefill and analysis of {options.layers} "
              f"layers at {tokens} vision tokens), peak GPU memory {peak:.1f} GiB on {torch.cuda.get_device_name()}")


if __name__ == "__main__":
    main()
