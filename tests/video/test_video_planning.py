"""Frame sampling and token-budget planning: pure arithmetic on VideoInfo, no decoding."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

from videonsa.errors import UserError
from videonsa.video import SamplingSettings, VideoInfo, VisionGeometry, frame_size, plan_video
from videonsa.video.planning import wanted_frame_count


def make_info(duration: float, width: int = 1280, height: int = 720, fps: float | None = 30.0, **kw) -> VideoInfo:
    frame_count = kw.pop("frame_count", None if fps is None else round(duration * fps))
    return VideoInfo(
        name="clip.mp4",
        backend="pyav",
        paths=(Path("clip.mp4"),),
        width=width,
        height=height,
        start_time=kw.pop("start_time", 0.0),
        duration=duration,
        frame_count=frame_count,
        frame_count_is_exact=frame_count is not None,
        average_fps=fps,
    )


@pytest.mark.parametrize("height", [28, 100, 224, 333, 720, 1080, 4000])
@pytest.mark.parametrize("width", [56, 128, 224, 500, 1280, 1920])
@pytest.mark.parametrize(("min_pixels", "max_pixels"), [(3136, 50_176), (12_544, 602_112), (100_352, 1_003_520)])
def test_frame_size_matches_transformers_smart_resize(height, width, min_pixels, max_pixels):
    assert frame_size(height, width, min_pixels=min_pixels, max_pixels=max_pixels) == smart_resize(
        height, width, factor=28, min_pixels=min_pixels, max_pixels=max_pixels
    )


def test_frame_size_is_multiple_of_28_and_within_max():
    for height, width in [(720, 1280), (1080, 1920), (481, 853), (2160, 3840)]:
        h, w = frame_size(height, width, max_pixels=50_176, min_pixels=3136)
        assert h % 28 == 0 and w % 28 == 0
        assert h * w <= 50_176
        assert abs(w / h - width / height) < 0.25


def test_wanted_frames_follow_fps_and_are_even():
    geometry = VisionGeometry()
    assert wanted_frame_count(make_info(10.0), SamplingSettings(fps=4), geometry) == 40
    assert wanted_frame_count(make_info(10.1), SamplingSettings(fps=4), geometry) == 40
    assert wanted_frame_count(make_info(2.3), SamplingSettings(fps=4), geometry) == 8  # 9.2 -> 9 -> even 8
    assert wanted_frame_count(make_info(10.0), SamplingSettings(fps=1.5), geometry) == 14  # 15 -> 14
    assert wanted_frame_count(make_info(600.0), SamplingSettings(fps=4, max_frames=101), geometry) == 100


def test_wanted_frames_never_exceed_source_frames_nor_fall_below_one_patch():
    geometry = VisionGeometry()
    slideshow = make_info(20.0, fps=0.5)  # 10 frames over 20 s
    assert wanted_frame_count(slideshow, SamplingSettings(fps=4), geometry) == 10
    blink = make_info(0.2, fps=30)  # 6 frames, 0.8 frames at 4 fps
    assert wanted_frame_count(blink, SamplingSettings(fps=4), geometry) == 2


def test_plan_within_budget_keeps_paper_sampling():
    plan = plan_video(make_info(60.0), SamplingSettings(), text_tokens=500)
    assert plan.frame_count == 240
    assert (plan.frame_height, plan.frame_width) == frame_size(720, 1280, max_pixels=50_176, min_pixels=12_544)
    assert plan.tokens_per_patch == (plan.frame_height // 28) * (plan.frame_width // 28)
    assert plan.video_tokens == 120 * plan.tokens_per_patch
    assert plan.total_tokens == plan.video_tokens + 500
    assert plan.timestamps == tuple(k * 0.25 for k in range(240))
    assert "trimmed" not in plan.describe()


def test_timestamps_spread_over_the_whole_video_from_the_first_frame():
    plan = plan_video(make_info(90.0, start_time=1.5), SamplingSettings(max_frames=30))
    assert plan.frame_count == 30
    assert plan.timestamps[0] == 1.5
    assert plan.timestamps[1] - plan.timestamps[0] == pytest.approx(3.0)
    assert plan.timestamps[-1] == pytest.approx(1.5 + 87.0)


@pytest.mark.parametrize("prefer", ["frames", "detail", "balanced"])
@pytest.mark.parametrize("duration", [30.0, 600.0, 7200.0])
@pytest.mark.parametrize("budget", [2_000, 16_384, 131_072])
def test_every_plan_fits_the_budget_with_even_frames_and_28_pixel_sides(prefer, duration, budget):
    settings = SamplingSettings(budget_tokens=budget, prefer=prefer)
    plan = plan_video(make_info(duration), settings, text_tokens=300)
    assert plan.total_tokens <= budget
    assert plan.frame_count >= 2 and plan.frame_count % 2 == 0
    assert plan.frame_height % 28 == 0 and plan.frame_width % 28 == 0
    assert plan.frame_height * plan.frame_width <= settings.pixels_per_frame
    assert plan.frame_count <= plan.wanted_frames
    assert list(plan.timestamps) == sorted(plan.timestamps)


def test_preferences_trade_frames_against_detail():
    info = make_info(1800.0)  # 7200 frames wanted at 4 fps
    plans = {
        prefer: plan_video(info, SamplingSettings(budget_tokens=65_536, prefer=prefer), text_tokens=100)
        for prefer in ("frames", "detail", "balanced")
    }
    frames, detail, balanced = plans["frames"], plans["detail"], plans["balanced"]
    assert frames.frame_count == 7200  # every wanted frame kept ...
    assert frames.tokens_per_patch < balanced.tokens_per_patch < detail.tokens_per_patch  # ... at lower detail
    assert detail.tokens_per_patch == detail.wanted_tokens_per_patch  # full detail kept ...
    assert detail.frame_count < balanced.frame_count < frames.frame_count  # ... with fewer frames
    for plan in plans.values():
        assert "trimmed to fit" in plan.describe()
        # Each plan uses most of what it may use (rounding to 28-pixel sides wastes a little).
        assert plan.video_tokens > 0.6 * (65_536 - 100)


def test_detail_falls_back_to_smaller_frames_when_two_full_frames_do_not_fit():
    plan = plan_video(make_info(30.0), SamplingSettings(budget_tokens=100, prefer="detail"), text_tokens=60)
    assert plan.frame_count == 2
    assert 16 <= plan.tokens_per_patch <= 40


def test_budget_too_small_for_two_frames_names_the_setting():
    settings = SamplingSettings(budget_tokens=200, min_pixels_per_frame=50_176)
    with pytest.raises(UserError, match=r"budget_tokens=200 is too small.*150 tokens.*min_pixels_per_frame"):
        plan_video(make_info(30.0), settings, text_tokens=150)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (SamplingSettings(fps=0), "fps"),
        (SamplingSettings(fps=math.nan), "fps"),
        (SamplingSettings(max_frames=1), "max_frames"),
        (SamplingSettings(pixels_per_frame=1000, min_pixels_per_frame=3136), "pixels_per_frame"),
        (SamplingSettings(min_pixels_per_frame=0), "min_pixels_per_frame"),
        (SamplingSettings(budget_tokens=0), "budget_tokens"),
        (SamplingSettings(prefer="speed"), "prefer"),
        (SamplingSettings(fps="4"), "fps must be a positive number"),
        (SamplingSettings(max_frames=7.5), "max_frames must be a whole number, got 7.5"),
        (SamplingSettings(pixels_per_frame=50_176.0), "pixels_per_frame must be a whole number"),
        (SamplingSettings(budget_tokens=None), "budget_tokens must be a whole number, got None"),
        (SamplingSettings(budget_tokens=True), "budget_tokens must be a whole number, got True"),
    ],
)
def test_bad_settings_name_the_setting(settings, message):
    with pytest.raises(UserError, match=message):
        settings.validate()


def test_geometry_counts_tokens_per_temporal_patch():
    geometry = VisionGeometry()
    assert geometry.pixels_per_token_side == 28
    assert geometry.tokens_per_patch(224, 224) == 64  # (224 / 28)^2 tokens per frame pair (docs/layer.md)
    plan = plan_video(make_info(4.0, width=224, height=224), SamplingSettings(fps=4))
    assert plan.video_tokens == 16 // 2 * 64
    assert plan.tokens_per_frame == 32
