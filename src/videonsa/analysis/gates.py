"""`videonsa analyze gates`: the learned branch gates over vision tokens, per layer, head and branch.

For each video, one prefill runs with a forward pre-hook on every attention layer; the hook applies the layer's
own gate MLP to the layer's input at the vision tokens, g = sigmoid(g_proj_2(gelu(g_proj_1(x))) / temperature),
and folds the values into running sums, so nothing of size T x layers is kept. Statistics pool the vision
tokens of all videos (docs/analysis.md, "gates"):

- mean, standard deviation, min and max per (layer, head, branch);
- inter-head similarity per (layer, branch): the cosine similarity of two heads' gate vectors over the tokens,
  averaged over the pairs of distinct heads (and, alongside, the Pearson correlation, which ignores the shared
  offset that makes cosines of positive vectors close to 1).

Vision tokens are those the mode treats as vision: the video placeholders in nsa (and dense, where the gates
are computed but unused), the original's position-id rule in official mode (`common.vision_mask`).
"""

from __future__ import annotations

import argparse
from typing import Any

from videonsa.analysis.common import BRANCH_NAMES, BRANCHES, add_video_arguments

HELP = "gate values per layer, head and branch over vision tokens (mean, spread, heatmaps, inter-head similarity)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """--video V [V ...] and the frame flags."""
    add_video_arguments(parser)


# A head whose gate spreads less than this over the tokens counts as constant for the correlation: a saturated
# gate (sigmoid of a large logit) varies only by float rounding, e.g. 1 - 6e-8 against 1 in float32.
CONSTANT_SPREAD = 1e-6


class GateStatistics:
    """Running sums of gate values per layer: exact means, spreads, extremes and head Gram matrices.

    Per layer (float64, on the CPU): tokens N, sums and sums of squares [3, HQ], min / max [3, HQ] and the Gram
    matrices sum_t g[t, i] g[t, j] [3, HQ, HQ] of each branch.
    """

    def __init__(self, layers: int, heads: int) -> None:
        import torch

        self.layers, self.heads = layers, heads
        zeros = lambda *shape: torch.zeros(layers, *shape, dtype=torch.float64)  # noqa: E731
        self.tokens = torch.zeros(layers, dtype=torch.float64)
        self.sum, self.sum_sq, self.gram = zeros(3, heads), zeros(3, heads), zeros(3, heads, heads)
        self.min = torch.full((layers, 3, heads), torch.inf, dtype=torch.float64)
        self.max = torch.full((layers, 3, heads), -torch.inf, dtype=torch.float64)

    def add(self, layer: int, gates: Any) -> None:
        """Fold in gates [N, HQ, 3] (cmp, slc, swa) of N vision tokens of `layer`."""
        values = gates.detach().to("cpu", dtype=self.sum.dtype).permute(2, 0, 1)  # [3, N, HQ]
        if values.shape[1] == 0:
            return
        self.tokens[layer] += values.shape[1]
        self.sum[layer] += values.sum(dim=1)
        self.sum_sq[layer] += values.square().sum(dim=1)
        self.gram[layer] += values.transpose(1, 2) @ values
        self.min[layer] = self.min[layer].minimum(values.amin(dim=1))
        self.max[layer] = self.max[layer].maximum(values.amax(dim=1))

    def mean(self) -> Any:
        """[layers, 3, HQ]."""
        return self.sum / self.tokens.clamp_min(1)[:, None, None]

    def std(self) -> Any:
        """[layers, 3, HQ], the population standard deviation over tokens."""
        n = self.tokens.clamp_min(1)[:, None, None]
        return (self.sum_sq / n - self.mean().square()).clamp_min(0).sqrt()

    def layer_std(self) -> Any:
        """[layers, 3]: the spread over all tokens and heads of a layer."""
        n = (self.tokens.clamp_min(1) * self.heads)[:, None]
        mean = self.sum.sum(dim=2) / n
        return (self.sum_sq.sum(dim=2) / n - mean.square()).clamp_min(0).sqrt()

    def head_cosine(self) -> Any:
        """[layers, 3, HQ, HQ]: cosine similarity of the heads' gate vectors over the tokens."""
        diagonal = self.gram.diagonal(dim1=-2, dim2=-1).clamp_min(1e-300).sqrt()
        return self.gram / (diagonal[..., :, None] * diagonal[..., None, :])

    def head_correlation(self) -> Any:
        """[layers, 3, HQ, HQ]: Pearson correlation of the heads' gate values over the tokens; 0 for a pair with a
        constant head (spread below `CONSTANT_SPREAD`), whose correlation would be float rounding noise."""
        import torch

        mean, spread = self.mean(), self.std()
        n = self.tokens.clamp_min(1)[:, None, None, None]
        covariance = self.gram / n - mean[..., :, None] * mean[..., None, :]
        scale = spread[..., :, None] * spread[..., None, :]
        varying = (spread[..., :, None] > CONSTANT_SPREAD) & (spread[..., None, :] > CONSTANT_SPREAD)
        return torch.where(varying, covariance / scale.clamp_min(1e-300), torch.zeros_like(covariance))


def off_diagonal_mean(matrices: Any) -> Any:
    """Mean of the off-diagonal entries of [..., H, H] matrices -> [...]; NaN for H = 1."""
    import torch

    heads = matrices.shape[-1]
    if heads < 2:
        return torch.full(matrices.shape[:-2], torch.nan, dtype=matrices.dtype)
    total = matrices.sum(dim=(-2, -1)) - matrices.diagonal(dim1=-2, dim2=-1).sum(dim=-1)
    return total / (heads * (heads - 1))


def layer_gates(call: Any, vision: Any, mode: str) -> Any:
    """Gate values [N, HQ, 3] of the layer's vision tokens (`vision`: bool [B, T]) in the layer's dtype.

    official: sigmoid(logits / temperature) from the original's gate logits, the values its NSA part mixes with at
    vision tokens; nsa / dense: `branch_gates`, the same MLP (the nsa path's own function)."""
    import torch

    from videonsa.layers.gates import branch_gates
    from videonsa.models.official_mode import official_gate_logits

    module = call.module
    x = call.hidden_states[vision.to(call.hidden_states.device)]  # [N, hidden]
    temperature = module.settings.gate_temperature
    if mode == "official":
        logits = official_gate_logits(x, module.g_proj_1, module.g_proj_2, module.num_heads)
        return (logits / temperature).sigmoid()
    return torch.stack(branch_gates(x, module.g_proj_1, module.g_proj_2, module.num_heads, temperature), dim=-1)


def run(args: argparse.Namespace) -> int:
    """Plan and check the videos, load the model, one prefill per video, then gates.json, plots, report."""
    from videonsa.analysis.common import start_prefill_analysis, vision_mask

    analysis = start_prefill_analysis(args, "gates")
    model, mode = analysis.model, analysis.opened.attention
    text_config = model.config.text_config
    statistics = GateStatistics(text_config.num_hidden_layers, text_config.num_attention_heads)
    videos = []
    for prepared in analysis.videos():
        before = statistics.sum.clone(), statistics.tokens.clone()

        def collect(call, inputs=prepared.inputs):
            statistics.add(call.layer, layer_gates(call, vision_mask(call, inputs, mode)[0:1], mode))

        analysis.prefill(prepared, collect)
        videos.append(dict(prepared.describe(), mean_by_layer=_video_means(statistics, *before)))
    result = gate_results(statistics, model.sparse_settings, mode)
    result["videos"] = videos
    report = analysis.write(result, plot_gates)
    for branch in BRANCHES:
        line = result["summary"][branch]
        print(f"gates: {BRANCH_NAMES[branch]}: mean {line['mean']:.3f}, std {line['std']:.3f}, "
              f"inter-head cosine {line['head_cosine']:.3f}")
    print(f"gates: wrote {analysis.out / 'gates.json'} and {report}")
    return 0


def _video_means(statistics: GateStatistics, sums_before: Any, tokens_before: Any) -> dict[str, list[float]]:
    """The mean gate per layer and branch (over heads and this video's tokens) of the video just added."""
    tokens = (statistics.tokens - tokens_before).clamp_min(1) * statistics.heads
    means = (statistics.sum - sums_before).sum(dim=2) / tokens[:, None]  # [layers, 3]
    return {branch: means[:, index].tolist() for index, branch in enumerate(BRANCHES)}


def gate_results(statistics: GateStatistics, settings: Any, mode: str) -> dict[str, Any]:
    """The numbers of gates.json (see docs/analysis.md for each field)."""
    mean, std = statistics.mean(), statistics.std()
    cosine = off_diagonal_mean(statistics.head_cosine())  # [layers, 3]
    correlation = off_diagonal_mean(statistics.head_correlation())
    layer_mean = mean.mean(dim=2)  # [layers, 3]
    layer_std = statistics.layer_std()
    total_tokens = float(statistics.tokens.sum())
    weights = statistics.tokens / max(total_tokens, 1.0)
    per_branch = lambda tensor, index: tensor[:, index].tolist()  # noqa: E731
    result: dict[str, Any] = {
        "analysis": "gates",
        "gates_used": mode != "dense",
        "settings": {"gate_temperature": settings.gate_temperature, "block_size": settings.block_size,
                     "block_count": settings.block_count, "window_size": settings.window_size},
        "layers": statistics.layers,
        "heads": statistics.heads,
        "vision_tokens_per_layer": statistics.tokens.tolist(),
        "branches": list(BRANCHES),
    }
    for name, tensor in (("mean", mean), ("std", std), ("min", statistics.min), ("max", statistics.max)):
        result[name] = {branch: tensor[:, index].tolist() for index, branch in enumerate(BRANCHES)}
    result["layer_mean"] = {branch: per_branch(layer_mean, i) for i, branch in enumerate(BRANCHES)}
    result["layer_std"] = {branch: per_branch(layer_std, i) for i, branch in enumerate(BRANCHES)}
    result["head_cosine"] = {branch: per_branch(cosine, i) for i, branch in enumerate(BRANCHES)}
    result["head_correlation"] = {branch: per_branch(correlation, i) for i, branch in enumerate(BRANCHES)}
    dominant = layer_mean.argmax(dim=1).tolist()
    summary: dict[str, Any] = {"attention": mode, "vision_tokens": int(statistics.tokens[0]) if statistics.layers
                               else 0}
    for index, branch in enumerate(BRANCHES):
        overall = float((layer_mean[:, index] * weights).sum())
        second = float(((layer_std[:, index].square() + layer_mean[:, index].square()) * weights).sum())
        summary[branch] = {
            "mean": overall,
            "std": max(second - overall**2, 0.0) ** 0.5,
            "head_cosine": float(cosine[:, index].nanmean()),
            "head_correlation": float(correlation[:, index].nanmean()),
        }
    summary["dominant_branch_by_layer"] = [BRANCHES[i] for i in dominant]
    result["summary"] = summary
    return result


def plot_gates(result: dict[str, Any], out: Any) -> list[Any]:
    """gates_heatmaps.png (layers x heads per branch), gates_by_layer.png (mean and spread per layer),
    gates_head_similarity.png (inter-head similarity per layer)."""
    import numpy as np

    from videonsa.analysis.common import integer_ticks, new_figure, save_figure

    layers = np.arange(result["layers"])
    suffix = "" if result["gates_used"] else " (dense mode: gates unused)"
    paths = []

    figure = new_figure(4.2 * len(BRANCHES), 0.5 + 0.22 * max(result["layers"], 8))
    axes = figure.subplots(1, len(BRANCHES), squeeze=False)[0]
    for axis, branch in zip(axes, BRANCHES, strict=True):
        image = axis.imshow(np.array(result["mean"][branch]), vmin=0, vmax=1, cmap="viridis", aspect="auto",
                            origin="lower", interpolation="nearest")
        axis.set_title(f"{BRANCH_NAMES[branch]} gate", fontsize=10)
        axis.set_xlabel("head")
        axis.set_ylabel("layer")
        integer_ticks(axis)
    figure.colorbar(image, ax=list(axes), shrink=0.9, label="mean gate")
    figure.suptitle(f"mean gate per layer and head{suffix}", fontsize=10)
    paths.append(save_figure(figure, out, "gates_heatmaps.png"))

    figure = new_figure(6.4, 4.0)
    axis = figure.add_subplot()
    for branch in BRANCHES:
        mean, std = np.array(result["layer_mean"][branch]), np.array(result["layer_std"][branch])
        axis.plot(layers, mean, marker=".", label=BRANCH_NAMES[branch])
        axis.fill_between(layers, np.clip(mean - std, 0, 1), np.clip(mean + std, 0, 1), alpha=0.2)
    axis.set(xlabel="layer", ylabel="gate (mean, band: one std)", ylim=(0, 1), title=f"gates by layer{suffix}")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    integer_ticks(axis, y=False)
    paths.append(save_figure(figure, out, "gates_by_layer.png"))

    figure = new_figure(6.4, 4.0)
    axis = figure.add_subplot()
    for branch in BRANCHES:
        line = axis.plot(layers, _floats(result["head_cosine"][branch]), marker=".", label=f"{branch} cosine")
        axis.plot(layers, _floats(result["head_correlation"][branch]), linestyle="--", color=line[0].get_color(),
                  label=f"{branch} correlation")
    axis.set(xlabel="layer", ylabel="mean over head pairs", ylim=(-1.02, 1.02),
             title="inter-head similarity of the gates")
    axis.legend(fontsize=7, ncol=3)
    axis.grid(alpha=0.3)
    integer_ticks(axis, y=False)
    paths.append(save_figure(figure, out, "gates_head_similarity.png"))
    return paths


def _floats(values: list[Any]) -> list[float]:
    return [float("nan") if value is None else value for value in values]
