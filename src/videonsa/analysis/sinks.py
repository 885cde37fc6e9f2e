"""`videonsa analyze sinks`: attention sinks per layer and NSA branch, and the value norms of the sinks.

For each video, one prefill runs with a forward pre-hook on every attention layer. The hook rebuilds the layer's
queries, keys and values at the vision tokens (its own projections and rotary embedding), runs the NSA operator
on them (`nsa_attention_parts`: selected blocks and compression lse) and accumulates, per branch, the attention
mass every key receives (`attention_mass.branch_key_mass`, chunked over queries: no T x T matrix). Per query head
h and key s (a compressed block for the compression branch):

    share[h, s] = (sum over queries t of p_branch[t, h, s]) / audience[h, s]

where the audience is the number of queries for which the branch gives s a probability. A (head, key) pair is a
sink when share > --threshold (0.1, the paper's criterion): on average the key takes more than a tenth of the
attention of the queries that could attend to it. docs/analysis.md, "sinks", defines every reported number:
the sink ratio, where sinks sit (relative position, block starts, frame starts, their spacing) and the value-norm
view (sinks whose value vector is small: norm below the median minus two interquartile ranges of the layer's
keys of that KV head).

The operator analysed is the `nsa` function over the video placeholders, whatever the model's mode: in official
mode the prefill (and so every layer's input) follows the original's function, whose compression is anti-causal
and whose top-k differs; its sinks are those of our operator on the same queries and keys.
"""

from __future__ import annotations

import argparse
from collections import Counter
from typing import Any

from videonsa.analysis.common import BRANCH_NAMES, BRANCHES, add_video_arguments

HELP = ("attention sinks per layer and branch: keys with attention share above 0.1, sink ratio, where sinks sit, "
        "and their value norms (from the operator's parts, chunked: no T x T matrix)")
DEFAULT_THRESHOLD = 0.1
POSITION_BINS = 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--video V [V ...], the frame flags and --threshold."""
    add_video_arguments(parser)
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help=f"a (head, key) pair is a sink when its attention share exceeds this (default "
                        f"{DEFAULT_THRESHOLD:g}, the paper's criterion)")


def low_value_norms(norms: Any) -> Any:
    """bool [..., K]: norms below median - 2 IQR of their row (norms [..., K], e.g. one row per KV head)."""
    import torch

    values = norms.double()
    levels = torch.tensor([0.25, 0.5, 0.75], dtype=values.dtype, device=values.device)
    quantiles = torch.quantile(values, levels, dim=-1)
    threshold = quantiles[1] - 2 * (quantiles[2] - quantiles[0])
    return values < threshold[..., None]


class SinkStatistics:
    """Counts per (layer, branch), summed over the videos; `add` takes one layer's per-key numbers."""

    def __init__(self, layers: int, threshold: float) -> None:
        self.layers, self.threshold = layers, threshold
        self.counts = [{branch: Counter() for branch in BRANCHES} for _ in range(layers)]
        # Per position bin: sink (head, key) pairs, and all (head, key) pairs with an audience.
        self.histogram = [{branch: [0] * POSITION_BINS for branch in BRANCHES} for _ in range(layers)]
        self.pair_histogram = [{branch: [0] * POSITION_BINS for branch in BRANCHES} for _ in range(layers)]
        self.gaps = [{branch: Counter() for branch in BRANCHES} for _ in range(layers)]

    def add(self, layer: int, branch: str, share: Any, audience: Any, positions: Any, norms: Any,
            seq_len: int, block_size: int, tokens_per_frame: int) -> None:
        """share, audience: [HQ, K] (`KeyMass`); positions: long [K], the first token of each key in the vision
        stream; norms: [HKV, K] value norms; seq_len: vision tokens of the video."""
        import torch

        group = share.shape[0] // norms.shape[0]
        valid = audience > 0
        sink = (share > self.threshold) & valid
        low = low_value_norms(norms).repeat_interleave(group, dim=0).to(valid.device)
        # The median as low_value_norms takes it (torch.median would give the lower middle value of an even count).
        median = torch.quantile(norms.double(), 0.5, dim=-1, keepdim=True)
        relative_norm = norms.double() / median.clamp_min(1e-30)
        relative_norm = relative_norm.repeat_interleave(group, dim=0).to(valid.device)
        at_block = (positions % block_size == 0)[None, :].expand_as(valid)
        at_frame = (positions % max(tokens_per_frame, 1) == 0)[None, :].expand_as(valid)
        counts = self.counts[layer][branch]
        counts["pairs"] += int(valid.sum())
        counts["sinks"] += int(sink.sum())
        counts["pairs_at_block_start"] += int((valid & at_block).sum())
        counts["sinks_at_block_start"] += int((sink & at_block).sum())
        counts["pairs_at_frame_start"] += int((valid & at_frame).sum())
        counts["sinks_at_frame_start"] += int((sink & at_frame).sum())
        counts["low_norm_pairs"] += int((valid & low).sum())
        counts["low_norm_sinks"] += int((sink & low).sum())
        counts["sink_relative_norm_sum"] += float(relative_norm[sink].sum())
        counts["sink_keys"] += int(sink.any(dim=0).sum())
        counts["keys"] += int(valid.any(dim=0).sum())
        bins = (positions.double() * POSITION_BINS / max(seq_len, 1)).long().clamp(0, POSITION_BINS - 1)
        for histogram, pairs in ((self.histogram, sink), (self.pair_histogram, valid)):
            per_bin = torch.zeros(POSITION_BINS, dtype=torch.long, device=bins.device)
            per_bin.scatter_add_(0, bins, pairs.sum(dim=0).to(torch.long).to(bins.device))
            counts_of_layer = histogram[layer][branch]
            for index, value in enumerate(per_bin.tolist()):
                counts_of_layer[index] += value
        sink_positions = positions[sink.any(dim=0).to(positions.device)].tolist()
        self.gaps[layer][branch].update(b - a for a, b in zip(sink_positions, sink_positions[1:]))

    def results(self) -> dict[str, Any]:
        """Per-layer lists per branch (see docs/analysis.md)."""
        fields = ("sink_ratio", "sinks", "pairs", "sink_keys", "keys", "at_block_start", "at_block_start_chance",
                  "at_frame_start", "at_frame_start_chance", "low_value_norm_sinks", "low_value_norm_chance",
                  "sink_value_norm_vs_median", "spacing", "spacing_share")
        result: dict[str, Any] = {name: {branch: [] for branch in BRANCHES} for name in fields}
        for layer in range(self.layers):
            for branch in BRANCHES:
                for name, value in self._layer(layer, branch).items():
                    result[name][branch].append(value)
        for name, histogram in (("position_sinks", self.histogram), ("position_pairs", self.pair_histogram)):
            result[name] = {branch: [histogram[layer][branch] for layer in range(self.layers)] for branch in BRANCHES}
        return result

    def _layer(self, layer: int, branch: str) -> dict[str, Any]:
        c = self.counts[layer][branch]
        ratio = lambda a, b: _ratio(c, a, b)  # noqa: E731
        spacing, spacing_share = None, None
        gaps = self.gaps[layer][branch]
        if sum(gaps.values()) >= 2:
            count = max(gaps.values())
            spacing = min(gap for gap, seen in gaps.items() if seen == count)  # ties: the shortest spacing
            spacing_share = count / sum(gaps.values())
        return {
            "sink_ratio": ratio("sinks", "pairs"),
            "sinks": c["sinks"],
            "pairs": c["pairs"],
            "sink_keys": c["sink_keys"],
            "keys": c["keys"],
            "at_block_start": ratio("sinks_at_block_start", "sinks") if branch != "cmp" else None,
            "at_block_start_chance": ratio("pairs_at_block_start", "pairs") if branch != "cmp" else None,
            "at_frame_start": ratio("sinks_at_frame_start", "sinks"),
            "at_frame_start_chance": ratio("pairs_at_frame_start", "pairs"),
            "low_value_norm_sinks": ratio("low_norm_sinks", "sinks"),
            "low_value_norm_chance": ratio("low_norm_pairs", "pairs"),
            "sink_value_norm_vs_median": ratio("sink_relative_norm_sum", "sinks"),
            "spacing": spacing,
            "spacing_share": spacing_share,
        }


def _ratio(counts: Counter, numerator: str, denominator: str) -> float | None:
    """counts[numerator] / counts[denominator], None when the denominator is 0 (nothing to take a share of)."""
    return counts[numerator] / counts[denominator] if counts[denominator] else None


def layer_vision_qkv(call: Any, vision: Any) -> tuple[Any, Any, Any]:
    """The layer's q [N, HQ, D], k, v [N, HKV, D] at the vision positions (bool [T]) of sample 0, rotary
    positions applied: what the layer's own forward computes."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen

    module = call.module
    x = call.hidden_states[:1]
    shape = (1, x.shape[1], -1, module.head_dim)
    query = module.q_proj(x).view(shape).transpose(1, 2)
    key = module.k_proj(x).view(shape).transpose(1, 2)
    value = module.v_proj(x).view(shape).transpose(1, 2)
    cos, sin = call.position_embeddings
    query, key = qwen.apply_rotary_pos_emb(query, key, cos, sin)
    vision = vision.to(x.device)
    dtype = value.dtype  # as the vision path runs: in v's dtype
    return tuple(t.transpose(1, 2)[0, vision].to(dtype) for t in (query, key, value))


def layer_masses(call: Any, vision: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(KeyMass per branch, value norms per branch [HKV, K]) of one layer's vision tokens."""
    import torch

    from videonsa.analysis.attention_mass import branch_key_mass
    from videonsa.ops import nsa_attention_parts
    from videonsa.ops.reference import compress_blocks

    module = call.module
    settings = module.settings
    q, k, v = layer_vision_qkv(call, vision)
    gates = [torch.full(q.shape[:2], 0.5, dtype=q.dtype, device=q.device)[None] for _ in BRANCHES]
    parts = nsa_attention_parts(q[None], k[None], v[None], *gates, scale=module.scaling, **settings.nsa_kwargs())
    masses = branch_key_mass(q, k, parts.block_indices[0], parts.lse_cmp[0], block_size=settings.block_size,
                             window_size=settings.window_size, scale=module.scaling)
    norms = v.double().norm(dim=-1).T  # [HKV, N]
    compressed = compress_blocks(v.double(), settings.block_size).norm(dim=-1).T  # [HKV, NB]
    return masses, {"cmp": compressed, "slc": norms, "swa": norms}


def run(args: argparse.Namespace) -> int:
    """Plan and check the videos, load the model, one hooked prefill per video, then sinks.json, plots, report."""
    import torch

    from videonsa.analysis.common import start_prefill_analysis
    from videonsa.errors import UserError

    if not 0 < args.threshold < 1:
        raise UserError(f"--threshold must be between 0 and 1, got {args.threshold:g}")
    analysis = start_prefill_analysis(args, "sinks")
    settings = analysis.model.sparse_settings
    statistics = SinkStatistics(analysis.model.config.text_config.num_hidden_layers, args.threshold)
    videos = []
    for prepared in analysis.videos():
        vision = prepared.inputs["mm_token_type_ids"][0] > 0
        seq_len = int(vision.sum())

        def collect(call, vision=vision, seq_len=seq_len, per_frame=prepared.tokens_per_frame):
            masses, norms = layer_masses(call, vision)
            token_positions = torch.arange(seq_len, device=vision.device)
            block_starts = token_positions[: seq_len // settings.block_size] * settings.block_size
            for branch in BRANCHES:
                positions = block_starts if branch == "cmp" else token_positions
                mass = masses[branch]
                statistics.add(call.layer, branch, mass.share(), mass.audience, positions.to(mass.mass.device),
                               norms[branch], seq_len, settings.block_size, per_frame)

        analysis.prefill(prepared, collect)
        videos.append(prepared.describe())
    result = sink_results(statistics, settings, args.threshold, analysis.opened.attention)
    result["videos"] = videos
    report = analysis.write(result, plot_sinks)
    for branch in BRANCHES:
        line = result["summary"][branch]
        print(f"sinks: {BRANCH_NAMES[branch]}: sink ratio {_percent(line['sink_ratio'])}, "
              f"{line['layers_with_sinks']} of {statistics.layers} layers with sinks, "
              f"low value norm {_percent(line['low_value_norm_sinks'])} of sinks")
    print(f"sinks: wrote {analysis.out / 'sinks.json'} and {report}")
    return 0


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2%}"


def sink_results(statistics: SinkStatistics, settings: Any, threshold: float, mode: str) -> dict[str, Any]:
    """The numbers of sinks.json (docs/analysis.md)."""
    per_layer = statistics.results()
    summary: dict[str, Any] = {"attention": mode, "threshold": threshold}
    for branch in BRANCHES:
        counts = [statistics.counts[layer][branch] for layer in range(statistics.layers)]
        total = sum(counts, Counter())
        summary[branch] = {
            "sink_ratio": _ratio(total, "sinks", "pairs"),
            "sinks": total["sinks"],
            "layers_with_sinks": sum(1 for c in counts if c["sinks"]),
            "at_block_start": _ratio(total, "sinks_at_block_start", "sinks") if branch != "cmp" else None,
            "at_block_start_chance": _ratio(total, "pairs_at_block_start", "pairs") if branch != "cmp" else None,
            "at_frame_start": _ratio(total, "sinks_at_frame_start", "sinks"),
            "at_frame_start_chance": _ratio(total, "pairs_at_frame_start", "pairs"),
            "low_value_norm_sinks": _ratio(total, "low_norm_sinks", "sinks"),
            "low_value_norm_chance": _ratio(total, "low_norm_pairs", "pairs"),
        }
    return {
        "analysis": "sinks",
        "threshold": threshold,
        "operator": "nsa (nsa_attention_parts over the video placeholders)",
        "settings": {"block_size": settings.block_size, "block_count": settings.block_count,
                     "window_size": settings.window_size, "init_blocks": settings.init_blocks,
                     "local_blocks": settings.local_blocks},
        "layers": statistics.layers,
        "branches": list(BRANCHES),
        "position_bins": POSITION_BINS,
        **per_layer,
        "summary": summary,
    }


def plot_sinks(result: dict[str, Any], out: Any) -> list[Any]:
    """sinks_ratio.png (sink ratio per layer), sinks_positions.png (sink ratio by layer and position),
    sinks_value_norm.png (share of sinks with small value norms, and their norm against the median)."""
    import numpy as np

    from videonsa.analysis.common import integer_ticks, new_figure, save_figure

    layers = np.arange(result["layers"])
    values = lambda name, branch: [np.nan if x is None else x for x in result[name][branch]]  # noqa: E731
    paths = []

    figure = new_figure(6.4, 4.0)
    axis = figure.add_subplot()
    for branch in BRANCHES:
        axis.plot(layers, values("sink_ratio", branch), marker=".", label=BRANCH_NAMES[branch])
    axis.set(xlabel="layer", ylabel=f"sink ratio (share > {result['threshold']:g})", title="attention sinks per layer")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    integer_ticks(axis, y=False)
    paths.append(save_figure(figure, out, "sinks_ratio.png"))

    figure = new_figure(4.2 * len(BRANCHES), 0.8 + 0.22 * max(result["layers"], 8))
    axes = figure.subplots(1, len(BRANCHES), squeeze=False)[0]
    for axis, branch in zip(axes, BRANCHES, strict=True):
        sinks = np.array(result["position_sinks"][branch], dtype=float)
        pairs = np.array(result["position_pairs"][branch], dtype=float)
        ratio = np.divide(sinks, pairs, out=np.zeros_like(sinks), where=pairs > 0)
        image = axis.imshow(ratio, aspect="auto", origin="lower", cmap="magma", vmin=0, vmax=1,
                            extent=(0, 1, -0.5, result["layers"] - 0.5), interpolation="nearest")
        axis.set(title=f"{BRANCH_NAMES[branch]} sinks", xlabel="position in the video (0 = first token)",
                 ylabel="layer")
        integer_ticks(axis, x=False)
    figure.colorbar(image, ax=list(axes), shrink=0.9, label="sink ratio at that position")
    paths.append(save_figure(figure, out, "sinks_positions.png"))

    figure = new_figure(9.6, 3.8)
    left, right = figure.subplots(1, 2)
    for branch in BRANCHES:
        left.plot(layers, values("low_value_norm_sinks", branch), marker=".", label=BRANCH_NAMES[branch])
        right.plot(layers, values("sink_value_norm_vs_median", branch), marker=".", label=BRANCH_NAMES[branch])
    left.set(xlabel="layer", ylabel="share of sinks", title="sinks with value norm < median - 2 IQR")
    right.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    right.set(xlabel="layer", ylabel="sink value norm / median", title="value norms of sinks")
    for axis in (left, right):
        axis.legend(fontsize=8)
        axis.grid(alpha=0.3)
        integer_ticks(axis, y=False)
    paths.append(save_figure(figure, out, "sinks_value_norm.png"))
    return paths
