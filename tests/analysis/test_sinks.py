"""`videonsa analyze sinks`: sink counts against dense softmaxes of each branch, computed by hand per layer."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from analysis_helpers import SMALL_FRAMES
from dense_branches import compressed_values, dense_probabilities
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen

from videonsa.analysis.sinks import SinkStatistics, low_value_norms
from videonsa.cli import main
from videonsa.inference.api import plan_question
from videonsa.inference.generation import GenerationSettings
from videonsa.inference.model_files import load_weights, open_model_files
from videonsa.inference.prompt import model_inputs
from videonsa.ops import nsa_attention_parts
from videonsa.video import SamplingSettings
from videonsa.video.paper import decode_planned_video

BRANCHES = ("cmp", "slc", "swa")
# Above 1/8, the uniform share over the tiny model's 8 selected / 8 window keys: only real sinks pass.
THRESHOLD = 0.15


def sinks_by_hand(checkpoint, video, threshold):
    """Per layer and branch: (sink pairs, pairs with an audience, sinks with a small value norm), from q, k, v
    computed from the captured layer input with the layer's weights and dense softmaxes over the vision tokens."""
    files = open_model_files(str(checkpoint))
    model = load_weights(files, attention="nsa", device=torch.device("cpu"), dtype=torch.float32)
    planned = plan_question(files, str(video), "Describe the video.",
                            sampling=SamplingSettings(fps=4, pixels_per_frame=12544),
                            generation=GenerationSettings(max_new_tokens=1), preset="planner")
    inputs = model_inputs(planned.prompt, decode_planned_video(planned.plan), files)
    vision = inputs["mm_token_type_ids"][0] > 0
    settings = model.sparse_settings
    found = {}

    def hook(module, args, kwargs):
        x = kwargs["hidden_states"]
        cos, sin = kwargs["position_embeddings"]
        shape = (1, x.shape[1], -1, module.head_dim)
        q = F.linear(x, module.q_proj.weight, module.q_proj.bias).view(shape).transpose(1, 2)
        k = F.linear(x, module.k_proj.weight, module.k_proj.bias).view(shape).transpose(1, 2)
        v = F.linear(x, module.v_proj.weight, module.v_proj.bias).view(shape)[0, vision].double()
        q, k = qwen.apply_rotary_pos_emb(q, k, cos, sin)
        q, k = (t.transpose(1, 2)[0, vision].double() for t in (q, k))
        gates = [torch.rand(1, len(q), q.shape[1], dtype=torch.float64) for _ in BRANCHES]
        parts = nsa_attention_parts(q[None], k[None], v[None], *gates, backend="reference", scale=module.scaling,
                                    **settings.nsa_kwargs())
        dense = dense_probabilities(q, k, parts.block_indices[0], settings.block_size, settings.window_size,
                                    module.scaling)
        group = q.shape[1] // k.shape[1]
        norms = {"cmp": compressed_values(v, settings.block_size).norm(dim=-1), "slc": v.norm(dim=-1)}
        norms["swa"] = norms["slc"]
        for branch, (probs, mask) in dense.items():
            audience = mask.sum(0)
            share = probs.sum(0) / audience.clamp_min(1)
            sink = (share > threshold) & (audience > 0)  # [HQ, K]
            values = norms[branch].T  # [HKV, K]
            low_quartile, median, high_quartile = torch.quantile(
                values, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64), dim=1)
            low = values < (median - 2 * (high_quartile - low_quartile))[:, None]
            low = low.repeat_interleave(group, dim=0)
            found[module.layer_idx, branch] = (int(sink.sum()), int((audience > 0).sum()), int((sink & low).sum()))

    handles = [layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True)
               for layer in model.model.language_model.layers]
    with torch.inference_mode():
        model.model(**inputs, use_cache=False)
    for handle in handles:
        handle.remove()
    return found


def test_sink_counts_match_dense_softmaxes_by_hand(tmp_path, analysis_inputs):
    out = tmp_path / "run"
    code = main(["analyze", "sinks", "--out", str(out), "--model", str(analysis_inputs.ours), "--attention", "nsa",
                 "--video", str(analysis_inputs.video), "--threshold", str(THRESHOLD), *SMALL_FRAMES])
    assert code == 0
    result = json.loads((out / "sinks.json").read_text())
    expected = sinks_by_hand(analysis_inputs.ours, analysis_inputs.video, THRESHOLD)
    some_sinks = 0
    for (layer, branch), (sinks, pairs, low) in expected.items():
        assert result["sinks"][branch][layer] == sinks, (layer, branch)
        assert result["pairs"][branch][layer] == pairs, (layer, branch)
        if sinks:
            assert result["low_value_norm_sinks"][branch][layer] == pytest.approx(low / sinks)
            assert result["sink_ratio"][branch][layer] == pytest.approx(sinks / pairs)
        some_sinks += sinks
    assert 0 < some_sinks < sum(pairs for _, pairs, _ in expected.values())  # the threshold separates keys
    for name in ("sinks_ratio.png", "sinks_positions.png", "sinks_value_norm.png", "report.html"):
        assert (out / name).stat().st_size > 1000, name
    assert "sinks_positions.png" in (out / "report.html").read_text()


def test_official_mode_runs_on_the_released_layout(tmp_path, analysis_inputs):
    out = tmp_path / "run"
    code = main(["analyze", "sinks", "--out", str(out), "--model", str(analysis_inputs.released), "--preset",
                 "planner", "--video", str(analysis_inputs.short_video), *SMALL_FRAMES])
    assert code == 0
    result = json.loads((out / "sinks.json").read_text())
    assert result["attention"] == "official"
    assert all(len(result["sink_ratio"][branch]) == result["layers"] for branch in BRANCHES)


def test_statistics_of_a_known_share():
    """Two heads (one KV head) over 8 keys: where the sinks are, at block starts and with small value norms."""
    statistics = SinkStatistics(layers=1, threshold=0.1)
    share = torch.tensor([[0.5, 0.0, 0.0, 0.0, 0.3, 0.0, 0.0, 0.0],
                          [0.0, 0.2, 0.0, 0.0, 0.3, 0.0, 0.0, 0.05]], dtype=torch.float64)
    audience = torch.ones(2, 8, dtype=torch.float64)
    audience[:, 7] = 0  # key 7 has no audience: neither a pair nor a sink
    norms = torch.tensor([[0.01, 1.0, 1.1, 0.9, 1.0, 1.05, 0.95, 1.0]], dtype=torch.float64)
    statistics.add(0, "slc", share, audience, torch.arange(8), norms, seq_len=8, block_size=4, tokens_per_frame=8)
    result = statistics.results()
    assert result["sinks"]["slc"] == [4] and result["pairs"]["slc"] == [14]
    assert result["sink_keys"]["slc"] == [3] and result["keys"]["slc"] == [7]
    assert result["at_block_start"]["slc"] == [pytest.approx(3 / 4)]  # keys 0, 4, 4 of sinks 0, 1, 4, 4
    assert result["at_frame_start"]["slc"] == [pytest.approx(1 / 4)]
    assert result["low_value_norm_sinks"]["slc"] == [pytest.approx(1 / 4)]  # key 0's tiny value
    assert result["spacing"]["slc"] == [1] and result["spacing_share"]["slc"] == [0.5]  # gaps 1 and 3: a tie
    assert sum(result["position_sinks"]["slc"][0]) == 4


def test_a_sinks_value_norm_is_compared_with_the_median_of_an_even_count():
    """Keys with value norms 1, 2, 3, 4: the median is 2.5 (not the lower middle value, 2)."""
    statistics = SinkStatistics(layers=1, threshold=0.1)
    share = torch.tensor([[0.0, 0.0, 0.0, 0.5]], dtype=torch.float64)
    norms = torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=torch.float64)
    statistics.add(0, "swa", share, torch.ones(1, 4, dtype=torch.float64), torch.arange(4), norms, seq_len=4,
                   block_size=4, tokens_per_frame=4)
    assert statistics.results()["sink_value_norm_vs_median"]["swa"] == [pytest.approx(4 / 2.5)]


def test_low_value_norms_use_median_minus_two_iqr():
    norms = torch.tensor([[1.0, 1.1, 0.9, 1.0, 1.2, 0.8, 1.0, 0.1]])
    quartiles = torch.quantile(norms.double(), torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64), dim=1)
    threshold = quartiles[1] - 2 * (quartiles[2] - quartiles[0])
    assert low_value_norms(norms).tolist() == (norms.double() < threshold[:, None]).tolist()
    assert low_value_norms(norms)[0].tolist() == [False] * 7 + [True]
