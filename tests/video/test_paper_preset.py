"""The paper preset's rules: frame count and indices, the resize rule and its pixel cap, the pixel resampling,
and plans decoded from real files (frame indices checked against the index drawn into each synthetic frame)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from videonsa.errors import UserError
from videonsa.video import VideoInfo, probe_video, synthetic
from videonsa.video import paper as paper_module
from videonsa.video.paper import (
    PaperSettings,
    PaperVideoPlan,
    count_video_frames,
    decode_paper_video,
    decode_planned_video,
    paper_frame_count,
    paper_frame_indices,
    paper_frame_size,
    paper_max_pixels,
    plan_paper_video,
    resize_frames,
    resolve_preset,
)

# ---------------------------------------------------------------- frame count and indices


@pytest.mark.parametrize(
    ("total", "video_fps", "fps", "max_frames", "expected"),
    [
        (60, 25.0, 4.0, 32, 8),  # 60 / 25 * 4 = 9.6 -> floored to even
        (60, 25.0, 0.5, 32, 4),  # 1.2 -> raised to the 4-frame minimum
        (1500, 25.0, 4.0, 32, 32),  # 240 -> capped at max_frames
        (1500, 25.0, 4.0, 33, 32),  # an odd max_frames is rounded down to even first
        (1000, 30.0, 1.05, 100, 34),  # 35.0 -> 34
        (1000, 30.0, 1.0, 100, 32),  # 33.3 -> 32
        (5, 1.0, 4.0, 32, 4),  # 20 -> capped at the 5 frames there are -> 4
        (3, 25.0, 100.0, 32, 2),  # 12 -> 3 frames -> 2
        (100, 10.0, 4.0, 3, 2),  # max_frames 3 -> 2, below the 4-frame minimum: the cap wins
        (2, 25.0, 4.0, 32, 2),
    ],
)
def test_frame_count_clamps_then_floors_to_even(total, video_fps, fps, max_frames, expected):
    assert paper_frame_count(total, video_fps, fps, max_frames) == expected


def test_a_video_of_one_frame_gives_one_clear_line():
    with pytest.raises(UserError, match="samples 0 frames from 1 .*at least 2"):
        paper_frame_count(1, 25.0, 4.0, 32)


@pytest.mark.parametrize(
    ("total", "count", "expected"),
    [
        (60, 8, (0, 8, 17, 25, 34, 42, 51, 59)),  # 59 / 7 = 8.43 steps
        (4, 4, (0, 1, 2, 3)),
        (6, 3, (0, 2, 5)),  # 2.5 rounds half to even: 2
        (8, 3, (0, 4, 7)),  # 3.5 rounds half to even: 4
        (10, 4, (0, 3, 6, 9)),
        (12, 6, (0, 2, 4, 7, 9, 11)),  # 2.2, 4.4, 6.6, 8.8
    ],
)
def test_frame_indices_are_a_rounded_linspace(total, count, expected):
    assert paper_frame_indices(total, count) == expected


# ---------------------------------------------------------------- frame size


def test_the_pixel_cap_follows_the_frame_count():
    settings = PaperSettings()  # max 1,605,632, min 200,704, total 90,316,800
    assert paper_max_pixels(32, settings) == 768 * 28 * 28  # the per-frame cap rules the wrapper's max
    assert paper_max_pixels(200, settings) == 768 * 28 * 28  # 903,168 per frame allowed, capped
    assert paper_max_pixels(400, settings) == 451_584  # 90,316,800 / 400 * 2
    assert paper_max_pixels(1000, settings) == 210_739  # floored at int(1.05 * 200,704)
    assert paper_max_pixels(32, PaperSettings(max_pixels=50_176)) == 50_176
    assert paper_max_pixels(400, PaperSettings(total_pixels=1_000_000)) == 210_739


@pytest.mark.parametrize(
    ("height", "width", "count", "settings", "expected"),
    [
        (1080, 1920, 32, PaperSettings(), (560, 1008)),  # 1092x1932 rounded is above the 602,112 cap: down
        (112, 112, 8, PaperSettings(), (448, 448)),  # 12,544 px is below min 200,704: scaled up 4x
        (448, 448, 8, PaperSettings(), (448, 448)),  # already in range and on the grid
        (100, 150, 8, PaperSettings(min_pixels=3136, max_pixels=50_176), (112, 140)),  # rounded to 28s only
        # max_pixels 50,176 below min_pixels 200,704: a frame rounding to at most 50,176 px is scaled UP to
        # the min-pixels floor; a larger one is scaled down to the 50,176 cap.
        (224, 224, 8, PaperSettings(max_pixels=50_176), (448, 448)),
        (112, 112, 8, PaperSettings(max_pixels=50_176), (448, 448)),
        (360, 640, 8, PaperSettings(max_pixels=50_176), (168, 280)),
    ],
)
def test_frame_size_hand_computed_cases(height, width, count, settings, expected):
    assert paper_frame_size(height, width, count, settings) == expected


def test_frame_size_matches_transformers_smart_resize_on_random_frames():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    rng = np.random.default_rng(0)
    for _ in range(300):
        height, width = (int(side) for side in rng.integers(20, 2500, size=2))
        count = int(rng.choice([4, 32, 300, 900]))
        settings = PaperSettings(
            min_pixels=int(rng.choice([3136, 50_176, 200_704, 401_408])),
            max_pixels=int(rng.choice([50_176, 401_408, 1_605_632])),
        )
        cap = paper_max_pixels(count, settings)
        expected = smart_resize(height, width, factor=28, min_pixels=settings.min_pixels, max_pixels=cap)
        assert paper_frame_size(height, width, count, settings) == expected, (height, width, count, settings)


def test_a_processor_resize_with_the_wrapper_pixels_leaves_the_size_unless_max_is_below_min():
    """What the original's video processor would do to the preset's frames if it re-applied its own smart
    resize with the wrapper's min/max pixels (version dependent; our patcher never resizes)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    settings = PaperSettings()
    for height, width in ((1080, 1920), (360, 640), (112, 112), (720, 1280), (480, 854)):
        size = paper_frame_size(height, width, 32, settings)
        assert smart_resize(*size, factor=28, min_pixels=settings.min_pixels, max_pixels=settings.max_pixels) == size
    flipped = PaperSettings(max_pixels=50_176)
    size = paper_frame_size(224, 224, 8, flipped)
    assert smart_resize(*size, factor=28, min_pixels=flipped.min_pixels, max_pixels=flipped.max_pixels) == (224, 224)


def test_elongated_frames_are_refused_naming_the_video():
    with pytest.raises(UserError, match="too elongated"):
        paper_frame_size(10, 2100, 8, PaperSettings())
    thin = VideoInfo(
        name="thin.mp4", backend="pyav", paths=(Path("thin.mp4"),), width=2100, height=10, start_time=0.0,
        duration=4.0, frame_count=100, frame_count_is_exact=True, average_fps=25.0,
    )  # fmt: skip
    with pytest.raises(UserError, match=r"^thin\.mp4: frames of 2100x10 are too elongated"):
        plan_paper_video(thin)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("fps", 0.0, "fps must be a positive"),
        ("fps", float("nan"), "fps must be a positive"),
        ("max_frames", 1, "max_frames must be at least 2"),
        ("min_pixels", 0, "min_pixels must be positive"),
        ("max_pixels", -5, "max_pixels must be positive"),
        ("total_pixels", 0, "total_pixels must be positive"),
        ("max_pixels", 2.5, "max_pixels must be a whole number"),
    ],
)
def test_bad_settings_name_the_setting(field, value, message):
    with pytest.raises(UserError, match=message):
        dataclasses.replace(PaperSettings(), **{field: value}).validate()


def test_presets_resolve_from_the_attention_mode():
    assert resolve_preset("auto", "official") == "paper"
    assert resolve_preset("auto", "nsa") == "planner"
    assert resolve_preset("auto", "dense") == "planner"
    assert resolve_preset("paper", "nsa") == "paper"
    assert resolve_preset("planner", "official") == "planner"
    with pytest.raises(UserError, match="preset must be one of auto, paper, planner, got 'papr'"):
        resolve_preset("papr", "nsa")


# ---------------------------------------------------------------- pixels


def _keys_cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    near = (a + 2) * x**3 - (a + 3) * x**2 + 1
    far = a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _resampling_matrix(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in] weights of antialiased bicubic resampling: the kernel widens by the shrink factor,
    taps outside the image are dropped and the rest renormalised."""
    scale = size_in / size_out
    stretch = max(scale, 1.0)
    matrix = np.zeros((size_out, size_in))
    for out in range(size_out):
        centre = (out + 0.5) * scale
        low, high = max(int(centre - 2 * stretch + 0.5), 0), min(int(centre + 2 * stretch + 0.5), size_in)
        taps = _keys_cubic((np.arange(low, high) - centre + 0.5) / stretch)
        matrix[out, low:high] = taps / taps.sum()
    return matrix


@pytest.mark.parametrize(("source", "target"), [((120, 200), (56, 84)), ((60, 90), (112, 168)), ((97, 131), (28, 56))])
def test_resize_is_antialiased_bicubic_rounded_from_float(source, target):
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 256, size=(2, *source, 3), dtype=np.uint8)
    resized = resize_frames(frames, *target)
    assert resized.dtype == np.uint8 and resized.shape == (2, *target, 3)
    exact = np.einsum("oh,nhwc->nowc", _resampling_matrix(source[0], target[0]), frames.astype(np.float64))
    exact = np.clip(np.einsum("pw,nowc->nopc", _resampling_matrix(source[1], target[1]), exact), 0, 255)
    assert np.abs(resized - exact).max() <= 0.5 + 5e-3  # rounded to the nearest level (float32 arithmetic)


def test_resize_to_the_same_size_keeps_the_frames():
    frames = np.random.default_rng(2).integers(0, 256, size=(2, 28, 56, 3), dtype=np.uint8)
    assert resize_frames(frames, 28, 56) is frames


# ---------------------------------------------------------------- plans on real files

SMALL = PaperSettings(min_pixels=56 * 56, max_pixels=56 * 56)


def test_plan_picks_the_indexed_frames_of_a_file(videos):
    info = probe_video(videos.short)  # 100 frames at 25 fps
    plan = plan_paper_video(info, SMALL, text_tokens=12)
    assert isinstance(plan, PaperVideoPlan) and plan.preset == "paper" and plan.second_per_grid_ts == 1.0
    assert plan.frame_indices == paper_frame_indices(100, 16) and plan.source_frames == 100
    assert (plan.frame_height, plan.frame_width) == (56, 56) and plan.video_tokens == 8 * 4
    assert plan.total_tokens == 32 + 12 and plan.budget_tokens == 0
    video = decode_planned_video(plan)
    assert video.frames.shape == (16, 56, 56, 3)
    native = decode_paper_video(dataclasses.replace(plan, frame_height=112, frame_width=112))
    assert [synthetic.read_frame_index(frame) for frame in native.frames] == list(plan.frame_indices)
    assert video.timestamps == pytest.approx([index / 25 for index in plan.frame_indices], abs=1e-3)
    assert "16 of 100 frames (indices 0, 7, 13, ..., 99) at 56x56" in plan.describe()
    assert "1.0 s per temporal patch" in plan.describe()


def test_frames_are_decoded_at_their_own_size_then_resized(videos):
    plan = plan_paper_video(probe_video(videos.wide), PaperSettings(min_pixels=3136, max_pixels=56 * 112))
    assert (plan.frame_height, plan.frame_width) == (56, 112)  # from 112x224
    native = decode_paper_video(dataclasses.replace(plan, frame_height=112, frame_width=224))
    resized = decode_paper_video(plan)
    assert np.array_equal(resized.frames, resize_frames(native.frames, 56, 112))


def test_decoding_in_chunks_gives_the_same_frames(videos, monkeypatch):
    plan = plan_paper_video(probe_video(videos.short), SMALL)
    whole = decode_paper_video(plan)
    monkeypatch.setattr(paper_module, "DECODE_CHUNK_BYTES", 3 * 112 * 112 * 3)  # 3 native frames at a time
    seen: list[tuple[int, int]] = []
    chunked = decode_paper_video(plan, progress=lambda done, total: seen.append((done, total)))
    assert np.array_equal(chunked.frames, whole.frames) and chunked.timestamps == whole.timestamps
    assert seen == [(done, 16) for done in range(1, 17)]


def test_a_container_without_a_frame_count_is_counted(videos):
    info = probe_video(videos.short_mkv)  # Matroska: no frame count in the header
    assert not info.frame_count_is_exact
    assert count_video_frames(info) == 100
    plan = plan_paper_video(info, SMALL)
    assert plan.frame_indices == paper_frame_indices(100, 16)


def test_a_frame_folder_uses_its_image_count_and_rate(videos):
    info = probe_video(videos.frame_folder, frames_fps=2.0)  # 12 images, 6 s
    plan = plan_paper_video(info, SMALL)
    assert plan.frame_indices == paper_frame_indices(12, 12)  # 6 s x 4 fps = 24 -> all 12 images
    native = decode_paper_video(dataclasses.replace(plan, frame_height=info.height, frame_width=info.width))
    assert [synthetic.read_frame_index(frame) for frame in native.frames] == list(range(12))
