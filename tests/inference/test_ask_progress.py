"""What `ask` shows while it works: the plan before any frame is decoded, and prefill progress.

Prefill is one forward pass over the whole prompt; its progress is counted per vision-encoder block and per
decoder layer through forward hooks (see docs/prefill-progress.md).
"""

from __future__ import annotations

import io

import pytest
import torch
from rich.console import Console

from videonsa import cli
from videonsa.inference.generation import GenerationSettings, generate_answer
from videonsa.inference.prefill_progress import PrefillMeter, PrefillProgress
from videonsa.inference.prompt import build_preset_prompt
from videonsa.video import SamplingSettings, decode_planned_video, plan_video, probe_video

TINY_FLAGS = ["--pixels", "3136", "--min-pixels", "3136", "--device", "cpu", "--attention", "dense"]


@pytest.fixture(scope="module")
def question(inputs, loaded):
    """(prompt, decoded video) of one question on the tiny clip, for `generate_answer`."""
    prompt = build_preset_prompt(loaded.files, "What moves?", None, preset="planner")
    settings = SamplingSettings(pixels_per_frame=3136, min_pixels_per_frame=3136)
    plan = plan_video(
        probe_video(inputs.video), settings, text_tokens=prompt.text_tokens + 4, geometry=loaded.files.geometry
    )
    return prompt, decode_planned_video(plan)


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(module._forward_hooks) for module in model.modules())


def test_prefill_progress_covers_every_block_and_layer_once(loaded, question):
    prompt, video = question
    model = loaded.model
    seen: list[PrefillProgress] = []
    hooks_before = _hook_count(model)
    settings = GenerationSettings(max_new_tokens=4)
    answer = generate_answer(model, loaded.files, prompt, video, settings, on_prefill=seen.append)

    blocks = len(model.model.visual.blocks)
    layers = len(model.model.language_model.layers)
    # One report per vision block and decoder layer of the prefill (none from the decoding steps), then the end.
    assert [(p.stage, p.stage_done) for p in seen] == (
        [("vision", i) for i in range(1, blocks + 1)] + [("text", i) for i in range(1, layers + 1)] + [("text", layers)]
    )
    assert all(p.stage_total == (blocks if p.stage == "vision" else layers) for p in seen)
    assert [p.finished for p in seen] == [False] * (blocks + layers) + [True]
    tokens = [p.tokens_done for p in seen]
    assert tokens == sorted(tokens) and tokens[-1] == seen[-1].prompt_tokens == answer.report.prompt_tokens
    assert 0 < tokens[0] < tokens[-1]
    assert all(p.prompt_tokens == answer.report.prompt_tokens for p in seen)
    assert _hook_count(model) == hooks_before  # nothing left behind on the model

    # Watching changes nothing: the same greedy answer without a callback.
    assert generate_answer(model, loaded.files, prompt, video, settings).text == answer.text


def test_prefill_hooks_are_removed_when_the_forward_fails(loaded):
    model = loaded.model
    hooks_before = _hook_count(model)
    with pytest.raises(RuntimeError), PrefillMeter(model, prompt_tokens=10, vision_rows=0, callback=print):
        raise RuntimeError("the forward failed")
    assert _hook_count(model) == hooks_before


def test_progress_line_names_tokens_rate_and_time_left():
    progress = PrefillProgress(
        prompt_tokens=20_000, stage="text", stage_done=7, stage_total=28, work_done=0.25, seconds=10.0
    )
    assert progress.tokens_done == 5_000
    assert progress.tokens_per_second == pytest.approx(500.0)
    assert progress.seconds_left == pytest.approx(30.0)
    assert progress.describe() == "prefill 5,000/20,000 tokens (decoder layer 7/28), 500 tokens/s, ~30s left"


def test_cli_prints_the_plan_before_decoding_any_frame(inputs, capsys, monkeypatch):
    import videonsa.video.paper as paper

    stderr_when_decoding: list[str] = []
    real_decode = paper.decode_planned_video

    def decode_and_note(plan, **kwargs):
        stderr_when_decoding.append(capsys.readouterr().err)
        return real_decode(plan, **kwargs)

    monkeypatch.setattr(paper, "decode_planned_video", decode_and_note)
    argv = ["ask", "--model", str(inputs.checkpoint), "--video", str(inputs.video), *TINY_FLAGS,
            "--max-new-tokens", "2", "What moves?"]  # fmt: skip
    assert cli.main(argv) == 0
    assert len(stderr_when_decoding) == 1
    lines = stderr_when_decoding[0].splitlines()
    assert [line.split()[0] for line in lines] == ["video", "plan"]
    assert lines[1].startswith("plan   8 frames every 0.30s at 56x56")


def test_cli_shows_prefill_progress_on_a_terminal(inputs, capsys, monkeypatch):
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich treats stderr as a terminal: live lines are drawn
    monkeypatch.delenv("NO_COLOR", raising=False)
    argv = ["ask", "--model", str(inputs.checkpoint), "--video", str(inputs.video), *TINY_FLAGS,
            "--max-new-tokens", "2", "What moves?"]  # fmt: skip
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "prefill" in err and "tokens/s" in err


def test_log_lines_when_stderr_is_not_a_terminal():
    from videonsa.commands.ask import prefill_display

    stream = io.StringIO()
    console = Console(file=stream, force_terminal=False, soft_wrap=True)
    with prefill_display(console, log_every_seconds=0.0) as show:
        for done in (1, 2):
            show(PrefillProgress(prompt_tokens=100, stage="text", stage_done=done, stage_total=2,
                                 work_done=done / 2, seconds=float(done)))  # fmt: skip
    assert stream.getvalue().splitlines() == [
        "prefill 50/100 tokens (decoder layer 1/2), 50 tokens/s, ~1s left",
        "prefill 100/100 tokens (decoder layer 2/2), 50 tokens/s, ~0s left",
    ]


def test_videoqa_ask_reports_prefill_progress(inputs, loaded):
    seen: list[PrefillProgress] = []
    loaded.ask(inputs.video, "What moves?", pixels_per_frame=3136, min_pixels_per_frame=3136, max_new_tokens=2,
               on_prefill=seen.append)  # fmt: skip
    assert seen and seen[-1].finished and seen[-1].tokens_done == seen[-1].prompt_tokens
