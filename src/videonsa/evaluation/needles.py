"""The offline needle-in-a-haystack benchmark: short, distinctive needles inserted at known times into long
haystack videos, with multiple-choice questions of three kinds (docs/evaluation.md describes it in full).

- retrieval: a white card shows a word or a number for a few seconds; "which word was on the card?"
- counting: a shape of a given colour flashes N times in one place; "how many times does it flash?"
- order: four coloured shapes each cross the screen once, at separate times; "which appears first?"

Two more kinds are made on request (not in the default set), for tiny models trained from scratch (`videonsa
demo`): recognisable from a 28 x 28 frame, options always in the same order so that the letter names the colour.

- colour: the whole screen turns red, green, blue or white for a moment; "which colour fills the screen?"
- before-black: the screen fills with one colour, later turns black, later still fills with another colour;
  "which colour filled the screen before it turned black?" The first colour ends at least `far_seconds` before
  the black screen, so a model can only relate the two through attention that reaches far back in time.

>>> needle_set = make_needle_set("needles", count=5, lengths=[60, 600, 3600], seed=0)
>>> len(needle_set.questions)      # 3 questions per video: 45

Each video is planned from its own random generator, seeded by (seed, length, index), so the same arguments
give byte-identical files, and adding lengths or raising the count leaves the existing videos unchanged. A
rerun into the same directory with the same arguments writes only the videos that are missing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from videonsa.errors import UserError
from videonsa.evaluation.drawing import NEEDLE_COLOURS, NEEDLE_SHAPES, draw_card, draw_shape
from videonsa.evaluation.haystack import Scene, footage_frames, generated_frames, plan_scenes, probe_footage
from videonsa.evaluation.questions import (
    NEEDLE_KINDS,
    OPTION_LETTERS,
    QUESTIONS_FILE,
    Question,
    QuestionSet,
    load_questions,
    write_questions,
)
from videonsa.options import DEFAULT_NEEDLE_FPS as DEFAULT_FPS  # defaults live where `--help` reads them cheaply
from videonsa.options import DEFAULT_NEEDLE_LENGTHS as DEFAULT_LENGTHS
from videonsa.options import DEFAULT_NEEDLE_SIZE as DEFAULT_SIZE
from videonsa.training.workers import die_with_parent
from videonsa.video.info import VideoInfo

SET_FILE = "set.json"
SET_FORMAT = "videonsa-needles"
SET_VERSION = 1
MAX_SECONDS = 24 * 3600
# H.264 at constant quality. Byte-identical files for one seed matter more here than encoding speed or size:
# one thread (x264's output depends on its thread count) and no macroblock-tree rate control (with it, the
# bundled x264 gave a different stream about one time in ten for the same frames; without it, 30 of 30 agreed).
X264_OPTIONS = {"crf": "23", "preset": "veryfast", "threads": "1", "x264-params": "no-mbtree=1"}
KEYFRAME_SECONDS = 10
OPTIONS_PER_QUESTION = 4
# Kinds made only when asked for (not in the default `NEEDLE_KINDS`): frame-filling colours (module docstring).
EXTRA_KINDS: tuple[str, ...] = ("colour", "before-black")
KNOWN_KINDS: tuple[str, ...] = NEEDLE_KINDS + EXTRA_KINDS
# The "colour" kind's colours (RGB), in the fixed order its options always take (so "A" always means red). Pure
# primaries and white: every two of them differ by full scale on two of the three channels (the corners of a
# regular tetrahedron in the RGB cube) and all four differ in luminance, so no single channel or brightness
# reading leaves two of them alike. Haystack pixels stay within 30-200 and never take these values.
FILL_RGB: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "white": (255, 255, 255),
}
FILL_COLOURS: tuple[str, ...] = tuple(FILL_RGB)
MARKER = "black"  # the before-black kind's marker screen (haystack pixels never go below 30)
FILL_PAINT: dict[str, tuple[int, int, int]] = {**FILL_RGB, MARKER: (0, 0, 0)}

WORDS = (
    "ANCHOR", "APRICOT", "BADGER", "BAMBOO", "BANJO", "BEACON", "BISCUIT", "BUCKET", "CACTUS", "CAMEL", "CANDLE",
    "CANOE", "CARROT", "CASTLE", "CHERRY", "COBALT", "COMPASS", "COYOTE", "CRAYON", "DOLPHIN", "DRAGON", "EMBER",
    "FALCON", "FEATHER", "FERRY", "GARLIC", "GIRAFFE", "GLACIER", "HAMMER", "HARBOR", "HELMET", "IGLOO", "JACKAL",
    "JIGSAW", "KETTLE", "KOALA", "LADDER", "LANTERN", "LEMON", "LOBSTER", "MAGNET", "MANGO", "MAPLE", "MEADOW",
    "MITTEN", "NUTMEG", "OCTOPUS", "ORCHID", "OTTER", "PADDLE", "PARROT", "PEBBLE", "PENGUIN", "PEPPER", "PICKLE",
    "PILLOW", "PIRATE", "PLANET", "PRETZEL", "PUMPKIN", "QUILT", "RABBIT", "RAVEN", "ROCKET", "SADDLE", "SALMON",
    "SPONGE", "SQUIRREL", "TEAPOT", "TIGER", "TOMATO", "TRUMPET", "TULIP", "TUNNEL", "TURTLE", "UMBRELLA",
    "VIOLIN", "WALNUT", "WALRUS", "WHISTLE", "WIZARD", "YOGURT", "ZEBRA", "ZIPPER",
)  # fmt: skip


@dataclass(frozen=True)
class NeedleTiming:
    """How long needles last, in whole seconds (frames = seconds x fps)."""

    card_seconds: int = 4
    flash_seconds: int = 1  # each flash shows this long, with as long a pause between flashes
    max_flashes: int = 5
    crossing_seconds: int = 3
    gap_seconds: int = 2  # at least this between needles and from either end of the video
    order_shapes: int = OPTIONS_PER_QUESTION
    fill_seconds: int = 2  # the "colour" and "before-black" kinds: how long the screen shows a colour
    far_seconds: int = 20  # the "before-black" kind: the asked colour ends at least this long before the black

    def seconds_needed(self, kinds: Sequence[str]) -> int:
        """The shortest video that holds the needles of `kinds` with their gaps."""
        durations = self.durations(kinds, flashes=self.max_flashes)
        return sum(durations) + self.gap_seconds * (len(durations) + 1)

    def durations(self, kinds: Sequence[str], *, flashes: int) -> list[int]:
        """Seconds of each needle block of `kinds`, in block order (the crossings are separate blocks)."""
        durations = []
        if "retrieval" in kinds:
            durations.append(self.card_seconds)
        if "counting" in kinds:
            durations.append((2 * flashes - 1) * self.flash_seconds)
        if "order" in kinds:
            durations += [self.crossing_seconds] * self.order_shapes
        if "colour" in kinds:
            durations.append(self.fill_seconds)
        if "before-black" in kinds:
            durations += [self.fill_seconds + self.far_seconds, self.fill_seconds, self.fill_seconds]
        return durations


@dataclass(frozen=True)
class Card:
    """A retrieval needle: `text` on a white card over frames [start, end)."""

    text: str
    start: int
    end: int


@dataclass(frozen=True)
class Flashes:
    """A counting needle: a shape shown at one place over each of the frame spans, hidden between them."""

    shape: str
    colour: str
    centre: tuple[int, int]
    radius: int
    spans: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Crossing:
    """An order needle: a shape moving in a straight line from `origin` to `target` over frames [start, end)."""

    shape: str
    colour: str
    radius: int
    origin: tuple[int, int]
    target: tuple[int, int]
    start: int
    end: int

    def centre_at(self, frame: int) -> tuple[float, float]:
        """Where the shape's centre is at `frame` (within [start, end))."""
        fraction = (frame - self.start) / max(1, self.end - self.start - 1)
        return (
            self.origin[0] + (self.target[0] - self.origin[0]) * fraction,
            self.origin[1] + (self.target[1] - self.origin[1]) * fraction,
        )

    @property
    def label(self) -> str:
        """How questions name it: "red triangle"."""
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Fill:
    """A colour needle: the whole frame filled with `colour` over frames [start, end)."""

    colour: str
    start: int
    end: int


@dataclass(frozen=True)
class NeedleVideo:
    """One planned video: its haystack, its needles and the questions about them."""

    name: str
    file: str  # relative to the set's directory
    seconds: int
    fps: int
    width: int
    height: int
    scenes: tuple[Scene, ...]  # empty when the haystack is footage
    footage_offset: float | None
    cards: tuple[Card, ...] = ()
    flashes: tuple[Flashes, ...] = ()
    crossings: tuple[Crossing, ...] = ()
    questions: tuple[Question, ...] = field(default=(), compare=False)
    fills: tuple[Fill, ...] = ()

    @property
    def frame_count(self) -> int:
        return self.seconds * self.fps

    def draw_needles(self, image: Image.Image, frame: int) -> None:
        """Draw every needle showing at `frame` onto `image` (in place)."""
        draw = ImageDraw.Draw(image)
        for fill in self.fills:
            if fill.start <= frame < fill.end:
                draw.rectangle((0, 0, self.width, self.height), fill=FILL_PAINT[fill.colour])
        for card in self.cards:
            if card.start <= frame < card.end:
                draw_card(draw, card.text, self.width, self.height)
        for flashes in self.flashes:
            if any(start <= frame < end for start, end in flashes.spans):
                draw_shape(draw, flashes.shape, flashes.colour, flashes.centre, flashes.radius)
        for crossing in self.crossings:
            if crossing.start <= frame < crossing.end:
                draw_shape(draw, crossing.shape, crossing.colour, crossing.centre_at(frame), crossing.radius)


@dataclass(frozen=True)
class NeedleSet:
    """A written needle set: its directory, planned videos and the questions as read back from the file."""

    directory: Path
    videos: tuple[NeedleVideo, ...]
    questions: QuestionSet

    @property
    def questions_path(self) -> Path:
        return self.directory / QUESTIONS_FILE


def parse_duration(text: str) -> int:
    """Whole seconds from "90", "90s", "5m", "1h", "1h30m" or "2h15m10s"; `UserError` otherwise."""
    import re

    match = re.fullmatch(r"\s*(?:(\d+)h)?\s*(?:(\d+)m)?\s*(?:(\d+)s?)?\s*", text.lower())
    if not text.strip() or match is None or not any(match.groups()):
        raise UserError(f"--lengths: cannot read {text!r} as a duration (e.g. 90, 90s, 5m, 1h, 1h30m)")
    hours, minutes, seconds = (int(group or 0) for group in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def length_label(seconds: int) -> str:
    """A length bin's label: "40s", "1m30s", "5m", "1h", "1h30m"."""
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{hours}h" if hours else "", f"{minutes}m" if minutes else "", f"{secs}s" if secs else ""]
    return "".join(parts) or "0s"


@dataclass(frozen=True)
class _Draft:
    """A question before it has an id and a video: its text, options, correct option and needle frame spans."""

    kind: str
    text: str
    options: list[str]
    correct: str
    spans: list[tuple[int, int]]

    def question(self, name: str, file: str, seconds: int, fps: int) -> Question:
        return Question(
            id=f"{name}-{self.kind}",
            video=file,
            question=self.text,
            options=tuple(self.options),
            answer=OPTION_LETTERS[self.options.index(self.correct)],
            kind=self.kind,
            video_seconds=float(seconds),
            needle_times=tuple((_seconds(start, fps), _seconds(end, fps)) for start, end in self.spans),
            length_bin=length_label(seconds),
        )


def _retrieval(rng: np.random.Generator, start: int, frames: int) -> tuple[Card, _Draft]:
    """A card with a word (or, one time in three, a three-digit number) and its question."""
    if rng.integers(3) == 0:
        texts = [str(value) for value in rng.choice(np.arange(100, 1000), OPTIONS_PER_QUESTION, replace=False)]
        what = "number"
    else:
        texts = [WORDS[i] for i in rng.choice(len(WORDS), OPTIONS_PER_QUESTION, replace=False)]
        what = "word"
    options = [texts[i] for i in rng.permutation(OPTIONS_PER_QUESTION)]
    card = Card(text=texts[0], start=start, end=start + frames)
    text = f"At one point in the video a white card with a {what} on it appears. Which {what} is on the card?"
    return card, _Draft("retrieval", text, options, texts[0], [(card.start, card.end)])


def _counting(
    rng: np.random.Generator, start: int, count: int, colour: str, timing: NeedleTiming, fps: int, size: tuple[int, int]
) -> tuple[Flashes, _Draft]:
    """A shape of `colour` flashing `count` times from frame `start`, and its question."""
    on = timing.flash_seconds * fps
    spans = [(start + 2 * k * on, start + (2 * k + 1) * on) for k in range(count)]
    radius = max(4, round(min(size) * 0.1))
    shape = str(rng.choice(NEEDLE_SHAPES))
    flashes = Flashes(shape, colour, _point(rng, *size, radius), radius, tuple(spans))
    others = [c for c in range(1, timing.max_flashes + 2) if c != count]
    options = sorted([count, *(int(c) for c in rng.choice(others, OPTIONS_PER_QUESTION - 1, replace=False))])
    text = (
        f"At one point in the video a {colour} {shape} flashes on and off in one place. How many times does it appear?"
    )
    return flashes, _Draft("counting", text, [str(option) for option in options], str(count), spans)


def _order(
    rng: np.random.Generator,
    starts: Sequence[int],
    shapes: Sequence[str],
    colours: Sequence[str],
    frames: int,
    size: tuple[int, int],
) -> tuple[list[Crossing], _Draft]:
    """Shapes crossing the screen from the given start frames, and the question which came first."""
    crossings = [_crossing(rng, shape, colour, start, frames, *size) for shape, colour, start in
                 zip(shapes, colours, starts, strict=True)]  # fmt: skip
    in_time = sorted(crossings, key=lambda crossing: crossing.start)
    options = [crossings[i].label for i in rng.permutation(len(crossings))]
    text = (
        f"{_number_word(len(crossings)).capitalize()} coloured shapes each cross the screen once, at different "
        "times in the video. Which of them appears first?"
    )
    return crossings, _Draft("order", text, options, in_time[0].label, [(c.start, c.end) for c in in_time])


def _colour_fill(rng: np.random.Generator, start: int, frames: int) -> tuple[Fill, _Draft]:
    """The screen filled with one of `FILL_COLOURS` from frame `start`, and its question (fixed option order)."""
    colour = FILL_COLOURS[int(rng.integers(len(FILL_COLOURS)))]
    fill = Fill(colour, start, start + frames)
    text = "Which colour fills the screen?"
    return fill, _Draft("colour", text, list(FILL_COLOURS), colour, [(fill.start, fill.end)])


def _before_black(rng: np.random.Generator, starts: Sequence[int], frames: int) -> tuple[list[Fill], _Draft]:
    """A colour from `starts[0]`, the black screen from `starts[1]`, another colour from `starts[2]` (each
    `frames` long), and the question which colour came before the black (fixed option order)."""
    asked, later = (FILL_COLOURS[int(i)] for i in rng.choice(len(FILL_COLOURS), 2, replace=False))
    fills = [Fill(colour, start, start + frames) for colour, start in zip((asked, MARKER, later), starts, strict=True)]
    text = "Which colour filled the screen before it turned black?"
    return fills, _Draft("before-black", text, list(FILL_COLOURS), asked, [(f.start, f.end) for f in fills])


def _in_order(blocks: list[tuple[str, int]], names: Sequence[str]) -> list[tuple[str, int]]:
    """`blocks` with the blocks named `names` moved, among the places they hold, into the order of `names`."""
    places = [index for index, (kind, _) in enumerate(blocks) if kind in names]
    ordered = sorted((block for block in blocks if block[0] in names), key=lambda block: names.index(block[0]))
    blocks = list(blocks)
    for place, block in zip(places, ordered, strict=True):
        blocks[place] = block
    return blocks


def _point(rng: np.random.Generator, width: int, height: int, radius: int) -> tuple[int, int]:
    return int(rng.integers(radius, width - radius + 1)), int(rng.integers(radius, height - radius + 1))


def _crossing(
    rng: np.random.Generator, shape: str, colour: str, start: int, frames: int, width: int, height: int
) -> Crossing:
    """A shape crossing the frame: from a point near one side to one near the opposite side."""
    radius = max(4, round(min(width, height) * 0.12))
    left, right = (radius, width // 3), (width - width // 3, width - radius)
    origin_x, target_x = int(rng.integers(*left)), int(rng.integers(*right))
    if rng.integers(2):
        origin_x, target_x = target_x, origin_x
    origin = (origin_x, int(rng.integers(radius, height - radius + 1)))
    target = (target_x, int(rng.integers(radius, height - radius + 1)))
    return Crossing(shape, colour, radius, origin, target, start, start + frames)


def _block_starts(rng: np.random.Generator, durations: Sequence[int], total: int, gap: int) -> list[int]:
    """Start frames for blocks of `durations` frames laid out in the given order, `gap` frames apart at least and
    from the ends; the slack is spread at random (uniform order statistics, integers only)."""
    slack = total - sum(durations) - gap * (len(durations) + 1)
    cuts = sorted(int(value) for value in rng.integers(0, slack + 1, size=len(durations)))
    starts, position, previous_cut = [], gap, 0
    for duration, cut in zip(durations, cuts, strict=True):
        position += cut - previous_cut
        starts.append(position)
        position += duration + gap
        previous_cut = cut
    return starts


def _seconds(frames: int, fps: int) -> float:
    return round(frames / fps, 6)


def plan_needle_video(
    seed: int,
    seconds: int,
    index: int,
    *,
    fps: int,
    size: tuple[int, int],
    kinds: Sequence[str],
    timing: NeedleTiming,
    footage_seconds: float | None = None,
) -> NeedleVideo:
    """Plan video `index` of length `seconds`: haystack, needles and questions, from its own generator."""
    rng = np.random.default_rng([seed, seconds, index])
    width, height = size
    name = f"{seconds:05d}s-{index:03d}"
    total = seconds * fps
    flash_count = int(rng.integers(1, timing.max_flashes + 1))
    colours = [str(c) for c in rng.permutation(list(NEEDLE_COLOURS))]
    shapes = [str(s) for s in rng.permutation(list(NEEDLE_SHAPES))]
    blocks = []  # (kind, frames), laid out in a random order
    if "retrieval" in kinds:
        blocks.append(("retrieval", timing.card_seconds * fps))
    if "counting" in kinds:
        blocks.append(("counting", (2 * flash_count - 1) * timing.flash_seconds * fps))
    if "order" in kinds:
        blocks += [(f"order-{k}", timing.crossing_seconds * fps) for k in range(timing.order_shapes)]
    if "colour" in kinds:
        blocks.append(("colour", timing.fill_seconds * fps))
    before_black = ("before-black-asked", "before-black-marker", "before-black-later")
    if "before-black" in kinds:
        # The asked colour's block runs on for far_seconds after the colour, keeping the black screen far from it.
        blocks += [(before_black[0], (timing.fill_seconds + timing.far_seconds) * fps),
                   (before_black[1], timing.fill_seconds * fps), (before_black[2], timing.fill_seconds * fps)]
    blocks = [blocks[i] for i in rng.permutation(len(blocks))]
    if "before-black" in kinds:
        blocks = _in_order(blocks, before_black)
    starts = dict(
        zip(
            (kind for kind, _ in blocks),
            _block_starts(rng, [f for _, f in blocks], total, timing.gap_seconds * fps),
            strict=True,
        )
    )
    drafts: list[_Draft] = []
    cards, flashes, crossings = [], [], []
    if "retrieval" in kinds:
        card, draft = _retrieval(rng, starts["retrieval"], timing.card_seconds * fps)
        cards.append(card)
        drafts.append(draft)
    if "counting" in kinds:
        colour = colours[timing.order_shapes]  # one the crossings do not use
        flash, draft = _counting(rng, starts["counting"], flash_count, colour, timing, fps, size)
        flashes.append(flash)
        drafts.append(draft)
    if "order" in kinds:
        order_starts = [starts[f"order-{k}"] for k in range(timing.order_shapes)]
        crossings, draft = _order(
            rng, order_starts, shapes[: timing.order_shapes], colours[: timing.order_shapes],
            timing.crossing_seconds * fps, size,
        )  # fmt: skip
        drafts.append(draft)
    fills = []
    if "colour" in kinds:
        fill, draft = _colour_fill(rng, starts["colour"], timing.fill_seconds * fps)
        fills.append(fill)
        drafts.append(draft)
    if "before-black" in kinds:
        made, draft = _before_black(rng, [starts[name] for name in before_black], timing.fill_seconds * fps)
        fills += made
        drafts.append(draft)
    footage_offset = None if footage_seconds is None else round(float(rng.uniform(0, footage_seconds)), 3)
    scenes = plan_scenes(rng, total, fps, width, height) if footage_seconds is None else ()
    file = f"videos/{name}.mp4"
    return NeedleVideo(
        name=name,
        file=file,
        seconds=seconds,
        fps=fps,
        width=width,
        height=height,
        scenes=scenes,
        footage_offset=footage_offset,
        cards=tuple(cards),
        flashes=tuple(flashes),
        crossings=tuple(crossings),
        questions=tuple(draft.question(name, file, seconds, fps) for draft in drafts),
        fills=tuple(fills),
    )


def _number_word(number: int) -> str:
    words = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
    return words[number] if number < len(words) else str(number)


def pick_codec() -> str:
    """libx264 where this FFmpeg build has it, else FFmpeg's own MPEG-4 Part 2 encoder."""
    import av

    try:
        av.codec.Codec("libx264", "w")
        return "libx264"
    except (av.FFmpegError, ValueError):
        return "mpeg4"


def write_needle_video(video: NeedleVideo, directory: Path, codec: str, footage: Sequence[VideoInfo] = ()) -> Path:
    """Render `video` (haystack with needles drawn over it) and encode it, atomically, under `directory`."""
    import av

    path = directory / video.file
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.partial{path.suffix}")
    if video.footage_offset is None:
        frames = generated_frames(video.scenes, video.width, video.height, video.fps)
    else:
        frames = footage_frames(footage, video.frame_count, video.width, video.height, video.fps, video.footage_offset)
    try:
        with av.open(str(temporary), "w", format="mp4") as container:
            options = dict(X264_OPTIONS) if codec == "libx264" else {"qscale": "4"}
            stream = container.add_stream(codec, rate=video.fps, options=options)
            stream.width, stream.height, stream.pix_fmt = video.width, video.height, "yuv420p"
            stream.codec_context.gop_size = KEYFRAME_SECONDS * video.fps
            if codec != "libx264":
                stream.codec_context.qscale = 4
            for index, image in enumerate(frames):
                video.draw_needles(image, index)
                container.mux(stream.encode(av.VideoFrame.from_image(image)))
            container.mux(stream.encode(None))
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def _check_arguments(
    count: int, lengths: Sequence[int], size: tuple[int, int], fps: int, kinds: Sequence[str], timing: NeedleTiming
) -> None:
    if count < 1:
        raise UserError(f"--count must be at least 1, got {count}")
    if not lengths:
        raise UserError("--lengths: give at least one video length")
    width, height = size
    if width < 48 or height < 48 or width % 2 or height % 2 or max(width, height) > 3840:
        raise UserError(f"--size {width}x{height}: width and height must be even, from 48 to 3840 pixels")
    if not 1 <= fps <= 30:
        raise UserError(f"--fps must be a whole number of frames per second from 1 to 30, got {fps}")
    unknown = sorted(set(kinds) - set(KNOWN_KINDS))
    if unknown or not kinds:
        raise UserError(f"--kinds: choose among {', '.join(KNOWN_KINDS)}, got {', '.join(kinds) or 'none'}")
    if {"colour", "before-black"} <= set(kinds):
        raise UserError("--kinds: colour and before-black cannot share a video (both fill the screen with colours)")
    needed = timing.seconds_needed(kinds)
    for seconds in lengths:
        if not needed <= seconds <= MAX_SECONDS:
            raise UserError(
                f"--lengths {seconds}: a video must last from {needed} s (to hold the {', '.join(kinds)} needles) "
                f"to {MAX_SECONDS // 3600} h"
            )


def _set_description(count, lengths, size, fps, kinds, seed, timing, codec, footage) -> dict:
    timing = asdict(timing)
    # Sets without the extra kinds describe themselves as before those kinds existed.
    if "colour" not in kinds and "before-black" not in kinds:
        del timing["fill_seconds"]
    if "before-black" not in kinds:
        del timing["far_seconds"]
    return {
        "format": SET_FORMAT,
        "version": SET_VERSION,
        "seed": seed,
        "count": count,
        "lengths": list(lengths),
        "size": list(size),
        "fps": fps,
        "kinds": list(kinds),
        "timing": timing,
        "codec": codec,
        "footage": footage,
    }


def _claim_directory(directory: Path, description: dict) -> None:
    """Make `directory` ours: new or empty, or an earlier run of the same set (which this run completes)."""
    set_file = directory / SET_FILE
    if set_file.is_file():
        try:
            existing = json.loads(set_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise UserError(f"{set_file}: unreadable ({error}); choose another output directory") from None
        if existing != description:
            changed = sorted(key for key in description if existing.get(key) != description[key])
            raise UserError(
                f"{directory}: holds a needle set made with other settings ({', '.join(changed)}); "
                "choose another output directory"
            )
        return
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise UserError(f"{directory}: exists and is not an empty directory; choose another output directory")
    directory.mkdir(parents=True, exist_ok=True)
    temporary = directory / f".{SET_FILE}.tmp"
    temporary.write_text(json.dumps(description, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, set_file)


def _footage_description(infos: Sequence[VideoInfo], folder: Path) -> dict:
    return {
        "folder": str(folder),
        "files": [
            {"path": os.path.relpath(info.paths[0], folder), "bytes": info.paths[0].stat().st_size} for info in infos
        ],
    }


def make_needle_set(
    out_dir: str | os.PathLike,
    *,
    count: int = 5,
    lengths: Sequence[int] = DEFAULT_LENGTHS,
    size: tuple[int, int] = DEFAULT_SIZE,
    seed: int = 0,
    footage: str | os.PathLike | None = None,
    fps: int = DEFAULT_FPS,
    kinds: Sequence[str] = NEEDLE_KINDS,
    timing: NeedleTiming | None = None,
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> NeedleSet:
    """Write a needle set to `out_dir`: `count` videos per length in `lengths` (seconds), at `size` (width,
    height) and `fps`, each with one needle and one question per kind in `kinds`.

    footage: a folder of videos to use as haystack (looped) instead of generated scenes. workers: videos encoded
    in parallel processes. progress: called as `progress(videos_done, videos_total)`. Files: `videos/*.mp4`,
    `questions.jsonl` (written last) and `set.json` (the arguments). Returns the planned set.
    """
    timing = timing or NeedleTiming()
    lengths = [int(seconds) for seconds in lengths]
    size = (int(size[0]), int(size[1]))
    kinds = [kind for kind in KNOWN_KINDS if kind in kinds] + sorted(set(kinds) - set(KNOWN_KINDS))
    _check_arguments(count, lengths, size, fps, kinds, timing)
    directory = Path(out_dir).expanduser()
    infos: tuple[VideoInfo, ...] = ()
    footage_description = None
    if footage is not None:
        folder = Path(footage).expanduser().resolve()
        infos = probe_footage(folder)
        footage_description = _footage_description(infos, folder)
    codec = pick_codec()
    description = _set_description(count, lengths, size, fps, kinds, seed, timing, codec, footage_description)
    footage_seconds = sum(info.duration for info in infos) if infos else None
    videos = tuple(
        plan_needle_video(
            seed, seconds, index, fps=fps, size=size, kinds=kinds, timing=timing, footage_seconds=footage_seconds
        )
        for seconds in lengths
        for index in range(count)
    )
    _claim_directory(directory, description)
    missing = [video for video in videos if not (directory / video.file).is_file()]
    _write_videos(missing, directory, codec, infos, workers, progress)
    write_questions(directory / QUESTIONS_FILE, [question for video in videos for question in video.questions])
    return NeedleSet(directory=directory, videos=videos, questions=load_questions(directory))


def _write_videos(videos, directory, codec, infos, workers, progress) -> None:
    total = len(videos)
    if progress is not None:
        progress(0, total)
    if workers <= 1 or total <= 1:
        for done, video in enumerate(videos, start=1):
            write_needle_video(video, directory, codec, infos)
            if progress is not None:
                progress(done, total)
        return
    # Workers die with this process: a killed `make-needles` leaves no encoder running.
    with ProcessPoolExecutor(
        max_workers=min(workers, total), initializer=die_with_parent, initargs=(os.getpid(),)
    ) as pool:
        futures = [pool.submit(write_needle_video, video, directory, codec, infos) for video in videos]
        for done, future in enumerate(futures, start=1):
            future.result()
            if progress is not None:
                progress(done, total)


__all__ = [
    "DEFAULT_LENGTHS",
    "Card",
    "Crossing",
    "EXTRA_KINDS",
    "FILL_COLOURS",
    "FILL_PAINT",
    "FILL_RGB",
    "MARKER",
    "Fill",
    "Flashes",
    "KNOWN_KINDS",
    "NeedleSet",
    "NeedleTiming",
    "NeedleVideo",
    "length_label",
    "make_needle_set",
    "parse_duration",
    "plan_needle_video",
    "write_needle_video",
]
