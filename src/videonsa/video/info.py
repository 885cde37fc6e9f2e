"""What probing a video tells: size, duration, frame count, and where to read it from."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class VideoInfo:
    """A readable video, as found by `videonsa.video.probe_video`.

    `paths` holds the one video file, or the frame images in playing order. Times are seconds on the file's
    own clock: the first frame shows at `start_time` and the video ends at `start_time + duration`.
    `frame_count` is None when neither the container nor its frame rate tells it.
    """

    name: str
    backend: str
    paths: tuple[Path, ...]
    width: int
    height: int
    start_time: float
    duration: float
    frame_count: int | None
    frame_count_is_exact: bool
    average_fps: float | None
    codec: str | None = None

    @property
    def end_time(self) -> float:
        """When the last frame stops showing, in seconds."""
        return self.start_time + self.duration

    def describe(self) -> str:
        """One line for people: name, size, duration, frame rate, frame count."""
        frames = (
            "unknown" if self.frame_count is None else f"{'' if self.frame_count_is_exact else '~'}{self.frame_count:,}"
        )
        rate = "unknown" if self.average_fps is None else f"{self.average_fps:.3g}"
        codec = f", {self.codec}" if self.codec else ""
        return f"{self.name}: {self.width}x{self.height}{codec}, {self.duration:.2f}s, {rate} fps, {frames} frames"
