"""`videonsa.load(...).ask(...)` on a tiny random-weight checkpoint: answers, streaming, letters, reports, errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

import videonsa
from videonsa.errors import UserError
from videonsa.inference.model_files import open_model_files, resolve_device, resolve_dtype
from videonsa.video import synthetic

TINY = dict(pixels_per_frame=56 * 56, min_pixels_per_frame=56 * 56)


def test_ask_streams_the_answer_and_reports_what_it_cost(loaded, inputs):
    pieces: list[str] = []
    answer = loaded.ask(inputs.video, "What moves?", max_new_tokens=6, on_text=pieces.append, **TINY)
    assert "".join(pieces).strip() == answer.text
    report, plan = answer.report, answer.plan
    assert 1 <= report.generated_tokens <= 6
    assert report.frames == plan.frame_count == 8
    assert (report.frame_height, report.frame_width) == (56, 56)
    assert report.video_tokens == plan.video_tokens == 16
    assert report.prompt_tokens + 6 == plan.total_tokens  # the plan reserved room for the whole answer
    assert report.prefill_seconds > 0 and report.video_seconds > 0
    assert report.attention == "nsa"
    assert "8 frames at 56x56" in report.describe() and "prefill" in report.describe()
    assert str(answer) == answer.text


def test_greedy_answers_repeat_and_seeded_sampling_repeats(loaded, inputs):
    first = loaded.ask(inputs.video, "What moves?", max_new_tokens=4, **TINY)
    assert loaded.ask(inputs.video, "What moves?", max_new_tokens=4, **TINY).text == first.text
    sampled = [loaded.ask(inputs.video, "What moves?", max_new_tokens=4, temperature=1.0, seed=7, **TINY) for _ in "ab"]
    assert sampled[0].text == sampled[1].text


def test_multiple_choice_answers_with_one_letter(loaded, inputs):
    answer = loaded.ask(inputs.video, "What moves?", options=["a square", "a disc", "a line", "nothing"], **TINY)
    assert answer.choice in {"A", "B", "C", "D"}
    assert answer.text == answer.choice
    assert answer.report.generated_tokens == 1
    probabilities = answer.choice_probabilities
    assert list(probabilities) == ["A", "B", "C", "D"]
    assert math.isclose(sum(probabilities.values()), 1.0, rel_tol=1e-5)
    assert answer.choice == max(probabilities, key=probabilities.get)  # greedy takes the likeliest letter


def test_attention_switches_between_nsa_and_dense_without_reloading(loaded, inputs):
    try:
        loaded.attention = "dense"
        answer = loaded.ask(inputs.video, "What moves?", options=["square", "disc"], **TINY)
        assert answer.report.attention == "dense" and answer.choice in {"A", "B"}
        with pytest.raises(UserError, match="attention must be one of auto, nsa, dense, official"):
            loaded.attention = "sparse"
    finally:
        loaded.attention = "nsa"
    assert loaded.attention == "nsa"


def test_a_tight_budget_trims_the_video_to_fit(loaded, inputs):
    roomy = loaded.plan(inputs.video, "What moves?", max_new_tokens=4, **TINY)
    budget = roomy.text_tokens + 8  # room for 2 temporal patches of 4 tokens
    answer = loaded.ask(inputs.video, "What moves?", max_new_tokens=4, budget_tokens=budget, prefer="detail", **TINY)
    assert answer.plan.frame_count == 4 < roomy.frame_count
    assert answer.report.prompt_tokens + 4 <= budget


def test_a_folder_of_frames_is_a_video(loaded, tmp_path):
    folder = synthetic.write_image_folder(tmp_path / "frames", frame_count=6, width=56, height=56)
    answer = loaded.ask(folder, "What moves?", options=["square", "disc"], frames_fps=2.0, **TINY)
    assert answer.plan.frame_count == 6 and answer.choice in {"A", "B"}


def test_unknown_and_bad_settings(loaded, inputs):
    with pytest.raises(TypeError, match="unknown setting"):
        loaded.ask(inputs.video, "What moves?", frames_per_second=2)
    with pytest.raises(UserError, match="max_new_tokens must be at least 1"):
        loaded.ask(inputs.video, "What moves?", max_new_tokens=0)
    with pytest.raises(UserError, match="prefer must be one of"):
        loaded.ask(inputs.video, "What moves?", prefer="everything")
    # Settings of the wrong type are named too, before the video is decoded (not as errors from inside generate).
    for setting, message in [
        ({"max_new_tokens": 2.5}, "max_new_tokens must be a whole number, got 2.5"),
        ({"temperature": 1.0, "top_k": 1.5}, "top_k must be a whole number"),
        ({"temperature": 1.0, "seed": "x"}, "seed must be a whole number, got 'x'"),
        ({"temperature": "0.5"}, "temperature must be a number, got '0.5'"),
        ({"max_frames": 7.5}, "max_frames must be a whole number"),
    ]:
        with pytest.raises(UserError, match=message):
            loaded.ask(inputs.video, "What moves?", progress=_no_decoding, **setting)


def _no_decoding(done: int, total: int) -> None:
    raise AssertionError("a frame was decoded before the settings were checked")


def test_resolve_settings_applies_overrides_to_the_presets_settings():
    from videonsa.inference.api import resolve_settings
    from videonsa.video import SamplingSettings
    from videonsa.video.paper import PaperSettings

    given = SamplingSettings(fps=2.0, budget_tokens=9000)
    sampling, paper, generation = resolve_settings(
        "planner", {"prefer": "frames", "max_new_tokens": 5}, sampling=given
    )
    assert paper is None and generation.max_new_tokens == 5
    assert (sampling.fps, sampling.budget_tokens, sampling.prefer) == (2.0, 9000, "frames")
    assert given.prefer == "balanced"  # the caller's object is left as it was

    sampling, paper, generation = resolve_settings("paper", {"max_pixels": 3136, "fps": 1.0, "seed": 4})
    assert sampling is None and generation.seed == 4
    assert (paper.max_pixels, paper.fps, paper.min_pixels) == (3136, 1.0, PaperSettings().min_pixels)

    with pytest.raises(UserError, match="total_pixels is a setting of the paper preset, but the planner preset"):
        resolve_settings("planner", {"total_pixels": 10})
    with pytest.raises(UserError, match=r"pixels_per_frame is a setting of the planner preset.*no token budget"):
        resolve_settings("paper", {"pixels_per_frame": 10})
    with pytest.raises(TypeError, match=r"unknown setting\(s\) colour; known: .*min_pixels"):
        resolve_settings("paper", {"colour": 1})
    with pytest.raises(UserError, match="resolve 'auto' first"):
        resolve_settings("auto", {})


def test_load_errors_name_the_model(tmp_path, monkeypatch):
    with pytest.raises(UserError, match=r"^model '\./missing-model': no such directory$"):
        videonsa.inference.load("./missing-model")
    stray = tmp_path / "weights.bin"
    stray.write_bytes(b"\0")
    with pytest.raises(UserError, match="is a file; pass the model's directory"):
        open_model_files(stray)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no config.json"):
        open_model_files(tmp_path / "empty")
    with pytest.raises(UserError, match="attention must be one of"):
        videonsa.inference.load(str(tmp_path), attention="sparse")


def test_hub_id_without_network_gives_one_line(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as caught:
        open_model_files("videonsa-tests/no-such-model")
    message = str(caught.value)
    assert message.startswith("model 'videonsa-tests/no-such-model': cannot download it from the Hugging Face Hub")
    assert "\n" not in message


def test_a_checkpoint_without_chat_template_is_refused(inputs, tmp_path):
    copy = tmp_path / "no-template"
    copy.mkdir()
    for path in inputs.checkpoint.iterdir():
        if path.name == "chat_template.jinja":
            continue
        data = path.read_bytes()
        if path.name == "tokenizer_config.json":
            config = json.loads(data)
            config.pop("chat_template", None)
            data = json.dumps(config).encode()
        (copy / path.name).write_bytes(data)
    with pytest.raises(UserError, match="has no chat template"):
        open_model_files(copy)


def test_devices_and_dtypes():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(UserError, match="dtype 'int8'"):
        resolve_dtype("int8", torch.device("cpu"))
    with pytest.raises(UserError, match="device 'tpu"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no CUDA GPU is visible"):
            resolve_device("cuda")
