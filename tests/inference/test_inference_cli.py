"""`videonsa ask` end to end on a tiny checkpoint, and one clean error line for every bad input."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from videonsa import cli, testing
from videonsa.inference import model_files
from videonsa.video import synthetic

TINY_FLAGS = ["--pixels", "3136", "--min-pixels", "3136", "--device", "cpu"]


def ask(inputs, *extra: str, video: Path | str | None = None, model: Path | str | None = None) -> list[str]:
    """argv for `videonsa ask` on the tiny checkpoint and clip (or the given video / model)."""
    return [
        "ask",
        "--model", str(model or inputs.checkpoint),
        "--video", str(video or inputs.video),
        *TINY_FLAGS,
        *extra,
    ]  # fmt: skip


def test_videonsa_ask_runs_end_to_end_in_a_subprocess(inputs):
    command = [sys.executable, "-m", "videonsa.cli", *ask(inputs, "--max-new-tokens", "5", "What moves?")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env={**os.environ, "NO_COLOR": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.endswith("\n") and len(result.stdout.splitlines()) == 1  # the answer, on stdout only
    lines = result.stderr.splitlines()
    plan_line = next(line for line in lines if line.startswith("plan "))
    report_line = next(line for line in lines if line.startswith("report "))
    assert lines.index(plan_line) < lines.index(report_line)
    assert re.search(r"^plan\s+8 frames every 0\.30s at 56x56 \(2 tokens per frame\) = 16 video tokens \+", plan_line)
    planned_text = int(re.search(r"\+ (\d+) text tokens", plan_line).group(1))
    prompt_tokens = int(re.search(r"(\d+) prompt tokens \(16 video\)", report_line).group(1))
    assert prompt_tokens == planned_text - 5 + 16  # the plan reserved the 5 answer tokens
    assert re.search(r"prefill \d+\.\d+s, decode", report_line) and "[attention nsa]" in report_line


def test_a_reader_that_goes_away_stops_ask_quietly(inputs):
    # `videonsa ask ... | head -c 1`: the reader has closed the pipe before the answer comes.
    command = [sys.executable, "-m", "videonsa.cli", *ask(inputs, "--max-new-tokens", "5", "What moves?")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "NO_COLOR": "1"})
    process.stdout.close()
    _, err = process.communicate(timeout=600)
    assert process.returncode == 141, err
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_multiple_choice_prints_the_letter(inputs, capsys):
    # --question keeps the question out of --options' reach, whatever the order.
    code = cli.main(ask(inputs, "--attention", "dense", "--options", "square", "disc", "line", "--question", "What?"))
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.strip() in {"A", "B", "C"}
    assert re.search(rf"^choice {out.strip()} \(A 0\.\d\d, B 0\.\d\d, C 0\.\d\d\)$", err, re.MULTILINE)
    assert "[attention dense]" in err


@pytest.fixture(scope="module")
def bad_videos(tmp_path_factory, inputs):
    folder = tmp_path_factory.mktemp("bad-videos")
    mkv = synthetic.write_video(folder / "good.mkv", frame_count=60, fps=25)
    text = folder / "notes.mp4"
    text.write_text("not a video\n" * 20)
    giant = folder / "giant"
    giant.mkdir()
    for index in range(2):  # PNG headers declaring 12000x9000 (108 Mpx) with almost no data
        synthetic.write_png_header_only(giant / f"{index}.png", 12_000, 9_000)
    return {
        "missing": folder / "missing.mp4",
        "not a video": text,
        "truncated": synthetic.truncated_copy(inputs.video, folder / "cut.mp4", keep_fraction=0.6),
        "corrupt": synthetic.corrupted_copy(mkv, folder / "noise.mkv", start_fraction=0.3),
        "audio only": synthetic.write_audio_only(folder / "tone.m4a", seconds=0.5),
        "zero frames": synthetic.undecodable_copy(mkv, folder / "noise-frames.mkv"),
        "single frame": synthetic.write_video(folder / "one.mp4", frame_count=1, fps=25),
        "enormous": giant,
    }


@pytest.fixture
def weights_must_not_load(monkeypatch):
    """Bad inputs must be caught before the weights load: loading them fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(model_files, "load_weights", refuse)


def run_and_get_error(argv: list[str], capsys) -> str:
    """Run the CLI, check it fails with exit 2, no stdout and exactly one error line; return that line.

    A mistake found while decoding comes after the video and plan lines, which print before decoding starts.
    """
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 2, err
    assert out == ""
    lines = err.splitlines()
    while lines and lines[0].startswith(("video  ", "plan   ")):
        lines.pop(0)
    assert len(lines) == 1, err
    assert lines[0].startswith("videonsa ask: error: ")
    assert "Traceback" not in err
    return lines[0].removeprefix("videonsa ask: error: ")


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("missing", "no such file or folder"),
        ("not a video", "cannot be opened as a video"),
        ("truncated", "truncated"),
        ("corrupt", "corrupt"),
        ("audio only", "has audio but no video stream"),
        ("zero frames", "no decodable frames"),
        ("single frame", "single video frame"),
        ("enormous", "enormous"),
    ],
)
def test_bad_videos_give_one_line_naming_the_file(bad_videos, inputs, case, expected, capsys, weights_must_not_load):
    video = bad_videos[case]
    message = run_and_get_error(ask(inputs, "What moves?", video=video), capsys)
    assert str(video) in message and expected in message


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--budget", "100"], r"^--budget=100 is too small: the text needs \d+ tokens"),
        (["--fps", "0"], r"^--fps must be a positive number"),
        (["--max-new-tokens", "0"], r"^--max-new-tokens must be at least 1"),
        (["--pixels", "1000"], r"^--pixels \(1000\) is below --min-pixels \(3136\)"),
        (["--frames-fps", "-1"], r"^--frames-fps must be a positive frame rate"),
        (["--options", "only one"], r"^options: give at least 2 choices"),
        (["--question", "Again?"], r"^give the question once"),
        (["--device", "tpu"], r"^device 'tpu' is not a device name"),
        (["--dtype", "int4"], r"^dtype 'int4' is not one of"),
    ],
)
def test_bad_settings_give_one_line_naming_the_flag(inputs, flags, expected, capsys, weights_must_not_load):
    message = run_and_get_error(ask(inputs, "What moves?", *flags), capsys)
    assert re.search(expected, message), message


def test_a_device_budget_too_small_is_not_blamed_on_budget(inputs, capsys, monkeypatch, weights_must_not_load):
    # On a GPU without --budget the budget is what fits its free memory: too small, the line must not name a
    # --budget the user never gave. (The CPU has no device budget: the GPU's is given here.)
    import videonsa.inference.memory as memory

    monkeypatch.setattr(memory, "default_budget_tokens", lambda *args, **kwargs: 100)
    monkeypatch.setattr(memory, "free_memory", lambda device: 2**30)
    message = run_and_get_error(ask(inputs, "What moves?"), capsys)
    assert message.startswith("the budget 100 is too small: the text needs"), message
    assert message.endswith("(the budget is what fits cpu's free memory: free some, or pass --budget)")


def test_a_question_swallowed_by_options_is_asked_for(inputs, capsys, weights_must_not_load):
    argv = ask(inputs, "--options", "square", "disc", "What moves?")
    assert run_and_get_error(argv, capsys).startswith("give the question: as the last argument (before --options)")


def test_bad_models_give_one_line_naming_the_model(inputs, tmp_path, capsys, monkeypatch, weights_must_not_load):
    message = run_and_get_error(ask(inputs, "What moves?", model=tmp_path / "nowhere"), capsys)
    assert message == f"model '{tmp_path / 'nowhere'}': no such directory"
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    message = run_and_get_error(ask(inputs, "What moves?", model="videonsa-tests/no-such-model"), capsys)
    assert message.startswith("model 'videonsa-tests/no-such-model': cannot download it from the Hugging Face Hub")


@pytest.mark.parametrize(
    ("template", "why"),
    [("{% for x in %}", "Expected an expression"), ('{{ raise_exception("no videos here") }}', "no videos here")],
)
def test_a_broken_chat_template_is_one_line_before_the_video_is_read(
    inputs, tmp_path, capsys, weights_must_not_load, template, why
):
    folder = tmp_path / "model"
    shutil.copytree(inputs.checkpoint, folder)
    (folder / "chat_template.jinja").write_text(template)
    message = run_and_get_error(ask(inputs, "What moves?", model=folder, video=tmp_path / "absent.mp4"), capsys)
    assert message.startswith(f"model '{folder}': its chat template cannot render the question (") and why in message


def test_hub_id_offline_in_a_fresh_process(inputs, tmp_path):
    """The real path: a new process with no network access to the Hub (HF_HUB_OFFLINE) and an empty cache."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    command = [sys.executable, "-m", "videonsa.cli", *ask(inputs, "What moves?", model="Enxin/VideoNSA")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "videonsa ask: error: model 'Enxin/VideoNSA': cannot download it from the Hugging Face Hub "
        "(HF_HUB_OFFLINE is set) and it is not in the local cache; pass a local model directory instead"
    ]


def test_fresh_gates_lets_a_partly_gated_checkpoint_answer(inputs, tmp_path, capsys):
    folder = testing.save_tiny_checkpoint(tmp_path / "partly-gated", seed=5)
    assert testing.drop_layer_gates(folder, layer=1) == 4
    argv = ask(inputs, "--max-new-tokens", "2", "What moves?", model=folder)
    capsys.readouterr()

    assert cli.main(argv) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after the plan: the gates are read with the weights
    assert error.startswith("videonsa ask: error: ") and "Traceback" not in error
    assert "missing for layer(s) 1 of 2" in error and "--fresh-gates" in error
    assert cli.main([*argv, "--fresh-gates"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 1 and re.search(r"^report .*\[attention nsa\]", err, re.MULTILINE), err
