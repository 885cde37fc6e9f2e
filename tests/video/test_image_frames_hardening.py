"""Frames given as images: an image too large to decode safely is one clear error, not a traceback."""

from __future__ import annotations

import numpy as np
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


def sixteen_bit_frames(folder, count: int = 2):
    """`count` 56x56 16-bit grayscale PNGs (Pillow mode I;16): a ramp over the whole 0-65535 range."""
    folder.mkdir()
    ramp = np.linspace(0, 65535, 56 * 56).round().astype(np.uint16).reshape(56, 56)
    for index in range(count):
        Image.fromarray(ramp).save(folder / f"frame_{index}.png")
    assert Image.open(folder / "frame_0.png").mode == "I;16"
    return ramp


def test_sixteen_bit_grayscale_frames_are_scaled_not_clipped(tmp_path):
    ramp = sixteen_bit_frames(tmp_path / "frames")
    plan = plan_video(probe_video(tmp_path / "frames", frames_fps=2), SamplingSettings(
        fps=2, pixels_per_frame=56 * 56, min_pixels_per_frame=56 * 56))
    frames = decode_video(plan).frames
    assert frames.shape == (2, 56, 56, 3)
    expected = np.round(ramp / 65535 * 255).astype(np.uint8)  # Pillow's own conversion made 255 of nearly all
    for channel in range(3):
        np.testing.assert_array_equal(frames[0, :, :, channel], expected)


def float_frames(folder, ramp: np.ndarray, count: int = 2) -> None:
    """`count` 32-bit float grayscale TIFFs (Pillow mode F) holding `ramp`."""
    folder.mkdir()
    for index in range(count):
        Image.fromarray(ramp.astype(np.float32)).save(folder / f"frame_{index}.tif")
    assert Image.open(folder / "frame_0.tif").mode == "F"


def decode_56(folder) -> np.ndarray:
    plan = plan_video(probe_video(folder, frames_fps=2), SamplingSettings(
        fps=2, pixels_per_frame=56 * 56, min_pixels_per_frame=56 * 56))
    return decode_video(plan).frames


def test_float_frames_in_0_1_are_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 1, 56 * 56).reshape(56, 56)
    float_frames(tmp_path / "frames", ramp)
    frames = decode_56(tmp_path / "frames")
    expected = np.round(ramp.astype(np.float32) * 255).astype(np.uint8)  # Pillow's own made all of it 0 or 1
    for channel in range(3):
        np.testing.assert_array_equal(frames[1, :, :, channel], expected)


@pytest.mark.parametrize("bad", [2.5, np.nan])
def test_float_frames_outside_0_1_are_refused_naming_the_file(tmp_path, bad):
    ramp = np.linspace(0, 1, 56 * 56).reshape(56, 56)
    ramp[0, 0] = bad
    float_frames(tmp_path / "frames", ramp)
    with pytest.raises(UserError, match=r"frame_0\.tif: float image") as error:
        decode_56(tmp_path / "frames")
    assert "\n" not in str(error.value)
