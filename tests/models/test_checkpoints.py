"""Checkpoints: own layout, the released flat layout, plain Qwen2.5-VL, Auto classes, conversion command."""

import json

import pytest
import torch
from model_checks import use_package_positions
from safetensors import safe_open
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoTokenizer

import videonsa
from videonsa import cli, testing
from videonsa.models import VideoNSAConfig, VideoNSAForConditionalGeneration, VideoNSAModel
from videonsa.models.checkpoints import to_current_key


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch.as_kwargs()).logits


def _stored_names(folder):
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        return set(handle.keys())


def _assert_same_weights(model, reference):
    state, expected = model.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(state[name], tensor), name


def test_save_pretrained_round_trip_keeps_logits_settings_and_architecture(tmp_path, batch):
    model = testing.tiny_model(seed=11, block_counts=3, window_size=12)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "videonsa"
    assert config["architectures"] == ["VideoNSAForConditionalGeneration"]
    assert {k: config["text_config"][k] for k in ("block_size", "block_counts", "window_size", "attention_mode")} \
        == {"block_size": 4, "block_counts": 3, "window_size": 12, "attention_mode": "nsa"}
    loaded = VideoNSAForConditionalGeneration.from_pretrained(tmp_path)
    _assert_same_weights(loaded, model)
    assert loaded.sparse_settings == model.sparse_settings
    torch.testing.assert_close(_logits(loaded, batch), _logits(model, batch), rtol=0, atol=0)


def test_legacy_layout_checkpoint_loads_with_every_tensor_in_place(tmp_path, batch, message_log):
    model = testing.tiny_model(seed=12)
    testing.save_tiny_checkpoint(tmp_path, model=model, legacy_layout=True)
    names = _stored_names(tmp_path)
    assert "model.layers.0.self_attn.g_proj_1.weight" in names
    assert "model.layers.1.self_attn.g_proj_2.bias" in names
    assert "visual.patch_embed.proj.weight" in names and "lm_head.weight" in names
    assert not any(name.startswith(("model.language_model.", "model.visual.")) for name in names)
    assert {to_current_key(name) for name in names} == set(model.state_dict())
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "qwen2_5_vl" and config["architectures"] == ["VideoNSAForConditionalGeneration"]

    loaded, info = VideoNSAForConditionalGeneration.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    _assert_same_weights(loaded, model)
    torch.testing.assert_close(_logits(loaded, batch), _logits(model, batch), rtol=0, atol=0)
    assert not [m for m in message_log.messages if "g_proj" in m or "newly initialized" in m]

    # Saved again, it loads again (transformers keeps the layout a checkpoint was read in).
    loaded.save_pretrained(tmp_path / "again")
    _assert_same_weights(VideoNSAForConditionalGeneration.from_pretrained(tmp_path / "again"), model)


def test_flat_config_with_top_level_settings_is_read(tmp_path):
    testing.save_tiny_checkpoint(tmp_path, legacy_layout=True, seed=13)
    config = json.loads((tmp_path / "config.json").read_text())
    text = config.pop("text_config")
    for key in ("block_size", "block_counts", "window_size", "init_blocks", "local_blocks", "gate_temperature",
                "attention_mode"):
        text.pop(key)
    config.update(text)  # the flat layout of older transformers: text keys at the top level
    config.update(block_size=8, block_counts=5, window_size=16)
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = VideoNSAForConditionalGeneration.from_pretrained(tmp_path)
    settings = model.sparse_settings
    # No attention_mode recorded, gates in the legacy layout: the released checkpoint's shape, official mode.
    assert (settings.block_size, settings.block_count, settings.window_size, settings.mode) == (8, 5, 16, "official")


def test_plain_qwen2_5_vl_loads_with_fresh_gates_and_one_notice(tmp_path, batch, message_log):
    stock = use_package_positions(testing.tiny_model(videonsa=False, seed=14))
    testing.save_tiny_checkpoint(tmp_path, model=stock)
    torch.manual_seed(0)
    model = VideoNSAForConditionalGeneration.from_pretrained(tmp_path)

    state, stock_state = model.state_dict(), stock.state_dict()
    for name, tensor in stock_state.items():
        assert torch.equal(state[name], tensor), name
    gate_names = [name for name in state if ".g_proj_" in name]
    assert len(gate_names) == 8
    weights = torch.cat([state[n].flatten() for n in gate_names if n.endswith("weight")])
    assert abs(weights.std().item() - 0.02) < 0.002 and abs(weights.mean().item()) < 0.002
    assert all(torch.count_nonzero(state[n]) == 0 for n in gate_names if n.endswith("bias"))

    notices = [m for m in message_log.messages if "g_proj" in m or "gates" in m or "newly initialized" in m]
    assert len(notices) == 1 and "no VideoNSA gates" in notices[0], notices
    model.set_attention_mode("dense")
    torch.testing.assert_close(_logits(model, batch), _logits(stock, batch), rtol=0, atol=0)


def test_plain_qwen2_5_vl_in_the_legacy_layout_loads_too(tmp_path):
    stock = testing.tiny_model(videonsa=False, seed=15)
    testing.save_tiny_checkpoint(tmp_path, model=stock, legacy_layout=True)
    model = VideoNSAForConditionalGeneration.from_pretrained(tmp_path)
    state = model.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in stock.state_dict().items())


def test_settings_given_at_load_time_override_the_checkpoint(tmp_path):
    testing.save_tiny_checkpoint(tmp_path, seed=16)
    model = VideoNSAForConditionalGeneration.from_pretrained(
        tmp_path, attention_mode="dense", block_counts=3, gate_temperature=0.5
    )
    settings = model.sparse_settings
    assert (settings.mode, settings.block_count, settings.gate_temperature) == ("dense", 3, 0.5)
    assert model.config.text_config.block_counts == 3
    with pytest.raises(videonsa.UserError, match=r"block_counts=0\): block_count must be positive"):
        VideoNSAForConditionalGeneration.from_pretrained(tmp_path, block_counts=0)


def test_auto_classes_find_the_model_after_import_videonsa(tmp_path):
    testing.save_tiny_checkpoint(tmp_path, seed=17)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), VideoNSAConfig)
    assert type(AutoModelForImageTextToText.from_pretrained(tmp_path)) is VideoNSAForConditionalGeneration
    assert type(AutoModel.from_pretrained(tmp_path)) is VideoNSAModel


def test_tiny_checkpoint_tokenizer_loads_offline(tmp_path):
    testing.save_tiny_checkpoint(tmp_path, seed=18)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens?"}]}],
        add_generation_prompt=True, tokenize=False,
    )
    ids = tokenizer(text).input_ids
    assert testing.TOKEN_IDS["<|video_pad|>"] in ids and ids[-3:] == tokenizer("assistant\n").input_ids[-3:]
    if testing.video_processor_available():
        from transformers import AutoProcessor

        assert type(AutoProcessor.from_pretrained(tmp_path)).__name__ == "Qwen2_5_VLProcessor"


def test_convert_command_adds_gates_and_writes_either_layout(tmp_path, capsys, batch):
    stock = testing.tiny_model(videonsa=False, seed=19)
    testing.save_tiny_checkpoint(tmp_path / "qwen", model=stock)
    assert cli.main(["convert", str(tmp_path / "qwen"), str(tmp_path / "nsa"), "--block-counts", "3"]) == 0
    assert "wrote VideoNSA checkpoint" in capsys.readouterr().out
    converted = VideoNSAForConditionalGeneration.from_pretrained(tmp_path / "nsa")
    assert converted.sparse_settings.block_count == 3
    assert any(".g_proj_1." in name for name in _stored_names(tmp_path / "nsa"))
    assert (tmp_path / "nsa" / "tokenizer.json").is_file() and (tmp_path / "nsa" / "chat_template.jinja").is_file()
    state = converted.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in stock.state_dict().items())

    # Converting the converted checkpoint to the released layout keeps every tensor, gates included.
    assert cli.main(["convert", str(tmp_path / "nsa"), str(tmp_path / "legacy"), "--legacy-layout"]) == 0
    assert "model.layers.0.self_attn.g_proj_1.weight" in _stored_names(tmp_path / "legacy")
    _assert_same_weights(VideoNSAForConditionalGeneration.from_pretrained(tmp_path / "legacy"), converted)

    # From the legacy layout back to the current one: current key names whatever the source layout.
    assert cli.main(["convert", str(tmp_path / "legacy"), str(tmp_path / "current")]) == 0
    assert "model.language_model.layers.0.self_attn.g_proj_1.weight" in _stored_names(tmp_path / "current")


def test_convert_of_a_training_checkpoint_leaves_its_training_state_behind(tmp_path, capsys):
    # A training checkpoint folder holds the model beside the Trainer's state and videonsa's completion marker;
    # copied, they would make the converted folder look like a checkpoint `videonsa train` can resume.
    from videonsa.training.trainer import COMPLETE_MARKER

    source = testing.save_tiny_checkpoint(tmp_path / "checkpoint-40", seed=21)
    for name in ("trainer_state.json", COMPLETE_MARKER, "optimizer.pt", "rng_state.pth", "training_args.bin"):
        (source / name).write_text("{}")
    assert cli.main(["convert", str(source), str(tmp_path / "out")]) == 0
    copied = {path.name for path in (tmp_path / "out").iterdir()}
    assert "tokenizer.json" in copied
    assert not copied & {"trainer_state.json", COMPLETE_MARKER, "optimizer.pt", "rng_state.pth", "training_args.bin"}


def test_convert_refuses_bad_folders_and_leaves_nothing_behind(tmp_path, capsys):
    testing.save_tiny_checkpoint(tmp_path / "src", seed=20)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    assert cli.main(["convert", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert "not a checkpoint folder" in capsys.readouterr().err
    assert cli.main(["convert", str(tmp_path / "src"), str(tmp_path / "taken")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "taken"]


def test_the_weights_checked_are_those_transformers_loads_when_a_stale_index_is_left(tmp_path, message_log):
    # Saving unsharded into a folder that held shards removes the shards but leaves the old index; transformers
    # then loads model.safetensors, so the checks must read it too rather than refuse the index's missing shards.
    model = testing.tiny_model(seed=22)
    model.save_pretrained(tmp_path / "resaved", max_shard_size="100KB")
    model.save_pretrained(tmp_path / "resaved")
    assert (tmp_path / "resaved" / "model.safetensors.index.json").is_file()
    _assert_same_weights(VideoNSAForConditionalGeneration.from_pretrained(tmp_path / "resaved"), model)

    # A plain Qwen2.5-VL model.safetensors beside a gated sharded save: the plain file is what loads, so its
    # missing gates are announced instead of silently initialised.
    testing.tiny_model(videonsa=False, seed=23).save_pretrained(tmp_path / "mixed")
    model.save_pretrained(tmp_path / "mixed", max_shard_size="100KB")
    VideoNSAForConditionalGeneration.from_pretrained(tmp_path / "mixed")
    assert any("no VideoNSA gates for all 2 layers" in m for m in message_log.messages), message_log.messages


@pytest.mark.parametrize("legacy", [False, True], ids=["current-layout", "legacy-layout"])
def test_saving_again_into_a_folder_replaces_its_weights_whatever_the_sharding(tmp_path, legacy):
    from videonsa.models.convert import save_current_layout, save_legacy_layout

    save = save_legacy_layout if legacy else save_current_layout
    old, new = testing.tiny_model(seed=24), testing.tiny_model(seed=25)
    save(old, tmp_path)
    save(new, tmp_path, max_shard_bytes=100_000)  # shards: the old model.safetensors would be loaded instead
    assert not (tmp_path / "model.safetensors").exists()
    _assert_same_weights(VideoNSAForConditionalGeneration.from_pretrained(tmp_path), new)
    save(old, tmp_path)  # one file again: no shards or index left to describe other weights
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    _assert_same_weights(VideoNSAForConditionalGeneration.from_pretrained(tmp_path), old)


def test_settings_changed_through_the_text_model_are_saved(tmp_path):
    from videonsa.models import set_attention_mode, set_sparsity

    model = testing.tiny_model(seed=26)
    set_sparsity(model.model.language_model, block_counts=3, window_size=12)
    set_attention_mode(model.model.language_model, "dense")
    model.save_pretrained(tmp_path)
    assert VideoNSAForConditionalGeneration.from_pretrained(tmp_path).sparse_settings == model.sparse_settings
