"""What every `videonsa analyze` subcommand shares (docs/analysis.md).

- the run folder `--out DIR`: each subcommand writes `DIR/<sub>.json` (`write_json`) and PNGs named
  `<sub>_*.png` (`save_figure`), then `videonsa.analysis.report.write_report(DIR)`; every file is written to a
  temporary name and renamed, so a killed run never leaves half a file;
- the shared options (`add_common_arguments`: --out, --model, --device, --dtype, --attention, --fresh-gates) and
  the video options (`add_video_arguments`: the frame planning of `videonsa ask`);
- loading a model and planning / decoding videos through the inference API (`open_analysis_model`,
  `plan_videos`, `video_inputs`), and the prologue of the prefill analyses (`start_prefill_analysis`);
- one prefill with the attention layers' inputs captured by forward hooks (`capture_attention_inputs`,
  `run_prefill`), which is how `gates` and `sinks` see every layer without changing the model.

Nothing heavy is imported at module level: `videonsa --help` builds these parsers without loading torch.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from videonsa.errors import UserError
from videonsa.options import ATTENTION_MODES, GREEDY_GENERATION, PRESETS

if TYPE_CHECKING:
    import torch
    from matplotlib.figure import Figure

    from videonsa.inference.api import PlannedQuestion
    from videonsa.inference.model_files import ModelFiles

# The subcommands, in the order the report shows them.
ANALYSES: tuple[str, ...] = ("gates", "sinks", "budget", "context", "latency")
# The NSA branches, in the order of the gate MLP's outputs.
BRANCHES: tuple[str, ...] = ("cmp", "slc", "swa")
BRANCH_NAMES = {"cmp": "compression", "slc": "selection", "swa": "sliding window"}
# The question put after the video: the analyses look at the prefill, which the question barely changes.
DEFAULT_QUESTION = "Describe the video."
_SUBCOMMAND_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


# ----------------------------------------------------------------------------------------------------------
# Options


def add_common_arguments(parser: argparse.ArgumentParser, model: bool = True) -> None:
    """--out DIR (required) and, with `model`, --model (required), --attention, --fresh-gates, --device, --dtype;
    without a model only --device and --dtype (e.g. `latency`, which builds random tensors)."""
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="run folder: SUB.json, SUB_*.png and report.html are written there")
    if model:
        parser.add_argument("--model", required=True,
                            help="model directory or Hugging Face Hub id (released layout or this package's)")
        parser.add_argument(
            "--attention", choices=ATTENTION_MODES, default="auto",
            help="auto (default: the checkpoint decides; official for the released Enxin/VideoNSA layout), nsa, "
            "dense or official",
        )
        from videonsa.commands.ask import FRESH_GATES_HELP

        parser.add_argument("--fresh-gates", action="store_true", help=FRESH_GATES_HELP)
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto",
                        help="auto (default: bfloat16 on GPU, float32 on CPU), bfloat16, float16 or float32")


def add_video_arguments(parser: argparse.ArgumentParser) -> None:
    """--video V [V ...] (required) and the frame planning flags of `videonsa ask` (same names and defaults)."""
    from videonsa.video.planning import DEFAULT_BUDGET_TOKENS, DEFAULT_FPS, DEFAULT_PIXELS_PER_FRAME, PREFERENCES

    group = parser.add_argument_group("videos and frames (as in `videonsa ask`)")
    group.add_argument("--video", nargs="+", required=True, metavar="VIDEO",
                       help="one or more video files or folders of frame images; statistics cover them all")
    group.add_argument("--question", default=DEFAULT_QUESTION,
                       help=f"text after the video in the prompt (default {DEFAULT_QUESTION!r})")
    group.add_argument("--preset", choices=PRESETS, default="auto",
                       help="planner, paper, or auto (default: paper for official attention, else planner)")
    group.add_argument("--fps", type=float, help=f"frames sampled per second (default {DEFAULT_FPS:g})")
    group.add_argument("--max-frames", type=int, help="at most this many frames")
    group.add_argument("--min-pixels", type=int, help="never fewer pixels per frame")
    group.add_argument("--budget", type=int, help=f"planner: total tokens (default {DEFAULT_BUDGET_TOKENS})")
    group.add_argument("--prefer", choices=PREFERENCES, help="planner: frames, detail or balanced (default)")
    group.add_argument("--pixels", type=int, help=f"planner: pixels per frame (default {DEFAULT_PIXELS_PER_FRAME})")
    group.add_argument("--max-pixels", type=int, help="paper preset: per-frame pixel cap")
    group.add_argument("--total-pixels", type=int, help="paper preset: pixel allowance of the whole video")
    group.add_argument("--frames-fps", type=float, default=DEFAULT_FPS,
                       help=f"for a folder of frame images: frames per second (default {DEFAULT_FPS:g})")
    group.add_argument("--backend", choices=("pyav", "decord"), default="pyav", help="video decoder (default pyav)")
    # Read by `videonsa ask`'s settings helper; an analysis only runs the prefill.
    parser.set_defaults(**{**GREEDY_GENERATION, "max_new_tokens": 1})


# ----------------------------------------------------------------------------------------------------------
# The run folder


def check_out_dir(out: str | Path) -> Path:
    """The run folder's path; `UserError` if it names a file. Creates nothing: call it before the slow checks,
    and `prepare_out_dir` once they passed, so that a mistake leaves no empty folder behind."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {out}: is a file, not a folder")
    return path


def prepare_out_dir(out: str | Path) -> Path:
    """The run folder, created if missing; `UserError` if it is a file or cannot be created."""
    path = check_out_dir(out)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"--out {out}: cannot create the folder ({error.strerror or error})") from None
    return path


def json_path(out: str | Path, sub: str) -> Path:
    """DIR/<sub>.json."""
    if not _SUBCOMMAND_NAME.match(sub):
        raise ValueError(f"not a subcommand name: {sub!r}")
    return Path(out) / f"{sub}.json"


def write_json(out: str | Path, sub: str, data: dict[str, Any]) -> Path:
    """Write `data` to DIR/<sub>.json atomically; NaN and infinities become null (strict JSON)."""
    from videonsa.files import atomic_write_json

    path = json_path(out, sub)
    atomic_write_json(path, json_ready(data))
    return path


def json_ready(value: Any) -> Any:
    """`value` with tuples as lists, paths as strings, numpy / torch scalars as Python numbers and non-finite
    floats as None."""
    if isinstance(value, dict):
        return {str(key): json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        return json_ready(value.item())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def new_figure(width: float = 6.4, height: float = 4.0, dpi: int = 110) -> Figure:
    """A matplotlib Figure on the Agg canvas (no pyplot, no display needed, no global state), laid out by
    matplotlib's constrained layout (titles, labels and colorbars never overlap)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def integer_ticks(axis: Any, x: bool = True, y: bool = True) -> None:
    """Only whole-number ticks on the chosen axes (layers, heads)."""
    from matplotlib.ticker import MaxNLocator

    if x:
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    if y:
        axis.yaxis.set_major_locator(MaxNLocator(integer=True))


def save_figure(figure: Figure, out: str | Path, name: str) -> Path:
    """Write `figure` as DIR/<name> (a PNG named `<sub>_*.png`) atomically; returns the path."""
    from videonsa.files import atomic_write

    if not name.endswith(".png") or "/" in name or "_" not in name:
        raise ValueError(f"plot names are <sub>_<what>.png, got {name!r}")
    path = Path(out) / name
    atomic_write(path, lambda temporary: figure.savefig(temporary, format="png"))
    return path


def finish_run(out: str | Path) -> Path:
    """Regenerate DIR/report.html after a subcommand wrote its files; returns its path."""
    from videonsa.analysis.report import write_report

    return write_report(out)


# ----------------------------------------------------------------------------------------------------------
# Model and videos


@dataclass
class AnalysisModel:
    """A model opened for analysis: its small files, the attention mode it will run and, once loaded, the
    weights (`load`)."""

    files: ModelFiles
    attention: str
    device: torch.device
    dtype: torch.dtype
    fresh_gates: bool = False
    model: Any = None

    def load(self) -> Any:
        """Load the weights (once) in eval mode; returns the VideoNSAForConditionalGeneration."""
        if self.model is None:
            from videonsa.commands.ask import _quiet_transformers_loading
            from videonsa.inference.model_files import load_weights

            _quiet_transformers_loading()
            self.model = load_weights(self.files, attention=self.attention, device=self.device, dtype=self.dtype,
                                      fresh_gates=self.fresh_gates)
        return self.model

    def describe(self) -> dict[str, Any]:
        """The run's model facts for the JSON file."""
        return {"model": self.files.name, "attention": self.attention, "device": str(self.device),
                "dtype": str(self.dtype).removeprefix("torch.")}


def open_analysis_model(args: argparse.Namespace) -> AnalysisModel:
    """The model's small files and settings, checked (one-line `UserError`s); no weights are read yet."""
    from videonsa.inference.model_files import (
        check_attention,
        open_model_files,
        resolve_attention,
        resolve_device,
        resolve_dtype,
    )

    check_attention(args.attention)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    files = open_model_files(args.model)
    choice = resolve_attention(files, args.attention)
    return AnalysisModel(files=files, attention=choice.mode, device=device, dtype=dtype,
                         fresh_gates=args.fresh_gates)


def plan_videos(opened: AnalysisModel, args: argparse.Namespace) -> list[PlannedQuestion]:
    """Check and plan every `--video` (probing it, decoding nothing) with the frame flags; `UserError` naming
    the first video or flag at fault."""
    from videonsa.commands.ask import _flag_names, _settings
    from videonsa.inference.api import plan_question
    from videonsa.video import probe_video
    from videonsa.video.paper import resolve_preset

    preset = resolve_preset(args.preset, opened.attention)
    frames, generation = _settings(args, preset)
    plans = []
    for video in args.video:
        if not Path(video).exists():
            raise UserError(f"--video {video}: no such file or folder")
        info = probe_video(video, backend=args.backend, frames_fps=args.frames_fps)  # its messages name the file
        try:
            plans.append(plan_question(
                opened.files, video, args.question,
                sampling=frames if preset == "planner" else None, paper=frames if preset == "paper" else None,
                generation=generation, backend=args.backend, frames_fps=args.frames_fps, preset=preset, info=info,
            ))
        except UserError as error:  # a setting the plan cannot meet (a --budget below the text): name its flag
            raise UserError(_flag_names(str(error))) from None
    return plans


@dataclass(frozen=True)
class VideoInputs:
    """One video's model inputs (on the model's device) and the facts the analyses report.

    inputs: input_ids, attention_mask, mm_token_type_ids [1, L], pixel_values_videos, video_grid_thw,
    second_per_grid_ts. tokens_per_frame: vision tokens per temporal patch (two frames).
    """

    path: str
    inputs: dict[str, Any]
    frames: int
    vision_tokens: int
    prompt_tokens: int
    tokens_per_frame: int

    def describe(self) -> dict[str, Any]:
        return {"path": self.path, "frames": self.frames, "vision_tokens": self.vision_tokens,
                "prompt_tokens": self.prompt_tokens, "tokens_per_temporal_patch": self.tokens_per_frame}


def video_inputs(opened: AnalysisModel, planned: PlannedQuestion, path: str) -> VideoInputs:
    """Decode the planned frames and build the model inputs of one prompt (video, then the question)."""
    from videonsa.inference.prompt import model_inputs
    from videonsa.video.paper import decode_planned_video

    decoded = decode_planned_video(planned.plan)
    inputs = model_inputs(planned.prompt, decoded, opened.files)
    grid = inputs["video_grid_thw"][0].tolist()
    merge = opened.files.geometry.merge_size
    vision = int((inputs["mm_token_type_ids"] > 0).sum())
    inputs = {name: tensor.to(opened.device) for name, tensor in inputs.items()}
    return VideoInputs(path=path, inputs=inputs, frames=planned.plan.frame_count, vision_tokens=vision,
                       prompt_tokens=int(inputs["input_ids"].shape[1]),
                       tokens_per_frame=int(grid[1] * grid[2]) // (merge * merge))


@dataclass
class PrefillAnalysis:
    """An analysis run that looks at one hooked prefill per video (`gates`, `sinks`), after its prologue
    (`start_prefill_analysis`): the videos planned, the run folder ready, the model loaded.

    name: the subcommand (its JSON file, its lines on stdout); planned: (path, plan) per `--video`.
    """

    name: str
    opened: AnalysisModel
    model: Any
    out: Path
    planned: list[tuple[str, PlannedQuestion]]

    def videos(self) -> Iterator[VideoInputs]:
        """Each video's model inputs in `--video` order, decoded only when reached (one video in memory)."""
        for path, planned in self.planned:
            yield video_inputs(self.opened, planned, path)

    def prefill(self, prepared: VideoInputs, callback: Callable[[LayerCall], None]) -> None:
        """One prefill over `prepared` with `callback` called at each attention layer; prints one line."""
        with capture_attention_inputs(self.model, callback):
            run_prefill(self.model, prepared.inputs)
        print(f"{self.name}: {prepared.path}: {prepared.vision_tokens} vision tokens in {prepared.frames} frames")

    def write(self, result: dict[str, Any], plot: Callable[[dict[str, Any], Path], Any]) -> Path:
        """Add the model facts to `result`, write DIR/<name>.json and the plots (`plot(result, out)`), then
        regenerate report.html; returns the report's path."""
        result.update(self.opened.describe())
        write_json(self.out, self.name, result)
        plot(result, self.out)
        return finish_run(self.out)


def start_prefill_analysis(args: argparse.Namespace, name: str) -> PrefillAnalysis:
    """The prologue `gates` and `sinks` share, ordered so that a mistake costs no waiting and leaves no folder:
    check --out, open the model's small files, check and plan every video (its prompt built, nothing decoded),
    then create the run folder and load the weights."""
    created = not check_out_dir(args.out).exists()
    opened = open_analysis_model(args)
    plans = plan_videos(opened, args)
    out = prepare_out_dir(args.out)
    try:
        model = opened.load()
    except BaseException:
        # Some mistakes show only once the weights load (gates missing in some layers): a folder made for this
        # run goes again.
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    return PrefillAnalysis(name=name, opened=opened, model=model, out=out,
                           planned=list(zip(args.video, plans, strict=True)))


# ----------------------------------------------------------------------------------------------------------
# One prefill with the attention layers' inputs captured


@dataclass(frozen=True)
class LayerCall:
    """What one attention layer received in the prefill.

    hidden_states: [B, T, hidden] (after the input norm); position_embeddings: (cos, sin) of the rotary
    embedding; kwargs: every keyword the layer got (the token split in nsa mode, `videonsa_official_tokens` in
    official mode).
    """

    layer: int
    module: Any
    hidden_states: Any
    position_embeddings: tuple[Any, Any] | None
    kwargs: dict[str, Any]


def attention_layers(model: Any) -> list[Any]:
    """The VideoNSA attention modules of `model`, in layer order."""
    from videonsa.models.modeling_videonsa import VideoNSAAttention

    layers = [module for module in model.modules() if isinstance(module, VideoNSAAttention)]
    if not layers:
        raise UserError(f"{type(model).__name__} has no VideoNSA attention layers to analyse")
    return sorted(layers, key=lambda module: module.layer_idx)


@contextlib.contextmanager
def capture_attention_inputs(model: Any, callback: Callable[[LayerCall], None]) -> Iterator[None]:
    """Call `callback(LayerCall)` at each attention layer as the forward pass reaches it (a forward pre-hook, so
    the callback sees the input before the layer runs and nothing is kept between layers); hooks are removed on
    exit."""
    handles = []

    def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        callback(LayerCall(layer=module.layer_idx, module=module, hidden_states=hidden,
                           position_embeddings=kwargs.get("position_embeddings"), kwargs=kwargs))

    try:
        for module in attention_layers(model):
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def run_prefill(model: Any, inputs: dict[str, Any]) -> None:
    """One forward pass of the base model over the whole prompt (no language-model head, no KV cache): what
    the analyses hook into. Runs under inference mode."""
    import torch

    with torch.inference_mode():
        model.model(**inputs, use_cache=False)


def vision_mask(call: LayerCall, inputs: dict[str, Any], mode: str) -> Any:
    """bool [B, T]: the tokens the layer's mode treats as vision.

    official: the original's classification from the M-RoPE position ids (a few video tokens whose three ids
    happen to be equal count as text there); nsa and dense: the video placeholders (mm_token_type_ids > 0).
    """
    if mode == "official":
        tokens = call.kwargs.get("videonsa_official_tokens")
        if tokens is not None:
            return tokens.is_vision
    return inputs["mm_token_type_ids"] > 0
