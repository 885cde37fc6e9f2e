"""Token lists and work items of the key-block-major kernels (`videonsa.ops.triton.selection.lists`).

Without a GPU the kernels run under the Triton interpreter in a child pytest (`test_under_interpreter`, see
tests/ops/interpreter_harness.py); shapes are tiny, inputs float32 or float16, the reference float64.
"""

from __future__ import annotations

import pytest
import torch
from interpreter_harness import DEVICE, interpreter_tests
from selection_checks import random_selection

from videonsa.ops.triton.selection.tiles import _slc_fwd_kernel

kernel_test, test_under_interpreter = interpreter_tests(_slc_fwd_kernel, __file__, min_passed=3)


@kernel_test
def test_block_lists_sort_triples_by_chunk_block_group() -> None:
    """Every used (token, group, slot) triple lands exactly once in the list of (its chunk, its global block,
    its group), tokens ascending; unused slots, ids past the sequence and ids of blocks after the token are
    left out."""
    from videonsa.ops.triton.selection import block_lists

    cu = torch.tensor([0, 40, 64], dtype=torch.int32)
    idx = random_selection(cu, 2, 3, 16, seed=23)
    idx[45, 1, 0] = 7  # sequence 1 has 2 blocks: dropped
    idx[50, 0, 1] = 1  # token 50 is in block 0 of sequence 1: block 1 starts after it, dropped
    idx[60, 0, 1] = 1  # token 60 is in block 1: kept
    for n_blocks, padded in ((5, 5), (None, 64 // 16 + 2)):  # the real count (3 + 2 blocks), or the bound
        lists = block_lists(idx.to(DEVICE), cu.to(DEVICE), 16, chunk_tokens=10, n_blocks=n_blocks)
        for name in ("offsets", "pairs", "block_indices"):
            setattr(lists, name, getattr(lists, name).cpu())
        assert lists.n_chunks == 7 and lists.n_blocks == padded
        assert int(lists.block_indices[45, 1, 0]) == -1 and int(lists.block_indices[50, 0, 1]) == -1
        assert int(lists.block_indices[60, 0, 1]) == 1
        seen = []
        for chunk in range(lists.n_chunks):
            for block in range(lists.n_blocks):
                for group in range(2):
                    pos = (chunk * lists.n_blocks + block) * 2 + group
                    triples = lists.pairs[lists.offsets[pos] : lists.offsets[pos + 1]].long()
                    tokens = triples // (2 * 3)
                    assert bool((tokens[1:] > tokens[:-1]).all())
                    for triple in triples.tolist():
                        t, g, slot = triple // 6, (triple // 3) % 2, triple % 3
                        seq = int(t >= 40)
                        assert (t // 10, g) == (chunk, group)
                        assert int(idx[t, g, slot]) + (3 if seq else 0) == block
                        assert int(idx[t, g, slot]) <= (t - 40 * seq) // 16
                        seen.append(triple)
        used = (lists.block_indices >= 0).reshape(-1).nonzero().flatten().tolist()
        assert sorted(seen) == used


@kernel_test
@pytest.mark.parametrize("split", [0, 1, 3, 512])
@pytest.mark.parametrize("seqlens", [[40, 24], [64], [5, 0, 30, 1], [0, 7, 0]])
def test_block_major_items_cover_each_list_in_pieces(split: int, seqlens: list[int]) -> None:
    """The forward's work items: each non-empty list's triples exactly once, in pieces of at most `split`
    (0: whole lists), grouped by chunk (the per-chunk bounds), longest first within a chunk, and never more
    than the launch bound (`grid`) of their chunk."""
    from videonsa.ops.triton.selection import block_lists, by_block_items

    cu = torch.tensor([0, *seqlens], dtype=torch.int32).cumsum(0).to(torch.int32)
    lists = block_lists(random_selection(cu, 2, 3, 16, seed=24).to(DEVICE), cu.to(DEVICE), 16, chunk_tokens=10)
    work = by_block_items(lists, 2, split)
    items, bounds, offsets = work.items.cpu(), work.bounds.tolist(), lists.offsets.cpu()
    per_chunk = lists.n_blocks * 2
    assert bounds[0] == 0 and len(bounds) == lists.n_chunks + 1 and len(work.grid) == lists.n_chunks
    assert items.shape[0] == sum(work.grid) >= bounds[-1]
    covered = torch.zeros(lists.pairs.numel(), dtype=torch.int64)
    for chunk in range(lists.n_chunks):
        chunk_items = items[bounds[chunk] : bounds[chunk + 1]]
        assert chunk_items.shape[0] <= work.grid[chunk]
        lengths = chunk_items[:, 2] - chunk_items[:, 1]
        assert bool((lengths > 0).all()) and bool((lengths[1:] <= lengths[:-1]).all())
        if split:
            assert bool((lengths <= split).all())
        for owner, start, end in chunk_items.tolist():
            lst = chunk * per_chunk + owner
            assert offsets[lst] <= start < end <= offsets[lst + 1]
            covered[start:end] += 1
    n_used = int(offsets[-1])  # the unused slots trail the lists in `pairs`
    assert bool((covered[:n_used] == 1).all()) and bool((covered[n_used:] == 0).all())
    if split == 0:  # whole lists: one item per non-empty list
        assert bounds[-1] == int((offsets[1:] > offsets[:-1]).sum())


@kernel_test
@pytest.mark.parametrize("split", [4, 1, 100])
def test_split_lists_cover_every_list_once(split: int) -> None:
    """dk/dv work items: every list (empty ones too) in pieces of at most `split` tokens, longest first; the
    pieces of a list cut in several get consecutive partial slots, in list order; the rows past the real
    items (the launch is a bound) are never counted; the partial count reaches the host."""
    from videonsa.ops.triton.selection import split_lists

    lengths = [0, 3, 10, 1, 16]
    offsets = torch.tensor([0, *lengths]).cumsum(0).to(DEVICE)
    work = split_lists(offsets, split, n_triples=40)  # a bound above the 30 listed tokens
    n_items = int(work.n_items)
    assert work.items.shape[0] == len(lengths) + 40 // split >= n_items
    items = work.items[:n_items].cpu()
    piece_lengths = (items[:, 2] - items[:, 1]).tolist()
    assert piece_lengths == sorted(piece_lengths, reverse=True), "longest pieces first"
    expected, parts, next_part = [], {}, 0
    for lst, length in enumerate(lengths):
        start = int(offsets[lst])
        cuts = list(range(start, start + length, split)) or [start]
        for j, a in enumerate(cuts):
            expected.append((lst, a, min(a + split, start + length)))
            if len(cuts) > 1:
                parts[(lst, a)] = next_part + j
        next_part += len(cuts) if len(cuts) > 1 else 0
    assert sorted((o, a, e) for o, a, e, _ in items.tolist()) == expected
    for o, a, _, part in items.tolist():
        assert part == parts.get((o, a), -1), "unsplit lists write their final result directly"
    assert work.n_parts.tolist() == [next_part]
    assert work.pieces.tolist() == [max(1, -(-n // split)) for n in lengths]
    assert work.part_end.tolist()[-1] == next_part
