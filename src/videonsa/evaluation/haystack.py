"""Haystacks for the needle benchmark: generated scenes, or the user's own footage looped to length.

Generated scenes are slow, varied and muted: a colour field drifting in stripes of a random direction and
width, a two-scale texture sliding across it, and a few muted ellipses and rectangles crossing the frame; a
new scene (new colours, texture, direction and shapes) starts every 15 to 75 seconds. Every pixel keeps a
channel spread (max - min) of at most `HAYSTACK_MAX_SPREAD` and a level of at most `HAYSTACK_MAX_LEVEL`, so
the saturated needle colours and the white card never occur in a generated haystack.

All per-frame arithmetic is on integers (a sine table, integer offsets), so the same seed gives the same
pixels; only a scene's set-up (its phase map and texture) uses floating point.

Footage: the video files of a folder (sorted by path) are played one after another and looped, starting at
an offset the set's seed picks per video, sampled at the set's frame rate with the project's PyAV reader,
scaled to cover the frame and cropped to its centre.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from videonsa.errors import UserError
from videonsa.evaluation.drawing import HAYSTACK_MAX_LEVEL, HAYSTACK_MAX_SPREAD
from videonsa.video import probe_video
from videonsa.video.info import VideoInfo

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv")
PHASE_STEPS = 1024  # one stripe period in the sine table
# 0..255 weights of colour_b against colour_a along one stripe period (an integer table: same on every machine).
_SINE_TABLE = np.rint(127.5 + 127.5 * np.sin(2 * np.pi * np.arange(PHASE_STEPS) / PHASE_STEPS)).astype(np.int32)
FOOTAGE_CHUNK_FRAMES = 240  # frames decoded per reader call (memory stays small for hour-long haystacks)


@dataclass(frozen=True)
class Blob:
    """A muted ellipse or rectangle drifting across a scene, wrapping around the frame's edges."""

    kind: str  # "ellipse" or "rectangle"
    colour: tuple[int, int, int]
    size: tuple[int, int]  # width, height in pixels
    start: tuple[int, int]  # x, y of the top-left corner at the scene's first frame
    velocity: tuple[int, int]  # pixels per second


@dataclass(frozen=True)
class Scene:
    """One generated haystack scene: `frames` frames of a drifting striped colour field, texture and blobs."""

    frames: int
    colour_a: tuple[int, int, int]
    colour_b: tuple[int, int, int]
    angle_degrees: int
    stripes: int  # stripe periods across the frame's diagonal
    drift: int  # phase steps (of PHASE_STEPS per period) per second
    texture_seed: int
    texture_cells: int  # coarse texture cells across the frame's width
    texture_amplitude: int
    texture_velocity: tuple[int, int]  # pixels per second
    blobs: tuple[Blob, ...]


def _muted_colour(rng: np.random.Generator, low: int, high: int, tint: int) -> tuple[int, int, int]:
    """A grey level in [low, high] plus a per-channel tint in [-tint, tint]: channel spread at most 2 * tint."""
    grey = int(rng.integers(low, high + 1))
    offsets = rng.integers(-tint, tint + 1, size=3)
    return tuple(int(np.clip(grey + offset, 0, HAYSTACK_MAX_LEVEL)) for offset in offsets)


def random_scene(rng: np.random.Generator, frames: int, width: int, height: int) -> Scene:
    """Draw one scene's parameters (muted colours, stripe direction and drift, texture, 1-4 blobs)."""
    tint = (HAYSTACK_MAX_SPREAD - 10) // 2  # fields stay within the spread bound with room for rounding
    blobs = []
    for _ in range(int(rng.integers(1, 5))):
        blob_width = int(rng.integers(max(2, width // 10), max(3, width // 3)))
        blob_height = int(rng.integers(max(2, height // 10), max(3, height // 3)))
        blobs.append(
            Blob(
                kind=("ellipse", "rectangle")[int(rng.integers(2))],
                colour=_muted_colour(rng, 30, 200, HAYSTACK_MAX_SPREAD // 2),
                size=(blob_width, blob_height),
                start=(int(rng.integers(0, width)), int(rng.integers(0, height))),
                velocity=(
                    int(rng.integers(-width // 8, width // 8 + 1)),
                    int(rng.integers(-height // 8, height // 8 + 1)),
                ),
            )
        )
    return Scene(
        frames=frames,
        colour_a=_muted_colour(rng, 40, 170, tint),
        colour_b=_muted_colour(rng, 40, 170, tint),
        angle_degrees=int(rng.integers(0, 360)),
        stripes=int(rng.integers(1, 4)),
        drift=int(rng.integers(8, 40)),
        texture_seed=int(rng.integers(2**31)),
        texture_cells=int(rng.integers(3, 9)),
        texture_amplitude=int(rng.integers(6, 22)),
        texture_velocity=(int(rng.integers(-width // 12, width // 12 + 1)), int(rng.integers(-3, 4))),
        blobs=tuple(blobs),
    )


def plan_scenes(rng: np.random.Generator, total_frames: int, fps: int, width: int, height: int) -> tuple[Scene, ...]:
    """Scenes of 15 to 75 seconds each, covering `total_frames` frames exactly."""
    scenes, covered = [], 0
    while covered < total_frames:
        frames = min(total_frames - covered, int(rng.integers(15 * fps, 75 * fps + 1)))
        scenes.append(random_scene(rng, frames, width, height))
        covered += frames
    return tuple(scenes)


def _periodic_noise(rng: np.random.Generator, height: int, width: int, cells_x: int, amplitude: int) -> np.ndarray:
    """Smooth noise [height, width] (int16, within +-amplitude) that tiles: bilinear over a wrapped cell grid."""
    cells_y = max(1, round(cells_x * height / width))
    grid = rng.integers(-amplitude, amplitude + 1, size=(cells_y, cells_x)).astype(np.float64)
    y = np.arange(height) * cells_y / height
    x = np.arange(width) * cells_x / width
    y0, x0 = np.floor(y).astype(int), np.floor(x).astype(int)
    fy, fx = (y - y0)[:, None], x - x0
    rows = grid[y0 % cells_y] * (1 - fy) + grid[(y0 + 1) % cells_y] * fy  # [height, cells_x]
    return np.rint(rows[:, x0 % cells_x] * (1 - fx) + rows[:, (x0 + 1) % cells_x] * fx).astype(np.int16)


class _SceneRenderer:
    """Frames of one scene; the phase map and texture are made once, each frame is integer arithmetic."""

    def __init__(self, scene: Scene, width: int, height: int, fps: int) -> None:
        self.scene, self.width, self.height, self.fps = scene, width, height, fps
        angle = math.radians(scene.angle_degrees)
        rows, columns = np.mgrid[0:height, 0:width]
        along = (columns * math.cos(angle) + rows * math.sin(angle)) / math.hypot(width, height)
        self.phase = np.rint(along * scene.stripes * PHASE_STEPS).astype(np.int64) % PHASE_STEPS
        texture_rng = np.random.default_rng(scene.texture_seed)
        self.texture = _periodic_noise(texture_rng, height, width, scene.texture_cells, scene.texture_amplitude)
        self.texture += _periodic_noise(
            texture_rng, height, width, scene.texture_cells * 4, scene.texture_amplitude // 3
        )
        self.colour_a = np.asarray(scene.colour_a, dtype=np.int32)
        self.colour_b_minus_a = np.asarray(scene.colour_b, dtype=np.int32) - self.colour_a

    def frame(self, index: int) -> Image.Image:
        """Frame `index` (0-based within the scene) as an RGB image."""
        shift = index * self.scene.drift // self.fps
        weight = _SINE_TABLE[(self.phase + shift) % PHASE_STEPS][..., None]  # [H, W, 1] in 0..255
        field = self.colour_a + (self.colour_b_minus_a * weight) // 255
        velocity_x, velocity_y = self.scene.texture_velocity
        texture = np.roll(self.texture, (index * velocity_y // self.fps, index * velocity_x // self.fps), axis=(0, 1))
        pixels = np.clip(field + texture[..., None], 0, HAYSTACK_MAX_LEVEL).astype(np.uint8)
        image = Image.fromarray(pixels, "RGB")
        draw = ImageDraw.Draw(image)
        for blob in self.scene.blobs:
            blob_width, blob_height = blob.size
            x = (blob.start[0] + index * blob.velocity[0] // self.fps) % (self.width + blob_width) - blob_width
            y = (blob.start[1] + index * blob.velocity[1] // self.fps) % (self.height + blob_height) - blob_height
            box = (x, y, x + blob_width - 1, y + blob_height - 1)
            if blob.kind == "ellipse":
                draw.ellipse(box, fill=blob.colour)
            else:
                draw.rectangle(box, fill=blob.colour)
        return image


def generated_frames(scenes: Sequence[Scene], width: int, height: int, fps: int) -> Iterator[Image.Image]:
    """Every frame of the scenes, in order."""
    for scene in scenes:
        renderer = _SceneRenderer(scene, width, height, fps)
        for index in range(scene.frames):
            yield renderer.frame(index)


def footage_files(folder: str | Path) -> list[Path]:
    """The video files under `folder` (by suffix, recursively), sorted by path; `UserError` if there are none."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"--footage {folder}: no such folder")
    files = sorted(path for path in folder.rglob("*") if path.is_file() and path.suffix.lower() in VIDEO_SUFFIXES)
    if not files:
        raise UserError(f"--footage {folder}: holds no video files ({', '.join(VIDEO_SUFFIXES)})")
    return files


def probe_footage(folder: str | Path) -> tuple[VideoInfo, ...]:
    """Probe every footage file (raises `UserError` naming the first unreadable one)."""
    return tuple(probe_video(path) for path in footage_files(folder))


def _cover_size(info: VideoInfo, width: int, height: int) -> tuple[int, int]:
    """(height, width) to scale a source frame to so that it covers `width` x `height` with its aspect ratio."""
    scale = max(width / info.width, height / info.height)
    return max(height, math.ceil(info.height * scale)), max(width, math.ceil(info.width * scale))


def footage_frames(
    infos: Sequence[VideoInfo], total_frames: int, width: int, height: int, fps: int, offset_seconds: float
) -> Iterator[Image.Image]:
    """`total_frames` frames at `fps` from the footage played in order and looped, starting `offset_seconds` in."""
    from videonsa.video.pyav_reader import read_frames

    durations = [info.duration for info in infos]
    loop = sum(durations)
    starts = np.cumsum([0.0, *durations[:-1]])
    chunk: list[float] = []
    chunk_file = -1

    def flush() -> Iterator[Image.Image]:
        info = infos[chunk_file]
        cover_height, cover_width = _cover_size(info, width, height)
        frames, _, _ = read_frames(info, chunk, cover_height, cover_width)
        top, left = (cover_height - height) // 2, (cover_width - width) // 2
        for frame in frames:
            yield Image.fromarray(np.ascontiguousarray(frame[top : top + height, left : left + width]), "RGB")

    for index in range(total_frames):
        position = (offset_seconds + index / fps) % loop
        file_index = int(np.searchsorted(starts, position, side="right") - 1)
        local_time = infos[file_index].start_time + position - starts[file_index]
        if chunk and (file_index != chunk_file or len(chunk) == FOOTAGE_CHUNK_FRAMES or local_time <= chunk[-1]):
            yield from flush()
            chunk = []
        chunk_file = file_index
        chunk.append(local_time)
    if chunk:
        yield from flush()


__all__ = [
    "VIDEO_SUFFIXES",
    "Blob",
    "Scene",
    "footage_files",
    "footage_frames",
    "generated_frames",
    "plan_scenes",
    "probe_footage",
    "random_scene",
]
