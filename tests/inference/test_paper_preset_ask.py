"""The paper preset through the prompt, the model inputs, `videonsa.load(...).ask` and `videonsa ask`, on the tiny
checkpoint: the evaluation's prompt layout, 1.0 s per temporal patch reaching the model, greedy decoding, the
preset chosen by the checkpoint's attention mode, and one clear line for every bad preset setting."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

from videonsa import cli, testing
from videonsa.errors import UserError
from videonsa.inference import model_files
from videonsa.inference.api import plan_question
from videonsa.inference.prompt import build_preset_prompt, model_inputs
from videonsa.video import SamplingSettings, decode_video
from videonsa.video.paper import PaperSettings, decode_planned_video

SMALL = dict(min_pixels=56 * 56, max_pixels=56 * 56)
SMALL_FLAGS = ["--min-pixels", "3136", "--max-pixels", "3136", "--device", "cpu"]
# A chat template with no default system turn, so that the system turn of a prompt is the preset's own.
PLAIN_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'video' -%}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- else -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)
PAPER_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>What is shown?<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def test_paper_prompt_is_system_then_video_then_text(loaded):
    plain = dataclasses.replace(loaded.files, chat_template=PLAIN_TEMPLATE)
    assert build_preset_prompt(plain, "<image>What is shown?", preset="paper").text == PAPER_PROMPT
    assert build_preset_prompt(plain, "What is shown?").text == PAPER_PROMPT.split("\n", 1)[1].split("\n", 1)[1]
    assert build_preset_prompt(loaded.files, "What is shown?", preset="paper").text == PAPER_PROMPT


def test_paper_prompt_keeps_our_options_format(loaded):
    prompt = build_preset_prompt(loaded.files, "Which?", ["red", "blue"], preset="paper")
    assert prompt.letters == ("A", "B")
    assert prompt.text.endswith(
        "<|vision_end|>Which?\nOptions:\nA. red\nB. blue\n"
        "Answer with the option's letter from the given choices directly.<|im_end|>\n<|im_start|>assistant\n"
    )


def test_model_inputs_get_one_second_per_temporal_patch(loaded, inputs):
    """At 8 fps the frames of clip.mp4 are ~0.28 s per pair apart; the paper preset still says 1.0."""
    paper = plan_question(loaded.files, inputs.video, "When?", preset="paper", paper=PaperSettings(fps=8, **SMALL))
    video = decode_planned_video(paper.plan)
    assert paper.plan.frame_count == 18 and video.seconds_per_patch == pytest.approx(0.28, abs=0.02)
    assert model_inputs(paper.prompt, video, loaded.files)["second_per_grid_ts"].tolist() == [1.0]
    planner_settings = SamplingSettings(fps=8, pixels_per_frame=3136, min_pixels_per_frame=3136)
    planner = plan_question(loaded.files, inputs.video, "When?", sampling=planner_settings)
    planner_video = decode_video(planner.plan)
    batch = model_inputs(planner.prompt, planner_video, loaded.files)
    assert batch["second_per_grid_ts"].tolist() == pytest.approx([planner_video.seconds_per_patch])


def test_one_second_per_patch_reaches_the_model_and_its_time_positions(loaded, inputs):
    prefill = []

    def remember(module, args, kwargs):
        if not prefill:  # the first call of generate is the prompt's prefill
            prefill.append(kwargs)

    handle = loaded.model.register_forward_pre_hook(remember, with_kwargs=True)
    try:
        answer = loaded.ask(inputs.video, "What moves?", preset="paper", max_new_tokens=2, **SMALL)
    finally:
        handle.remove()
    assert answer.plan.preset == "paper"
    assert prefill[0]["second_per_grid_ts"].tolist() == [1.0]
    planned = plan_question(loaded.files, inputs.video, "What moves?", preset="paper", paper=PaperSettings(**SMALL))
    batch = model_inputs(planned.prompt, decode_planned_video(planned.plan), loaded.files)
    assert torch.equal(batch["input_ids"], prefill[0]["input_ids"].cpu())
    positions, _ = loaded.model.model.get_rope_index(
        input_ids=batch["input_ids"],
        mm_token_type_ids=batch["mm_token_type_ids"],
        video_grid_thw=batch["video_grid_thw"],
        second_per_grid_ts=batch["second_per_grid_ts"],
        attention_mask=batch["attention_mask"],
    )
    temporal = positions[0, 0][batch["mm_token_type_ids"][0] == 2].view(int(batch["video_grid_thw"][0, 0]), -1)
    per_second = loaded.files.tokens_per_second  # 2: one temporal patch = 1.0 s = 2 time positions
    assert (temporal == temporal[:, :1]).all()
    assert (temporal[:, 0] - temporal[0, 0]).tolist() == [k * per_second for k in range(4)]


def test_paper_answers_are_greedy_and_repeat(loaded, inputs):
    first = loaded.ask(inputs.video, "What moves?", preset="paper", max_new_tokens=4, **SMALL)
    again = loaded.ask(inputs.video, "What moves?", preset="paper", max_new_tokens=4, seed=3, **SMALL)
    assert first.text == again.text and first.report.frames == 8
    choice = loaded.ask(inputs.video, "What moves?", options=["a square", "a disc"], preset="paper", **SMALL)
    assert choice.choice in {"A", "B"} and choice.report.generated_tokens == 1


def test_the_planner_stays_the_default_for_our_checkpoints(loaded, inputs):
    assert loaded.attention == "nsa"
    plan = loaded.plan(inputs.video, "What moves?", pixels_per_frame=3136, min_pixels_per_frame=3136)
    assert plan.preset == "planner" and plan.second_per_grid_ts is None


@pytest.mark.parametrize(
    ("settings", "error", "message"),
    [
        (dict(preset="paper", budget_tokens=1000), UserError, "budget_tokens is a setting of the planner preset"),
        (dict(preset="paper", prefer="frames"), UserError, "prefer is a setting of the planner preset"),
        (dict(preset="planner", max_pixels=3136), UserError, "max_pixels is a setting of the paper preset"),
        (dict(preset="paper", sampling=SamplingSettings()), UserError, "the paper preset takes paper=PaperSettings"),
        (dict(preset="planner", paper=PaperSettings()), UserError, "pass preset='paper'"),
        (dict(preset="paper", temperature=0.7), UserError, "the paper preset decodes greedily"),
        (dict(preset="paper", max_frames=1), UserError, "max_frames must be at least 2"),
        (dict(preset="paper", max_pixels=0), UserError, "max_pixels must be positive"),
        (dict(preset="papers"), UserError, "preset must be one of auto, paper, planner, got 'papers'"),
        (dict(preset="paper", max_pixel=3136), TypeError, "unknown setting"),
    ],
)
def test_bad_preset_settings_in_python(loaded, inputs, settings, error, message):
    with pytest.raises(error, match=re.escape(message)):
        loaded.plan(inputs.video, "What moves?", **settings)


# ---------------------------------------------------------------- the command line


def ask_argv(inputs, *extra: str, model=None) -> list[str]:
    return ["ask", "--model", str(model or inputs.checkpoint), "--video", str(inputs.video), *extra]


def test_videonsa_ask_preset_paper_end_to_end(inputs, capsys):
    code = cli.main(ask_argv(inputs, "--preset", "paper", *SMALL_FLAGS, "--max-new-tokens", "3", "What moves?"))
    out, err = capsys.readouterr()
    assert code == 0, err
    assert len(out.splitlines()) == 1
    plan = next(line for line in err.splitlines() if line.startswith("plan "))
    assert re.fullmatch(
        r"plan\s+8 of 60 frames \(indices 0, 8, 17, \.\.\., 59\) at 56x56 \(2 tokens per frame\) = 16 video tokens "
        r"\+ \d+ text tokens = \d+; fps 4, max_frames 32, min_pixels 3,136, max_pixels 3,136 \(cap 3,136\), "
        r"1\.0 s per temporal patch \[preset paper\]",
        plan,
    )
    assert re.search(r"^report 8 frames at 56x56, \d+ prompt tokens \(16 video\)", err, re.MULTILINE)


def test_videonsa_ask_says_when_the_planner_ran(inputs, capsys):
    flags = ["--pixels", "3136", "--min-pixels", "3136", "--device", "cpu", "--max-new-tokens", "2"]
    code = cli.main(ask_argv(inputs, *flags, "What moves?"))
    _, err = capsys.readouterr()
    assert code == 0, err
    assert re.search(r"^plan\s+8 frames every .* of 131,072 \[preset planner\]$", err, re.MULTILINE)


@pytest.fixture(scope="module")
def released_layout(tmp_path_factory):
    """A tiny checkpoint laid out as the released Enxin/VideoNSA: legacy flat keys, no recorded attention mode."""
    path = testing.save_tiny_checkpoint(tmp_path_factory.mktemp("released") / "tiny", legacy_layout=True)
    config = json.loads((path / "config.json").read_text())
    config.pop("attention_mode", None)
    config.get("text_config", {}).pop("attention_mode", None)
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_the_released_layout_runs_the_paper_preset_by_default(inputs, released_layout, capsys):
    code = cli.main(ask_argv(inputs, *SMALL_FLAGS, "--max-new-tokens", "2", "What moves?", model=released_layout))
    _, err = capsys.readouterr()
    assert code == 0, err
    assert re.search(r"^plan .*\[preset paper\]$", err, re.MULTILINE)
    assert re.search(r"^note .*running attention_mode='official'", err, re.MULTILINE)
    assert "[attention official]" in err
    # An explicit attention mode other than official brings back the planner (and its flags).
    flags = ["--attention", "nsa", "--pixels", "3136", "--min-pixels", "3136", "--device", "cpu"]
    code = cli.main(ask_argv(inputs, *flags, "--max-new-tokens", "2", "What?", model=released_layout))
    _, err = capsys.readouterr()
    assert code == 0, err
    assert re.search(r"^plan .*\[preset planner\]$", err, re.MULTILINE) and "[attention nsa]" in err


@pytest.fixture
def weights_must_not_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(model_files, "load_weights", refuse)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--preset", "paper", "--budget", "1000"], "--budget is a setting of the planner preset, but the paper"),
        (["--preset", "paper", "--prefer", "detail"], "--prefer is a setting of the planner preset"),
        (["--preset", "paper", "--pixels", "3136"], "the paper preset takes --max-pixels and --min-pixels"),
        (["--max-pixels", "3136"], "--max-pixels is a setting of the paper preset, but the planner preset runs"),
        (["--preset", "planner", "--total-pixels", "9"], "--total-pixels is a setting of the paper preset"),
        (["--preset", "paper", "--temperature", "0.5"], "--temperature 0.5: the paper preset decodes greedily"),
        (["--preset", "paper", "--max-frames", "1"], "--max-frames must be at least 2"),
        (["--preset", "paper", "--min-pixels", "0"], "--min-pixels must be positive, got 0"),
        (["--preset", "paper", "--max-pixels", "-1"], "--max-pixels must be positive, got -1"),
        (["--preset", "paper", "--total-pixels", "0"], "--total-pixels must be positive, got 0"),
        (["--preset", "paper", "--fps", "0"], "--fps must be a positive number"),
    ],
)
def test_bad_preset_flags_give_one_line(inputs, flags, expected, capsys, weights_must_not_load):
    code = cli.main(ask_argv(inputs, *flags, "--device", "cpu", "What moves?"))
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("videonsa ask: error: ") and expected in lines[0]


def test_an_unknown_preset_is_refused_by_the_parser(inputs, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(ask_argv(inputs, "--preset", "papr", "What moves?"))
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert re.fullmatch(r"videonsa ask: error: argument --preset: invalid choice: 'papr' \(choose from .*\)", error)
    assert all(preset in error for preset in ("auto", "paper", "planner"))


def test_the_scaled_up_frames_reach_the_model_inputs_unchanged(loaded, inputs):
    """max_pixels 50,176 below min_pixels 200,704: clip.mp4's 112x112 frames are scaled UP to 448x448, and the
    patches keep that size (our patcher never resizes, unlike a processor re-applying its own pixel bounds)."""
    settings = PaperSettings(min_pixels=200_704, max_pixels=50_176)
    planned = plan_question(loaded.files, inputs.video, "When?", preset="paper", paper=settings)
    assert (planned.plan.frame_height, planned.plan.frame_width) == (448, 448)
    video = decode_planned_video(planned.plan)
    assert video.frames.shape == (8, 448, 448, 3)
    batch = model_inputs(planned.prompt, video, loaded.files)
    assert batch["video_grid_thw"].tolist() == [[4, 448 // 14, 448 // 14]]
    assert int((batch["mm_token_type_ids"] == 2).sum()) == 4 * 16 * 16
