"""Synthetic videos with known content, written with PyAV, for tests and for trying the pipeline without data.

Every frame shows its own index as a 4 x 4 grid of black/white cells in its top-left quarter (16 bits, most
significant bit first, row by row), a red square moving right and a green disc moving down, both at known
positions, over a dark grey background. `read_frame_index` recovers the index from a decoded (and possibly
resized, lossily compressed) frame, so a test can tell exactly which source frame a sampler picked.

Also here: a variable-frame-rate file, an audio-only file, a folder of frame images, corrupted or
truncated copies of a file, a copy whose frames are all noise, and a PNG that only declares a size.
"""

from __future__ import annotations

import math
import shutil
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

CODE_COLUMNS = 4
CODE_ROWS = 4
CODE_BITS = CODE_COLUMNS * CODE_ROWS
BACKGROUND = 48
SQUARE_COLOUR = (230, 30, 30)
DISC_COLOUR = (30, 200, 40)


@dataclass(frozen=True)
class ShapePositions:
    """Centres (x, y) in pixels of the two moving shapes of one frame, and their size."""

    square_centre: tuple[float, float]
    disc_centre: tuple[float, float]
    square_side: int
    disc_radius: int


def shape_positions(index: int, width: int, height: int) -> ShapePositions:
    """Where the moving shapes of frame `index` are in a `width` x `height` synthetic frame.

    The square sweeps the bottom-left to bottom-right band, the disc the right half top to bottom; both
    advance a few pixels per frame and wrap around, so consecutive frames differ.
    """
    side = max(4, height // 6)
    radius = max(3, min(width, height) // 10)
    square_travel = max(1, width - side)
    square_x = (index * 3) % square_travel + side / 2
    square_y = height - side / 2 - 1
    disc_travel = max(1, height - 2 * radius)
    disc_x = width * 3 / 4
    disc_y = (index * 2) % disc_travel + radius
    return ShapePositions((square_x, square_y), (disc_x, disc_y), side, radius)


def _code_cell_bounds(bit: int, width: int, height: int) -> tuple[int, int, int, int]:
    """Pixel box (top, bottom, left, right) of code cell `bit` in the top-left quarter of the frame."""
    row, column = divmod(bit, CODE_COLUMNS)
    cell_height = (height // 2) / CODE_ROWS
    cell_width = (width // 2) / CODE_COLUMNS
    top, left = round(row * cell_height), round(column * cell_width)
    return top, round(top + cell_height), left, round(left + cell_width)


def synthetic_frame(index: int, width: int, height: int) -> np.ndarray:
    """Frame `index` of the synthetic video: uint8 RGB array [height, width, 3]."""
    if not 0 <= index < 2**CODE_BITS:
        raise ValueError(f"frame index {index} does not fit in {CODE_BITS} code bits")
    image = np.full((height, width, 3), BACKGROUND, dtype=np.uint8)
    for bit in range(CODE_BITS):
        top, bottom, left, right = _code_cell_bounds(bit, width, height)
        is_set = (index >> (CODE_BITS - 1 - bit)) & 1
        image[top:bottom, left:right] = 255 if is_set else 0
    shapes = shape_positions(index, width, height)
    (square_x, square_y), half = shapes.square_centre, shapes.square_side / 2
    image[round(square_y - half) : round(square_y + half), round(square_x - half) : round(square_x + half)] = (
        SQUARE_COLOUR
    )
    rows, columns = np.mgrid[0:height, 0:width]
    disc_x, disc_y = shapes.disc_centre
    image[(columns - disc_x) ** 2 + (rows - disc_y) ** 2 <= shapes.disc_radius**2] = DISC_COLOUR
    return image


def read_frame_index(frame: np.ndarray) -> int:
    """Recover the index drawn by `synthetic_frame` from a decoded RGB frame [H, W, 3] of any size.

    Reads the middle half of each code cell, so it survives resizing and lossy compression.
    """
    height, width = frame.shape[:2]
    luma = np.asarray(frame, dtype=np.float32).mean(axis=2)
    index = 0
    for bit in range(CODE_BITS):
        top, bottom, left, right = _code_cell_bounds(bit, width, height)
        margin_y, margin_x = max(0, (bottom - top) // 4), max(0, (right - left) // 4)
        centre = luma[top + margin_y : bottom - margin_y, left + margin_x : right - margin_x]
        index = (index << 1) | int(centre.mean() > 127)
    return index


def square_centre_in(frame: np.ndarray) -> tuple[float, float]:
    """Centre (x, y) of the red square's pixels in a decoded RGB frame [H, W, 3]."""
    pixels = np.asarray(frame, dtype=np.int32)
    red = (pixels[..., 0] > 150) & (pixels[..., 1] < 100) & (pixels[..., 2] < 100)
    rows, columns = np.nonzero(red)
    if rows.size == 0:
        raise ValueError("no red square in this frame")
    return float(columns.mean()) + 0.5, float(rows.mean()) + 0.5


def _open_video_stream(container, codec: str, rate: Fraction | int, width: int, height: int, gop: int):
    options = {"crf": "12", "preset": "veryfast", "g": str(gop)} if codec == "libx264" else {}
    stream = container.add_stream(codec, rate=rate, options=options)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.codec_context.gop_size = gop
    if codec != "libx264":
        stream.codec_context.bit_rate = 8_000_000
    return stream


def write_video(
    path: str | Path,
    *,
    frame_count: int,
    fps: float = 25.0,
    width: int = 112,
    height: int = 112,
    codec: str = "libx264",
    gop: int = 25,
) -> Path:
    """Write a constant-frame-rate synthetic video of `frame_count` frames; frame i is shown at i / fps.

    Its duration is frame_count / fps seconds. `gop` is the keyframe interval in frames.
    """
    if frame_count > 2**CODE_BITS:
        raise ValueError(f"at most {2**CODE_BITS} frames can carry their index, asked for {frame_count}")
    path = Path(path)
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), "w") as container:
        stream = _open_video_stream(container, codec, rate, width, height, gop)
        for index in range(frame_count):
            frame = av.VideoFrame.from_ndarray(synthetic_frame(index, width, height), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def write_variable_frame_rate_video(
    path: str | Path,
    timestamps: Sequence[float],
    *,
    end_time: float,
    width: int = 112,
    height: int = 112,
) -> Path:
    """Write a video whose frame i is shown from `timestamps[i]` (seconds, increasing, millisecond precision).

    The file is Matroska with a 1 ms time base, so the irregular times survive exactly. `end_time` is when
    the last frame stops showing (the file's duration).
    """
    times_ms = [round(t * 1000) for t in timestamps]
    if any(b <= a for a, b in zip(times_ms, times_ms[1:], strict=False)) or round(end_time * 1000) <= times_ms[-1]:
        raise ValueError("timestamps must increase by at least 1 ms and end before end_time")
    path = Path(path)
    with av.open(str(path), "w", format="matroska") as container:
        stream = _open_video_stream(container, "libx264", 1000, width, height, gop=25)
        stream.time_base = Fraction(1, 1000)
        stream.codec_context.time_base = Fraction(1, 1000)
        ends_ms = [*times_ms[1:], round(end_time * 1000)]
        duration_at = {start: end - start for start, end in zip(times_ms, ends_ms, strict=True)}

        def mux_with_durations(packets: list[av.Packet]) -> None:
            # Matroska stores each block's duration, which is how the last frame's display time survives.
            for packet in packets:
                packet.duration = duration_at[packet.pts]
            container.mux(packets)

        for index, time_ms in enumerate(times_ms):
            frame = av.VideoFrame.from_ndarray(synthetic_frame(index, width, height), format="rgb24")
            frame.pts, frame.time_base = time_ms, Fraction(1, 1000)
            mux_with_durations(stream.encode(frame))
        mux_with_durations(stream.encode(None))
    return path


def write_audio_only(path: str | Path, *, seconds: float = 1.0, sample_rate: int = 16_000) -> Path:
    """Write a file with one audio stream (a 440 Hz tone) and no video stream."""
    path = Path(path)
    samples_per_frame = 1024
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=sample_rate, layout="mono")
        total = int(seconds * sample_rate)
        for start in range(0, total, samples_per_frame):
            time = (np.arange(start, start + samples_per_frame) / sample_rate).astype(np.float32)
            tone = (0.2 * np.sin(2 * math.pi * 440 * time)).astype(np.float32)[None, :]
            frame = av.AudioFrame.from_ndarray(tone, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = sample_rate, start
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def write_image_folder(
    folder: str | Path, *, frame_count: int, width: int = 112, height: int = 112, suffix: str = ".png"
) -> Path:
    """Write synthetic frames 0..frame_count-1 as numbered images (frame_1.png, frame_2.png, ...).

    The numbers are not zero-padded on purpose: readers must sort them naturally (2 before 10).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(frame_count):
        Image.fromarray(synthetic_frame(index, width, height)).save(folder / f"frame_{index + 1}{suffix}")
    return folder


def truncated_copy(source: str | Path, destination: str | Path, keep_fraction: float) -> Path:
    """Copy the first `keep_fraction` of `source`'s bytes to `destination` (an interrupted download)."""
    data = Path(source).read_bytes()
    destination = Path(destination)
    destination.write_bytes(data[: int(len(data) * keep_fraction)])
    return destination


def corrupted_copy(source: str | Path, destination: str | Path, *, start_fraction: float = 0.3, seed: int = 0) -> Path:
    """Copy `source` to `destination`, overwriting every byte from `start_fraction` of the file on with noise.

    The header survives, so the file still opens, but no packet after that point holds valid data.
    """
    destination = Path(destination)
    shutil.copyfile(source, destination)
    data = bytearray(destination.read_bytes())
    start = int(len(data) * start_fraction)
    noise = np.random.default_rng(seed).integers(0, 256, size=len(data) - start, dtype=np.uint8)
    data[start:] = noise.tobytes()
    destination.write_bytes(bytes(data))
    return destination


def undecodable_copy(source: str | Path, destination: str | Path, *, seed: int = 0) -> Path:
    """Copy `source`'s video stream with every packet's payload replaced by noise of the same size.

    The container, stream header and timestamps are intact, so the file opens and reports a video stream,
    but not one frame decodes.
    """
    destination = Path(destination)
    rng = np.random.default_rng(seed)
    with av.open(str(source)) as reader, av.open(str(destination), "w") as writer:
        original = reader.streams.video[0]
        stream = writer.add_stream_from_template(original)
        for packet in reader.demux(original):
            if packet.size == 0:
                continue  # the demuxer's end-of-stream marker
            noise = av.Packet(rng.integers(0, 256, size=packet.size, dtype=np.uint8).tobytes())
            noise.pts, noise.dts, noise.time_base = packet.pts, packet.dts, packet.time_base
            noise.is_keyframe, noise.stream = packet.is_keyframe, stream
            writer.mux(noise)
    return destination


def write_png_header_only(path: str | Path, width: int, height: int) -> Path:
    """A PNG that declares `width` x `height` RGB pixels but holds only a few bytes of image data.

    Readers that check the declared size before decoding see an enormous image without anyone paying for it.
    """

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    path = Path(path)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)))
    return path
