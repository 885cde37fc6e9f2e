"""What `videonsa data prepare` needs to know about a clip before training: readable, frame rate, frame count, size.

`probe_clip` dispatches on the clip's form: a video file is probed by `videonsa.video` (PyAV, imported only then,
so that training from frame images works where PyAV is not installed); a frame list is checked on disk and its
first and last image opened.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from typing import Any

# How text files that list other media begin (lower-cased): FFmpeg concat scripts, M3U/HLS, PLS, XML playlists
# and manifests (XSPF, ASX, DASH, SMIL), SDP session descriptions.
PLAYLIST_SIGNATURES = (b"ffconcat", b"#extm3u", b"#extinf", b"[playlist]", b"<?xml", b"<mpd", b"<smil", b"<asx",
                       b"<playlist", b"v=0")


class ClipUnreadable(RuntimeError):
    """The clip exists but cannot be decoded (corrupt file, unknown codec, no video stream)."""


class ClipMissing(FileNotFoundError):
    """A file the clip needs is not on disk."""


@dataclass(frozen=True)
class ClipInfo:
    """Facts about one clip. fps and duration are None for frame lists (their rate is not recorded)."""

    num_frames: int
    width: int
    height: int
    fps: float | None = None
    duration: float | None = None
    start_time: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> ClipInfo:
        names = ("num_frames", "width", "height", "fps", "duration")
        return cls(**{key: record.get(key) for key in names}, start_time=record.get("start_time") or 0.0)


def probe_clip(media: tuple[str, ...], is_video: bool) -> ClipInfo:
    """Probe a video file (`media` = (path,)) or a frame list; raises `ClipMissing` or `ClipUnreadable`."""
    return probe_video_file(media[0]) if is_video else probe_frame_list(media)


def probe_video_file(path: str) -> ClipInfo:
    """Probe a video file with `videonsa.video.probe_video`, the probe `videonsa ask` uses (it opens the file and
    decodes its first two frames). Files that list other files (playlists, concat scripts) are never opened."""
    if not os.path.isfile(path):
        raise ClipMissing(path)
    _refuse_playlist(path)
    from videonsa.errors import UserError

    try:
        from videonsa.video import probe_video
    except ImportError as error:  # PyAV missing: frame-image data still works, video files cannot
        raise ClipUnreadable(f"cannot read video files here ({error})") from None
    try:
        info = probe_video(path)
    except UserError as error:
        raise ClipUnreadable(str(error)) from None
    if info.frame_count is None:
        raise ClipUnreadable(f"{path}: cannot tell how many frames it has")
    return ClipInfo(num_frames=int(info.frame_count), width=info.width, height=info.height, fps=info.average_fps,
                    duration=info.duration, start_time=info.start_time)


def _refuse_playlist(path: str) -> None:
    """Raise `ClipUnreadable` if the file starts like a text list of other media (FFmpeg detects some of these
    by content, whatever the file is called, and would then read the files they name)."""
    with open(path, "rb") as stream:
        head = stream.read(64).lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith(PLAYLIST_SIGNATURES):
        raise ClipUnreadable(f"{path}: is a playlist or list of other files, not a video")


def probe_frame_list(paths: tuple[str, ...]) -> ClipInfo:
    """Check every frame image exists; open the first and last to check they are images of the same size."""
    from PIL import Image, UnidentifiedImageError

    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        raise ClipMissing(f"{len(missing)} of {len(paths)} frames missing, first {missing[0]}")
    sizes = set()
    for path in {paths[0], paths[-1]}:
        try:
            with Image.open(path) as image:
                image.verify()
                sizes.add(image.size)
        except Image.DecompressionBombError:
            raise ClipUnreadable(f"frame {path}: image is too large to decode safely") from None
        except (UnidentifiedImageError, OSError, SyntaxError) as error:
            raise ClipUnreadable(f"frame {path}: {error}") from None
    if len(sizes) != 1:
        raise ClipUnreadable(f"frames differ in size: {sorted(sizes)}")
    (width, height), = sizes
    return ClipInfo(num_frames=len(paths), width=width, height=height)


def frames_at_rate(info: ClipInfo, sample_fps: float | None) -> int:
    """How many frames sampling at `sample_fps` yields (all frames for frame lists or when `sample_fps` is None).

    A video is sampled at min(sample_fps, native fps) over its duration, so a 100 s clip at 4 fps gives 400.
    """
    if sample_fps is None or info.fps is None or info.fps <= 0:
        return info.num_frames
    duration = info.duration if info.duration else info.num_frames / info.fps
    rate = min(sample_fps, info.fps)
    return max(1, min(info.num_frames, math.floor(duration * rate + 1e-6))) if info.num_frames else 0
