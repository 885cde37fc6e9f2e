"""Decoding synthetic videos: the sampled frames are the right frames, at the right timestamps, at the planned size."""

from __future__ import annotations

import importlib.util
import math
import shutil

import numpy as np
import pytest

from videonsa.video import SamplingSettings, decode_video, load_video, plan_video, probe_video, synthetic
from videonsa.video.synthetic import read_frame_index, shape_positions, square_centre_in

SMALL = dict(min_pixels_per_frame=28 * 28 * 4)


def shown_index(time: float, starts) -> int:
    """Index of the frame showing at `time` given increasing start times."""
    return max(i for i, start in enumerate(starts) if start <= time + 1e-6)


def test_probe_reads_size_duration_rate_and_frame_count(videos):
    info = probe_video(videos.short)
    assert (info.width, info.height) == (112, 112)
    assert info.duration == pytest.approx(4.0)
    assert info.start_time == 0.0
    assert info.average_fps == pytest.approx(25.0)
    assert info.frame_count == 100 and info.frame_count_is_exact
    assert info.codec == "h264"
    assert "4.00s" in info.describe() and "112x112" in info.describe()
    wide = probe_video(videos.wide)  # Matroska stores no frame count: estimated from the rate
    assert (wide.width, wide.height, wide.frame_count, wide.frame_count_is_exact) == (224, 112, 50, False)
    assert wide.duration == pytest.approx(5.0)


def test_fps_sampling_picks_the_frame_showing_at_each_time(videos):
    plan = plan_video(probe_video(videos.short), SamplingSettings(fps=4, **SMALL))
    assert plan.frame_count == 16
    video = decode_video(plan)
    assert video.frames.shape == (16, 112, 112, 3) and video.frames.dtype == np.uint8
    indices = [read_frame_index(frame) for frame in video.frames]
    assert indices == [math.floor(k * 0.25 * 25 + 1e-9) for k in range(16)]  # 0, 6, 12, 18, 25, ...
    assert video.timestamps == pytest.approx([index / 25 for index in indices])
    assert video.seconds_per_patch == pytest.approx(0.5, abs=0.01)


def test_max_frames_spreads_samples_over_the_whole_video(videos):
    plan = plan_video(probe_video(videos.short), SamplingSettings(fps=4, max_frames=6, **SMALL))
    video = decode_video(plan)
    indices = [read_frame_index(frame) for frame in video.frames]
    assert indices == [math.floor(k * (4.0 / 6) * 25 + 1e-9) for k in range(6)]
    assert video.timestamps[-1] > 3.2


def test_seeking_decodes_a_small_part_of_a_long_video(videos):
    info = probe_video(videos.long)
    plan = plan_video(info, SamplingSettings(fps=4, max_frames=20, **SMALL))
    video = decode_video(plan)
    indices = [read_frame_index(frame) for frame in video.frames]
    assert indices == [math.floor(k * 3.0 * 25 + 1e-9) for k in range(20)]
    assert video.seeks >= 10
    # Each sample costs at most one keyframe interval (25 frames) plus a few frames of decoder delay.
    assert video.frames_decoded < 20 * 30 < info.frame_count


def test_mpeg_ts_seeks_that_land_late_step_back_to_the_right_frame(tmp_path):
    """MPEG-TS has no index: a seek can land after the wanted time, and the reader must step back."""
    path = synthetic.write_video(tmp_path / "long.ts", frame_count=1000, fps=25, gop=25)
    info = probe_video(path)
    assert info.start_time > 0  # the TS clock does not start at zero
    plan = plan_video(info, SamplingSettings(fps=4, max_frames=10, **SMALL))
    video = decode_video(plan)
    assert [read_frame_index(f) for f in video.frames] == [100 * k for k in range(10)]
    assert video.timestamps == pytest.approx([info.start_time + 4.0 * k for k in range(10)])
    assert video.seeks > 10  # some seeks were retried further back


def test_dense_sampling_decodes_forward_instead_of_seeking(videos):
    plan = plan_video(probe_video(videos.long), SamplingSettings(fps=4, max_frames=120, **SMALL))
    video = decode_video(plan)
    assert video.seeks == 0
    assert video.frames_decoded <= 1500
    assert [read_frame_index(f) for f in video.frames] == [math.floor(k * 0.5 * 25 + 1e-9) for k in range(120)]


def test_variable_frame_rate_timestamps_are_the_real_ones(videos):
    info = probe_video(videos.variable)
    assert info.duration == pytest.approx(videos.vfr_end)
    # The header's 1000 fps is Matroska's time base: the probe counts the frames and takes their mean rate.
    count = len(videos.vfr_times)
    assert (info.frame_count, info.frame_count_is_exact) == (count, True)
    assert info.average_fps == pytest.approx(count / videos.vfr_end)
    plan = plan_video(info, SamplingSettings(fps=4, **SMALL))  # 4 fps would ask for 12: capped at the 10 there are
    assert plan.timestamps == pytest.approx([k * videos.vfr_end / count for k in range(count)])
    video = decode_video(plan)
    expected = [shown_index(t, videos.vfr_times) for t in plan.timestamps]
    assert [read_frame_index(frame) for frame in video.frames] == expected
    assert video.timestamps == pytest.approx([videos.vfr_times[i] for i in expected])
    # The time positions follow the real timestamps' slope, not the planned even spacing.
    slope = np.polyfit(np.arange(count), [videos.vfr_times[i] for i in expected], 1)[0]
    assert video.seconds_per_patch == pytest.approx(2 * slope)


def test_a_matroska_file_starting_late_lasts_from_its_first_frame_to_its_last(tmp_path):
    """Matroska's Duration runs from 0 on the file's clock (it is the last frame's end), so a file whose frames start
    at 2 s (a remuxed TS stream, a cut with copied timestamps) lasts Duration - 2 s, not Duration."""
    times = [2.0 + index / 10 for index in range(30)]
    late = synthetic.write_variable_frame_rate_video(tmp_path / "late.mkv", times, end_time=5.0)
    info = probe_video(late)
    assert (info.start_time, info.end_time) == pytest.approx((2.0, 5.0))
    assert info.average_fps == pytest.approx(10.0) and info.frame_count == 30
    video = decode_video(plan_video(info, SamplingSettings(fps=10, **SMALL)))  # the planner wanted 50 frames before
    assert [read_frame_index(frame) for frame in video.frames] == list(range(30))
    assert video.timestamps == pytest.approx(times)


def test_frames_are_resized_to_the_plan_and_shapes_move_where_expected(videos):
    info = probe_video(videos.wide)  # 224x112
    plan = plan_video(info, SamplingSettings(fps=2, pixels_per_frame=112 * 56, min_pixels_per_frame=56 * 28))
    assert (plan.frame_height, plan.frame_width) == (56, 112)
    video = decode_video(plan)
    assert video.frames.shape == (10, 56, 112, 3)
    for frame, time in zip(video.frames, video.timestamps, strict=True):
        index = read_frame_index(frame)
        assert index == round(time * 10)
        expected_x, expected_y = shape_positions(index, 224, 112).square_centre
        x, y = square_centre_in(frame)
        assert abs(x * 2 - expected_x) <= 3 and abs(y * 2 - expected_y) <= 3


def test_progress_reports_every_frame(videos):
    calls = []
    load_video(videos.short, SamplingSettings(fps=2, **SMALL), progress=lambda done, total: calls.append((done, total)))
    assert calls == [(k, 8) for k in range(1, 9)]


def test_folder_of_images_plays_in_natural_order_at_frames_fps(videos):
    info = probe_video(videos.frame_folder, frames_fps=2.0)
    assert info.backend == "images" and info.frame_count == 12 and info.duration == pytest.approx(6.0)
    assert [path.name for path in info.paths[:3]] == ["frame_1.png", "frame_2.png", "frame_3.png"]
    assert info.paths[9].name == "frame_10.png"
    video = decode_video(plan_video(info, SamplingSettings(fps=1, **SMALL)))
    assert [read_frame_index(frame) for frame in video.frames] == [0, 2, 4, 6, 8, 10]
    assert video.timestamps == pytest.approx([0, 1, 2, 3, 4, 5])


def test_hidden_files_in_a_frame_folder_are_not_frames(videos, tmp_path):
    folder = tmp_path / "copied-from-a-mac"
    shutil.copytree(videos.frame_folder, folder)
    (folder / "._frame_1.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")  # AppleDouble metadata
    (folder / ".thumbnail.png").write_bytes((folder / "frame_1.png").read_bytes())
    info = probe_video(folder, frames_fps=2.0)
    assert info.frame_count == 12 and [path.name for path in info.paths[:2]] == ["frame_1.png", "frame_2.png"]
    video = decode_video(plan_video(info, SamplingSettings(fps=1, **SMALL)))
    assert [read_frame_index(frame) for frame in video.frames] == [0, 2, 4, 6, 8, 10]


def test_list_of_images_is_a_video_in_the_given_order(videos):
    images = sorted(videos.frame_folder.glob("*.png"), key=lambda p: -int(p.stem.split("_")[1]))[:4]
    video = load_video([str(p) for p in images], SamplingSettings(fps=4, **SMALL), frames_fps=4.0)
    assert [read_frame_index(frame) for frame in video.frames] == [11, 10, 9, 8]


@pytest.mark.skipif(importlib.util.find_spec("decord") is None, reason="decord is not installed")
def test_decord_backend_picks_the_same_frames_as_pyav(videos):
    settings = SamplingSettings(fps=4, max_frames=24, **SMALL)
    by_pyav = decode_video(plan_video(probe_video(videos.long), settings))
    by_decord = decode_video(plan_video(probe_video(videos.long, backend="decord"), settings))
    assert [read_frame_index(f) for f in by_decord.frames] == [read_frame_index(f) for f in by_pyav.frames]
    assert by_decord.timestamps == pytest.approx(by_pyav.timestamps)
