"""Which attention mode a checkpoint runs by default: the released checkpoint's layout runs "official" and says so
in one line, this package's checkpoints run the mode they record ("nsa" unless changed), an explicit choice
always wins, through `from_pretrained`, conversion and `videonsa.load`."""

from __future__ import annotations

import json
import logging

import pytest

import videonsa.inference
from videonsa import UserError, testing
from videonsa.inference.model_files import check_attention, open_model_files, resolve_attention
from videonsa.models import VideoNSAForConditionalGeneration
from videonsa.models.checkpoints import checkpoint_attention_mode
from videonsa.models.convert import convert_checkpoint

RELEASED_NOTICE = "released-checkpoint layout, running attention_mode='official'"


def released_like(path):
    """A tiny checkpoint shaped as Enxin/VideoNSA is published: legacy flat keys with gates, a qwen2_5_vl config
    with the sparse settings at the top level and no attention_mode."""
    testing.save_tiny_checkpoint(path, legacy_layout=True, seed=21)
    config = json.loads((path / "config.json").read_text())
    text = config["text_config"]
    text.pop("attention_mode")
    for key in ("block_counts", "window_size"):
        config[key] = text.pop(key)
    (path / "config.json").write_text(json.dumps(config))
    return path


def notices(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if "attention_mode='official'" in record.getMessage()]


@pytest.fixture
def released(tmp_path):
    return released_like(tmp_path / "released")


def test_released_layout_loads_in_official_mode_with_one_line(released, caplog):
    with caplog.at_level(logging.INFO):
        model = VideoNSAForConditionalGeneration.from_pretrained(released)
    assert model.sparse_settings.mode == "official"
    assert (model.sparse_settings.block_count, model.sparse_settings.window_size) == (2, 8)
    (line,) = notices(caplog)
    assert line == (f"{released}: {RELEASED_NOTICE} (the function it was trained with); pass attention_mode='nsa' "
                    "(--attention nsa on the command line) "
                    "for the corrected NSA")
    assert checkpoint_attention_mode(released).source == "released-layout"


@pytest.mark.parametrize("mode", ["nsa", "dense"])
def test_an_explicit_mode_wins_without_a_notice(released, caplog, mode):
    with caplog.at_level(logging.INFO):
        model = VideoNSAForConditionalGeneration.from_pretrained(released, attention_mode=mode)
    assert model.sparse_settings.mode == mode and not notices(caplog)


@pytest.mark.parametrize("legacy_layout", [False, True])
def test_our_checkpoints_load_in_the_mode_they_record(tmp_path, caplog, legacy_layout):
    path = testing.save_tiny_checkpoint(tmp_path / "ours", legacy_layout=legacy_layout, seed=22)
    with caplog.at_level(logging.INFO):
        assert VideoNSAForConditionalGeneration.from_pretrained(path).sparse_settings.mode == "nsa"
    assert not notices(caplog)
    assert checkpoint_attention_mode(path).source == "config"


def test_a_plain_qwen_checkpoint_in_the_legacy_layout_loads_in_nsa_mode(tmp_path, caplog):
    path = testing.save_tiny_checkpoint(tmp_path / "qwen", videonsa=False, legacy_layout=True, seed=23)
    with caplog.at_level(logging.INFO):
        assert VideoNSAForConditionalGeneration.from_pretrained(path).sparse_settings.mode == "nsa"
    assert not notices(caplog)
    assert checkpoint_attention_mode(path).source == "default"


@pytest.mark.parametrize("legacy_layout", [False, True])
def test_converting_the_released_checkpoint_keeps_official_mode_in_its_config(released, tmp_path, caplog,
                                                                               legacy_layout):
    converted = convert_checkpoint(released, tmp_path / "converted", legacy_layout=legacy_layout)
    assert json.loads((converted / "config.json").read_text())["text_config"]["attention_mode"] == "official"
    caplog.clear()
    with caplog.at_level(logging.INFO):
        model = VideoNSAForConditionalGeneration.from_pretrained(converted)
    assert model.sparse_settings.mode == "official"
    (line,) = notices(caplog)
    assert line.startswith(f"{converted}: config.json records it, running attention_mode='official'")
    # Converted with an explicit mode, the checkpoint records that one.
    explicit = convert_checkpoint(released, tmp_path / "as-nsa", attention_mode="nsa")
    assert VideoNSAForConditionalGeneration.from_pretrained(explicit).sparse_settings.mode == "nsa"


def test_resolve_attention_tells_the_mode_and_where_it_came_from(released, tmp_path):
    files = open_model_files(str(released))
    auto = resolve_attention(files)
    assert (auto.mode, auto.from_checkpoint, auto.source) == ("official", True, "released-layout")
    assert auto.notice.startswith(f"{released}: {RELEASED_NOTICE}")
    explicit = resolve_attention(files, "nsa")
    assert (explicit.mode, explicit.from_checkpoint, explicit.source, explicit.notice) == ("nsa", False, "user", None)

    ours = open_model_files(str(testing.save_tiny_checkpoint(tmp_path / "ours", seed=24)))
    assert resolve_attention(ours) == resolve_attention(ours, "auto")
    assert (resolve_attention(ours).mode, resolve_attention(ours).notice) == ("nsa", None)


def test_load_with_auto_attention_follows_the_checkpoint_and_says_so_once(released, caplog):
    with caplog.at_level(logging.INFO):
        model = videonsa.inference.load(str(released), attention="auto", device="cpu")
    assert model.attention == "official"
    (line,) = notices(caplog)
    assert line.startswith(f"{released}: {RELEASED_NOTICE}")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert videonsa.inference.load(str(released), attention="nsa", device="cpu").attention == "nsa"
    assert not notices(caplog)


def test_attention_setting_names():
    for name in ("auto", "nsa", "dense", "official"):
        assert check_attention(name) == name
    with pytest.raises(UserError, match="attention must be one of auto, nsa, dense, official, got 'sparse'"):
        check_attention("sparse")


def test_a_checkpoint_recording_an_unknown_mode_is_named(tmp_path):
    path = testing.save_tiny_checkpoint(tmp_path / "odd", seed=25)
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["attention_mode"] = "sparse"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="config.json records attention_mode 'sparse'"):
        resolve_attention(open_model_files(str(path)))
