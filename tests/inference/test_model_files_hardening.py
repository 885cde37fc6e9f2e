"""Broken model folders are refused with one line naming the file, before any weight is loaded or any frame is
decoded: implausible or malformed config.json, config and weights that disagree, truncated or garbage
safetensors, pickle-format weights (never unpickled). Checked through `videonsa.load`, `videonsa ask` and
`videonsa convert`."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

import videonsa.inference
from videonsa import cli
from videonsa.errors import UserError


def _edit_config(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        result = change(config)
        (folder / "config.json").write_text(json.dumps(config if result is None else result))

    return apply


def _set(section: str | None, **values) -> Callable[[Path], None]:
    def change(config: dict) -> None:
        (config[section] if section else config).update(values)

    return _edit_config(change)


def _set_processor(**values) -> Callable[[Path], None]:
    def apply(folder: Path) -> None:
        processor = json.loads((folder / "preprocessor_config.json").read_text())
        processor.update(values)
        (folder / "preprocessor_config.json").write_text(json.dumps(processor))

    return apply


def _truncate(folder: Path) -> None:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])


def _garbage(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(b"\x93NUMPY not safetensors at all" * 100)


class _Trap:
    """Unpickling this creates the file `marker`: proof that a weight file was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _pickle_only(folder: Path) -> None:
    (folder / "model.safetensors").unlink()
    with open(folder / "pytorch_model.bin", "wb") as handle:
        pickle.dump({"weights": _Trap(folder / "UNPICKLED")}, handle)


def _index_with_missing_shard(folder: Path) -> None:
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


BROKEN = {
    "config_is_a_list": (_edit_config(lambda c: [c]), r"config\.json must hold a JSON object"),
    "config_is_empty": (_edit_config(lambda c: {}), r"config\.json.*hidden_size: missing"),
    "layers_1e6": (_set("text_config", num_hidden_layers=1e6), r"num_hidden_layers: .*integer"),
    "layers_a_million": (_set("text_config", num_hidden_layers=1_000_000), r"num_hidden_layers: .*less than or equal"),
    "hidden_zero": (_set("text_config", hidden_size=0), r"text_config\.hidden_size: .*greater than 0"),
    "hidden_a_string": (_set("text_config", hidden_size="64"), r"text_config\.hidden_size: .*integer"),
    "heads_negative": (_set("text_config", num_attention_heads=-4), r"num_attention_heads: .*greater than 0"),
    "heads_do_not_divide": (_set("text_config", num_attention_heads=3), r"hidden_size 64 is not a multiple of"),
    "kv_heads_do_not_divide": (_set("text_config", num_key_value_heads=3), r"num_attention_heads 4 is not a mult"),
    "vision_a_list": (_set(None, vision_config=[1, 2]), r"vision_config: .*(object|dictionary)"),
    "vision_depth_zero": (_set("vision_config", depth=0), r"vision_config\.depth: .*greater than 0"),
    "video_token_beyond_vocab": (_set(None, video_token_id=10_000), r"video_token_id 10000 is not below vocab_size"),
    "more_layers_than_weights": (
        _set("text_config", num_hidden_layers=3, layer_types=["full_attention"] * 3), r"says 3 text layers.* hold 2"
    ),
    "layer_types_disagree": (_set("text_config", num_hidden_layers=3), r"config\.json: not a usable.*layer_types"),
    "other_mlp_width": (_set("text_config", intermediate_size=96), r"mlp\.gate_proj\.weight.*\[96, 64\].*\[128, 64\]"),
    "vision_width_differs": (_set("vision_config", out_hidden_size=32), r"out_hidden_size 32 differs from the text"),
    "mrope_sections": (
        _edit_config(lambda c: c["text_config"]["rope_parameters"].update(mrope_section=[2, 3, 4])),
        r"mrope_section \[2, 3, 4\] sums to 9, not half the head dimension 16",
    ),
    "block_size_zero": (_set("text_config", block_size=0), r"config\.json: block_size must be positive"),
    "image_mean_of_two_channels": (
        _set_processor(image_mean=[0.5, 0.5]), r"preprocessor_config\.json: image_mean must be 3 finite numbers"
    ),
    "image_mean_a_string": (_set_processor(image_mean="abc"), r"preprocessor_config\.json: image_mean must be 3"),
    "image_std_zero": (_set_processor(image_std=[0.2, 0, 0.2]), r"preprocessor_config\.json: image_std must be pos"),
    "truncated_weights": (_truncate, r"model\.safetensors: not a readable safetensors file .*truncated"),
    "garbage_weights": (_garbage, r"model\.safetensors: not a readable safetensors file"),
    "pickle_weights": (_pickle_only, r"pytorch_model\.bin.*pickle.*safetensors"),
    "index_missing_shard": (_index_with_missing_shard, r"model-00002-of-00002\.safetensors.*missing"),
}


@pytest.fixture
def broken(inputs, tmp_path, request) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(inputs.checkpoint, folder)
    BROKEN[request.param][0](folder)
    return folder


def _one_line(text: str) -> str:
    assert "\n" not in text.strip() and "Traceback" not in text, text
    return text


@pytest.mark.parametrize("broken", list(BROKEN), indirect=True)
def test_load_refuses_a_broken_model_folder_in_one_line(broken: Path, request) -> None:
    case = request.node.callspec.params["broken"]
    with pytest.raises(UserError, match=BROKEN[case][1]) as raised:
        videonsa.inference.load(str(broken), device="cpu")
    _one_line(str(raised.value))
    assert not (broken / "UNPICKLED").exists()


@pytest.mark.parametrize("broken", ["config_is_empty", "layers_1e6", "truncated_weights", "pickle_weights",
                                    "other_mlp_width", "image_mean_of_two_channels"], indirect=True)
def test_ask_refuses_it_before_the_video_is_read(broken: Path, request, capsys, tmp_path) -> None:
    """The video does not even exist: the model folder's fault is found first."""
    case = request.node.callspec.params["broken"]
    code = cli.main(["ask", "--model", str(broken), "--video", str(tmp_path / "absent.mp4"), "--device", "cpu", "Q?"])
    err = capsys.readouterr().err
    assert code == 2
    assert "absent.mp4" not in err and _one_line(err)
    assert re.search(BROKEN[case][1], err), err
    assert not (broken / "UNPICKLED").exists()


@pytest.mark.parametrize("broken", ["config_is_a_list", "layers_a_million", "garbage_weights", "pickle_weights",
                                    "more_layers_than_weights"], indirect=True)
def test_convert_refuses_it_and_writes_nothing(broken: Path, request, capsys, tmp_path) -> None:
    case = request.node.callspec.params["broken"]
    code = cli.main(["convert", str(broken), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and _one_line(err)
    assert re.search(BROKEN[case][1], err), err
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []
    assert not (broken / "UNPICKLED").exists()


def test_pickle_weights_beside_safetensors_are_ignored_never_unpickled(inputs, tmp_path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(inputs.checkpoint, folder)
    with open(folder / "pytorch_model.bin", "wb") as handle:
        pickle.dump({"weights": _Trap(folder / "UNPICKLED")}, handle)
    model = videonsa.inference.load(str(folder), device="cpu")
    assert model is not None and not (folder / "UNPICKLED").exists()


def test_one_number_stands_for_every_channel_of_a_pixel_statistic(inputs, tmp_path) -> None:
    folder = tmp_path / "model"
    shutil.copytree(inputs.checkpoint, folder)
    _set_processor(image_mean=0.5, image_std=[0.25, 0.5, 1])(folder)
    files = videonsa.inference.open_model_files(str(folder))
    assert files.image_mean == (0.5, 0.5, 0.5) and files.image_std == (0.25, 0.5, 1.0)
