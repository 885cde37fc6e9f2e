"""Chunked prefill from the library and the CLI: same answers as one pass, progress over chunks, the memory model
that picks the chunk and the planner's budget on a GPU."""

from __future__ import annotations

import pytest
import torch

import videonsa.inference
from videonsa import cli, testing
from videonsa.errors import UserError
from videonsa.inference.generation import GenerationSettings, generate_answer
from videonsa.inference.memory import (
    CHUNK_QUANTUM,
    MIN_AUTO_CHUNK,
    PLANNING_CHUNK,
    PrefillMemory,
    choose_prefill_chunk,
    default_budget_tokens,
    planning_chunk,
)
from videonsa.inference.prefill_progress import PrefillProgress
from videonsa.inference.prompt import build_preset_prompt
from videonsa.models import VideoNSAConfig
from videonsa.models.chunked_prefill import CACHE_KWARG
from videonsa.models.kv_cache import PreallocatedLayer
from videonsa.video import SamplingSettings, decode_planned_video, plan_video, probe_video

TINY_FLAGS = ["--pixels", "3136", "--min-pixels", "3136", "--device", "cpu"]


@pytest.fixture(scope="module")
def question(inputs, loaded):
    """(prompt, decoded video) of a multiple-choice question on the tiny clip (8 frames, 16 video tokens)."""
    prompt = build_preset_prompt(loaded.files, "What moves?", ["a ball", "a box", "nothing"], preset="planner")
    settings = SamplingSettings(pixels_per_frame=3136, min_pixels_per_frame=3136)
    plan = plan_video(
        probe_video(inputs.video), settings, text_tokens=prompt.text_tokens + 1, geometry=loaded.files.geometry
    )
    return prompt, decode_planned_video(plan)


@pytest.mark.parametrize("mode", ["nsa", "dense"])
def test_chunked_answer_equals_one_pass_and_reports_every_chunk(loaded, question, mode):
    prompt, video = question
    model = loaded.model
    original = model.sparse_settings.mode
    model.set_attention_mode(mode)
    try:
        settings = GenerationSettings(max_new_tokens=1)
        one_pass = generate_answer(model, loaded.files, prompt, video, settings, prefill_chunk_size=None)
        seen: list[PrefillProgress] = []
        chunked = generate_answer(
            model, loaded.files, prompt, video, settings, prefill_chunk_size=8, on_prefill=seen.append
        )
    finally:
        model.set_attention_mode(original)
    assert chunked.choice == one_pass.choice
    for letter, share in one_pass.choice_probabilities.items():
        assert chunked.choice_probabilities[letter] == pytest.approx(share, abs=1e-5)
    report = chunked.report
    assert one_pass.report.prefill_chunk is None and report.prefill_chunk == 8
    chunks = -(-report.prompt_tokens // 8)
    assert report.prefill_chunks == chunks and f"in {chunks} chunks of 8 tokens" in report.describe()
    # The vision tower's pieces first, then one report per chunk, the last one finished.
    stages = [p.stage for p in seen]
    assert stages == ["vision-chunk"] * stages.count("vision-chunk") + ["chunk"] * chunks
    assert seen[stages.count("vision-chunk") - 1].stage_done == report.video_tokens
    assert [p.stage_done for p in seen if p.stage == "chunk"] == list(range(1, chunks + 1))
    assert [p.finished for p in seen] == [False] * (len(seen) - 1) + [True]
    work = [p.work_done for p in seen]
    assert work == sorted(work) and work[-1] == 1.0
    assert "(chunk 1/" in seen[stages.count("vision-chunk")].describe()


def test_auto_runs_a_short_prompt_in_one_pass(loaded, question):
    prompt, video = question
    answer = generate_answer(loaded.model, loaded.files, prompt, video, GenerationSettings(max_new_tokens=1))
    assert answer.report.prefill_chunk is None


def test_load_and_ask_take_a_chunk_size(inputs):
    qa = videonsa.inference.load(str(inputs.checkpoint), device="cpu", prefill_chunk_size=16)
    kwargs = dict(pixels_per_frame=3136, min_pixels_per_frame=3136, max_new_tokens=2)
    assert qa.ask(inputs.video, "What moves?", **kwargs).report.prefill_chunk == 16
    assert qa.ask(inputs.video, "What moves?", prefill_chunk_size=None, **kwargs).report.prefill_chunk is None
    with pytest.raises(UserError, match="prefill_chunk_size must be 'auto', a positive number"):
        videonsa.inference.load(str(inputs.checkpoint), device="cpu", prefill_chunk_size=-4)


@pytest.mark.parametrize("setting", [0, -8, 2.5, "16", True])
@pytest.mark.parametrize("preset", [{"preset": "planner"}, {"preset": "planner", "budget_tokens": 4096},
                                    {"preset": "paper"}], ids=["planner", "planner-with-budget", "paper"])
def test_ask_refuses_a_bad_chunk_size_before_reading_the_video(loaded, tmp_path, setting, preset):
    # The video does not exist: the setting's error, not the missing file's, shows it is checked first, whatever
    # the preset (the planner's default budget also reads the setting, the other two do not).
    with pytest.raises(UserError, match=r"^prefill_chunk_size must be 'auto', a positive number .*got"):
        loaded.ask(tmp_path / "missing.mp4", "What moves?", prefill_chunk_size=setting, **preset)


OFFICIAL_REFUSAL = r"^prefill_chunk_size: attention_mode 'official' prefills in one pass"


@pytest.fixture(scope="module")
def official(inputs):
    """The tiny checkpoint loaded in attention_mode 'official', which prefills in one pass only."""
    return videonsa.inference.load(str(inputs.checkpoint), device="cpu", attention="official")


@pytest.mark.parametrize("preset", ["auto", "planner"])  # auto: the paper preset, as official mode picks
def test_ask_refuses_a_chunk_size_the_model_cannot_run_before_reading_the_video(official, tmp_path, preset):
    # The video does not exist: the chunking error, not the missing file's, shows it is checked first.
    missing = tmp_path / "missing.mp4"
    with pytest.raises(UserError, match=OFFICIAL_REFUSAL):
        official.ask(missing, "What moves?", prefill_chunk_size=8, preset=preset)
    # A model without chunked prefill at all (stock Qwen2.5-VL) refuses a chunk size as early.
    stock = videonsa.inference.VideoQA(official.files, testing.tiny_model(videonsa=False))
    with pytest.raises(UserError, match=r"^prefill_chunk_size=8: Qwen2_5_VLForConditionalGeneration has no chunked"):
        stock.ask(missing, "What moves?", prefill_chunk_size=8, preset=preset)
    # One pass and the automatic choice suit official mode: those reach the video, and its error.
    for setting in ("auto", None):
        with pytest.raises(UserError, match="missing.mp4: no such file"):
            official.ask(missing, "What moves?", prefill_chunk_size=setting, preset=preset)


def test_official_refusal_is_the_same_line_early_and_late(official, inputs, tmp_path):
    # A chunk size given to `load` is refused by ask too, and generate_answer (decoded video in hand) says the
    # same line, even for a chunk longer than the prompt (which would run as one pass).
    qa = videonsa.inference.VideoQA(official.files, official.model, prefill_chunk_size=8)
    with pytest.raises(UserError, match=OFFICIAL_REFUSAL) as early:
        qa.ask(tmp_path / "missing.mp4", "What moves?")
    prompt = build_preset_prompt(official.files, "What moves?", None, preset="paper")
    plan = qa.plan(inputs.video, "What moves?", preset="paper", max_pixels=3136, min_pixels=3136)
    for chunk in (8, 1 << 20):
        with pytest.raises(UserError) as late:
            generate_answer(official.model, official.files, prompt, decode_planned_video(plan),
                            GenerationSettings(max_new_tokens=1), prefill_chunk_size=chunk)
        assert str(late.value) == str(early.value)


def test_cli_chunked_answer_equals_one_pass_and_reports_plan_chunks_and_time(inputs, capsys):
    outputs = []
    for chunk in ("0", "12"):
        argv = ["ask", "--model", str(inputs.checkpoint), "--video", str(inputs.video), *TINY_FLAGS,
                "--prefill-chunk", chunk, "--max-new-tokens", "3", "What moves?"]  # fmt: skip
        assert cli.main(argv) == 0
        outputs.append(capsys.readouterr())
    assert outputs[0].out == outputs[1].out
    err = outputs[1].err
    assert "plan   " in err and "chunks of 12 tokens" in err and "chunks of" not in outputs[0].err
    assert any(line.startswith("time   ") and "prefill" in line for line in err.splitlines())


def test_cli_refuses_bad_chunk_values_and_official_chunking(inputs, capsys):
    base = ["ask", "--model", str(inputs.checkpoint), "--video", str(inputs.video), *TINY_FLAGS, "What?"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*base, "--prefill-chunk", "-3"])
    assert exit_info.value.code == 2 and "--prefill-chunk" in capsys.readouterr().err
    assert cli.main([*base, "--prefill-chunk", "64", "--attention", "official", "--preset", "planner"]) == 2
    assert "attention_mode 'official' prefills in one pass" in capsys.readouterr().err


def test_cli_refuses_official_chunking_before_reading_the_video(inputs, tmp_path, capsys):
    argv = ["ask", "--model", str(inputs.checkpoint), "--video", str(tmp_path / "missing.mp4"), *TINY_FLAGS,
            "--prefill-chunk", "64", "--attention", "official", "--preset", "planner", "What?"]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "attention_mode 'official' prefills in one pass" in err and "missing.mp4" not in err


@pytest.mark.parametrize("tied", [False, True])
def test_parameter_count_from_the_config_matches_the_model(tied):
    # transformers ties the LM head by the top-level flag, which is where a saved tied config keeps it.
    config = testing.tiny_videonsa_config()
    config.tie_word_embeddings = tied
    model = testing.tiny_model(config)
    actual = sum(parameter.numel() for parameter in model.parameters())  # a tied matrix counts once
    memory = PrefillMemory.from_config(model.config.to_dict(), torch.float32)
    assert memory.weight_bytes == pytest.approx(4 * actual, rel=0.01)


def test_a_config_tied_in_its_text_config_only_is_counted_tied():
    # Older saves keep the flag in text_config alone; transformers forwards it to the top level and ties.
    config = testing.tiny_videonsa_config().to_dict()
    config["tie_word_embeddings"], config["text_config"]["tie_word_embeddings"] = False, True
    model = testing.tiny_model(VideoNSAConfig.from_dict(config))
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    actual = sum(parameter.numel() for parameter in model.parameters())
    assert PrefillMemory.from_config(config, torch.float32).weight_bytes == pytest.approx(4 * actual, rel=0.01)


def test_resident_memory_counts_the_pixel_rows_as_ask_holds_them():
    # ask holds frames_to_patches' rows on the device through the prefill in the model's dtype: 4 merged patches
    # of 3 x 2 x 14 x 14 values per vision token, 2 bytes each in bf16 (docs/long-videos.md, "Memory model").
    import numpy as np

    from videonsa.video.patches import frames_to_patches

    rows, _ = frames_to_patches(np.zeros((2, 28, 28, 3), dtype=np.uint8))
    pixel_bytes = rows.numel() * torch.bfloat16.itemsize  # one merged token
    assert pixel_bytes == 9_408
    kv, feature, copies = 28 * 2 * 4 * 128 * 2, 3584 * 2, 5 * 2048
    resident = PrefillMemory.from_config(QWEN_7B, torch.bfloat16).resident_per_token
    assert resident == kv + feature + pixel_bytes + copies
    float32_rows = PrefillMemory.from_config(QWEN_7B, torch.bfloat16, pixel_dtype=torch.float32).resident_per_token
    assert float32_rows == resident + pixel_bytes


def test_the_pixel_rows_reach_the_model_in_the_vision_towers_dtype_with_the_same_answer(inputs, monkeypatch):
    # The tower casts its input to its dtype: rows cast before they go to the device give the same answer in half
    # the memory of float32 rows (and without a cast copy of the whole video).
    import videonsa.inference.generation as generation

    loaded = videonsa.inference.load(str(inputs.checkpoint), device="cpu", dtype="bfloat16")
    prompt = build_preset_prompt(loaded.files, "What moves?", preset="planner")
    planned = loaded.plan(inputs.video, "What moves?", pixels_per_frame=3136, min_pixels_per_frame=3136)
    video = decode_planned_video(planned)
    settings = GenerationSettings(max_new_tokens=4)
    seen = []
    generate = loaded.model.generate

    def noting_the_pixels(*args, **kwargs):
        seen.append(kwargs["pixel_values_videos"].dtype)
        return generate(*args, **kwargs)

    monkeypatch.setattr(loaded.model, "generate", noting_the_pixels)
    cast = generate_answer(loaded.model, loaded.files, prompt, video, settings)
    monkeypatch.setattr(generation, "_on_device", lambda model, tensors, device: tensors)  # float32 rows
    uncast = generate_answer(loaded.model, loaded.files, prompt, video, settings)
    assert seen == [torch.bfloat16, torch.float32]
    assert cast.text == uncast.text and cast.report.generated_tokens == uncast.report.generated_tokens


def test_memory_model_picks_one_pass_when_it_fits_and_else_chunks_that_fit():
    memory = PrefillMemory(weight_bytes=10_000, resident_per_token=10, working_per_token=100)
    free = 1_000_000
    fits = memory.one_pass_tokens(free)
    assert fits * 110 <= free * 0.9 < (fits + 1) * 110
    assert memory.chunk_for(fits, free) is None
    # One token too many for one pass: the largest whole quantum beside the prompt's resident memory.
    assert memory.chunk_for(fits + 1, free) == (900_000 - (fits + 1) * 10) // 100 // CHUNK_QUANTUM * CHUNK_QUANTUM
    # No room at all beside the prompt: the smallest automatic chunk (the estimate may be pessimistic).
    assert memory.chunk_for(89_000, free) == MIN_AUTO_CHUNK
    big = PrefillMemory(weight_bytes=0, resident_per_token=1, working_per_token=10)
    chunk = big.chunk_for(8_500_000, 100_000_000)
    assert chunk % CHUNK_QUANTUM == 0 and 8_500_000 * 1 + chunk * 10 <= 0.9 * 100_000_000
    assert 8_500_000 + (chunk + CHUNK_QUANTUM) * 10 > 0.9 * 100_000_000
    budget = big.budget_tokens(100_000_000, chunk=4096)
    assert budget % CHUNK_QUANTUM == 0 and budget + 4096 * 10 <= 0.9 * 100_000_000


def test_auto_chunking_is_one_pass_in_official_mode_and_the_budget_stays_fixed_off_the_gpu():
    memory = PrefillMemory(weight_bytes=0, resident_per_token=1 << 20, working_per_token=1 << 20)
    cpu = torch.device("cpu")
    assert choose_prefill_chunk("auto", 1 << 30, memory, cpu, "official") is None
    assert choose_prefill_chunk("auto", 1 << 30, memory, cpu, "nsa") is not None  # cannot fit in one pass
    assert choose_prefill_chunk(4096, 10, memory, cpu, "nsa") == 4096
    assert default_budget_tokens(testing.tiny_model().config.to_dict(), cpu, torch.float32) is None


@pytest.mark.gpu
def test_default_budget_on_the_gpu_fits_its_free_memory():
    config = testing.tiny_model().config.to_dict()
    memory = PrefillMemory.from_config(config, torch.bfloat16)
    budget = default_budget_tokens(config, torch.device("cuda"), torch.bfloat16)
    free, _ = torch.cuda.mem_get_info()
    assert budget > 0 and budget * memory.resident_per_token <= free


@pytest.mark.gpu
def test_free_memory_respects_a_per_process_cap():
    from videonsa.inference.memory import free_memory

    cuda = torch.device("cuda")  # no index: free_memory resolves the current device
    index = torch.cuda.current_device()
    _, total = torch.cuda.mem_get_info(index)
    before = getattr(torch.cuda, "get_per_process_memory_fraction", lambda _: 1.0)(index)
    torch.cuda.set_per_process_memory_fraction(0.25, index)
    try:
        assert free_memory(cuda) <= int(total * 0.25) - torch.cuda.memory_allocated(index)
    finally:
        torch.cuda.set_per_process_memory_fraction(before, index)


QWEN_7B = {
    "text_config": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                        num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "vision_config": dict(depth=32, hidden_size=1280, intermediate_size=3420, out_hidden_size=3584,
                          spatial_merge_size=2, patch_size=14, temporal_patch_size=2),
}


def test_gpu_budget_is_what_fits_beside_the_weights(monkeypatch):
    import videonsa.inference.memory as memory_module

    cuda = torch.device("cuda")  # never touched: the free memory is given
    monkeypatch.setattr(memory_module, "free_memory", lambda device: 80 * 2**30)
    memory = PrefillMemory.from_config(QWEN_7B, torch.bfloat16)
    assert memory.weight_bytes == pytest.approx(2 * 8.66e9, rel=0.01)  # Qwen2.5-VL-7B with VideoNSA's gates
    budget = default_budget_tokens(QWEN_7B, cuda, torch.bfloat16)
    assert budget % CHUNK_QUANTUM == 0 and 500_000 < budget < 1_000_000
    room = 0.9 * 80 * 2**30 - memory.weight_bytes - 16384 * memory.working_per_token
    assert budget * memory.resident_per_token <= room < (budget + CHUNK_QUANTUM) * memory.resident_per_token
    # Weights already loaded no longer need room.
    assert default_budget_tokens(QWEN_7B, cuda, torch.bfloat16, loaded_bytes=memory.weight_bytes) > budget
    monkeypatch.setattr(memory_module, "free_memory", lambda device: 10 * 2**30)
    with pytest.raises(UserError, match="the weights take ~16.1 GiB; no room for a prompt"):
        default_budget_tokens(QWEN_7B, cuda, torch.bfloat16)


def test_videoqa_plans_with_the_device_budget_unless_one_is_given(inputs, loaded, monkeypatch):
    import videonsa.inference.api as api

    monkeypatch.setattr(api, "default_budget_tokens", lambda config, device, dtype, loaded_bytes, chunk: 50_000)
    kwargs = dict(pixels_per_frame=3136, min_pixels_per_frame=3136)
    assert loaded.plan(inputs.video, "What moves?", **kwargs).budget_tokens == 50_000
    assert loaded.plan(inputs.video, "What moves?", budget_tokens=4096, **kwargs).budget_tokens == 4096


def test_gpu_budget_of_a_one_pass_prefill_fits_its_working_memory(monkeypatch):
    # A prefill that will run in one pass (--prefill-chunk 0, official mode) holds every token's working memory at
    # once: its default budget must leave room for that, not only for one chunk's.
    import videonsa.inference.memory as memory_module

    cuda = torch.device("cuda")  # never touched: the free memory is given
    monkeypatch.setattr(memory_module, "free_memory", lambda device: 80 * 2**30)
    memory = PrefillMemory.from_config(QWEN_7B, torch.bfloat16)
    budget = default_budget_tokens(QWEN_7B, cuda, torch.bfloat16, chunk=None)
    room = 0.9 * 80 * 2**30 - memory.weight_bytes
    per_token = memory.resident_per_token + memory.working_per_token
    assert budget % CHUNK_QUANTUM == 0 and budget * per_token <= room < (budget + CHUNK_QUANTUM) * per_token
    assert budget < default_budget_tokens(QWEN_7B, cuda, torch.bfloat16)
    # An explicit chunk sets aside that chunk's working memory.
    assert default_budget_tokens(QWEN_7B, cuda, torch.bfloat16, chunk=4096) > default_budget_tokens(
        QWEN_7B, cuda, torch.bfloat16, chunk=65536
    )


@pytest.mark.parametrize(
    ("setting", "mode", "chunk"),
    [("auto", "nsa", PLANNING_CHUNK), (None, "nsa", None), (4096, "dense", 4096), ("auto", "official", None)],
)
def test_the_budget_is_planned_for_the_prefill_that_will_run(setting, mode, chunk):
    assert planning_chunk(setting, mode) == chunk


def test_videoqa_budget_follows_its_prefill_setting(inputs, loaded, monkeypatch):
    import videonsa.inference.api as api

    seen = []
    monkeypatch.setattr(
        api, "default_budget_tokens", lambda config, device, dtype, loaded_bytes, chunk: seen.append(chunk) or 50_000
    )
    kwargs = dict(pixels_per_frame=3136, min_pixels_per_frame=3136)
    loaded.plan(inputs.video, "What moves?", **kwargs)
    original = loaded.prefill_chunk_size
    loaded.prefill_chunk_size = None
    try:
        loaded.plan(inputs.video, "What moves?", **kwargs)
    finally:
        loaded.prefill_chunk_size = original
    assert seen == [planning_chunk(original, loaded.attention), None]


def test_ask_budget_line_plans_for_a_one_pass_prefill(monkeypatch):
    import types

    import videonsa.inference.memory as memory_module
    from videonsa.commands.ask import _device_budget

    monkeypatch.setattr(memory_module, "free_memory", lambda device: 80 * 2**30)
    files = types.SimpleNamespace(config=QWEN_7B)
    cuda = torch.device("cuda")  # never touched: the free memory is given
    chunked, _ = _device_budget(SamplingSettings(), files, cuda, torch.bfloat16, chunk=PLANNING_CHUNK)
    one_pass, _ = _device_budget(SamplingSettings(), files, cuda, torch.bfloat16, chunk=None)
    assert one_pass.budget_tokens == default_budget_tokens(QWEN_7B, cuda, torch.bfloat16, chunk=None)
    assert one_pass.budget_tokens < chunked.budget_tokens


def test_auto_retries_in_smaller_chunks_when_the_estimate_runs_out_of_memory(loaded, question, monkeypatch):
    import videonsa.inference.generation as generation

    prompt, video = question
    model = loaded.model
    attempts = []
    real_generate = model.generate

    def generate_or_run_out(**kwargs):
        attempts.append(model.prefill_chunking)
        if model.prefill_chunking is None or model.prefill_chunking.chunk_size > 16:
            raise torch.OutOfMemoryError("simulated")
        return real_generate(**kwargs)

    monkeypatch.setattr(model, "generate", generate_or_run_out)
    monkeypatch.setattr(generation, "CHUNK_QUANTUM", 4)  # the tiny prompt's chunks, in quanta of 4 tokens
    settings = GenerationSettings(max_new_tokens=1)
    answer = generate_answer(model, loaded.files, prompt, video, settings)
    tokens = answer.report.prompt_tokens
    first = tokens // 4 // 4 * 4
    assert [a if a is None else a.chunk_size for a in attempts] == [None, first, first // 4 // 4 * 4]
    assert answer.report.prefill_chunk == first // 4 // 4 * 4
    attempts.clear()
    with pytest.raises(torch.OutOfMemoryError):  # an explicit choice is not second-guessed
        generate_answer(model, loaded.files, prompt, video, settings, prefill_chunk_size=None)
    assert attempts == [None]


def test_cli_running_out_of_memory_is_one_line_naming_the_settings_that_help(inputs, capsys, monkeypatch):
    import videonsa.inference.generation as generation

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(generation, "generate_answer", out_of_memory)
    argv = ["ask", "--model", str(inputs.checkpoint), "--video", str(inputs.video), *TINY_FLAGS, "--prefill-chunk",
            "0", "What moves?"]  # fmt: skip
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert "out of memory" in line and "--budget" in line and "--prefill-chunk" in line


@pytest.mark.parametrize("kind", ["multiple choice", "open"])
def test_the_answer_is_generated_into_a_cache_with_room_for_the_prompt_and_the_answer(
    loaded, question, monkeypatch, kind
):
    prompt, video = question
    if kind == "open":
        prompt = build_preset_prompt(loaded.files, "What moves?", preset="planner")
    caches = []
    generate = loaded.model.generate

    def noting_the_cache(*args, **kwargs):
        caches.append(kwargs.get(CACHE_KWARG))
        return generate(*args, **kwargs)

    monkeypatch.setattr(loaded.model, "generate", noting_the_cache)
    answer = generate_answer(loaded.model, loaded.files, prompt, video, GenerationSettings(max_new_tokens=5))
    (cache,) = caches
    assert {type(layer) for layer in cache.layers} == {PreallocatedLayer}
    # A multiple-choice question answers one letter; an open one up to max_new_tokens (the last one never cached).
    answer_room = 1 if kind == "multiple choice" else 5
    assert {layer.capacity for layer in cache.layers} == {answer.report.prompt_tokens + answer_room}
    cached = answer.report.prompt_tokens + answer.report.generated_tokens - 1
    assert {layer.get_seq_length() for layer in cache.layers} == {cached}
