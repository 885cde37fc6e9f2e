"""The lmms-eval plugin: found through lmms-eval's own registry, driven through its CLI on local tasks (the
needle task and one in MLVU's format with MLVU's own document functions), and served in-process with the
request shapes of the paper's benchmarks. A tiny random-weight checkpoint stands in for the 7B model; every
reply is checked against what the inference API answers for the same prompt and video."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# lmms-eval comes with the `eval` extra. CI installs it, so there a missing lmms-eval fails instead of skipping.
if os.environ.get("CI") != "true":
    pytest.importorskip("lmms_eval", reason="needs the eval extra: pip install -e '.[eval]'")
from lmms_eval.api.instance import Instance  # noqa: E402
from PIL import Image  # noqa: E402

import videonsa  # noqa: E402
from videonsa import testing  # noqa: E402
from videonsa.errors import UserError  # noqa: E402
from videonsa.evaluation import lmms_model  # noqa: E402
from videonsa.evaluation.lmms_model import VideoNSALmms, cut_at_stop, generation_settings, parse_model_args  # noqa: E402
from videonsa.evaluation.lmms_plugin import MODEL_CLASS_PATH  # noqa: E402
from videonsa.evaluation.lmms_run import (  # noqa: E402
    format_model_args,
    install_needle_task,
    lmms_eval_command,
    run_lmms_eval,
)
from videonsa.evaluation.lmms_tasks import needle_task  # noqa: E402
from videonsa.video import synthetic  # noqa: E402

FPS = 2  # sampling rate of every run here: a 4 s clip gives 8 frames
MAX_NEW_TOKENS = 6
OPTIONS = ["CAT", "DOG", "SUN", "MAP"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A tiny checkpoint and a needle set of 4 questions about 3 short videos (JSONL as make-needles writes)."""
    root = tmp_path_factory.mktemp("lmms")
    testing.save_tiny_checkpoint(root / "ckpt")
    needles = root / "needles"
    (needles / "videos").mkdir(parents=True)
    for index in range(3):
        synthetic.write_video(needles / "videos" / f"clip{index}.mp4", frame_count=8 + 4 * index, fps=4)
    rows = [
        {
            "id": f"q{index}",
            "video": f"videos/clip{index % 3}.mp4",
            "question": f"Which word is shown on the screen? ({index})",
            "options": OPTIONS,
            "answer": "ABCD"[index],
            "kind": ("retrieval", "counting", "order")[index % 3],
            "video_seconds": 2.0 + index % 3,
            "needle_times": [[0.5, 1.0]],
            "length_bin": f"{2 + index % 3}s",
        }
        for index in range(4)
    ]
    (needles / "questions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


@pytest.fixture(scope="module")
def offline_env(workspace) -> dict[str, str]:
    """No network, and Hugging Face caches inside the test's folder."""
    return {
        "HF_HOME": str(workspace / "hf"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


@pytest.fixture(scope="module")
def qa(workspace):
    """The checkpoint loaded through the public API: the reference every plugin reply is compared with."""
    return videonsa.load(str(workspace / "ckpt"), device="cpu")


@pytest.fixture(scope="module")
def plugin(workspace) -> VideoNSALmms:
    return VideoNSALmms(pretrained=str(workspace / "ckpt"), device="cpu", fps=FPS)


def expected_reply(qa, video, text: str, max_new_tokens: int, stops=("\n\n",)) -> str:
    video = [str(path) for path in video] if isinstance(video, list) else str(video)
    # Images are frames shown at the sampling rate (every one kept), as the plugin shows them.
    answer = qa.ask(video, text, fps=FPS, frames_fps=FPS, max_new_tokens=max_new_tokens)
    return cut_at_stop(answer.text, stops)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- lmms-eval finds the model ---------------------------------------------------------------------------------


def test_lmms_eval_registry_finds_videonsa_through_the_entry_point():
    from lmms_eval.models import get_model
    from lmms_eval.models.registry_v2 import ModelRegistryV2

    registry = ModelRegistryV2()
    registry.load_entrypoint_manifests()  # what lmms-eval's CLI does at start-up, group lmms_eval.models
    resolved = registry.resolve("videonsa")
    assert (resolved.model_type, resolved.class_path) == ("simple", MODEL_CLASS_PATH)
    assert get_model("videonsa") is VideoNSALmms


def test_importing_videonsa_never_imports_lmms_eval():
    code = (
        "import sys, videonsa, videonsa.evaluation, videonsa.evaluation.lmms_run, videonsa.evaluation.lmms_plugin\n"
        "import videonsa.evaluation.lmms_tasks.needle_task\n"
        "assert 'lmms_eval' not in sys.modules, sorted(m for m in sys.modules if m.startswith('lmms_eval'))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- end to end through lmms-eval's CLI ------------------------------------------------------------------------


def test_needle_task_runs_through_the_lmms_eval_cli(workspace, offline_env, qa):
    model_args = {"pretrained": str(workspace / "ckpt"), "device": "cpu", "fps": FPS, "max_new_tokens": MAX_NEW_TOKENS}
    run = run_lmms_eval(
        model_args, ["videonsa_needles"], workspace / "out-needles", questions=workspace / "needles", env=offline_env
    )
    command = list(run.command)
    assert command[1:5] == ["-m", "lmms_eval", "--model", "videonsa"]
    assert command[command.index("--include_path") + 1] == str(workspace / "out-needles" / "lmms_tasks")
    results = json.loads(run.results_file.read_text())
    assert results["n-samples"]["videonsa_needles"]["effective"] == 4
    metrics = results["results"]["videonsa_needles"]
    samples = read_jsonl(next(run.results_file.parent.glob("*_samples_videonsa_needles.jsonl")))
    assert len(samples) == 4
    docs = {row["id"]: row for row in read_jsonl(workspace / "needles" / "questions.jsonl")}
    for sample in samples:
        record = sample["accuracy"]
        doc = docs[record["id"]]
        reply = sample["filtered_resps"][0] if isinstance(sample["filtered_resps"], list) else sample["filtered_resps"]
        video = workspace / "needles" / doc["video"]
        assert reply == expected_reply(qa, video, needle_task.doc_to_text(doc), MAX_NEW_TOKENS)
        assert record["choice"] == needle_task.parse_choice(reply, "ABCD")
        assert record["score"] == float(record["choice"] == doc["answer"])
    scores = [sample["accuracy"]["score"] for sample in samples]
    assert metrics["accuracy,none"] == pytest.approx(sum(scores) / len(scores))


def test_a_needle_whose_video_is_gone_is_scored_wrong_and_the_run_finishes(workspace, offline_env, tmp_path):
    rows = read_jsonl(workspace / "needles" / "questions.jsonl")[:2]
    rows[0]["video"] = "videos/deleted.mp4"
    rows[1]["video"] = str(workspace / "needles" / rows[1]["video"])
    (tmp_path / "questions.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    model_args = {"pretrained": str(workspace / "ckpt"), "device": "cpu", "fps": FPS, "max_new_tokens": 2}
    run = run_lmms_eval(model_args, ["videonsa_needles"], tmp_path / "out", questions=tmp_path, env=offline_env)
    samples = read_jsonl(next(run.results_file.parent.glob("*_samples_videonsa_needles.jsonl")))
    records = {sample["accuracy"]["id"]: sample["accuracy"] for sample in samples}
    assert set(records) == {"q0", "q1"}
    assert (records["q0"]["choice"], records["q0"]["score"]) == (None, 0.0)


def test_a_task_in_mlvu_format_runs_with_mlvu_own_functions(workspace, offline_env, qa, tmp_path):
    """MLVU-dev's YAML settings and document functions, pointed at a local JSON set (videos under HF_HOME/mlvu)."""
    videos = Path(offline_env["HF_HOME"]) / "mlvu"
    videos.mkdir(parents=True, exist_ok=True)
    synthetic.write_video(videos / "movie.mp4", frame_count=12, fps=4)
    docs = [
        {
            "video_name": "movie.mp4",
            "question": f"What happens first?{suffix}\n(A) a\n(B) b\n(C) c\n(D) d",
            "answer": "B",
            "task_type": "order",
        }
        for suffix in ("", " Think.")
    ]
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    (task_dir / "docs.json").write_text(json.dumps(docs))
    mlvu = "lmms_eval.tasks.mlvu.utils"
    (task_dir / "mlvu_local.yaml").write_text(
        "task: mlvu_local\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n  data_files:\n    test: docs.json\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        f"doc_to_visual: !function {mlvu}.mlvu_doc_to_visual_dev\n"
        f"doc_to_text: !function {mlvu}.mlvu_doc_to_text\n"
        "doc_to_target: answer\n"
        "generation_kwargs:\n  max_new_tokens: 16\n  temperature: 0\n  top_p: 1.0\n  num_beams: 1\n  do_sample: false\n"
        f"process_results: !function {mlvu}.mlvu_process_results\n"
        "metric_list:\n  - metric: mlvu_percetion_score\n"
        f"    aggregation: !function {mlvu}.mlvu_aggregate_results_dev\n    higher_is_better: true\n"
        "lmms_eval_specific_kwargs:\n  default:\n    pre_prompt: ''\n"
        '    post_prompt: "\\nOnly give the best option.\\nBest option: ("\n'
    )
    model_args = format_model_args({"pretrained": workspace / "ckpt", "device": "cpu", "fps": FPS})
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "lmms_eval",
        "--model",
        "videonsa",
        "--model_args",
        model_args,
        "--tasks",
        "mlvu_local",
        "--include_path",
        str(task_dir),
        "--output_path",
        str(out),
        "--log_samples",
    ]
    subprocess.run(command, env={**os.environ, **offline_env}, check=True, capture_output=True, text=True)
    results_file = next(out.rglob("*_results.json"))
    assert "mlvu_percetion_score,none" in json.loads(results_file.read_text())["results"]["mlvu_local"]
    samples = read_jsonl(next(out.rglob("*_samples_mlvu_local.jsonl")))
    assert len(samples) == 2
    for sample, doc in zip(sorted(samples, key=lambda s: s["doc_id"]), docs):
        text = doc["question"] + "\nOnly give the best option.\nBest option: ("
        assert sample["input"] == text
        reply = sample["filtered_resps"][0] if isinstance(sample["filtered_resps"], list) else sample["filtered_resps"]
        assert reply == expected_reply(qa, videos / "movie.mp4", text, 16)


def test_bad_model_args_end_the_lmms_eval_run_with_one_clear_line(workspace, offline_env, tmp_path):
    command = [
        sys.executable,
        "-m",
        "lmms_eval",
        "--model",
        "videonsa",
        "--model_args",
        f"pretrained={workspace / 'ckpt'},window=64",
        "--tasks",
        "videonsa_needles",
        "--include_path",
        str(tmp_path),
        "--output_path",
        str(tmp_path / "out"),
    ]
    install_needle_task(workspace / "needles", tmp_path)
    done = subprocess.run(command, env={**os.environ, **offline_env}, capture_output=True, text=True)
    output = done.stdout + done.stderr
    assert "videonsa model_args: unknown argument(s) window; known: pretrained, attention" in output
    assert not list((tmp_path / "out").rglob("*_results.json"))


def test_a_second_task_folder_is_refused_as_lmms_eval_would_drop_one(workspace, tmp_path, monkeypatch):
    """lmms-eval's CLI keeps the last --include_path only: a user's folder beside the needle task would vanish."""
    from lmms_eval.__main__ import parse_eval_args

    first, second = tmp_path / "mine", tmp_path / "needles"
    command = lmms_eval_command({"pretrained": "d"}, ["t"], tmp_path, include_paths=[first])
    monkeypatch.setattr(sys, "argv", ["lmms_eval", *command[3:], "--include_path", str(second)])
    assert parse_eval_args()[1].include_path == str(second)
    with pytest.raises(UserError, match="lmms-eval takes one task folder \\(--include_path\\), got 2"):
        lmms_eval_command({"pretrained": "d"}, ["t"], tmp_path, include_paths=[first, second])
    with pytest.raises(UserError, match="takes one task folder"):
        run_lmms_eval(
            {"pretrained": "d"},
            ["videonsa_needles"],
            tmp_path / "out",
            questions=workspace / "needles",
            include_paths=[first],
        )


# --- the request shapes of the paper's benchmarks, in process --------------------------------------------------


def request(context, gen_kwargs, visuals, task="bench", doc_id=0) -> tuple[Instance, dict]:
    """An Instance as lmms-eval builds it for a simple model, and the task_dict entry its doc_to_visual reads."""
    arguments = (context, gen_kwargs, lambda doc: doc["visuals"], doc_id, task, "test")
    instance = Instance("generate_until", arguments, idx=0, metadata={"task": task, "doc_id": doc_id, "repeats": 1})
    return instance, {"visuals": visuals}


def serve(plugin, entries) -> list[str]:
    docs: dict[str, dict[str, list]] = {}
    for instance, doc in entries:
        docs.setdefault(instance.args[4], {"test": []})["test"].append(doc)
    plugin.task_dict = docs
    return [result.text for result in plugin.generate_until([instance for instance, _ in entries])]


def test_benchmark_request_shapes_get_the_api_answer_and_share_one_decode_per_video(workspace, plugin, qa, monkeypatch):
    clip0, clip1 = (str(workspace / "needles" / "videos" / f"clip{index}.mp4") for index in (0, 1))
    longvideobench = (
        "What is shown?\nA. a\nB. b\nC. c\nD. d\nAnswer with the option's letter from the given choices directly.\n",
        {"max_new_tokens": 32, "temperature": 0.0, "do_sample": False, "until": ["\n\n"]},
    )
    vsibench = (
        "How many chairs are in the room?\nPlease answer the question using a single word or phrase.",
        {"max_new_tokens": 16, "temperature": 0.0, "top_p": 1.0, "num_beams": 1, "do_sample": False, "until": ["\n\n"]},
    )
    timescope = (
        "<image>When does the dog appear?\nAnswer with the option's letter from the given choices directly.",
        {"max_new_tokens": 16, "temperature": 0.0, "until": ["\n\n"]},
    )
    entries = [
        request(*longvideobench, [clip0], doc_id=0),
        request(*vsibench, [clip1], doc_id=1),
        request(*timescope, [clip0], doc_id=2),
    ]
    decodes = []
    real_decode = lmms_model.decode_planned_video
    monkeypatch.setattr(lmms_model, "decode_planned_video", lambda plan: decodes.append(plan) or real_decode(plan))
    replies = serve(plugin, entries)
    assert [plan.info.name for plan in decodes] == [clip0, clip1]  # clip0's two questions: one decode
    expected = [
        expected_reply(qa, clip0, longvideobench[0], 32),
        expected_reply(qa, clip1, vsibench[0], 16),
        expected_reply(qa, clip0, timescope[0].replace("<image>", ""), 16),
    ]
    assert replies == expected


def test_a_visual_not_in_a_list_is_one_video(workspace, plugin, qa):
    # A task whose doc_to_visual returns the video's path itself, not a list holding it.
    clip = str(workspace / "needles" / "videos" / "clip0.mp4")
    gen_kwargs = {"max_new_tokens": MAX_NEW_TOKENS, "temperature": 0, "until": ["\n\n"]}
    replies = serve(plugin, [request("What moves?", gen_kwargs, clip), request("What moves?", gen_kwargs, [clip])])
    assert replies[0] == replies[1] == expected_reply(qa, clip, "What moves?", MAX_NEW_TOKENS)


def test_image_visuals_are_frames_and_a_single_image_fills_one_temporal_patch(workspace, plugin, qa, tmp_path):
    frames = [Image.fromarray(synthetic.synthetic_frame(index, 112, 112)) for index in range(4)]
    gen_kwargs = {"max_new_tokens": MAX_NEW_TOKENS, "temperature": 0, "until": ["\n\n"]}
    replies = serve(
        plugin,
        [
            request("Describe the frames.", gen_kwargs, frames),
            request("Describe the image.", gen_kwargs, frames[:1], doc_id=1),
        ],
    )
    paths = []
    for index, frame in enumerate(frames):
        paths.append(str(tmp_path / f"f{index}.png"))
        frame.save(paths[-1])
    assert replies[0] == expected_reply(qa, paths, "Describe the frames.", MAX_NEW_TOKENS)
    assert replies[1] == expected_reply(qa, paths[:1] * 2, "Describe the image.", MAX_NEW_TOKENS)


def test_a_failing_request_gets_an_empty_reply_and_an_error_line_and_the_others_are_answered(
    workspace, plugin, qa, caplog
):
    """A missing or broken video, no visual, two videos: each of those requests fails alone, named in the log."""
    clip = str(workspace / "needles" / "videos" / "clip0.mp4")
    broken = workspace / "broken.mp4"
    broken.write_bytes(b"not a video" * 16)
    gen_kwargs = {"max_new_tokens": MAX_NEW_TOKENS, "until": ["\n\n"]}
    visuals = [[str(workspace / "missing.mp4")], [clip], [], [clip, clip], [str(broken)]]
    with caplog.at_level("ERROR", logger=lmms_model.__name__):
        replies = serve(plugin, [request("Hi", gen_kwargs, shown, doc_id=i) for i, shown in enumerate(visuals)])
    assert replies == ["", expected_reply(qa, clip, "Hi", MAX_NEW_TOKENS), "", "", ""]
    *errors, summary = [record.getMessage() for record in caplog.records]
    by_doc = {
        int(re.match(r"videonsa: task bench, doc (\d+) not answered \(UserError: ", e).group(1)): e for e in errors
    }
    assert sorted(by_doc) == [0, 2, 3, 4]
    assert "missing.mp4: no such file" in by_doc[0]
    assert "doc 2 has no video or image" in by_doc[2]
    assert "with a video among them; one video only" in by_doc[3]
    assert "broken.mp4: cannot be opened as a video" in by_doc[4]
    assert summary == "videonsa: 4 of 5 requests failed (errors above) and were answered with an empty reply"
    with pytest.raises(NotImplementedError, match="loglikelihood"):
        plugin.loglikelihood([])


def test_generation_settings_no_request_can_run_stop_the_run(workspace):
    """Settings the task gives every request are refused once, not logged as failures request after request."""
    clip = str(workspace / "needles" / "videos" / "clip0.mp4")
    paper = VideoNSALmms(pretrained=str(workspace / "ckpt"), device="cpu", preset="paper", fps=FPS, max_frames=8)
    with pytest.raises(UserError, match="task bench: temperature=0.7 asks for sampling, and the paper preset"):
        serve(paper, [request("Hi", {"max_new_tokens": 2, "temperature": 0.7, "do_sample": True}, [clip])])
    with pytest.raises(UserError, match="task bench: num_beams=3 asks for beam search"):
        serve(paper, [request("Hi", {"max_new_tokens": 2, "num_beams": 3}, [clip])])


# --- settings ---------------------------------------------------------------------------------------------------


def test_generation_kwargs_follow_the_task_with_max_new_tokens_capped():
    greedy = generation_settings({"max_new_tokens": 1024, "temperature": 0, "do_sample": False}, None, "tomato")
    assert (greedy.max_new_tokens, greedy.temperature) == (1024, 0.0)
    assert generation_settings({"max_new_tokens": 1024}, 64, "tomato").max_new_tokens == 64
    assert generation_settings({}, 48, "t").max_new_tokens == 48
    sampled = generation_settings({"temperature": 0.7, "top_p": 0.9, "do_sample": True}, None, "t")
    assert (sampled.temperature, sampled.top_p) == (0.7, 0.9)
    assert generation_settings({"temperature": 0.7, "do_sample": False}, None, "t").temperature == 0.0
    with pytest.raises(UserError, match="task mlvu: num_beams=4 asks for beam search"):
        generation_settings({"num_beams": 4}, None, "mlvu")


def test_stop_strings_cut_at_the_earliest():
    assert cut_at_stop("B. a dog\n\nBecause", ["\n\n"]) == "B. a dog"
    assert cut_at_stop("x</s>y\n\nz", ["\n\n", "</s>"]) == "x"
    assert cut_at_stop("plain", ["\n\n"]) == "plain"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"fps": 2}, "pretrained=DIR_OR_HUB_ID is required"),
        ({"pretrained": "x", "blocks": 3}, "unknown argument(s) blocks"),
        ({"pretrained": "x", "max_frames": 2.5}, "max_frames must be a whole number, got 2.5"),
        ({"pretrained": "x", "fps": "fast"}, "fps must be a number, got 'fast'"),
    ],
)
def test_model_args_are_parsed_strictly(args, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_model_args(args)


def test_model_args_typed_as_lmms_eval_passes_them():
    parsed = parse_model_args(
        {
            "pretrained": "d",
            "fps": 4,
            "max_frames": 256,
            "budget": 65536,
            "prefer": "frames",
            "block_counts": 16,
            "window_size": "128",
            "attention": "dense",
        }
    )
    assert (parsed.fps, parsed.max_frames, parsed.budget, parsed.window_size) == (4.0, 256, 65536, 128)


def test_settings_of_the_other_preset_and_batching_are_refused_before_loading(workspace):
    checkpoint = str(workspace / "ckpt")
    with pytest.raises(UserError, match="pixels is a setting of the planner preset, and this run uses preset=paper"):
        VideoNSALmms(pretrained=checkpoint, preset="paper", pixels=50176)
    with pytest.raises(UserError, match="total_pixels is a setting of the paper preset"):
        VideoNSALmms(pretrained=checkpoint, preset="planner", total_pixels=10**7)
    with pytest.raises(UserError, match="batch_size=4 is not supported; use 1"):
        VideoNSALmms(pretrained=checkpoint, batch_size="4")


def test_sparse_budget_reaches_the_model(workspace):
    model = VideoNSALmms(pretrained=str(workspace / "ckpt"), device="cpu", block_counts=3, window_size=32)
    text_config = model.qa.model.config.text_config
    assert (text_config.block_counts, text_config.window_size) == (3, 32)


# --- the needle task's own functions ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "choice"),
    [("B", "B"), ("(C) the sun", "C"), ("The answer is D.", "D"), ("A. CAT", "A"), ("Apples", None), ("E", None)],
)
def test_needle_replies_are_scored_by_their_first_option_letter(reply, choice):
    assert needle_task.parse_choice(reply, "ABCD") == choice
    doc = {"id": "q", "kind": "order", "length_bin": "1m", "answer": "C", "options": OPTIONS}
    metrics = needle_task.process_results(doc, [reply])
    assert set(metrics) == {"accuracy", "accuracy_order"}
    assert metrics["accuracy"]["score"] == float(choice == "C")
    assert needle_task.accuracy([metrics["accuracy"], {"score": 1.0}]) == (float(choice == "C") + 1) / 2


def test_needle_videos_resolve_against_the_set_folder(tmp_path):
    assert needle_task.doc_to_visual({"video": "videos/a.mp4"}, tmp_path) == [str(tmp_path / "videos/a.mp4")]
    assert needle_task.doc_to_visual({"video": "/data/b.mp4"}, tmp_path) == ["/data/b.mp4"]


def test_installed_needle_task_inside_the_set_stays_movable(workspace, tmp_path):
    copy = tmp_path / "set"
    copy.mkdir()
    (copy / "questions.jsonl").write_text((workspace / "needles" / "questions.jsonl").read_text())
    install_needle_task(copy, copy)
    assert "test: questions.jsonl" in (copy / "videonsa_needles.yaml").read_text()
    assert "NEEDLE_SET_DIR = Path(__file__).parent" in (copy / "utils.py").read_text()
    elsewhere = install_needle_task(copy / "questions.jsonl", tmp_path / "tasks")
    assert f"test: '{copy / 'questions.jsonl'}'" in (elsewhere / "videonsa_needles.yaml").read_text()
    with pytest.raises(UserError, match="no such needle question file"):
        install_needle_task(tmp_path / "missing", tmp_path / "t2")
