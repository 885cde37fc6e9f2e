"""Frames given as images: an image too large to decode safely is one clear error, not a traceback."""

from __future__ import annotations

import pytest
from PIL import Image

from videonsa.errors import UserError
from videonsa.video import SamplingSettings, decode_video, plan_video, probe_video
from videonsa.video.synthetic import write_image_folder


def test_an_oversized_image_in_the_middle_is_a_user_error(tmp_path, monkeypatch):
    folder = write_image_folder(tmp_path / "frames", frame_count=6, width=56, height=56, suffix=".png")
    Image.new("RGB", (300, 300)).save(folder / "frame_4.png")
    info = probe_video(folder)  # reads the first image's header only
    plan = plan_video(info, SamplingSettings(fps=2, min_pixels_per_frame=28 * 28 * 4))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # 300 x 300 is then over twice the limit
    with pytest.raises(UserError, match=r"frame_4\.png: image is too large to decode safely") as error:
        decode_video(plan)
    assert "\n" not in str(error.value)
