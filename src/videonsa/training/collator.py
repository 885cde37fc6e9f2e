"""Batching dataset items: pad the token sequences on the right, keep each sample's frames as its own tensor."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from videonsa.training.conversation import IGNORE_INDEX

GRID_KEYS = ("image_grid_thw", "video_grid_thw")


@dataclass
class VideoChatCollator:
    """Collates `VideoChatDataset` items.

    Output: input_ids, labels, attention_mask, mm_token_type_ids [B, T_max] (right padded with `pad_token_id`,
    -100, 0, 0); vision_frames: list of B uint8 tensors [k_i, H_i, W_i, 3]; image_grid_thw or video_grid_thw
    [sum k_i or B, 3]; second_per_grid_ts [B] for videos; data_stats: the items' counters summed, int64 [4].
    """

    pad_token_id: int

    def __call__(self, items: Sequence[dict[str, Tensor]]) -> dict[str, Tensor | list[Tensor]]:
        if not items:
            raise ValueError("cannot collate an empty batch")
        length = max(len(item["input_ids"]) for item in items)
        batch: dict[str, Tensor | list[Tensor]] = {
            "input_ids": _pad([item["input_ids"] for item in items], length, self.pad_token_id),
            "labels": _pad([item["labels"] for item in items], length, IGNORE_INDEX),
            "attention_mask": _pad([torch.ones_like(item["input_ids"]) for item in items], length, 0),
            "mm_token_type_ids": _pad([item["mm_token_type_ids"] for item in items], length, 0),
            "vision_frames": [item["vision_frames"] for item in items],
            "data_stats": torch.stack([item["data_stats"] for item in items]).sum(0),
        }
        for key in (*GRID_KEYS, "second_per_grid_ts"):
            if key in items[0]:
                batch[key] = torch.cat([item[key] for item in items])
        return batch


def _pad(rows: Sequence[Tensor], length: int, value: int) -> Tensor:
    out = torch.full((len(rows), length), value, dtype=rows[0].dtype)
    for index, row in enumerate(rows):
        out[index, : len(row)] = row
    return out
