"""What the needles look like: a palette of saturated named colours, outlined polygon shapes, and word cards.

Needles are drawn over the haystack with PIL. Their colours are saturated (the channel spread, max - min, is at
least 165), while generated haystack scenes keep every pixel's spread at most `HAYSTACK_MAX_SPREAD`, so a needle
colour never occurs in a generated haystack; the tests use this to find needles in decoded frames. A card is a
white box with black text, brighter than any generated haystack pixel (`HAYSTACK_MAX_LEVEL`).
"""

from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Saturated needle colours, by the name questions use.
NEEDLE_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 35),
    "green": (20, 185, 60),
    "blue": (35, 75, 235),
    "yellow": (245, 215, 20),
    "magenta": (215, 40, 205),
    "orange": (250, 130, 15),
    "cyan": (15, 205, 215),
}
NEEDLE_SHAPES: tuple[str, ...] = ("star", "triangle", "diamond", "cross", "hexagon")
OUTLINE = (10, 10, 10)
CARD_BACKGROUND = (250, 250, 250)
CARD_TEXT = (0, 0, 0)
# Generated haystack pixels stay within these bounds (see haystack.py), so needles stand out by colour.
HAYSTACK_MAX_SPREAD = 60
HAYSTACK_MAX_LEVEL = 215


def shape_polygon(shape: str, centre: tuple[float, float], radius: float) -> list[tuple[float, float]]:
    """Vertices (x, y) of `shape` (one of NEEDLE_SHAPES) centred at `centre`, fitting a circle of `radius`."""
    cx, cy = centre
    if shape == "star":
        points = [(radius if k % 2 == 0 else radius * 0.45, -math.pi / 2 + k * math.pi / 5) for k in range(10)]
    elif shape == "triangle":
        points = [(radius, -math.pi / 2 + k * 2 * math.pi / 3) for k in range(3)]
    elif shape == "diamond":
        points = [(radius, k * math.pi / 2) for k in range(4)]
    elif shape == "hexagon":
        points = [(radius, k * math.pi / 3) for k in range(6)]
    elif shape == "cross":
        arm = radius * 0.38
        corners = [(arm, radius), (arm, arm), (radius, arm), (radius, -arm), (arm, -arm), (arm, -radius)]
        corners += [(-x, -y) for x, y in corners]
        return [(cx + x, cy + y) for x, y in corners]
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(NEEDLE_SHAPES)}")
    return [(cx + r * math.cos(angle), cy + r * math.sin(angle)) for r, angle in points]


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, colour: str, centre: tuple[float, float], radius: float) -> None:
    """Draw a filled, dark-outlined needle shape in the named colour."""
    outline_width = max(1, round(radius / 10))
    draw.polygon(
        shape_polygon(shape, centre, radius), fill=NEEDLE_COLOURS[colour], outline=OUTLINE, width=outline_width
    )


@functools.lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Pillow's bundled font: the same glyphs on every machine with the same Pillow, no font files needed.
    return ImageFont.load_default(size=size)


def card_box(width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the card in a `width` x `height` frame: centred, 80% wide, 40% high."""
    card_width, card_height = round(width * 0.8), round(height * 0.4)
    left, top = (width - card_width) // 2, (height - card_height) // 2
    return left, top, left + card_width, top + card_height


@functools.lru_cache(maxsize=256)
def _card_font_size(text: str, card_width: int, card_height: int) -> int:
    """The largest font size whose rendering of `text` fits 90% of the card's width and 70% of its height."""
    size = max(6, round(card_height * 0.7))
    while size > 6:
        left, top, right, bottom = _font(size).getbbox(text)
        if right - left <= card_width * 0.9 and bottom - top <= card_height * 0.7:
            break
        size -= 1
    return size


def draw_card(draw: ImageDraw.ImageDraw, text: str, width: int, height: int) -> None:
    """Draw the retrieval card: `text` in black, as large as fits, on a white box in the frame's centre."""
    left, top, right, bottom = card_box(width, height)
    draw.rectangle((left, top, right - 1, bottom - 1), fill=CARD_BACKGROUND)
    size = _card_font_size(text, right - left, bottom - top)
    draw.text(((left + right) / 2, (top + bottom) / 2), text, font=_font(size), fill=CARD_TEXT, anchor="mm")


def render_card(text: str, width: int, height: int) -> np.ndarray:
    """The card alone on a black frame: uint8 [height, width, 3] (what `draw_card` puts over a haystack)."""
    image = Image.new("RGB", (width, height))
    draw_card(ImageDraw.Draw(image), text, width, height)
    return np.asarray(image)


def colour_mask(frame: np.ndarray, colour: str, tolerance: int = 45) -> np.ndarray:
    """Boolean [H, W]: pixels of a decoded RGB frame [H, W, 3] within `tolerance` (per channel) of a needle colour."""
    target = np.asarray(NEEDLE_COLOURS[colour], dtype=np.int16)
    return np.abs(frame.astype(np.int16) - target).max(axis=-1) <= tolerance


__all__ = [
    "CARD_BACKGROUND",
    "HAYSTACK_MAX_LEVEL",
    "HAYSTACK_MAX_SPREAD",
    "NEEDLE_COLOURS",
    "NEEDLE_SHAPES",
    "card_box",
    "colour_mask",
    "draw_card",
    "draw_shape",
    "render_card",
    "shape_polygon",
]
