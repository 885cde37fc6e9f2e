"""The training dataset: one conversation about one clip per item, frames decoded on the fly.

`__getitem__` runs in dataloader worker processes. For each sample it plans how many frames fit the token
budget, reads only those frames, and returns token ids, assistant-only labels and the resized frames as uint8
(they become `pixel_values` on the training device, see `VideoNSATrainer`). A clip that is missing or cannot be
decoded is logged and replaced by the next sample in the manifest, so a bad file never stops a run and the
sequence of samples stays a pure function of the sampler's order (which keeps resumed runs identical).

Token budget: a sample whose text plus frames exceeds `max_tokens` keeps an evenly spread subset of its frames.
Every item carries counters (`data_stats`) of skipped samples, trimmed samples and dropped frames, which the
trainer sums into its logs.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from videonsa.errors import UserError
from videonsa.training.annotations import Sample
from videonsa.training.clips import ClipReader, ClipReadError, MediaReader
from videonsa.training.config import DataSettings
from videonsa.training.conversation import ConversationEncoder, EncodedConversation
from videonsa.training.pixels import TEMPORAL_PATCH_SIZE, PixelRange, tokens_per_frame
from videonsa.training.prepare import ManifestEntry
from videonsa.training.probe import ClipInfo, ClipMissing, ClipUnreadable, frames_at_rate, probe_clip

logger = logging.getLogger("videonsa.training")

# Order of the counters in each item's `data_stats` tensor (summed over a batch by the collator).
STAT_NAMES = ("samples_skipped", "samples_trimmed", "frames_dropped", "frames_kept")


class SampleTooLong(ValueError):
    """The text alone leaves no room for a single frame within the token budget."""


@dataclass(frozen=True)
class FramePlan:
    """Which of a clip's candidate frames (at the sampling rate) a sample keeps."""

    candidates: int
    positions: tuple[int, ...]
    capped: int

    @property
    def trimmed(self) -> bool:
        """Frames were dropped for the token budget (beyond any `max_frames` cap)."""
        return len(self.positions) < self.capped


def even_positions(count: int, keep: int) -> tuple[int, ...]:
    """`keep` of `count` positions spread evenly: the middle of each of `keep` equal stretches."""
    keep = min(keep, count)
    return tuple(math.floor((index + 0.5) * count / keep) for index in range(keep))


class VideoChatDataset(Dataset):
    """Samples from a manifest (or raw annotations), encoded for Qwen2.5-VL / VideoNSA training.

    entries: manifest entries (clips probed beforehand) or bare samples (probed when first read).
    reader: how frames are read; the default decodes videos with `videonsa.video` and loads frame images.
    """

    def __init__(
        self,
        entries: Sequence[ManifestEntry | Sample],
        tokenizer,
        settings: DataSettings,
        reader: ClipReader | None = None,
    ) -> None:
        if not entries:
            raise UserError("the training data is empty (no samples in the manifest or annotations)")
        self.entries = list(entries)
        self.settings = settings
        self.encoder = ConversationEncoder(tokenizer, settings.frames_as)
        self.pixels = PixelRange(settings.min_pixels, settings.max_pixels)
        self.reader = reader or MediaReader()
        self.as_video = settings.frames_as == "video"

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        """The sample at `index`, or the next readable one after it (the skips are logged and counted)."""
        attempts = self.settings.max_consecutive_skips + 1
        for skipped in range(attempts):
            position = (index + skipped) % len(self.entries)
            sample, _ = self._entry(position)
            try:
                item = self.build(position)
            except (ClipMissing, ClipUnreadable, ClipReadError, SampleTooLong) as error:
                logger.warning("skipping sample %s (%s): %s", sample.id, sample.origin, error)
                continue
            item["data_stats"][0] = skipped
            return item
        raise UserError(f"{attempts} samples in a row from position {index} could not be read; "
                        "check the video root and the manifest")

    def build(self, position: int) -> dict[str, torch.Tensor]:
        """Encode the sample at `position`; raises on a missing, unreadable or oversized sample."""
        sample, clip = self._entry(position)
        if clip is None:
            clip = probe_clip(sample.media_paths, sample.video is not None)
        plan = self.plan(sample, clip)
        frames = self.reader.read(sample, clip, plan.positions, self.settings.sample_fps, self.pixels)
        plan, frames, encoded = self._fit(sample, plan, frames)
        return self._item(encoded, frames, plan, clip)

    def plan(self, sample: Sample, clip: ClipInfo) -> FramePlan:
        """Choose the frames to read: all sampled frames, capped by `max_frames`, then thinned to the budget."""
        candidates = frames_at_rate(clip, self.settings.sample_fps) if sample.video else len(sample.frames)
        if candidates < 1:
            raise ClipUnreadable("the clip has no frames")
        capped = min(candidates, self.settings.max_frames or candidates)
        try:
            per_frame = tokens_per_frame(clip.height, clip.width, self.pixels)
        except ValueError as error:  # an absurd aspect ratio: the vision tower cannot take this clip
            raise ClipUnreadable(str(error)) from None
        keep = min(capped, self._frames_within_budget(sample, candidates, per_frame))
        if keep < 1:
            raise SampleTooLong(f"the text alone needs about {self.settings.max_tokens} tokens or more")
        return FramePlan(candidates, even_positions(candidates, keep), capped)

    def _frames_within_budget(self, sample: Sample, candidates: int, per_frame: int) -> int:
        """Most frames whose tokens, with the text, stay within `max_tokens` (text measured, not guessed)."""
        budget = self.settings.max_tokens
        if self.as_video:
            text = self.encoder.text_length(self._messages(sample, candidates, (0,)))
            return TEMPORAL_PATCH_SIZE * ((budget - text + 1) // per_frame)
        one = self.encoder.text_length(self._messages(sample, candidates, (0,)))
        if candidates == 1:
            return 1 if one - 1 + per_frame <= budget else 0
        two = self.encoder.text_length(self._messages(sample, candidates, (0, 1)))
        part = two - one  # tokens one more image part adds to the text, its single pad included
        fixed = one - part
        return max(0, (budget - fixed) // (part - 1 + per_frame))

    def _messages(self, sample: Sample, candidates: int, positions: Sequence[int]) -> list[dict]:
        kept = np.zeros(candidates, dtype=bool)
        kept[list(positions)] = True
        return self.encoder.messages(sample.turns, kept.tolist(), sample.per_frame_tags)

    def _fit(
        self, sample: Sample, plan: FramePlan, frames: np.ndarray
    ) -> tuple[FramePlan, np.ndarray, EncodedConversation]:
        """Encode with the frames as read; if their real size costs more than planned, thin them further."""
        while True:
            per_frame = (frames.shape[1] // 28) * (frames.shape[2] // 28)
            counts = self._vision_token_counts(len(plan.positions), per_frame)
            encoded = self.encoder.encode(self._messages(sample, plan.candidates, plan.positions), counts)
            if len(encoded) <= self.settings.max_tokens:
                return plan, frames, encoded
            if len(plan.positions) == 1:
                raise SampleTooLong(f"{len(encoded)} tokens with a single frame, budget {self.settings.max_tokens}")
            keep = even_positions(len(plan.positions), len(plan.positions) - 1)
            plan = FramePlan(plan.candidates, tuple(plan.positions[i] for i in keep), plan.capped)
            frames = frames[list(keep)]

    def _vision_token_counts(self, frames: int, per_frame: int) -> list[int]:
        if self.as_video:
            return [math.ceil(frames / TEMPORAL_PATCH_SIZE) * per_frame]
        return [per_frame] * frames

    def _item(
        self, encoded: EncodedConversation, frames: np.ndarray, plan: FramePlan, clip: ClipInfo
    ) -> dict[str, torch.Tensor]:
        height, width = frames.shape[1] // 14, frames.shape[2] // 14
        kept = len(plan.positions)
        if self.as_video:
            grid = torch.tensor([[math.ceil(kept / TEMPORAL_PATCH_SIZE), height, width]])
        else:
            grid = torch.tensor([[1, height, width]] * kept)
        item = {
            "input_ids": torch.tensor(encoded.input_ids, dtype=torch.long),
            "labels": torch.tensor(encoded.labels, dtype=torch.long),
            "mm_token_type_ids": torch.tensor(encoded.mm_token_type_ids, dtype=torch.long),
            "vision_frames": torch.from_numpy(np.ascontiguousarray(frames)),
            ("video_grid_thw" if self.as_video else "image_grid_thw"): grid,
            "data_stats": torch.tensor([0, int(plan.trimmed), plan.candidates - kept, kept], dtype=torch.long),
        }
        if self.as_video:
            item["second_per_grid_ts"] = torch.tensor([self._seconds_per_patch(plan, clip)])
        return item

    def _seconds_per_patch(self, plan: FramePlan, clip: ClipInfo) -> float:
        """Time one temporal patch spans: the clip's length over the kept frames, two frames per patch."""
        rate = min(self.settings.sample_fps, clip.fps) if clip.fps else self.settings.sample_fps
        seconds = plan.candidates / rate
        return TEMPORAL_PATCH_SIZE * seconds / len(plan.positions)

    def _entry(self, position: int) -> tuple[Sample, ClipInfo | None]:
        entry = self.entries[position]
        if isinstance(entry, ManifestEntry):
            return entry.sample, entry.clip
        return entry, None
