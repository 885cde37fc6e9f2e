"""Annotation readers: LLaVA-Video-178K and frames-as-images layouts, normalisation, and bad records."""

from __future__ import annotations

import json

import pytest

from videonsa.errors import UserError
from videonsa.training.annotations import Sample, Turn, read_annotations


def write_json(path, records):
    path.write_text(json.dumps(records))
    return path


def write_jsonl(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_llava_video_record_is_normalised(tmp_path):
    records = [
        {
            "id": "v1_0",
            "video": "sub/clip.mp4",
            "data_source": "academic",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat happens?"},
                {"from": "gpt", "value": "A dog runs."},
                {"from": "human", "value": "Then?"},
                {"from": "gpt", "value": "It sits."},
            ],
        }
    ]
    result = read_annotations(write_json(tmp_path / "a.json", records), media_root=tmp_path)
    assert result.rejected == []
    (sample,) = result.samples
    assert sample.id == "v1_0"
    assert sample.video == str(tmp_path / "sub" / "clip.mp4")
    assert sample.frames == ()
    assert [turn.role for turn in sample.turns] == ["user", "assistant", "user", "assistant"]
    assert sample.turns[0].text == "<video>\nWhat happens?"  # LLaVA-Video's <image> names the whole clip
    assert sample.origin.endswith("a.json[0]")


def test_missing_placeholder_puts_the_clip_before_the_first_question(tmp_path):
    record = {"id": "x", "video": "c.mp4", "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Describe."},
        {"from": "gpt", "value": "Grey."},
    ]}
    (sample,) = read_annotations(write_jsonl(tmp_path / "a.jsonl", [record])).samples
    assert sample.turns[1] == Turn("user", "<video>\nDescribe.")
    assert sample.video == str(tmp_path / "c.mp4")  # relative to the annotation file without a media root


def test_frames_layout_with_one_image_tag_per_frame(tmp_path):
    record = {
        "messages": [
            {"role": "user", "content": "<image><image><image>What is shown?"},
            {"role": "assistant", "content": "Cats."},
        ],
        "images": ["f/1.jpg", "f/2.jpg", "f/3.jpg"],
    }
    (sample,) = read_annotations(write_jsonl(tmp_path / "m.jsonl", [record])).samples
    assert sample.per_frame_tags
    assert sample.frames == tuple(str(tmp_path / "f" / f"{i}.jpg") for i in (1, 2, 3))
    assert sample.id.endswith("m.jsonl:1")  # no id: the origin names it


def test_frames_layout_with_content_parts_and_a_single_video_part(tmp_path):
    record = {
        "id": "p",
        "messages": [
            {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Count them."}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Three."}]},
        ],
        "images": ["a.png", "b.png"],
    }
    (sample,) = read_annotations(write_jsonl(tmp_path / "m.jsonl", [record])).samples
    assert not sample.per_frame_tags
    assert sample.turns[0].text == "<video>Count them."
    assert sample.turns[1].text == "Three."


@pytest.mark.parametrize(
    ("record", "why"),
    [
        ({"id": "a", "conversations": [{"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "a"}]},
         "without a 'video'"),
        ({"id": "b", "video": "v.mp4", "conversations": [{"from": "human", "value": "<image>q"}]},
         "no assistant turn"),
        ({"id": "c", "video": "v.mp4", "conversations": [{"from": "robot", "value": "q"}]}, "unknown speaker"),
        ({"id": "d", "video": "v.mp4", "conversations": [
            {"from": "human", "value": "<image><image>q"}, {"from": "gpt", "value": "a"}]}, "2 media placeholders"),
        ({"id": "e", "video": "v.mp4", "conversations": [
            {"from": "gpt", "value": "first"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
         "first turn"),
        ({"id": "f", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
         "'images'"),
        ({"id": "g", "video": "v.mp4"}, "neither 'conversations'"),
    ],
)
def test_malformed_records_are_rejected_with_a_reason(tmp_path, record, why):
    good = {"id": "ok", "video": "v.mp4", "conversations": [
        {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    result = read_annotations(write_jsonl(tmp_path / "a.jsonl", [good, record]))
    assert [sample.id for sample in result.samples] == ["ok"]
    (rejected,) = result.rejected
    assert rejected.reason == "malformed"
    assert why in rejected.detail
    assert rejected.origin.endswith("a.jsonl:2")


def test_a_jsonl_line_that_is_not_json_is_rejected_not_fatal(tmp_path):
    good = {"id": "ok", "video": "v.mp4", "conversations": [
        {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    result = read_annotations(write_jsonl(tmp_path / "a.jsonl", [good, "{not json", good]))
    assert len(result.samples) == 2
    assert "not JSON" in result.rejected[0].detail


def test_unusable_annotation_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_annotations(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("[{")
    with pytest.raises(UserError, match="not valid JSON"):
        read_annotations(broken)
    with pytest.raises(UserError, match="not a folder"):
        read_annotations(write_json(tmp_path / "a.json", []), media_root=tmp_path / "nope")


def test_sample_json_round_trip():
    sample = Sample("s", (Turn("user", "<image><image>q"), Turn("assistant", "a")), frames=("x", "y"),
                    per_frame_tags=True, origin="f:1")
    assert Sample.from_json(json.loads(json.dumps(sample.to_json()))) == sample
