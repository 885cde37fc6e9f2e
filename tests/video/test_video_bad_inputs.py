"""Every bad video input gives one `UserError` line naming the file at fault."""

from __future__ import annotations

import pytest
from PIL import Image

from videonsa.errors import UserError
from videonsa.video import SamplingSettings, decode_video, load_video, plan_video, probe_video
from videonsa.video.synthetic import (
    corrupted_copy,
    synthetic_frame,
    truncated_copy,
    undecodable_copy,
    write_png_header_only,
)

SMALL = SamplingSettings(min_pixels_per_frame=28 * 28 * 4)


def load_error(video, **kwargs) -> str:
    """The message of the UserError that probing, planning and decoding `video` raises (one line)."""
    with pytest.raises(UserError) as caught:
        load_video(video, SMALL, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.mp4"
    assert load_error(missing) == f"{missing}: no such file or folder"


def test_not_a_video(tmp_path):
    text = tmp_path / "notes.mp4"
    text.write_text("these are not frames\n" * 50)
    assert load_error(text).startswith(f"{text}: cannot be opened as a video")


def test_truncated_mp4_cannot_be_opened(videos, tmp_path):
    cut = truncated_copy(videos.short, tmp_path / "cut.mp4", keep_fraction=0.5)
    message = load_error(cut)
    assert message.startswith(str(cut)) and "truncated" in message


def test_truncated_mkv_stops_early(videos, tmp_path):
    cut = truncated_copy(videos.short_mkv, tmp_path / "cut.mkv", keep_fraction=0.5)
    message = load_error(cut)
    assert message.startswith(f"{cut}: the video stops at")
    assert "truncated or corrupt" in message


def test_corrupt_packets_after_the_header(videos, tmp_path):
    broken = corrupted_copy(videos.short_mkv, tmp_path / "noise.mkv", start_fraction=0.3)
    message = load_error(broken)
    assert message.startswith(str(broken)) and "corrupt" in message


def test_zero_decodable_frames(videos, tmp_path):
    noise = undecodable_copy(videos.short_mkv, tmp_path / "noise-frames.mkv")
    message = load_error(noise)
    assert message.startswith(f"{noise}: its video stream has no decodable frames")


def test_audio_only(videos):
    assert load_error(videos.audio_only) == f"{videos.audio_only}: has audio but no video stream"


def test_single_frame_is_shorter_than_one_temporal_patch(videos, tmp_path):
    message = load_error(videos.single_frame)
    assert message.startswith(f"{videos.single_frame}: has a single video frame") and "temporal patch" in message
    lone = tmp_path / "lone"
    lone.mkdir()
    Image.fromarray(synthetic_frame(0, 56, 56)).save(lone / "0.png")
    assert "single frame image" in load_error(lone)


def test_enormous_resolution_is_refused_before_decoding(videos):
    with pytest.raises(UserError, match=r"short.mp4: resolution 112x112 is enormous \(more than 10,000 pixels"):
        probe_video(videos.short, max_source_pixels=10_000)


@pytest.mark.parametrize(("width", "height"), [(10_000, 8_000), (30_000, 20_000)])
def test_enormous_frame_images_are_refused_from_their_header(tmp_path, width, height):
    """80 Mpx passes PIL but not our 67 Mpx limit; 600 Mpx is refused by PIL itself. Nothing is decoded."""
    folder = tmp_path / "giant"
    folder.mkdir()
    for index in range(2):
        write_png_header_only(folder / f"{index}.png", width, height)
    message = load_error(folder)
    assert message.startswith(f"{folder / '0.png'}:") and "enormous" in message


def test_too_elongated_frames(tmp_path):
    folder = tmp_path / "strip"
    folder.mkdir()
    for index in range(2):
        Image.new("RGB", (2010, 10)).save(folder / f"{index}.png")
    assert "more elongated than 200:1" in load_error(folder)


def test_budget_too_small_for_two_frames(videos):
    info = probe_video(videos.short)
    with pytest.raises(UserError, match="budget_tokens=40 is too small"):
        plan_video(info, SamplingSettings(budget_tokens=40, min_pixels_per_frame=3136), text_tokens=37)


def test_empty_folder_and_folder_without_images(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no frames here")
    assert load_error(empty).startswith(f"{empty}: folder holds no frame images")


def test_unreadable_or_mismatched_frame_images(videos, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for index in range(4):
        Image.fromarray(synthetic_frame(index, 56, 56)).save(folder / f"{index}.png")
    (folder / "2.png").write_bytes(b"not a png")
    assert load_error(folder, frames_fps=4.0).startswith(f"{folder / '2.png'}: not a readable image")
    Image.fromarray(synthetic_frame(2, 84, 56)).save(folder / "2.png")
    assert "all frames must have one size" in load_error(folder, frames_fps=4.0)


def test_list_with_a_missing_image(videos, tmp_path):
    images = sorted(videos.frame_folder.glob("*.png"))[:2] + [tmp_path / "gone.png"]
    assert load_error([str(p) for p in images]) == f"{tmp_path / 'gone.png'}: no such image file"


def test_unknown_backend_and_video_of_the_wrong_type(videos):
    assert "backend must be one of pyav, decord" in load_error(videos.short, backend="opencv")
    with pytest.raises(UserError, match="a video must be a file path"):
        probe_video(42)


def test_decord_backend_without_decord_says_how_to_install(videos, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_decord(name, *args, **kwargs):
        if name == "decord":
            raise ImportError("no decord here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_decord)
    assert load_error(videos.short, backend="decord") == "backend 'decord' needs the decord package: pip install decord"


def test_errors_leave_no_partial_result(videos, tmp_path):
    """Decoding a truncated file raises before returning anything: no half-filled frames reach the model."""
    cut = truncated_copy(videos.short_mkv, tmp_path / "cut.mkv", keep_fraction=0.5)
    info = probe_video(cut)  # the header is intact, so probing passes
    with pytest.raises(UserError):
        decode_video(plan_video(info, SMALL))
