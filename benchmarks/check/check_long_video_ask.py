"""`videonsa ask` on an hour-long video on one GPU, end to end: plan, frame decoding, chunked prefill with its
progress, the answer, the report and the time; then the same question with a one-pass prefill, whose answer must
be the same.

    python benchmarks/check/check_long_video_ask.py                      # 60 minutes at 4 fps, 224x224 frames
    python benchmarks/check/check_long_video_ask.py --minutes 30 --chunk 32768 --layers 8

No weights are needed: a small random-weight VideoNSA checkpoint (`videonsa.testing`, with the default NSA budget
of blocks of 64, so the Triton kernels run) and a synthetic video (`videonsa.video.synthetic`) are written to
--out. An hour at 4 fps and 224 x 224 pixels is 14,400 frames, 460,800 video tokens. The answer of a random model
means nothing; what is checked is that the long prompt runs chunk by chunk and answers what one pass answers.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

from videonsa import cli, testing
from videonsa.video import synthetic


def ask(checkpoint: Path, video: Path, chunk: str, args: argparse.Namespace) -> tuple[int, str, str, float]:
    """Run `videonsa ask` in this process: (exit status, stdout, stderr, seconds)."""
    argv = ["ask", "--model", str(checkpoint), "--video", str(video), "--device", args.device, "--fps", str(args.fps),
            "--pixels", str(args.pixels), "--prefill-chunk", chunk, "--max-new-tokens", "8",
            "What colour does the screen turn?"]
    out, err = io.StringIO(), io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(argv)
    return status, out.getvalue(), err.getvalue(), time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=60.0)
    parser.add_argument("--fps", type=float, default=4.0, help="frames per second, of the video and sampled")
    parser.add_argument("--pixels", type=int, default=224 * 224)
    parser.add_argument("--chunk", default="65536", help="--prefill-chunk of the chunked run (auto, N)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu for a short dry run")
    parser.add_argument("--no-one-pass", action="store_true", help="skip the one-pass comparison")
    parser.add_argument("--out", type=Path, default=None, help="folder for the checkpoint and video (default: temp)")
    args = parser.parse_args(argv)

    folder = args.out or Path(tempfile.mkdtemp(prefix="long-video-ask-"))
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = folder / "videonsa-small"
    if not (checkpoint / "config.json").exists():
        testing.save_tiny_checkpoint(checkpoint, num_layers=args.layers, hidden_size=256, num_heads=4,
                                     num_kv_heads=2, intermediate_size=512, block_size=64, block_counts=16,
                                     window_size=256)
    frames = round(args.minutes * 60 * args.fps)
    video = folder / f"synthetic-{args.minutes:g}min.mp4"
    if not video.exists():
        started = time.perf_counter()
        synthetic.write_video(video, frame_count=frames, fps=args.fps, width=224, height=224, gop=250)
        print(f"wrote {video} ({frames} frames) in {time.perf_counter() - started:.1f}s", flush=True)

    runs = [args.chunk] + ([] if args.no_one_pass else ["0"])
    answers = []
    for chunk in runs:
        status, out, err, seconds = ask(checkpoint, video, chunk, args)
        print(f"--- videonsa ask --prefill-chunk {chunk}: exit {status}, {seconds:.1f}s")
        # The lines ask prints on stderr (progress bars are drawn only on a terminal).
        print("\n".join(line for line in err.splitlines() if line.strip()))
        print(f"answer: {out.strip()!r}", flush=True)
        if status != 0:
            sys.exit(status)
        answers.append(out)
    if len(answers) == 2:
        same = answers[0] == answers[1]
        print(f"chunked and one-pass answers {'are the same' if same else 'DIFFER'}")
        if not same:
            sys.exit(1)


if __name__ == "__main__":
    main()
