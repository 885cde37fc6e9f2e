"""`videonsa data prepare`: probing, the filter's counts and reasons, manifest and report files, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from videonsa.cli import main
from videonsa.errors import UserError
from videonsa.training.prepare import ClipFilter, prepare_manifest, read_manifest
from videonsa.training.probe import ClipInfo, ClipUnreadable, frames_at_rate, probe_clip
from videonsa.video import probe_video
from videonsa.video.synthetic import write_image_folder, write_variable_frame_rate_video, write_video

# Frames are counted at 4 fps; keep 8 to 16 of them (2 to 4 seconds of video).
SMALL_FILTER = ClipFilter(sample_fps=4.0, min_frames=8, max_frames=16)


def llava(record_id: str, video: str) -> dict:
    return {"id": record_id, "video": video, "conversations": [
        {"from": "human", "value": "<image>\nWhat moves?"}, {"from": "gpt", "value": "A square."}]}


def frames_record(record_id: str, paths: list[str]) -> dict:
    return {"id": record_id, "messages": [
        {"role": "user", "content": "<video>What moves?"}, {"role": "assistant", "content": "A disc."}],
        "images": paths}


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    """Videos and frame folders of known lengths and rates, one of each kind the filter must sort."""
    root = tmp_path_factory.mktemp("media")
    small = {"width": 56, "height": 56}
    write_video(root / "short.mp4", frame_count=15, fps=10, **small)  # 1.5 s -> 6 frames at 4 fps
    write_video(root / "good.mp4", frame_count=30, fps=10, **small)  # 3 s -> 12 frames
    write_video(root / "long.mp4", frame_count=50, fps=10, **small)  # 5 s -> 20 frames
    write_video(root / "slow.mp4", frame_count=6, fps=2, **small)  # 3 s at 2 fps: below 4 fps
    (root / "garbage.mp4").write_bytes(b"\x00\x01not a video" * 64)
    write_image_folder(root / "frames10", frame_count=10, width=56, height=56, suffix=".png")
    write_image_folder(root / "frames3", frame_count=3, width=56, height=56, suffix=".png")
    return root


def annotation_file(root: Path) -> Path:
    frames10 = [f"frames10/frame_{i}.png" for i in range(1, 11)]
    frames3 = [f"frames3/frame_{i}.png" for i in range(1, 4)]
    lines = [
        llava("short", "short.mp4"),
        llava("good_a", "good.mp4"),
        llava("good_b", "good.mp4"),  # a second question on the same clip, probed once
        llava("long", "long.mp4"),
        llava("slow", "slow.mp4"),
        llava("garbage", "garbage.mp4"),
        llava("absent", "absent.mp4"),
        frames_record("frames_ok", frames10),
        frames_record("frames_few", frames3),
        frames_record("frames_gone", [*frames10[:9], "frames10/frame_99.png"]),
        {"id": "broken", "video": "good.mp4"},
    ]
    path = root / "annotations.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


EXPECTED_DROPS = {
    "short": "too_few_frames",
    "long": "too_many_frames",
    "slow": "fps",
    "garbage": "unreadable",
    "absent": "missing",
    "frames_few": "too_few_frames",
    "frames_gone": "missing",
    "broken": "malformed",
}


@pytest.mark.parametrize("workers", [0, 2])
def test_filter_keeps_and_drops_the_right_samples(media, tmp_path, workers):
    summary = prepare_manifest(annotation_file(media), tmp_path / "train.jsonl", clip_filter=SMALL_FILTER,
                               workers=workers, progress=False)
    entries = read_manifest(summary.manifest)
    assert sorted(entry.sample.id for entry in entries) == ["frames_ok", "good_a", "good_b"]
    assert summary.kept == 3
    assert summary.total == 11
    report = json.loads(summary.report.read_text())
    assert report["kept"] == 3 and report["dropped"] == 8 and report["total"] == 11
    assert report["dropped_by_reason"] == {
        "malformed": 1, "unsafe_path": 0, "missing": 2, "unreadable": 1, "fps": 1, "too_few_frames": 2,
        "too_many_frames": 1}
    assert {item["id"]: item["reason"] for item in report["dropped_samples"]} == EXPECTED_DROPS
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_manifest_records_what_probing_found(media, tmp_path):
    summary = prepare_manifest(annotation_file(media), tmp_path / "m.jsonl", clip_filter=SMALL_FILTER,
                               workers=0, progress=False)
    by_id = {entry.sample.id: entry for entry in read_manifest(summary.manifest)}
    video = by_id["good_a"].clip
    assert (video.num_frames, video.width, video.height, video.fps) == (30, 56, 56, 10.0)
    assert video.duration == pytest.approx(3.0)
    assert frames_at_rate(video, 4.0) == 12
    frames = by_id["frames_ok"].clip
    assert (frames.num_frames, frames.fps) == (10, None)
    assert by_id["good_a"].sample.video == str(media / "good.mp4")


def test_text_with_unicode_line_separators_survives_the_manifest(media, tmp_path):
    # json.dumps(ensure_ascii=False) writes U+2028 and U+0085 unescaped inside strings; they are not line ends.
    record = llava("sep", "good.mp4")
    record["conversations"][0]["value"] = "<image>\nWhat\u2028moves\x85here?"
    annotations = tmp_path / "a.jsonl"
    annotations.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    summary = prepare_manifest(annotations, tmp_path / "m.jsonl", media_root=media, clip_filter=SMALL_FILTER,
                               workers=0, progress=False)
    (entry,) = read_manifest(summary.manifest)
    assert entry.sample.turns[0].text == "<video>\nWhat\u2028moves\x85here?"


@pytest.mark.parametrize("content", [b"\x90\x00 a video, not a manifest", b'{"id": "a", "turns": [], "clip": null}\n',
                                     b"[" * 100_000 + b"\n"], ids=["binary", "null_clip", "deep"])
def test_a_file_that_is_no_manifest_is_one_line_user_error(tmp_path, content):
    path = tmp_path / "m.jsonl"
    path.write_bytes(content)
    with pytest.raises(UserError, match="manifest .*m.jsonl"):
        read_manifest(path)


def test_each_clip_is_probed_once(media, tmp_path):
    probed = []

    def counting_probe(paths, is_video):
        probed.append(paths)
        return probe_clip(paths, is_video)

    prepare_manifest(annotation_file(media), tmp_path / "m.jsonl", clip_filter=SMALL_FILTER, workers=0,
                     prober=counting_probe, progress=False)
    assert len(probed) == len(set(probed)) == 9  # 10 clip references, good.mp4 twice; the broken record none


def test_frames_at_rate_counts_the_sampled_frames():
    assert frames_at_rate(ClipInfo(num_frames=3000, width=1, height=1, fps=30.0, duration=100.0), 4.0) == 400
    assert frames_at_rate(ClipInfo(num_frames=200, width=1, height=1, fps=2.0, duration=100.0), 4.0) == 200
    assert frames_at_rate(ClipInfo(num_frames=37, width=1, height=1), 4.0) == 37  # frame lists: as given


def test_filter_settings_are_checked():
    with pytest.raises(UserError, match="max_frames"):
        ClipFilter(min_frames=10, max_frames=5)
    with pytest.raises(UserError, match="sampling rate"):
        ClipFilter(sample_fps=0)


def test_cli_prepare_writes_manifest_and_report(media, tmp_path, capsys):
    manifest = tmp_path / "out" / "train.jsonl"
    code = main(["data", "prepare", str(annotation_file(media)), "-o", str(manifest), "--min-frames", "8",
                 "--max-frames", "16", "--workers", "0", "--quiet"])
    assert code == 0
    assert len(read_manifest(manifest)) == 3
    assert (tmp_path / "out" / "train.report.json").is_file()
    assert "kept" in capsys.readouterr().out


@pytest.mark.parametrize("which", ["manifest", "report"])
def test_an_output_that_is_a_folder_is_refused_before_probing(media, tmp_path, which):
    probed = []
    folder = tmp_path / "a folder"
    folder.mkdir()
    paths = {"manifest": tmp_path / "m.jsonl", "report": None, which: folder}
    with pytest.raises(UserError, match=f"the {which} path .*a folder is a folder"):
        prepare_manifest(annotation_file(media), paths["manifest"], report=paths["report"], workers=0,
                         prober=lambda media, is_video: probed.append(media), progress=False)
    assert probed == []


@pytest.mark.parametrize(("flags", "message"), [
    (["--min-frames", "0"], "--min-frames must be at least 1, got 0"),
    (["--min-frames", "20", "--max-frames", "10"], "--max-frames (10) is below --min-frames (20)"),
    (["--fps", "0"], "--fps must be a positive sampling rate, got 0"),
])
def test_cli_prepare_names_the_filter_flags(tmp_path, capsys, flags, message):
    assert main(["data", "prepare", str(tmp_path / "a.jsonl"), "-o", str(tmp_path / "m.jsonl"), *flags]) == 2
    assert capsys.readouterr().err.strip() == f"videonsa data: error: {message}"


def test_cli_prepare_reports_user_mistakes_in_one_line(tmp_path, capsys):
    code = main(["data", "prepare", str(tmp_path / "none.jsonl"), "-o", str(tmp_path / "m.jsonl")])
    assert code == 2
    error = capsys.readouterr().err
    assert "does not exist" in error and "Traceback" not in error and error.count("\n") == 1
    assert not (tmp_path / "m.jsonl").exists()


def test_unsafe_paths_are_dropped_with_their_own_reason(media, tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(llava("good", "good.mp4")) + "\n" + json.dumps(llava("up", "../good.mp4")) + "\n")
    summary = prepare_manifest(path, tmp_path / "m.jsonl", media_root=media / "frames10", clip_filter=SMALL_FILTER,
                               workers=0, progress=False)
    assert summary.kept == 0 and summary.dropped == {"unsafe_path": 1, "missing": 1}
    summary = prepare_manifest(path, tmp_path / "m.jsonl", media_root=media / "frames10", clip_filter=SMALL_FILTER,
                               workers=0, progress=False, allow_outside_root=True)
    assert summary.kept == 1


@pytest.mark.parametrize("script", ["ffconcat version 1.0\nfile seg.ts\n", "#EXTM3U\n#EXTINF:3,\nseg.ts\n"])
def test_a_list_of_files_disguised_as_a_video_is_never_opened(tmp_path, script):
    write_video(tmp_path / "seg.ts", frame_count=30, fps=10, width=56, height=56)  # what the script would pull in
    fake = tmp_path / "clip.mp4"
    fake.write_text(script)
    with pytest.raises(ClipUnreadable, match="is a playlist"):
        probe_clip((str(fake),), True)


def test_variable_frame_rate_mkv_is_probed_as_ask_reads_it(tmp_path):
    # Matroska with a 1 ms time base: FFmpeg reports 1000 fps, which is no real frame rate.
    times = [0.0, 0.1, 0.2, 0.3, 0.5, 0.6, 0.7, 0.9, 1.0, 1.1, 1.3, 1.4, 1.5, 1.7, 1.8, 1.9, 2.1, 2.2, 2.3, 2.5]
    video = write_variable_frame_rate_video(tmp_path / "vfr.mkv", times, end_time=2.6, width=56, height=56)
    clip = probe_clip((str(video),), True)
    assert clip.num_frames == 20 and clip.fps == pytest.approx(20 / 2.6) and clip.duration == pytest.approx(2.6)
    assert frames_at_rate(clip, 4.0) == 10
    info = probe_video(video)
    assert (info.frame_count, info.average_fps) == (clip.num_frames, clip.fps)
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(llava("vfr", "vfr.mkv")) + "\n")
    summary = prepare_manifest(path, tmp_path / "m.jsonl", clip_filter=ClipFilter(min_frames=8, max_frames=16),
                               workers=0, progress=False)
    assert summary.kept == 1, summary.dropped


def test_manifest_is_found_from_another_directory(media, tmp_path, monkeypatch):
    monkeypatch.chdir(media)
    summary = prepare_manifest(annotation_file(media).name, tmp_path / "m.jsonl", media_root=".",
                               clip_filter=SMALL_FILTER, workers=0, progress=False)
    monkeypatch.chdir(tmp_path)
    for entry in read_manifest(summary.manifest):
        assert all(Path(path).is_absolute() and Path(path).is_file() for path in entry.sample.media_paths)


def test_relative_manifest_paths_resolve_against_the_manifest(media, tmp_path, monkeypatch):
    summary = prepare_manifest(annotation_file(media), media / "m.jsonl", clip_filter=SMALL_FILTER, workers=0,
                               progress=False)
    records = [json.loads(line) for line in summary.manifest.read_text().splitlines()]
    for record in records:
        record["video"] = record["video"] and str(Path(record["video"]).relative_to(media))
        record["frames"] = [str(Path(frame).relative_to(media)) for frame in record["frames"]]
    moved = media / "m.jsonl"
    moved.write_text("".join(json.dumps(record) + "\n" for record in records))
    monkeypatch.chdir(tmp_path)
    entries = read_manifest(moved)
    assert entries[0].sample.media_paths[0] == str(media / Path(records[0]["video"] or records[0]["frames"][0]))
    assert all(Path(path).is_file() for entry in entries for path in entry.sample.media_paths)


def test_duplicate_ids_are_in_the_report(media, tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(llava("same", str(media / "good.mp4"))) + "\n" +
                    json.dumps(llava("same", str(media / "long.mp4"))) + "\n")
    summary = prepare_manifest(path, tmp_path / "m.jsonl", media_root=media, allow_outside_root=True,
                               clip_filter=SMALL_FILTER, workers=0, progress=False)
    report = json.loads(summary.report.read_text())
    assert list(report["duplicate_ids"]) == ["same"] and len(report["duplicate_ids"]["same"]) == 2
    assert summary.duplicate_ids == 1


def test_cli_prepare_keeping_nothing_fails_with_a_hint(media, tmp_path, capsys):
    code = main(["data", "prepare", str(annotation_file(media)), "-o", str(tmp_path / "m.jsonl"), "--workers", "0",
                 "--quiet"])  # the paper's 350-550 frames: none of these short clips pass
    assert code != 0
    error = capsys.readouterr().err
    assert "kept 0 of 11" in error and "--min-frames" in error
    assert (tmp_path / "m.report.json").is_file()


def test_oversized_frame_image_is_unreadable_not_fatal(tmp_path, monkeypatch):
    from PIL import Image

    write_image_folder(tmp_path / "f", frame_count=3, width=56, height=56, suffix=".png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 56 x 56 is then a decompression bomb
    with pytest.raises(ClipUnreadable, match="too large"):
        probe_clip(tuple(str(tmp_path / "f" / f"frame_{i}.png") for i in (1, 2, 3)), False)
