"""The planner's promises under rounding: `min_pixels_per_frame` is a real floor, and "balanced" is never
strictly worse than "frames" (see the module docstring of `videonsa.video.planning`)."""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path

import pytest

from videonsa.errors import UserError
from videonsa.video import SamplingSettings, VideoInfo, plan_video
from videonsa.video.planning import VideoPlan

# (width, height) of common and awkward sources: landscape, portrait, ultra-wide, tiny, odd sizes.
SOURCES = [(1920, 1080), (1080, 1920), (1280, 720), (640, 480), (3840, 1080), (112, 112), (333, 517), (2560, 1080)]


def make_info(width: int, height: int, duration: float = 10.0, fps: float = 30.0) -> VideoInfo:
    return VideoInfo(
        name="clip.mp4",
        backend="pyav",
        paths=(Path("clip.mp4"),),
        width=width,
        height=height,
        start_time=0.0,
        duration=duration,
        frame_count=round(duration * fps),
        frame_count_is_exact=True,
        average_fps=fps,
    )


def test_min_pixels_12544_on_a_1080p_clip_gives_at_least_12544_pixels():
    # The reported case: 12,544 asked, 11,760 (140x84) given.
    plan = plan_video(make_info(1920, 1080), SamplingSettings(pixels_per_frame=12_544, min_pixels_per_frame=12_544))
    assert plan.frame_width * plan.frame_height >= 12_544
    assert (plan.frame_width, plan.frame_height) == (168, 84)  # the smallest 28-multiple size at 16:9 above it


@pytest.mark.parametrize(("width", "height"), SOURCES)
@pytest.mark.parametrize("min_pixels", [3136, 12_544, 20_000, 50_176])
@pytest.mark.parametrize("prefer", ["frames", "detail", "balanced"])
def test_no_plan_goes_below_the_min_pixels_floor(width, height, min_pixels, prefer):
    info = make_info(width, height, duration=60.0)
    for budget in (800, 3_000, 20_000, 200_000):
        settings = SamplingSettings(
            pixels_per_frame=max(min_pixels, 50_176), min_pixels_per_frame=min_pixels, budget_tokens=budget
        )
        settings = dataclasses.replace(settings, prefer=prefer)
        try:
            plan = plan_video(info, settings, text_tokens=100)
        except UserError:
            continue  # the budget cannot hold two frames at the floor: refused, not shrunk below it
        assert plan.frame_width * plan.frame_height >= min_pixels, (budget, plan.describe())
        assert plan.total_tokens <= budget


def _dominates(better: VideoPlan, worse: VideoPlan) -> bool:
    """`better` has at least the frames and the detail of `worse`, and more of one of them."""
    at_least = better.frame_count >= worse.frame_count and better.tokens_per_patch >= worse.tokens_per_patch
    strictly = better.frame_count > worse.frame_count or better.tokens_per_patch > worse.tokens_per_patch
    return at_least and strictly


def test_balanced_keeps_every_frame_when_they_all_fit_at_the_same_size():
    # The reported shape: 40 frames wanted, budget 1000; balanced gave 34 frames at 308x112 though all 40 fit so.
    info = make_info(2560, 1080, duration=10.0)
    plans = {
        prefer: plan_video(info, SamplingSettings(budget_tokens=1000, prefer=prefer), text_tokens=100)
        for prefer in ("frames", "balanced")
    }
    assert not _dominates(plans["frames"], plans["balanced"]), {k: p.describe() for k, p in plans.items()}


@pytest.mark.parametrize(("width", "height"), SOURCES)
def test_balanced_is_never_strictly_worse_than_frames(width, height):
    for duration, budget in itertools.product((5.0, 10.0, 30.0, 120.0), (600, 1_000, 2_500, 8_000, 40_000)):
        info = make_info(width, height, duration=duration)
        try:
            frames, balanced = (
                plan_video(info, SamplingSettings(budget_tokens=budget, prefer=prefer), text_tokens=100)
                for prefer in ("frames", "balanced")
            )
        except UserError:
            continue
        assert not _dominates(frames, balanced), (duration, budget, frames.describe(), balanced.describe())
        assert balanced.total_tokens <= budget
