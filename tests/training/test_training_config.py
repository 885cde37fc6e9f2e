"""Training configuration: the recipe's defaults, files and overrides, the shipped launcher configs, CLI flags."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from videonsa.cli import main
from videonsa.errors import UserError
from videonsa.training.config import config_file, load_config, parse_override
from videonsa.training.trainer import training_arguments


def minimal(tmp_path, **extra) -> dict:
    return {"model.path": str(tmp_path), "data.manifest": "m.jsonl", "trainer.output_dir": str(tmp_path / "o"),
            **extra}


def test_recipe_defaults_are_the_papers(tmp_path):
    config = load_config(None, minimal(tmp_path, **{"trainer.bf16": False})).validate()
    args = training_arguments(config)
    assert (args.learning_rate, args.adam_beta1, args.adam_beta2) == (1e-6, 0.9, 0.999)
    assert args.weight_decay == 0.01 and args.max_grad_norm == 1.0
    assert str(args.lr_scheduler_type.value) == "cosine" and args.warmup_steps == 0.1
    assert args.per_device_train_batch_size == 1 and args.gradient_accumulation_steps == 4
    assert args.num_train_epochs == 1
    assert "adamw" in str(args.optim).lower()
    checkpointing = getattr(args, "activation_checkpointing", None) or args.gradient_checkpointing
    assert checkpointing
    assert not args.remove_unused_columns
    recipe = load_config(None, minimal(tmp_path))
    assert recipe.trainer["bf16"] is True
    assert all(vars(recipe.trainable).values())  # vision tower, projector, language model and gates
    assert recipe.data.sample_fps == 4.0 and recipe.data.max_pixels == 50176
    assert recipe.data.frames_as == "images" and recipe.data.max_tokens == 36864


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_a_config_file_overrides_the_recipe(tmp_path, suffix):
    settings = {"model": {"path": "ckpt", "sparse": {"block_counts": 16}}, "data": {"manifest": "a.jsonl"},
                "trainable": {"vision_tower": False}, "trainer": {"learning_rate": 2e-6, "output_dir": "out"}}
    path = tmp_path / f"train{suffix}"
    text = yaml.safe_dump(settings) if suffix == ".yaml" else json.dumps(settings)
    path.write_text(text.replace("2.0e-06", "2e-6"))  # as people write it
    config = load_config(path, {"trainer.save_steps": 7})
    assert config.trainer["learning_rate"] == 2e-6 and config.trainer["save_steps"] == 7
    assert config.trainer["gradient_accumulation_steps"] == 4  # untouched recipe value
    assert config.model.sparse == {"block_counts": 16}
    assert config.data.manifest == [str(tmp_path / "a.jsonl")]  # relative to the config file
    assert config.trainable.frozen() == ["vision_tower"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"modle": {}}, "unknown section 'modle'"),
        ({"data": {"fps": 2}}, "unknown setting data.fps"),
        ({"trainer": {"learning_rat": 1}}, "unknown setting trainer.learning_rat"),
        ({"trainer": [1, 2]}, "must be a mapping"),
    ],
)
def test_typos_are_errors_that_name_the_key(tmp_path, content, message):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(UserError, match=message):
        load_config(path)


@pytest.mark.parametrize(("flags", "key"), [(["--set", "trainer=5"], "trainer"),
                                           (["--set", "data=5", "--set", "data.manifest=m.jsonl"], "data")])
def test_a_section_set_to_a_non_mapping_is_refused_not_dropped(tmp_path, capsys, flags, key):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": {"path": "ckpt"}, "data": {"manifest": "m.jsonl"}}))
    # A later key of the section (--output-dir is trainer.output_dir) replaced the non-mapping by a mapping of that
    # key alone: the recipe's whole section was lost without a word.
    assert main(["train", str(config), *flags, "--output-dir", str(tmp_path / "out"), "--print-config"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"videonsa train: error: {key} must be a mapping") and "\n" not in error, error


def test_an_empty_section_keeps_the_recipes(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  path: ckpt\ntrainer:\n  # learning_rate: 2e-6\n")
    assert load_config(path).trainer["learning_rate"] == 1e-6


def test_validation_names_the_missing_pieces(tmp_path):
    with pytest.raises(UserError, match="model.path"):
        load_config().validate()
    with pytest.raises(UserError, match="data.manifest or data.annotations"):
        load_config(None, {"model.path": "x", "trainer.output_dir": "o"}).validate()
    with pytest.raises(UserError, match="nothing to train"):
        load_config(None, minimal(tmp_path, **{f"trainable.{part}": False for part in
                                                ("vision_tower", "projector", "language_model", "gates")})).validate()
    with pytest.raises(UserError, match="strategy"):
        load_config(None, minimal(tmp_path, strategy="zero4")).validate()


def test_bad_trainer_values_become_user_errors(tmp_path):
    config = load_config(None, minimal(tmp_path, **{"trainer.bf16": False, "trainer.fp16": True,
                                                     "trainer.lr_scheduler_type": "sideways"}))
    with pytest.raises(UserError, match="trainer settings"):
        training_arguments(config)


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="DeepSpeed is installed here")
def test_deepspeed_strategies_say_how_to_install_deepspeed(tmp_path):
    config = load_config(None, minimal(tmp_path, strategy="zero3", **{"trainer.bf16": False}))
    with pytest.raises(UserError, match=r"videonsa\[train\]"):
        training_arguments(config)


def test_fresh_gates_is_off_by_default_and_needs_the_videonsa_architecture(tmp_path):
    assert load_config(None, minimal(tmp_path)).model.fresh_gates is False
    config = load_config(None, minimal(tmp_path, **{"model.fresh_gates": True})).validate()
    assert config.model.fresh_gates is True and config.to_dict()["model"]["fresh_gates"] is True
    stock = load_config(None, minimal(tmp_path, **{"model.fresh_gates": True, "model.architecture": "qwen2_5_vl"}))
    with pytest.raises(UserError, match="model.fresh_gates needs model.architecture videonsa"):
        stock.validate()
    with pytest.raises(UserError, match="model.fresh_gates"):
        load_config(None, minimal(tmp_path, **{"model.fresh_gates": "yes"}))


def test_override_parsing():
    # YAML 1.1 reads 2e-5 (no dot) as a string; configs and overrides read it as the number users mean.
    assert parse_override("trainer.learning_rate=2e-5") == ("trainer.learning_rate", 2e-5)
    assert parse_override("trainer.save_steps=3") == ("trainer.save_steps", 3)
    assert isinstance(parse_override("trainer.save_steps=3")[1], int)
    assert parse_override("data.manifest=[a.jsonl, b.jsonl]") == ("data.manifest", ["a.jsonl", "b.jsonl"])
    with pytest.raises(UserError, match="section.key=value"):
        parse_override("learning_rate")


def test_shipped_launcher_configs_parse_and_say_what_they_are():
    zero2 = yaml.safe_load(config_file("accelerate_zero2.yaml").read_text())
    zero3 = yaml.safe_load(config_file("accelerate_zero3.yaml").read_text())
    fsdp2 = yaml.safe_load(config_file("accelerate_fsdp2.yaml").read_text())
    assert zero2["distributed_type"] == zero3["distributed_type"] == "DEEPSPEED"
    assert (zero2["deepspeed_config"]["zero_stage"], zero3["deepspeed_config"]["zero_stage"]) == (2, 3)
    assert fsdp2["distributed_type"] == "FSDP" and fsdp2["fsdp_config"]["fsdp_version"] == 2
    for name, stage in (("deepspeed_zero2.json", 2), ("deepspeed_zero3.json", 3)):
        deepspeed = json.loads(config_file(name).read_text())
        assert deepspeed["zero_optimization"]["stage"] == stage
        # The recipe owns these; "auto" lets the Trainer fill them in so they cannot disagree.
        for key in ("gradient_accumulation_steps", "gradient_clipping", "train_micro_batch_size_per_gpu"):
            assert deepspeed[key] == "auto"
        assert "optimizer" not in deepspeed and "scheduler" not in deepspeed


def test_cli_flags_reach_the_config(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": {"path": "ckpt"}, "data": {"manifest": "m.jsonl"}}))
    code = main(["train", str(config), "--output-dir", str(tmp_path / "out"), "--freeze", "vision_tower,projector",
                 "--max-steps", "9", "--set", "trainer.save_steps=3", "--print-config"])
    assert code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["output_dir"] == str(tmp_path / "out")
    assert printed["trainer"]["max_steps"] == 9 and printed["trainer"]["save_steps"] == 3
    assert printed["trainable"] == {"vision_tower": False, "projector": False, "language_model": True,
                                    "gates": True}
    assert main(["train", str(config), "--gates-only", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainable"] == {"vision_tower": False, "projector": False, "language_model": False,
                                    "gates": True}
    assert main(["train", str(config), "--freeze", "visual"]) == 2
    assert "unknown part 'visual'" in capsys.readouterr().err


def test_export_configs(tmp_path, capsys):
    assert main(["train", "--export-configs", str(tmp_path / "cfg")]) == 0
    names = sorted(path.name for path in (tmp_path / "cfg").iterdir())
    assert "recipe.yaml" in names and "accelerate_zero3.yaml" in names and "deepspeed_zero2.json" in names
    assert main(["train", "--export-configs", str(tmp_path / "cfg")]) == 2  # never overwrites
    assert "already exists" in capsys.readouterr().err


def write_yaml(path, content: dict):
    path.write_text(yaml.safe_dump(content))
    return path


def test_every_badly_typed_or_out_of_range_setting_is_reported_at_once(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {
        "model": {"path": "ckpt", "dtype": "float64"},
        "data": {"manifest": "m.jsonl", "sample_fps": "fast", "max_tokens": 0},
        "trainable": {"vision_tower": "false"},  # a string: would have been truthy
        "trainer": {"output_dir": "o", "learning_rate": -1e-6, "per_device_train_batch_size": 0,
                    "gradient_accumulation_steps": 0, "num_train_epochs": -1, "save_steps": "often"},
    })
    with pytest.raises(UserError) as caught:
        load_config(path)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    for field in ("model.dtype", "data.sample_fps", "data.max_tokens", "trainable.vision_tower",
                  "trainer.learning_rate", "trainer.per_device_train_batch_size",
                  "trainer.gradient_accumulation_steps", "trainer.num_train_epochs", "trainer.save_steps"):
        assert field in message, field
    assert "'false'" in message  # the offending value is shown


@pytest.mark.parametrize(("override", "value"), [
    ("model.sparse.block_size", 0), ("model.sparse.block_counts", "many"), ("model.sparse.blocks", 3),
    ("model.sparse.attention_mode", "sparse"), ("trainer.max_steps", 0), ("trainer.dataloader_num_workers", -2),
    ("data.min_pixels", 10), ("trainable.gates", 1), ("trainer.bf16", "yes"), ("trainer.learning_rate", float("nan")),
    ("data.sample_fps", float("inf")),
])
def test_single_bad_values_name_their_setting(tmp_path, override, value):
    with pytest.raises(UserError, match=override.replace(".", r"\.")):
        load_config(None, minimal(tmp_path, **{override: value}))


def test_numbers_written_as_integers_are_accepted_where_floats_belong(tmp_path):
    config = load_config(None, minimal(tmp_path, **{"data.sample_fps": 2, "trainer.learning_rate": 1,
                                                     "trainer.max_steps": -1}))
    assert config.data.sample_fps == 2 and config.trainer["learning_rate"] == 1


def test_all_problems_of_a_config_are_listed_together(tmp_path):
    config = load_config(None, {"trainable.gates": False, "trainable.vision_tower": False,
                                "trainable.projector": False, "trainable.language_model": False})
    with pytest.raises(UserError) as caught:
        config.validate()
    message = str(caught.value)
    for part in ("model.path", "data.manifest or data.annotations", "nothing to train", "trainer.output_dir"):
        assert part in message, part


def test_a_yaml_alias_bomb_is_refused_quickly(tmp_path):
    # Ten levels of ten aliases each: 10**10 strings once expanded (saving the config record would never end).
    levels = ['&a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    levels += [f"&a{level} [{', '.join([f'*a{level - 1}'] * 10)}]" for level in range(1, 10)]
    path = tmp_path / "bomb.yaml"
    path.write_text(f"trainer: {{output_dir: o, run_name: [{', '.join(levels)}]}}\n")
    import time

    start = time.monotonic()
    with pytest.raises(UserError, match="bomb.yaml"):
        load_config(path)
    assert time.monotonic() - start < 5


def test_recursive_and_deeply_nested_yaml_is_a_user_error(tmp_path):
    recursive = tmp_path / "loop.yaml"
    recursive.write_text("model: &m {path: x, sparse: *m}\n")
    with pytest.raises(UserError, match="loop.yaml"):
        load_config(recursive)
    deep = tmp_path / "deep.yaml"
    deep.write_text("trainer: " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(UserError, match="deep.yaml"):
        load_config(deep)


def test_relative_paths_in_a_config_file_resolve_against_its_folder(tmp_path, monkeypatch):
    folder = tmp_path / "project" / "configs"
    folder.mkdir(parents=True)
    path = write_yaml(folder / "train.yaml", {
        "model": {"path": "../ckpt", "tokenizer": "~/tok"},
        "data": {"annotations": ["../data/a.jsonl"], "media_root": "../media"},
        "trainer": {"output_dir": "runs/x"},
    })
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(path, {"data.media_root": "here/media"})
    project = tmp_path / "project"
    assert config.model.path == str(project / "ckpt")
    assert config.model.tokenizer == str(Path("~/tok").expanduser())
    assert config.data.annotations == [str(project / "data" / "a.jsonl")]
    assert config.trainer["output_dir"] == str(folder / "runs" / "x")
    # Command-line values are relative to where the command runs.
    assert config.data.media_root == str(elsewhere / "here" / "media")
