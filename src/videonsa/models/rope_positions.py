"""Qwen2.5-VL's multimodal rotary (M-RoPE) position ids, the same on every transformers version.

The rule (docs/layer.md, "Rotary positions"): text tokens get three equal ids counting up by one. A vision block
(an image, or a video of several temporal patches) that starts where the next text id would be, `start`, gives
its token at temporal patch k, merged row r and merged column c the ids

    (start + floor(k * seconds_per_patch * tokens_per_second), start + r, start + c)

(an image has one temporal patch, k = 0). The text after a vision block continues at one more than the largest
id of everything before it, as Qwen2.5-VL was trained and as the original VideoNSA code computes it.

Two transformers behaviours are corrected here, which is why the package computes the ids itself:
* transformers 5.3 and later continue the text after a vision block at start + max(rows, columns), inside the
  video's temporal range when it has several temporal patches (a video with temporal ids 4 .. 24 is followed by
  text at 6, 7, ...), while decoding still starts past the largest id;
* transformers 5.17 (like the 4.x releases) truncates `seconds_per_patch` to a whole number first, putting every
  frame of a 4 fps video (0.5 s per patch) at one time id; later releases keep the fraction, and so does this
  package. With one second per patch (the paper preset) both agree.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import groupby

import torch
from torch import Tensor

# Qwen2.5-VL's token types in mm_token_type_ids.
TEXT, IMAGE, VIDEO = 0, 1, 2


def _vision_block(
    start: int, grid: Tensor, merge: int, time_step: Tensor | None, device: torch.device
) -> Tensor:
    """Position ids [3, t * h * w] of one image or video whose block starts at id `start`."""
    frames, height, width = (int(x) for x in grid)
    rows, cols = height // merge, width // merge
    patch = torch.arange(frames, device=device)
    temporal = (patch * time_step).long() if time_step is not None else torch.zeros_like(patch)
    t = temporal.view(-1, 1, 1).expand(frames, rows, cols)
    r = torch.arange(rows, device=device).view(1, -1, 1).expand(frames, rows, cols)
    c = torch.arange(cols, device=device).view(1, 1, -1).expand(frames, rows, cols)
    return torch.stack([t, r, c]).reshape(3, -1) + start


def _vision_run(
    count: int, kind: int, start: int, grids: Iterator[Tensor], seconds: Iterator[Tensor],
    tokens_per_second: float, merge: int, device: torch.device,
) -> list[Tensor]:
    """Position ids of a run of `count` image or video tokens, one [3, n] block per grid (a run may hold several
    images or videos back to back), the first starting at id `start`, each next one past the last's largest id."""
    blocks, filled = [], 0
    while filled < count:
        grid = next(grids, None)
        if grid is None:
            raise ValueError(f"more {'video' if kind == VIDEO else 'image'} tokens than grids in "
                             "video_grid_thw / image_grid_thw")
        step = None
        if kind == VIDEO:
            # Float32 seconds times tokens per second, then the patch index, then floor: as the later
            # transformers releases compute it.
            step = torch.tensor(float(next(seconds, 1.0)), dtype=torch.float32, device=device) * tokens_per_second
        blocks.append(_vision_block(start, grid, merge, step, device))
        filled += blocks[-1].shape[1]
        start = int(blocks[-1].max()) + 1
    if filled != count:
        raise ValueError("a vision grid does not match its number of placeholder tokens")
    return blocks


def multimodal_position_ids(
    mm_token_type_ids: Tensor,
    image_grid_thw: Tensor | None,
    video_grid_thw: Tensor | None,
    second_per_grid_ts: Tensor | None,
    attention_mask: Tensor | None,
    *,
    tokens_per_second: float,
    spatial_merge_size: int,
) -> tuple[Tensor, Tensor]:
    """Qwen2.5-VL's position ids of a prompt batch and the rope deltas that decoding continues from.

    mm_token_type_ids, attention_mask: [B, L] (0 text, 1 image, 2 video; padding has mask 0 and gets id 1, as in
    transformers); image_grid_thw, video_grid_thw: [num_images / num_videos, 3] in patches, in prompt order over
    the batch; second_per_grid_ts: [num_videos] seconds between temporal patches (1.0 each when None).
    Returns (position_ids [3, B, L] int64, rope deltas [B, 1]: largest id + 1 - number of real tokens).

    A run of vision tokens may hold several images or videos back to back; each takes the next grid.
    """
    batch, length = mm_token_type_ids.shape
    device = mm_token_type_ids.device
    grids = {IMAGE: iter(image_grid_thw if image_grid_thw is not None else ()),
             VIDEO: iter(video_grid_thw if video_grid_thw is not None else ())}
    seconds = iter(second_per_grid_ts if second_per_grid_ts is not None else ())
    position_ids = torch.ones(3, batch, length, dtype=torch.long, device=device)
    deltas = []
    for sample in range(batch):
        keep = (attention_mask[sample].bool() if attention_mask is not None
                else torch.ones(length, dtype=torch.bool, device=device))
        pieces: list[Tensor] = []
        next_id = 0
        for kind, run in groupby(mm_token_type_ids[sample][keep].tolist()):
            count = len(list(run))
            if kind == TEXT:
                new = [torch.arange(count, device=device).expand(3, -1) + next_id]
            else:
                new = _vision_run(count, kind, next_id, grids[kind], seconds, tokens_per_second,
                                  spatial_merge_size, device)
            pieces += new
            next_id = int(new[-1].max()) + 1
        ids = torch.cat(pieces, dim=1)
        position_ids[:, sample, keep] = ids
        deltas.append(int(ids.max()) + 1 - int(keep.sum()))
    return position_ids, torch.tensor(deltas, device=device).view(-1, 1)
