"""Shared kernel utilities (`videonsa.ops.triton.utils`) and host reads (`videonsa.ops.triton.host`)."""

from __future__ import annotations

import torch
from interpreter_harness import DEVICE, interpreter_tests

from videonsa.ops.triton.utils import _tiles_kernel

kernel_test, test_under_interpreter = interpreter_tests(_tiles_kernel, __file__, min_passed=2)


@kernel_test
def test_tiles_never_straddle_sequences() -> None:
    from videonsa.ops.triton.utils import tiles_of

    cu = torch.tensor([0, 5, 5 + 18, 5 + 18 + 1], dtype=torch.int32, device=DEVICE)
    tiles = tiles_of(cu, 9).tolist()
    assert tiles == [[0, 5, 0, 5], [5, 9, 5, 23], [14, 9, 5, 23], [23, 1, 23, 24]]
    # With a bound on the count (no host sync): the same tiles, then empty rows.
    assert tiles_of(cu, 9, max_tiles=6).tolist() == tiles + [[24, 0, 24, 24]] * 2
    # Empty sequences (first, inner, last) own no tile.
    cu = torch.tensor([0, 0, 3, 3, 13, 13], dtype=torch.int32, device=DEVICE)
    assert tiles_of(cu, 4).tolist() == [[0, 3, 0, 3], [3, 4, 3, 13], [7, 4, 3, 13], [11, 2, 3, 13]]
    assert tiles_of(cu, 4, max_tiles=5).tolist()[4] == [13, 0, 13, 13]
    # int64 offsets and a strided view read the same (the kernels take a contiguous int32 copy).
    assert tiles_of(cu.long(), 4).tolist() == tiles_of(cu, 4).tolist()
    strided = torch.stack([cu, cu], dim=1)[:, 0]
    assert tiles_of(strided, 4).tolist() == tiles_of(cu, 4).tolist()


def test_host_copy_reads_the_values_at_copy_time() -> None:
    from videonsa.ops.triton.host import HostCopy

    x = torch.tensor([3, 1, 4])
    copy = HostCopy(x)
    x.add_(10)  # later writes to the source do not reach the copy
    assert copy.tolist() == [3, 1, 4]
    assert HostCopy(torch.tensor(7)).tolist() == 7


@kernel_test
def test_query_tiles_are_the_tiles_in_sequence_form() -> None:
    """`query_tiles` lists the tiles of `tiles_of` as (sequence, first position in it), empty sequences owning
    none; the one-sequence shortcut (no device read) gives the same table as the general path."""
    from videonsa.ops.triton.utils import query_tiles, tiles_of

    cu = torch.tensor([0, 0, 3, 3, 13, 13, 30], dtype=torch.int32, device=DEVICE)
    got = query_tiles(cu, 4).tolist()
    assert got == [[1, 0], [3, 0], [3, 4], [3, 8], [5, 0], [5, 4], [5, 8], [5, 12], [5, 16]]
    rows = tiles_of(cu, 4).tolist()
    assert [cu[s].item() + p for s, p in got] == [r[0] for r in rows]
    one = torch.tensor([0, 30], dtype=torch.int32, device=DEVICE)
    assert query_tiles(one, 4, total=30).tolist() == query_tiles(one, 4).tolist()
