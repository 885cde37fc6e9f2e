"""M-RoPE time positions of video tokens that keep fractions of a second on every transformers version.

Qwen2.5-VL puts temporal patch k of a video at time position start + floor(k * interval), with interval =
tokens_per_second * seconds between patches. transformers 5.17 truncates the seconds to a whole number
first (`int(0.5) == 0`), which puts every frame of a 4 fps video at one time position; later releases keep
the fraction. `fractional_video_time_positions` rewrites the temporal row of the video tokens after the
stock computation so that every version gives the fractional result (later releases are left unchanged).
"""

from __future__ import annotations

import torch
from torch import Tensor

# Qwen2.5-VL's token type for video placeholders in mm_token_type_ids (0 text, 1 image).
VIDEO_TOKEN_TYPE = 2


def _runs(types: Tensor, wanted: int) -> list[tuple[int, int]]:
    """(start, end) of each maximal run of `wanted` in the 1-D tensor `types`."""
    hits = (types == wanted).to(torch.int8)
    edges = torch.diff(hits, prepend=hits.new_zeros(1), append=hits.new_zeros(1))
    starts = torch.nonzero(edges == 1).flatten().tolist()
    ends = torch.nonzero(edges == -1).flatten().tolist()
    return list(zip(starts, ends, strict=True))


def fractional_video_time_positions(
    position_ids: Tensor,
    mm_token_type_ids: Tensor,
    video_grid_thw: Tensor,
    second_per_grid_ts: Tensor,
    attention_mask: Tensor | None,
    *,
    tokens_per_second: float,
    spatial_merge_size: int,
) -> tuple[Tensor, Tensor]:
    """Recompute the time positions of video tokens with fractional seconds, and the rope deltas after them.

    position_ids: [3, B, L] from Qwen2.5-VL's `get_rope_index` (row 0 temporal); mm_token_type_ids,
    attention_mask: [B, L]; video_grid_thw: [num_videos, 3] in patches; second_per_grid_ts: [num_videos].
    Videos are taken in order, sample by sample, as transformers does. Returns (position_ids [3, B, L],
    rope deltas [B, 1]: highest position + 1 - number of real tokens, per sample).
    """
    position_ids = position_ids.clone()
    videos = iter(zip(video_grid_thw, second_per_grid_ts, strict=True))
    deltas = []
    for sample in range(position_ids.shape[1]):
        keep = (
            attention_mask[sample].bool()
            if attention_mask is not None
            else torch.ones_like(mm_token_type_ids[sample], dtype=torch.bool)
        )
        temporal = position_ids[0, sample, keep]
        for start, end in _runs(mm_token_type_ids[sample][keep], VIDEO_TOKEN_TYPE):
            while start < end:  # a run could hold several videos placed back to back
                (frames, height, width), seconds = next(videos)
                per_patch = int(height // spatial_merge_size) * int(width // spatial_merge_size)
                length = int(frames) * per_patch
                # The same float arithmetic as the later transformers releases: interval first, then floor.
                interval = tokens_per_second * seconds
                patch = torch.arange(length, device=temporal.device) // per_patch
                temporal[start : start + length] = temporal[start] + (patch * interval).long()
                start += length
        position_ids[0, sample, keep] = temporal
        deltas.append(position_ids[:, sample, keep].max() + 1 - keep.sum())
    return position_ids, torch.stack(deltas).view(-1, 1).to(position_ids.device)
