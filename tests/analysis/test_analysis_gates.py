"""`videonsa analyze gates`: the statistics against the gate MLP applied by hand to the captured layer inputs."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from analysis_helpers import SMALL_FRAMES

from videonsa.analysis.gates import CONSTANT_SPREAD, GateStatistics, off_diagonal_mean
from videonsa.cli import main
from videonsa.inference.api import plan_question
from videonsa.inference.generation import GenerationSettings
from videonsa.inference.model_files import load_weights, open_model_files
from videonsa.inference.prompt import model_inputs
from videonsa.video import SamplingSettings
from videonsa.video.paper import decode_planned_video

BRANCHES = ("cmp", "slc", "swa")


def gates_by_hand(checkpoint, videos, attention):
    """Per layer: gate values [N, HQ, 3] over the vision tokens of all `videos`, from the layer inputs captured
    with our own hooks and the gate MLP written out: sigmoid((W2 gelu(W1 x + b1) + b2) / temperature).

    Vision tokens: the video placeholders, or in official mode the model's own position-id classification."""
    files = open_model_files(str(checkpoint))
    model = load_weights(files, attention=attention, device=torch.device("cpu"), dtype=torch.float32)
    text = model.config.text_config
    per_layer = [[] for _ in range(text.num_hidden_layers)]
    placeholder_differs = False
    for video in videos:
        planned = plan_question(
            files, str(video), "Describe the video.", sampling=SamplingSettings(fps=4, pixels_per_frame=12544),
            generation=GenerationSettings(max_new_tokens=1), preset="planner",
        )
        inputs = model_inputs(planned.prompt, decode_planned_video(planned.plan), files)
        placeholders = inputs["mm_token_type_ids"][0] > 0
        handles = []

        def hook(module, args, kwargs, placeholders=placeholders):
            nonlocal placeholder_differs
            x = kwargs["hidden_states"][0]
            vision = placeholders
            if attention == "official":
                vision = kwargs["videonsa_official_tokens"].is_vision[0]
                placeholder_differs |= bool((vision != placeholders).any())
            x = x[vision]
            hidden = F.gelu(x @ module.g_proj_1.weight.T + module.g_proj_1.bias)
            logits = hidden @ module.g_proj_2.weight.T + module.g_proj_2.bias
            gates = torch.sigmoid(logits / text.gate_temperature).view(len(x), text.num_attention_heads, 3)
            per_layer[module.layer_idx].append(gates)

        for layer in model.model.language_model.layers:
            handles.append(layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True))
        with torch.inference_mode():
            model.model(**inputs, use_cache=False)
        for handle in handles:
            handle.remove()
    return [torch.cat(values).double() for values in per_layer], placeholder_differs


def run_gates(tmp_path, checkpoint, videos, *extra):
    out = tmp_path / "run"
    code = main(["analyze", "gates", "--out", str(out), "--model", str(checkpoint),
                 "--video", *map(str, videos), *SMALL_FRAMES, *extra])
    assert code == 0
    return out, json.loads((out / "gates.json").read_text())


def check_against(result, per_layer):
    for layer, gates in enumerate(per_layer):
        assert result["vision_tokens_per_layer"][layer] == len(gates)
        for index, branch in enumerate(BRANCHES):
            values = gates[..., index]  # [N, HQ]
            reported = {name: torch.tensor(result[name][branch][layer], dtype=torch.float64)
                        for name in ("mean", "std", "min", "max")}
            torch.testing.assert_close(reported["mean"], values.mean(0), atol=1e-5, rtol=0)
            torch.testing.assert_close(reported["std"], values.std(0, correction=0), atol=1e-5, rtol=0)
            torch.testing.assert_close(reported["min"], values.amin(0), atol=1e-6, rtol=0)
            torch.testing.assert_close(reported["max"], values.amax(0), atol=1e-6, rtol=0)
            unit = values / values.norm(dim=0)
            cosine = unit.T @ unit
            heads = cosine.shape[0]
            expected = (cosine.sum() - cosine.trace()) / (heads * (heads - 1))
            assert result["head_cosine"][branch][layer] == pytest.approx(float(expected), abs=1e-6)
            correlation = torch.corrcoef(values.T)
            constant = values.std(0, correction=0) <= CONSTANT_SPREAD  # saturated heads: rounding noise, set to 0
            correlation[constant, :] = 0
            correlation[:, constant] = 0
            correlation.diagonal().fill_(1)
            expected = (correlation.sum() - correlation.trace()) / (heads * (heads - 1))
            assert result["head_correlation"][branch][layer] == pytest.approx(float(expected), abs=1e-5)


def test_gate_statistics_pool_two_videos_as_the_gate_mlp_by_hand(tmp_path, analysis_inputs):
    videos = [analysis_inputs.video, analysis_inputs.short_video]
    out, result = run_gates(tmp_path, analysis_inputs.ours, videos, "--attention", "nsa")
    per_layer, _ = gates_by_hand(analysis_inputs.ours, videos, "nsa")
    assert result["attention"] == "nsa" and result["gates_used"]
    check_against(result, per_layer)
    # The gates really differ between branches (the tiny model spreads them out): a wrong branch order
    # would show.
    assert len({round(result["summary"][branch]["mean"], 3) for branch in BRANCHES}) == 3
    assert [video["path"] for video in result["videos"]] == [str(video) for video in videos]
    for name in ("gates_heatmaps.png", "gates_by_layer.png", "gates_head_similarity.png", "report.html"):
        assert (out / name).stat().st_size > 1000, name
    report = (out / "report.html").read_text()
    assert "gates_heatmaps.png" in report and "gates.json" in report


def test_official_mode_uses_the_original_vision_tokens(tmp_path, analysis_inputs):
    """The released layout runs official attention by default: gates at the tokens the original treats as
    vision (M-RoPE ids not all equal), which leave out a few video placeholders."""
    videos = [analysis_inputs.short_video]
    _, result = run_gates(tmp_path, analysis_inputs.released, videos, "--preset", "planner")
    per_layer, placeholder_differs = gates_by_hand(analysis_inputs.released, videos, "official")
    assert result["attention"] == "official"
    assert placeholder_differs
    check_against(result, per_layer)


def test_dense_mode_marks_the_gates_unused(tmp_path, analysis_inputs):
    _, result = run_gates(tmp_path, analysis_inputs.ours, [analysis_inputs.short_video], "--attention", "dense")
    assert result["attention"] == "dense" and not result["gates_used"]


def test_statistics_accumulate_exactly_across_calls():
    torch.manual_seed(0)
    first, second = torch.rand(7, 3, 3), torch.rand(5, 3, 3)
    statistics = GateStatistics(layers=1, heads=3)
    statistics.add(0, first)
    statistics.add(0, second)
    both = torch.cat([first, second]).double().permute(2, 0, 1)  # [3, N, HQ]
    torch.testing.assert_close(statistics.mean()[0], both.mean(1))
    torch.testing.assert_close(statistics.std()[0], both.std(1, correction=0))
    cosine = off_diagonal_mean(statistics.head_cosine())[0]
    unit = both / both.norm(dim=1, keepdim=True)
    expected = off_diagonal_mean(unit.transpose(1, 2) @ unit)
    torch.testing.assert_close(cosine, expected)


def test_one_head_has_no_inter_head_similarity():
    statistics = GateStatistics(layers=1, heads=1)
    statistics.add(0, torch.rand(4, 1, 3))
    assert torch.isnan(off_diagonal_mean(statistics.head_cosine())).all()
