"""Probing and seek-based frame reading with PyAV (FFmpeg), the default video backend.

Reading jumps to the keyframe before each wanted time and decodes forward only to that time, so sampling a few
hundred frames from a two-hour video decodes a small fraction of it. Where wanted times are closer together
than the keyframe interval it keeps decoding forward instead, which costs less than seeking back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np

from videonsa.errors import UserError
from videonsa.video.info import VideoInfo
from videonsa.video.limits import check_frame_dimensions

try:
    import av
except ImportError:  # a dependency, but a node fed pre-extracted frames (or the GPU image) may lack it
    av = None

# A frame counts as showing at time t when its timestamp is at most t plus this (float rounding of t).
TIME_TOLERANCE = 1e-4
# Until two keyframes have been seen in a row, assume one every this many seconds.
DEFAULT_KEYFRAME_INTERVAL = 2.0
# Frame rates above this in a header are container time bases, not real rates (Matroska reports 1000).
MAX_PLAUSIBLE_FPS = 480.0

Progress = Callable[[int, int], None]


def _open(path: Path):
    """Open `path` with FFmpeg or raise `UserError` saying it is not a readable video."""
    if av is None:
        raise UserError(f"{path}: reading video files needs PyAV (pip install av)")
    try:
        return av.open(str(path))
    except (av.FFmpegError, OSError) as error:
        reason = getattr(error, "strerror", None) or str(error)
        raise UserError(f"{path}: cannot be opened as a video ({reason}); not a video, or truncated?") from None


def _video_stream(container, path: Path):
    if container.streams.video:
        return container.streams.video[0]
    if container.streams.audio:
        raise UserError(f"{path}: has audio but no video stream")
    raise UserError(f"{path}: has no video stream (not a video, or truncated?)")


def _first_frames(container, stream, path: Path, count: int) -> list:
    """Decode up to `count` frames from the start; raise `UserError` if the stream yields none."""
    frames = []
    try:
        for frame in container.decode(stream):
            frames.append(frame)
            if len(frames) == count:
                break
    except av.FFmpegError as error:
        if not frames:
            raise UserError(
                f"{path}: its video stream has no decodable frames ({error.strerror}); corrupt file?"
            ) from None
    if not frames:
        raise UserError(f"{path}: its video stream has no decodable frames (corrupt or empty file?)")
    if frames[0].pts is None:
        raise UserError(f"{path}: its frames carry no timestamps; remux it (e.g. ffmpeg -i IN -c copy OUT.mkv)")
    return frames


def _end_time(container, stream) -> float | None:
    """When the video stream ends, in seconds, from the stream or the container header, else by demuxing."""
    if stream.duration and stream.time_base:
        return float((stream.start_time or 0) * stream.time_base + stream.duration * stream.time_base)
    if container.duration:
        start, duration = (container.start_time or 0) / av.time_base, container.duration / av.time_base
        # Matroska's (and WebM's) Duration runs on the file's clock from 0, not from the first frame: it is the
        # last frame's end (what FFmpeg's muxer writes). Added to a late start (a remuxed TS stream, a cut with
        # copied timestamps) it would put the end past the last frame, and reading would report a valid file as
        # truncated. A Duration not after the first frame can only be a span from it.
        if "matroska" in container.format.name and duration > start:
            return duration
        return start + duration
    end = None
    for packet in container.demux(stream):
        if packet.pts is not None and packet.time_base is not None:
            packet_end = float((packet.pts + (packet.duration or 0)) * packet.time_base)
            end = packet_end if end is None else max(end, packet_end)
    return end


def _average_fps(stream) -> float | None:
    rate = stream.average_rate or stream.guessed_rate
    if rate and 0 < float(rate) <= MAX_PLAUSIBLE_FPS:
        return float(rate)
    return None


def _count_packets(container, stream) -> int:
    """Video packets in the stream (one per frame), counted by demuxing from the start."""
    container.seek(0)
    return sum(1 for packet in container.demux(stream) if packet.size)


def probe_file(path: Path, *, max_source_pixels: int) -> VideoInfo:
    """Open `path`, check it has a decodable video stream of sane size, and read its timing.

    Decodes only the first two frames. Raises `UserError` naming the file for anything unusable.
    """
    with _open(path) as container:
        stream = _video_stream(container, path)
        check_frame_dimensions(str(path), stream.codec_context.width, stream.codec_context.height, max_source_pixels)
        first = _first_frames(container, stream, path, count=2)
        if len(first) < 2:
            raise UserError(f"{path}: has a single video frame; at least 2 are needed (one temporal patch)")
        container.seek(0)
        start_time = float(first[0].time)
        end_time = _end_time(container, stream)
        if end_time is None or end_time <= start_time:
            raise UserError(f"{path}: cannot tell how long its video stream lasts (corrupt header?)")
        average_fps = _average_fps(stream)
        duration = end_time - start_time
        exact = bool(stream.frames)
        frame_count = stream.frames if exact else (round(duration * average_fps) if average_fps else None)
        if frame_count is None:
            # No usable rate in the header (variable-rate Matroska reports its 1 ms time base as 1000 fps):
            # count the packets, which reads the file without decoding it, and take the true average rate.
            frame_count, exact = _count_packets(container, stream), True
            average_fps = frame_count / duration
        return VideoInfo(
            name=str(path),
            backend="pyav",
            paths=(path,),
            width=first[0].width,
            height=first[0].height,
            start_time=start_time,
            duration=duration,
            frame_count=frame_count,
            frame_count_is_exact=exact,
            average_fps=average_fps,
            codec=stream.codec_context.name,
        )


class SeekingFrameReader:
    """Returns, for increasing times, the frame showing at each time, seeking only where that saves decoding.

    `frames_decoded` and `seeks` count the work done, for tests and reports.
    """

    def __init__(self, container, stream, path: Path) -> None:
        self.container, self.stream, self.path = container, stream, path
        self.frames_decoded = 0
        self.seeks = 0
        self._frames: Iterator | None = None
        self._next = None  # decoded but not yet passed: the first frame after the last time asked for
        self._current = None  # the last frame showing at or before the last time asked for
        self._last_keyframe_time: float | None = None
        self._keyframe_interval: float | None = None
        self._exhausted = False

    def _decode_next(self):
        """The next decoded frame, or None at the end of the stream."""
        if self._frames is None:
            self._frames = self.container.decode(self.stream)
        try:
            frame = next(self._frames)
        except StopIteration:
            self._exhausted = True
            return None
        except av.FFmpegError as error:
            raise UserError(f"{self.path}: decoding failed ({error.strerror}); the file looks corrupt") from None
        self.frames_decoded += 1
        if frame.pts is None:
            raise UserError(f"{self.path}: a frame carries no timestamp; remux it (e.g. ffmpeg -i IN -c copy OUT.mkv)")
        if frame.key_frame:
            if self._last_keyframe_time is not None and frame.time > self._last_keyframe_time:
                # The longest interval seen: encoders add keyframes at scene cuts, which say nothing about
                # how far back a seek may land.
                interval = frame.time - self._last_keyframe_time
                self._keyframe_interval = max(interval, self._keyframe_interval or 0.0)
            self._last_keyframe_time = frame.time
        return frame

    def _seek(self, time: float) -> None:
        """Jump to the keyframe at or before `time` (clamped to the stream start)."""
        offset = max(0, int(time / self.stream.time_base))
        self.container.seek(offset, stream=self.stream, backward=True, any_frame=False)
        self.seeks += 1
        self._frames, self._next, self._current = None, None, None
        self._last_keyframe_time = None
        self._exhausted = False

    def _position(self) -> float:
        """Time of the frame decoding would reach next (the stream start before anything is decoded)."""
        frame = self._next or self._current
        if frame is not None:
            return float(frame.time)
        return float((self.stream.start_time or 0) * self.stream.time_base)

    def _worth_seeking(self, time: float) -> bool:
        # A seek lands on the keyframe before `time`; it saves work only if that keyframe lies ahead of us.
        return time - self._position() > (self._keyframe_interval or DEFAULT_KEYFRAME_INTERVAL)

    @property
    def exhausted(self) -> bool:
        """Whether decoding reached the end of the stream."""
        return self._exhausted

    def _advance_to(self, time: float) -> None:
        """Decode forward until the next frame would be after `time`."""
        while not self._exhausted:
            if self._next is None:
                self._next = self._decode_next()
                if self._next is None:
                    return
            if self._next.time > time + TIME_TOLERANCE:
                return
            self._current, self._next = self._next, None

    def frame_at(self, time: float):
        """The decoded frame showing at `time`: the last one whose timestamp is at most `time`."""
        if self._worth_seeking(time):
            self._seek(time)
        self._advance_to(time)
        back_off = 1.0
        # Some demuxers land after the wanted time; step further back until a frame at or before it shows up.
        while self._current is None and self._next is not None:
            if time - back_off <= 0:
                self._seek(0)
                self._advance_to(time)
                return self._current or self._next
            self._seek(time - back_off)
            self._advance_to(time)
            back_off *= 2
        return self._current


def _check_reached(path: Path, frame, wanted_time: float, info: VideoInfo, at_end: bool) -> None:
    """Raise `UserError` if the stream ended well before `wanted_time` (a truncated or damaged file)."""
    if frame is None:
        raise UserError(f"{path}: no frame could be decoded near {wanted_time:.2f}s; the file looks corrupt")
    if not at_end:
        return  # a later frame exists, so this one really is the one showing at `wanted_time`
    shown_until = frame.time + (float(frame.duration * frame.time_base) if frame.duration else 0.0)
    allowed_gap = max(1.0, 2.0 / info.average_fps) if info.average_fps else 1.0
    if wanted_time - shown_until > allowed_gap:
        raise UserError(
            f"{path}: the video stops at {frame.time:.2f}s although its header says it lasts until "
            f"{info.end_time:.2f}s (truncated or corrupt file)"
        )


def read_frames(
    info: VideoInfo,
    timestamps: Sequence[float],
    height: int,
    width: int,
    progress: Progress | None = None,
) -> tuple[np.ndarray, list[float], dict[str, int]]:
    """Decode the frames showing at `timestamps` (increasing), scaled to `height` x `width` RGB.

    Returns (frames uint8 [N, height, width, 3], each frame's own timestamp in seconds, work counters).
    """
    path = info.paths[0]
    frames = np.empty((len(timestamps), height, width, 3), dtype=np.uint8)
    times: list[float] = []
    with _open(path) as container:
        stream = _video_stream(container, path)
        stream.thread_type = "AUTO"
        reader = SeekingFrameReader(container, stream, path)
        for index, time in enumerate(timestamps):
            frame = reader.frame_at(time)
            _check_reached(path, frame, time, info, reader.exhausted)
            frames[index] = frame.to_ndarray(format="rgb24", width=width, height=height, interpolation="BICUBIC")
            times.append(float(frame.time))
            if progress is not None:
                progress(index + 1, len(timestamps))
        return frames, times, {"frames_decoded": reader.frames_decoded, "seeks": reader.seeks}
