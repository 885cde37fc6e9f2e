"""What a training run shows and where it reports: worker processes that fit the machine, a loss line for every
step of a short run, lines with numbers rather than dicts of strings, TensorBoard when installed."""

from __future__ import annotations

import logging
import os

import pytest
import yaml
from training_helpers import train_overrides

from videonsa.cli import main
from videonsa.training import trainer as trainer_module
from videonsa.training.config import load_config
from videonsa.training.log_lines import describe_log
from videonsa.training.trainer import default_dataloader_workers, training_arguments


@pytest.mark.parametrize(("cpus", "processes", "workers"), [
    (1, 1, 0), (2, 1, 0), (3, 1, 2), (4, 1, 3), (8, 1, 4), (64, 1, 4), (16, 2, 4), (8, 4, 0), (12, 4, 2),
])
def test_default_workers_fit_the_cores_of_each_process(cpus, processes, workers):
    assert default_dataloader_workers(cpus, processes) == workers


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="needs os.sched_getaffinity")
@pytest.mark.parametrize(("cores", "workers"), [(2, 0), (8, 4)])
def test_the_recipe_picks_the_workers_for_this_machine(tmp_path, monkeypatch, cores, workers):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    config = load_config(None, {"model.path": str(tmp_path), "data.manifest": "m.jsonl",
                                "trainer.output_dir": str(tmp_path / "o"), "trainer.bf16": False}).validate()
    assert config.trainer["dataloader_num_workers"] == "auto"
    args = training_arguments(config)
    assert args.dataloader_num_workers == workers
    assert args.dataloader_persistent_workers == (workers > 0)


def test_report_to_auto_means_tensorboard_when_installed(tmp_path, monkeypatch):
    import transformers.integrations

    config = load_config(None, {"model.path": str(tmp_path), "data.manifest": "m.jsonl",
                                "trainer.output_dir": str(tmp_path / "o"), "trainer.bf16": False})
    monkeypatch.setattr(transformers.integrations, "is_tensorboard_available", lambda: False)
    assert training_arguments(config).report_to in ([], "none", ["none"])
    monkeypatch.setattr(transformers.integrations, "is_tensorboard_available", lambda: True)
    assert trainer_module.available_reporters() == ["tensorboard"]


def test_a_log_entry_reads_as_a_line_of_numbers():
    logs = {"loss": 5.58213, "grad_norm": 6.4681, "learning_rate": 0.003, "epoch": 0.3333,
            "data/samples_skipped": 0, "data/samples_trimmed": 1, "data/frames_dropped": 12, "data/frames_kept": 1234}
    assert describe_log(logs, 1, 6) == ("step 1/6  epoch 0.33  loss 5.5821  lr 0.003  grad norm 6.47  "
                                        "frames 1,234, dropped 12, samples trimmed 1")
    summary = {"train_runtime": 12.34, "train_samples_per_second": 4.5, "train_steps_per_second": 1.5,
               "train_loss": 0.0, "epoch": 1.0}
    assert describe_log(summary, 6, 6) == "training took 12.3s, 4.5 samples/s, 1.5 steps/s"


def test_a_short_run_logs_a_readable_loss_line_every_step(videonsa_checkpoint, colour_clips, tmp_path, capsys,
                                                          caplog):
    overrides = train_overrides(videonsa_checkpoint, colour_clips(3, frames=2), tmp_path / "run", max_steps=3,
                                logging_steps="auto", report_to="auto")
    nested: dict = {}
    for dotted, value in overrides.items():
        section, key = dotted.split(".", 1)
        nested.setdefault(section, {})[key] = value
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(nested))
    caplog.set_level(logging.INFO, logger="videonsa.training")
    assert main(["train", str(path), "--report-to", "none"]) == 0
    lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith("step ")]
    assert [line.split("  ")[0] for line in lines] == ["step 1/3", "step 2/3", "step 3/3"]
    for line in lines:
        assert "{" not in line and "'" not in line
        loss = line.split("loss ")[1].split()[0]
        assert float(loss) > 0
    assert "mean loss" in capsys.readouterr().out
