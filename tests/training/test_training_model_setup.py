"""Loading the model to train (Qwen2.5-VL with new gates, or VideoNSA) and freezing its parts."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from videonsa import testing
from videonsa.errors import UserError
from videonsa.models.checkpoints import to_current_key
from videonsa.training.config import ModelSettings, TrainableSettings
from videonsa.training.model_setup import load_model, load_tokenizer, part_of, set_trainable


@pytest.mark.parametrize(
    ("name", "part"),
    [
        ("model.language_model.layers.3.self_attn.g_proj_1.weight", "gates"),
        ("model.layers.3.self_attn.g_proj_2.bias", "gates"),  # legacy flat layout
        ("model.visual.merger.mlp.0.weight", "projector"),
        ("visual.merger.ln_q.weight", "projector"),
        ("model.visual.blocks.0.attn.qkv.weight", "vision_tower"),
        ("visual.patch_embed.proj.weight", "vision_tower"),
        ("model.language_model.embed_tokens.weight", "language_model"),
        ("model.language_model.layers.0.self_attn.q_proj.weight", "language_model"),
        ("lm_head.weight", "language_model"),
    ],
)
def test_parameters_are_assigned_to_parts(name, part):
    assert part_of(name) == part


def saved_weights(checkpoint) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under current-layout parameter names (transformers may save the legacy ones)."""
    return {to_current_key(name): tensor for name, tensor in load_file(str(checkpoint / "model.safetensors")).items()}


def trained_parts(model) -> set[str]:
    return {part_of(name) for name, parameter in model.named_parameters() if parameter.requires_grad}


def test_gates_only_trains_exactly_the_gate_projections():
    model = testing.tiny_model()
    counts = set_trainable(model, TrainableSettings(vision_tower=False, projector=False, language_model=False))
    trained = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    layers = model.config.text_config.num_hidden_layers
    assert len(trained) == 4 * layers  # g_proj_1 and g_proj_2, weight and bias, in every layer
    assert all(".g_proj_" in name for name in trained)
    assert counts["gates"]["trained"] == counts["gates"]["total"] > 0
    assert counts["language_model"]["trained"] == 0


def test_freezing_the_vision_side_keeps_language_model_and_gates():
    model = testing.tiny_model()
    set_trainable(model, TrainableSettings(vision_tower=False, projector=False))
    assert trained_parts(model) == {"language_model", "gates"}
    set_trainable(model, TrainableSettings())
    assert trained_parts(model) == {"vision_tower", "projector", "language_model", "gates"}


def test_gates_only_on_a_model_without_gates_is_a_user_error():
    model = testing.tiny_model(videonsa=False)
    with pytest.raises(UserError, match="no parameter is left to train"):
        set_trainable(model, TrainableSettings(vision_tower=False, projector=False, language_model=False))


def test_a_qwen_checkpoint_loads_with_new_gates(qwen_checkpoint):
    model = load_model(ModelSettings(path=str(qwen_checkpoint)))
    gates = {name: p for name, p in model.named_parameters() if part_of(name) == "gates"}
    assert gates
    weights = torch.cat([p.flatten() for name, p in gates.items() if name.endswith("weight")])
    biases = torch.cat([p.flatten() for name, p in gates.items() if name.endswith("bias")])
    assert biases.abs().max() == 0
    assert 0.01 < weights.std().item() < 0.03  # N(0, 0.02), how new gates start (docs/layer.md, the gates)
    saved = saved_weights(qwen_checkpoint)
    parameters = dict(model.named_parameters())
    for name in saved:
        torch.testing.assert_close(parameters[name], saved[name])


def test_a_videonsa_checkpoint_keeps_its_gates_and_takes_sparse_overrides(videonsa_checkpoint):
    model = load_model(ModelSettings(path=str(videonsa_checkpoint), sparse={"block_counts": 3}))
    saved = saved_weights(videonsa_checkpoint)
    gate_names = [key for key in saved if ".g_proj_" in key]
    assert gate_names
    parameters = dict(model.named_parameters())
    for key in gate_names:
        torch.testing.assert_close(parameters[key], saved[key])
    assert model.sparse_settings.block_count == 3


def test_model_settings_mistakes_are_user_errors(tmp_path, videonsa_checkpoint):
    with pytest.raises(UserError, match="nothing does not exist"):
        load_model(ModelSettings(path=str(tmp_path / "nothing")))
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="not a checkpoint folder"):
        load_model(ModelSettings(path=str(tmp_path / "file")))
    with pytest.raises(UserError, match="model.sparse.blocks"):
        load_model(ModelSettings(path=str(videonsa_checkpoint), sparse={"blocks": 3}))
    with pytest.raises(UserError, match="qwen2_5_vl"):
        load_model(ModelSettings(path=str(videonsa_checkpoint), architecture="qwen2_5_vl", sparse={"block_size": 8}))


def test_a_partly_gated_checkpoint_trains_only_with_fresh_gates(tmp_path):
    folder = testing.save_tiny_checkpoint(tmp_path / "partly-gated", seed=5)
    testing.drop_layer_gates(folder, layer=1)
    with pytest.raises(UserError, match=r"gates are missing for layer\(s\) 1 of 2"):
        load_model(ModelSettings(path=str(folder)))

    torch.manual_seed(0)
    model = load_model(ModelSettings(path=str(folder), fresh_gates=True))
    saved, parameters = saved_weights(folder), dict(model.named_parameters())
    kept = [name for name in saved if ".g_proj_" in name]
    assert len(kept) == 4 and all(".layers.0." in name for name in kept)
    for name in kept:
        torch.testing.assert_close(parameters[name], saved[name])
    fresh = {name: p for name, p in parameters.items() if ".layers.1.self_attn.g_proj_" in name}
    assert len(fresh) == 4
    assert all(torch.count_nonzero(p) == 0 for name, p in fresh.items() if name.endswith("bias"))
    assert 0.01 < torch.cat([p.flatten() for n, p in fresh.items() if n.endswith("weight")]).std().item() < 0.03
    with pytest.raises(UserError, match="model.fresh_gates is set but model.architecture is qwen2_5_vl"):
        load_model(ModelSettings(path=str(folder), architecture="qwen2_5_vl", fresh_gates=True))


def test_tokenizer_comes_with_its_chat_template(videonsa_checkpoint):
    tokenizer = load_tokenizer(str(videonsa_checkpoint))
    assert tokenizer.chat_template and tokenizer.pad_token_id == testing.TOKEN_IDS["<|endoftext|>"]


def test_a_missing_tokenizer_folder_is_named_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    for missing in (str(tmp_path / "gone"), "./gone", "~/surely-not-here-videonsa", "models/gone"):
        with pytest.raises(UserError, match=r"(gone|surely-not-here-videonsa): it does not exist$"):
            load_tokenizer(missing)


def test_dense_attention_mode_leaves_the_unused_gates_untrained():
    model = testing.tiny_model(attention_mode="dense")
    set_trainable(model, TrainableSettings())
    assert trained_parts(model) == {"vision_tower", "projector", "language_model"}
    with pytest.raises(UserError, match="dense attention mode"):
        set_trainable(model, TrainableSettings(vision_tower=False, projector=False, language_model=False))
