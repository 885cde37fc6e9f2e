"""`videonsa data prepare`: probe and filter the clips of annotation files into a training manifest."""

from __future__ import annotations

import argparse
import re
import sys

DEFAULT_WORKERS_NOTE = "number of CPUs"
# The ClipFilter settings its messages name -> the flags that set them here.
FILTER_FLAGS = {"sample_fps": "--fps", "min_frames": "--min-frames", "max_frames": "--max-frames"}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `data` (with its `prepare` action) to the CLI."""
    parser = subparsers.add_parser("data", help="prepare training data (probe, filter, manifest)")
    actions = parser.add_subparsers(dest="data_action", metavar="ACTION", required=True)
    prepare = actions.add_parser(
        "prepare",
        help="probe every clip in parallel, filter, write a manifest and a drop report",
        description="Read LLaVA-Video-178K or frames-as-images annotations (JSON/JSONL), probe every clip once in "
        "parallel, keep the clips the filter accepts (defaults: the paper's 4 fps, 350-550 frames) and write a "
        "JSONL manifest for `videonsa train`, plus a JSON report of every dropped sample and why.",
    )
    prepare.add_argument("annotations", nargs="+", help="annotation files (.json or .jsonl)")
    prepare.add_argument("-o", "--output", required=True, help="manifest to write (.jsonl)")
    prepare.add_argument("--video-root", help="folder the video/frame paths are relative to, and must stay in "
                         "(default: each annotation file's folder)")
    prepare.add_argument("--allow-outside-root", action="store_true",
                         help="accept absolute paths, ~ and .. that leave the video root (URLs and playlists are "
                         "refused regardless); only for annotation files you trust")
    prepare.add_argument("--report", help="drop report to write (default: <manifest>.report.json)")
    prepare.add_argument("--fps", type=float, default=4.0, help="sampling rate frames are counted at (4)")
    prepare.add_argument("--min-fps", type=float, default=None,
                         help="lowest native frame rate kept (default: the sampling rate; 0 keeps all)")
    prepare.add_argument("--min-frames", type=int, default=350, help="fewest frames at --fps (350)")
    prepare.add_argument("--max-frames", type=int, default=550, help="most frames at --fps (550; 0: no limit)")
    prepare.add_argument("--workers", type=int, default=None,
                         help=f"probing processes (default: {DEFAULT_WORKERS_NOTE}; 0: in this process)")
    prepare.add_argument("--quiet", action="store_true", help="no progress bar")
    prepare.set_defaults(func=run_prepare)


def run_prepare(args: argparse.Namespace) -> int:
    """Run `data prepare` and print what was kept and dropped."""
    from videonsa.training.prepare import DROP_REASONS, prepare_manifest

    clip_filter = _clip_filter(args)
    summary = prepare_manifest(
        args.annotations,
        args.output,
        media_root=args.video_root,
        clip_filter=clip_filter,
        report=args.report,
        workers=args.workers,
        progress=not args.quiet,
        allow_outside_root=args.allow_outside_root,
    )
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{summary.total} samples", show_header=True)
    table.add_column("outcome")
    table.add_column("samples", justify="right")
    table.add_row("kept", str(summary.kept))
    for reason in DROP_REASONS:
        if summary.dropped.get(reason):
            table.add_row(f"dropped: {reason}", str(summary.dropped[reason]))
    console = Console()
    console.print(table)
    console.print(f"manifest: {summary.manifest}\nreport:   {summary.report}")
    if summary.duplicate_ids:
        console.print(f"note: {summary.duplicate_ids} ids are carried by more than one sample (all kept; listed "
                      "under duplicate_ids in the report)")
    if summary.kept == 0:
        print(f"error: data prepare kept 0 of {summary.total} samples; {summary.empty_hint()}", file=sys.stderr)
        return 1
    return 0


def _clip_filter(args: argparse.Namespace):
    """The filter the flags ask for; a bad value is reported under its flag, not ClipFilter's setting name."""
    from videonsa.errors import UserError
    from videonsa.training.prepare import ClipFilter

    try:
        return ClipFilter(
            sample_fps=args.fps, min_fps=args.min_fps, min_frames=args.min_frames, max_frames=args.max_frames or None
        )
    except UserError as error:
        named = re.sub(r"\b(" + "|".join(FILTER_FLAGS) + r")\b", lambda match: FILTER_FLAGS[match[1]], str(error))
        raise UserError(named) from None
