"""Annotation files: the LLaVA-Video-178K layout and the frames-as-images messages layout, read into `Sample`s.

Two record layouts are understood, in JSON (a list of records) or JSONL (one record per line) files:

* **LLaVA-Video-178K**: ``{"id": ..., "video": "relative/path.mp4", "conversations": [{"from": "human",
  "value": "<image>\\nQuestion"}, {"from": "gpt", "value": "Answer"}, ...]}``. The ``<image>`` (or ``<video>``)
  placeholder marks where the clip goes; LLaVA-Video uses ``<image>`` even for videos.
* **Frames as images** (the layout the original VideoNSA recipe trained on): ``{"messages": [{"role": "user",
  "content": "<image><image>...Question"}, {"role": "assistant", "content": "Answer"}], "images": [frame paths]}``.
  ``content`` may also be a list of parts (``{"type": "text", "text": ...}``, ``{"type": "image"}``,
  ``{"type": "video"}``). Either one ``<image>`` per frame, or a single placeholder for the whole clip.

Every sample is normalised to the same form: turns of ``system`` / ``user`` / ``assistant`` text in which the
clip is marked either by exactly one ``<video>`` (all frames together) or, for frame lists whose ``<image>`` tags
sit in the text one per frame, by one ``<image>`` per frame. A record that cannot be understood becomes a
`Rejected` entry with the reason, never an exception, so that one bad line does not stop a 200K-record job
(a line that is not UTF-8, not JSON, or nested too deeply for the JSON reader included).

Media paths are untrusted input: by default they must stay inside the video root (see `confined_path`), so an
annotation file cannot make training read, or the drop report reveal, files from elsewhere on the machine.
docs/training-data.md describes the rules.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from videonsa.errors import UserError
from videonsa.files import jsonl_lines

VIDEO_TAG = "<video>"
IMAGE_TAG = "<image>"
PLACEHOLDER_PATTERN = re.compile(r"<video>|<image>")
ROLES = ("system", "user", "assistant")
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


# Files FFmpeg reads as lists of other files or streams (HLS, M3U, PLS, XSPF, ASX, concat scripts, DASH
# manifests, SDP session descriptions): never opened from annotations, whatever the root.
PLAYLIST_SUFFIXES = frozenset({".m3u8", ".m3u", ".pls", ".xspf", ".asx", ".wpl", ".ffconcat", ".concat", ".mpd",
                               ".sdp", ".ism", ".ismc", ".f4m"})
# A path starting like ``http:``, ``file:``, ``concat:`` or ``pipe:`` names an FFmpeg protocol, not a file.
URL_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


class MalformedRecord(ValueError):
    """A record that cannot be read as a training sample; the message says why."""

    reason = "malformed"


class UnsafePath(MalformedRecord):
    """A media path that leaves the video root, or names a URL or a playlist."""

    reason = "unsafe_path"


@dataclass(frozen=True)
class Turn:
    """One message of a conversation. `text` may hold ``<video>`` / ``<image>`` placeholders."""

    role: str
    text: str


@dataclass(frozen=True)
class Sample:
    """One training conversation about one clip, given either as a video file or as a list of frame images.

    video: path of the video file (None when the clip is given as frames).
    frames: paths of the frame images, in order (empty when the clip is a video file).
    per_frame_tags: True when the text holds one ``<image>`` per frame instead of a single ``<video>``.
    origin: where the record came from (``file:line``), for messages about it.
    """

    id: str
    turns: tuple[Turn, ...]
    video: str | None = None
    frames: tuple[str, ...] = ()
    per_frame_tags: bool = False
    origin: str = ""

    @property
    def media_paths(self) -> tuple[str, ...]:
        """Every file this sample needs on disk."""
        return (self.video,) if self.video is not None else self.frames

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict; `Sample.from_json` reads it back."""
        record = asdict(self)
        record["turns"] = [asdict(turn) for turn in self.turns]
        record["frames"] = list(self.frames)
        return record

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> Sample:
        """Inverse of `to_json`."""
        return cls(
            id=str(record["id"]),
            turns=tuple(Turn(role=turn["role"], text=turn["text"]) for turn in record["turns"]),
            video=record.get("video"),
            frames=tuple(record.get("frames", ())),
            per_frame_tags=bool(record.get("per_frame_tags", False)),
            origin=record.get("origin", ""),
        )


@dataclass(frozen=True)
class Rejected:
    """A record or sample left out of training, with a short reason category and a human-readable detail."""

    id: str
    origin: str
    reason: str
    detail: str


@dataclass
class AnnotationSet:
    """The samples read from annotation files, and the records that could not be read."""

    samples: list[Sample] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)

    @property
    def duplicate_ids(self) -> dict[str, list[str]]:
        """Ids that more than one sample carries, each with the origins (``file:line``) of those samples."""
        origins: dict[str, list[str]] = {}
        for sample in self.samples:
            origins.setdefault(sample.id, []).append(sample.origin)
        return {sample_id: places for sample_id, places in origins.items() if len(places) > 1}


def read_annotations(
    paths: str | Path | Sequence[str | Path],
    media_root: str | Path | None = None,
    *,
    allow_outside_root: bool = False,
) -> AnnotationSet:
    """Read LLaVA-Video-178K or frames-as-images annotation files (JSON or JSONL, layouts may be mixed).

    Video and frame paths are resolved against `media_root`, or against each annotation file's folder when it is
    None, into absolute paths. They must stay inside that root (symlinks resolved) unless `allow_outside_root`;
    URLs and playlists are always refused (reason ``unsafe_path``). A missing or undecodable file raises
    `UserError`; a bad record is returned in `rejected`.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise UserError("no annotation files given")
    result = AnnotationSet()
    for path in map(Path, paths):
        root = Path(media_root) if media_root is not None else path.parent
        if media_root is not None and not root.is_dir():
            raise UserError(f"video root {root} is not a folder")
        place = MediaPlace(root.resolve(), allow_outside_root)
        for origin, record in _records(path):
            try:
                if isinstance(record, MalformedRecord):
                    raise record
                result.samples.append(_without_stray_bytes(parse_record(record, place, origin)))
            except MalformedRecord as error:
                record_id = _printable(record.get("id", origin)) if isinstance(record, dict) else origin
                result.rejected.append(Rejected(record_id, origin, error.reason, _printable(str(error))))
    return result


@dataclass(frozen=True)
class MediaPlace:
    """Where a record's media paths may point: inside `root` (absolute, symlinks resolved), or anywhere."""

    root: Path
    allow_outside_root: bool = False


def parse_record(record: Any, media: MediaPlace | Path, origin: str) -> Sample:
    """Normalise one record of either layout into a `Sample`; raises `MalformedRecord` with the reason.

    `media`: where the record's media paths may point (a bare `Path` is a root they must stay inside).
    """
    place = media if isinstance(media, MediaPlace) else MediaPlace(Path(media).resolve())
    if not isinstance(record, dict):
        raise MalformedRecord(f"expected a JSON object, got {type(record).__name__}")
    if "conversations" in record:
        return _parse_llava(record, place, origin)
    if "messages" in record:
        return _parse_messages(record, place, origin)
    raise MalformedRecord("has neither 'conversations' (LLaVA-Video layout) nor 'messages' (frames layout)")


def confined_path(path: str, place: MediaPlace) -> str:
    """The absolute path a record's media `path` names; raises `UnsafePath` if it may not be read.

    Always refused: URLs and FFmpeg protocols (``http:``, ``file:``, ``concat:``, ``pipe:``...) and playlists.
    Unless `place.allow_outside_root`: absolute paths, ``~``, ``..`` components, and paths that a symlink takes
    out of the root. The message depends only on the path as written and on links inside the root, so the drop
    report never tells whether some file elsewhere on the machine exists.
    """
    if "\0" in path:
        raise UnsafePath(f"{path!r} holds a NUL character")
    if URL_PATTERN.match(path):
        raise UnsafePath(f"{path!r} is a URL or protocol, not a file path")
    if Path(path).suffix.lower() in PLAYLIST_SUFFIXES:
        raise UnsafePath(f"{path!r} is a playlist; list the media files themselves")
    if place.allow_outside_root:
        return os.path.abspath(place.root / Path(path).expanduser())
    if path.startswith("~") or Path(path).is_absolute():
        raise UnsafePath(f"{path!r} is not relative to the video root (pass --allow-outside-root to permit)")
    if ".." in Path(path).parts:
        raise UnsafePath(f"{path!r} climbs out with '..' (pass --allow-outside-root to permit)")
    # Resolving follows symlinks inside the root; whatever lies outside is never looked at.
    resolved = (place.root / path).resolve()
    if not resolved.is_relative_to(place.root):
        raise UnsafePath(f"{path!r} is a link out of the video root (pass --allow-outside-root to permit)")
    return str(resolved)


def _records(path: Path) -> Iterator[tuple[str, Any]]:
    """(origin, record) for every record of a JSON or JSONL file; a JSONL line that is not JSON comes as a
    `MalformedRecord` in place of the record, so that it is reported like any other bad record."""
    if not path.is_file():
        raise UserError(f"annotation file {path} does not exist")
    # Bytes that are not UTF-8 become lone surrogates, so the rest of the file still parses and only the records
    # holding them are rejected (by `_without_stray_bytes`).
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    if path.suffix.lower() == ".jsonl" or not text.lstrip().startswith("["):
        for line_number, line in enumerate(jsonl_lines(text), start=1):
            if not line.strip():
                continue
            origin = f"{path}:{line_number}"
            try:
                yield origin, json.loads(line)
            except json.JSONDecodeError as error:
                yield origin, MalformedRecord(f"line is not JSON ({error.msg})")
            except RecursionError:
                yield origin, MalformedRecord("line is nested too deeply to read as JSON")
        return
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"annotation file {path} is not valid JSON: {error.msg} at line {error.lineno}") from None
    except RecursionError:
        raise UserError(f"annotation file {path} is nested too deeply to read as JSON "
                        "(write it as JSONL, one record per line, to reject only the bad records)") from None
    if not isinstance(records, list):
        raise UserError(f"annotation file {path} must hold a JSON list of records")
    for index, record in enumerate(records):
        yield f"{path}[{index}]", record


def _parse_llava(record: dict[str, Any], place: MediaPlace, origin: str) -> Sample:
    video = record.get("video")
    if not isinstance(video, str) or not video:
        raise MalformedRecord("LLaVA-Video record without a 'video' path")
    conversations = record["conversations"]
    if not isinstance(conversations, list):
        raise MalformedRecord("'conversations' is not a list")
    turns = []
    for message in conversations:
        if not isinstance(message, dict) or "from" not in message or "value" not in message:
            raise MalformedRecord("a conversation turn lacks 'from' or 'value'")
        role = LLAVA_ROLES.get(str(message["from"]).lower())
        if role is None:
            raise MalformedRecord(f"unknown speaker {message['from']!r} (expected human, gpt or system)")
        turns.append(Turn(role, _as_text(message["value"])))
    turns = _single_clip_tag(turns)
    return _checked(Sample(_record_id(record, origin), tuple(turns), video=confined_path(video, place),
                           origin=origin))


def _parse_messages(record: dict[str, Any], place: MediaPlace, origin: str) -> Sample:
    messages = record["messages"]
    if not isinstance(messages, list):
        raise MalformedRecord("'messages' is not a list")
    frames = record.get("images", [])
    if isinstance(record.get("videos"), list) and record["videos"] and not frames:
        frames = record["videos"][0]  # ms-swift style: one video given as its list of frames
    if not isinstance(frames, list) or not frames or not all(isinstance(f, str) and f for f in frames):
        raise MalformedRecord("frames-layout record needs a non-empty 'images' list of frame paths")
    turns = []
    for message in messages:
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise MalformedRecord("a message lacks 'role' or 'content'")
        role = str(message["role"]).lower()
        if role not in ROLES:
            raise MalformedRecord(f"unknown role {message['role']!r} (expected system, user or assistant)")
        turns.append(Turn(role, _content_text(message["content"])))
    image_tags = sum(turn.text.count(IMAGE_TAG) for turn in turns)
    video_tags = sum(turn.text.count(VIDEO_TAG) for turn in turns)
    per_frame = len(frames) > 1 and video_tags == 0 and image_tags == len(frames)
    if not per_frame:
        turns = _single_clip_tag(turns)
    return _checked(Sample(_record_id(record, origin), tuple(turns),
                           frames=tuple(confined_path(f, place) for f in frames),
                           per_frame_tags=per_frame, origin=origin))


def _content_text(content: Any) -> str:
    """The text of a message whose content is a string or a list of typed parts, with placeholders for media."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise MalformedRecord("message content is neither text nor a list of parts")
    pieces = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            pieces.append(_as_text(part.get("text")))
        elif kind == "image":
            pieces.append(IMAGE_TAG)
        elif kind == "video":
            pieces.append(VIDEO_TAG)
        else:
            raise MalformedRecord(f"unknown content part {part!r}")
    return "".join(pieces)


def _single_clip_tag(turns: list[Turn]) -> list[Turn]:
    """Rewrite the turns so that exactly one ``<video>`` marks the clip (added to the first user turn if absent)."""
    tags = sum(len(PLACEHOLDER_PATTERN.findall(turn.text)) for turn in turns)
    if tags > 1:
        raise MalformedRecord(f"{tags} media placeholders for one clip (expected one, or one <image> per frame)")
    if tags == 1:
        return [Turn(turn.role, PLACEHOLDER_PATTERN.sub(VIDEO_TAG, turn.text)) for turn in turns]
    for index, turn in enumerate(turns):
        if turn.role == "user":
            return [*turns[:index], Turn("user", f"{VIDEO_TAG}\n{turn.text}"), *turns[index + 1 :]]
    raise MalformedRecord("no user turn")


def _checked(sample: Sample) -> Sample:
    """Reject conversations the trainer cannot learn from."""
    roles = [turn.role for turn in sample.turns]
    if "assistant" not in roles:
        raise MalformedRecord("no assistant turn to learn from")
    if "user" not in roles:
        raise MalformedRecord("no user turn")
    if [role for role in roles if role != "system"][0] != "user":
        raise MalformedRecord("the first turn after any system prompt must be the user's")
    for turn in sample.turns:
        if turn.role != "user" and PLACEHOLDER_PATTERN.search(turn.text):
            raise MalformedRecord(f"media placeholder in a {turn.role} turn (only user turns may hold the clip)")
        if turn.role == "assistant" and not turn.text.strip():
            raise MalformedRecord("empty assistant turn")
    return sample


def _record_id(record: dict[str, Any], origin: str) -> str:
    record_id = record.get("id")
    return str(record_id) if record_id not in (None, "") else origin


def _without_stray_bytes(sample: Sample) -> Sample:
    """`sample` unless one of its strings holds bytes that were not UTF-8 (lone surrogates after decoding)."""
    strings = [sample.id, *(turn.text for turn in sample.turns), *sample.media_paths]
    if any(_has_surrogates(text) for text in strings):
        raise MalformedRecord("holds bytes that are not UTF-8 text")
    return sample


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _printable(value: Any) -> str:
    """`value` as text that can be written as UTF-8 (stray bytes shown as ``\\xff``)."""
    text = str(value)
    return text.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="backslashreplace")


def _as_text(value: Any) -> str:
    if not isinstance(value, str):
        raise MalformedRecord(f"expected text, got {type(value).__name__}")
    return value


def write_samples_jsonl(samples: Iterable[Sample], path: str | Path) -> int:
    """Write samples as JSONL atomically (temporary file, then rename); returns how many were written."""
    from videonsa.files import atomic_write_text

    lines = [json.dumps(sample.to_json(), ensure_ascii=False) for sample in samples]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)
