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


def test_a_jsonl_record_with_unicode_line_separators_is_one_record(tmp_path):
    # Raw U+2028 / U+0085 inside a JSON string (json.dumps with ensure_ascii=False) do not end the line.
    record = {"id": "ok", "video": "v.mp4", "conversations": [
        {"from": "human", "value": "what\u2028now\x85?"}, {"from": "gpt", "value": "a"}]}
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    result = read_annotations(path)
    assert result.rejected == []
    assert result.samples[0].turns[0].text == "<video>\nwhat\u2028now\x85?"


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


def llava_record(record_id: str, video: str) -> dict:
    return {"id": record_id, "video": video, "conversations": [
        {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}


@pytest.mark.parametrize(
    "video",
    ["../secret.mp4", "sub/../../secret.mp4", "/etc/passwd", "~/clip.mp4", "list.m3u8", "sub/list.M3U",
     "http://example.com/a.mp4", "file:///etc/passwd", "concat:a.mp4|b.mp4", "pipe:0", "clip.ffconcat", "a\0b.mp4"],
)
def test_paths_leaving_the_video_root_are_refused(tmp_path, video):
    root = tmp_path / "root"
    root.mkdir()
    result = read_annotations(write_jsonl(tmp_path / "a.jsonl", [llava_record("bad", video)]), media_root=root)
    assert result.samples == []
    (rejected,) = result.rejected
    assert rejected.reason == "unsafe_path"


def test_frame_paths_are_confined_too(tmp_path):
    record = {"id": "f", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
              "images": ["ok.png", "../../etc/hostname"]}
    result = read_annotations(write_jsonl(tmp_path / "a.jsonl", [record]))
    assert [item.reason for item in result.rejected] == ["unsafe_path"]


def test_a_symlink_out_of_the_root_is_refused_and_one_inside_is_kept(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "v.mp4").write_bytes(b"x")
    (root / "inside.mp4").write_bytes(b"x")
    (root / "escape.mp4").symlink_to(outside / "v.mp4")
    (root / "alias.mp4").symlink_to(root / "inside.mp4")
    (root / "escape_dir").symlink_to(outside)
    records = [llava_record("escape", "escape.mp4"), llava_record("alias", "alias.mp4"),
               llava_record("through_dir", "escape_dir/v.mp4")]
    result = read_annotations(write_jsonl(tmp_path / "a.jsonl", records), media_root=root)
    assert [sample.id for sample in result.samples] == ["alias"]
    assert result.samples[0].video == str((root / "inside.mp4").resolve())
    assert {item.id: item.reason for item in result.rejected} == {"escape": "unsafe_path",
                                                                   "through_dir": "unsafe_path"}


def test_the_report_does_not_tell_whether_a_file_outside_exists(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "exists.mp4").write_bytes(b"x")
    records = [llava_record("a", "../exists.mp4"), llava_record("b", "../absent.mp4"),
               llava_record("c", str(tmp_path / "exists.mp4")), llava_record("d", str(tmp_path / "absent.mp4"))]
    result = read_annotations(write_jsonl(tmp_path / "a.jsonl", records), media_root=root)
    details = [item.detail.replace("exists", "NAME").replace("absent", "NAME") for item in result.rejected]
    assert len(details) == 4 and details[0] == details[1] and details[2] == details[3]


def test_outside_paths_are_allowed_when_asked_but_never_urls_or_playlists(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    records = [llava_record("up", "../v.mp4"), llava_record("abs", str(tmp_path / "w.mp4")),
               llava_record("url", "https://example.com/v.mp4"), llava_record("list", "../v.m3u8")]
    result = read_annotations(write_jsonl(tmp_path / "a.jsonl", records), media_root=root, allow_outside_root=True)
    assert {sample.id: sample.video for sample in result.samples} == {
        "up": str(tmp_path / "v.mp4"), "abs": str(tmp_path / "w.mp4")}
    assert {item.id for item in result.rejected} == {"url", "list"}


def test_relative_media_root_gives_absolute_paths(tmp_path, monkeypatch):
    (tmp_path / "root").mkdir()
    monkeypatch.chdir(tmp_path)
    path = write_jsonl(tmp_path / "a.jsonl", [llava_record("a", "concat:x.mp4")])
    assert read_annotations(path, media_root=".").rejected[0].reason == "unsafe_path"
    path = write_jsonl(tmp_path / "b.jsonl", [llava_record("b", "v.mp4")])
    assert read_annotations(path, media_root="root").samples[0].video == str(tmp_path / "root" / "v.mp4")


def test_a_line_that_is_not_utf8_is_rejected_not_fatal(tmp_path):
    good = json.dumps(llava_record("ok", "v.mp4")).encode()
    bad = json.dumps(llava_record("bad", "v.mp4")).encode().replace(b'"a"', b'"\xff\xfe"')
    path = tmp_path / "a.jsonl"
    path.write_bytes(good + b"\n" + bad + b"\n" + good + b"\n")
    result = read_annotations(path)
    assert [sample.id for sample in result.samples] == ["ok", "ok"]
    (rejected,) = result.rejected
    assert rejected.reason == "malformed" and "UTF-8" in rejected.detail and rejected.origin.endswith(":2")
    json.dumps(rejected.id, ensure_ascii=False).encode("utf-8")  # the report can be written


def test_non_utf8_record_in_a_json_list_is_rejected_not_fatal(tmp_path):
    good = json.dumps(llava_record("ok", "v.mp4")).encode()
    bad = json.dumps(llava_record("bad\udcff", "v.mp4")).encode().replace(b"\\udcff", b"\xff")
    path = tmp_path / "a.json"
    path.write_bytes(b"[" + good + b"," + bad + b"]")
    result = read_annotations(path)
    assert [sample.id for sample in result.samples] == ["ok"]
    assert "UTF-8" in result.rejected[0].detail
    json.dumps(result.rejected[0].id, ensure_ascii=False).encode("utf-8")


def test_a_deeply_nested_line_is_rejected_not_fatal(tmp_path):
    good = json.dumps(llava_record("ok", "v.mp4"))
    deep = '{"id": "deep", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    result = read_annotations(write_jsonl(tmp_path / "a.jsonl", [good, deep, good]))
    assert len(result.samples) == 2
    assert "nested" in result.rejected[0].detail


def test_a_deeply_nested_json_list_is_one_line_user_error(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(UserError, match="nested"):
        read_annotations(path)


def test_duplicate_ids_are_reported(tmp_path):
    records = [llava_record("a", "v.mp4"), llava_record("b", "v.mp4"), llava_record("a", "w.mp4")]
    result = read_annotations(write_jsonl(tmp_path / "a.jsonl", records))
    assert len(result.samples) == 3
    assert list(result.duplicate_ids) == ["a"]
    assert [origin.rsplit(":", 1)[1] for origin in result.duplicate_ids["a"]] == ["1", "3"]
