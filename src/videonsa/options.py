"""Choices and defaults users pick from, in a module that imports nothing heavy.

The command line lists these in `--help` and checks flags against them while parsing, so they live apart from
the code that acts on them (which needs torch, transformers or PyAV): `videonsa --help`, `--version` and
argument errors then answer without loading those libraries. The modules that act on a choice import it from
here, so each value is written once.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

# Attention modes a user may ask for. "auto": the mode the checkpoint runs by default
# (`videonsa.inference.model_files.resolve_attention`); the others are explicit choices.
ATTENTION_MODES: tuple[str, ...] = ("auto", "nsa", "dense", "official")

# How frames are chosen and the prompt laid out: "planner" (the token-budget planner, `videonsa.video.planning`),
# "paper" (the paper's evaluation, `videonsa.video.paper`), "auto" (paper for official attention, else planner).
PRESETS: tuple[str, ...] = ("auto", "paper", "planner")

# Defaults of the paper preset, from the paper's evaluation wrapper; fps had none there (it had to be given),
# 4 is the paper's sampling rate.
DEFAULT_PAPER_FPS = 4.0
DEFAULT_PAPER_MAX_FRAMES = 32
DEFAULT_PAPER_MIN_PIXELS = 256 * 28 * 28  # 200,704
DEFAULT_PAPER_MAX_PIXELS = 2048 * 28 * 28  # 1,605,632 (above the per-frame cap, so the cap rules)
# The evaluation's video reader: a whole video may hold at most this many pixels (over pairs of frames; the
# original read it from the environment variable VIDEO_MAX_PIXELS).
DEFAULT_PAPER_TOTAL_PIXELS = int(128000 * 28 * 28 * 0.9)  # 90,316,800

# VideoNSA's gate temperature: the gate MLP's logits are divided by it before the sigmoid (docs/layer.md, the
# gates). The layers, the official mode, the demo model, the tiny test models and `videonsa convert --help` read
# it from here.
DEFAULT_GATE_TEMPERATURE = 0.3

# Answer generation: `GenerationSettings`' defaults, read from here (at most 256 new tokens, greedy, top-p and top-k
# off, no seed). Commands without sampling flags (eval, the analyses) set these on their arguments for `videonsa
# ask`'s settings helper, which reads them. Read-only: every command's defaults come from this one mapping.
DEFAULT_MAX_NEW_TOKENS = 256
GREEDY_GENERATION: Mapping[str, Any] = MappingProxyType(
    {"max_new_tokens": DEFAULT_MAX_NEW_TOKENS, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seed": None}
)

# Defaults of `videonsa eval make-needles`: video lengths in seconds, (width, height), frames per second.
DEFAULT_NEEDLE_LENGTHS: tuple[int, ...] = (60, 300, 900, 1800, 3600)
DEFAULT_NEEDLE_SIZE = (320, 240)
DEFAULT_NEEDLE_FPS = 2
