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
`Rejected` entry with the reason, never an exception, so that one bad line does not stop a 200K-record job.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from videonsa.errors import UserError

VIDEO_TAG = "<video>"
IMAGE_TAG = "<image>"
PLACEHOLDER_PATTERN = re.compile(r"<video>|<image>")
ROLES = ("system", "user", "assistant")
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class MalformedRecord(ValueError):
    """A record that cannot be read as a training sample; the message says why."""


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


def read_annotations(
    paths: str | Path | Sequence[str | Path], media_root: str | Path | None = None
) -> AnnotationSet:
    """Read LLaVA-Video-178K or frames-as-images annotation files (JSON or JSONL, layouts may be mixed).

    Relative video and frame paths are resolved against `media_root`, or against each annotation file's folder
    when it is None. A missing or undecodable file raises `UserError`; a bad record is returned in `rejected`.
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
        for origin, record in _records(path):
            try:
                if isinstance(record, MalformedRecord):
                    raise record
                result.samples.append(parse_record(record, root, origin))
            except MalformedRecord as error:
                record_id = str(record.get("id", origin)) if isinstance(record, dict) else origin
                result.rejected.append(Rejected(record_id, origin, "malformed", str(error)))
    return result


def parse_record(record: Any, media_root: Path, origin: str) -> Sample:
    """Normalise one record of either layout into a `Sample`; raises `MalformedRecord` with the reason."""
    if not isinstance(record, dict):
        raise MalformedRecord(f"expected a JSON object, got {type(record).__name__}")
    if "conversations" in record:
        return _parse_llava(record, media_root, origin)
    if "messages" in record:
        return _parse_messages(record, media_root, origin)
    raise MalformedRecord("has neither 'conversations' (LLaVA-Video layout) nor 'messages' (frames layout)")


def _records(path: Path) -> Iterator[tuple[str, Any]]:
    """(origin, record) for every record of a JSON or JSONL file; a JSONL line that is not JSON comes as a
    `MalformedRecord` in place of the record, so that it is reported like any other bad record."""
    if not path.is_file():
        raise UserError(f"annotation file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".jsonl" or not text.lstrip().startswith("["):
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            origin = f"{path}:{line_number}"
            try:
                yield origin, json.loads(line)
            except json.JSONDecodeError as error:
                yield origin, MalformedRecord(f"line is not JSON ({error.msg})")
        return
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"annotation file {path} is not valid JSON: {error.msg} at line {error.lineno}") from None
    if not isinstance(records, list):
        raise UserError(f"annotation file {path} must hold a JSON list of records")
    for index, record in enumerate(records):
        yield f"{path}[{index}]", record


def _parse_llava(record: dict[str, Any], media_root: Path, origin: str) -> Sample:
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
    return _checked(Sample(_record_id(record, origin), tuple(turns), video=_resolve(video, media_root),
                           origin=origin))


def _parse_messages(record: dict[str, Any], media_root: Path, origin: str) -> Sample:
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
                           frames=tuple(_resolve(f, media_root) for f in frames),
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


def _resolve(path: str, media_root: Path) -> str:
    candidate = Path(path).expanduser()
    return str(candidate if candidate.is_absolute() else media_root / candidate)


def _as_text(value: Any) -> str:
    if not isinstance(value, str):
        raise MalformedRecord(f"expected text, got {type(value).__name__}")
    return value


def write_samples_jsonl(samples: Iterable[Sample], path: str | Path) -> int:
    """Write samples as JSONL atomically (temporary file, then rename); returns how many were written."""
    from videonsa.training.io import atomic_write_text

    lines = [json.dumps(sample.to_json(), ensure_ascii=False) for sample in samples]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)
