"""Sequence parallelism (Ulysses) for contexts longer than one GPU holds.

`ulysses` holds the differentiable collectives (all-to-all between sequence and head shards, gather, sum);
`sequence` what the VideoNSA text model and its attention layers do with them (`enable_sequence_parallel`).
"""

from videonsa.parallel.sequence import (
    SequenceParallel,
    SequenceParallelModule,
    disable_sequence_parallel,
    enable_sequence_parallel,
)
from videonsa.parallel.ulysses import (
    all_reduce_sum,
    all_to_all,
    gather_sequence,
    heads_to_sequence,
    sequence_to_heads,
    shard_sequence,
)

__all__ = [
    "SequenceParallel",
    "SequenceParallelModule",
    "all_reduce_sum",
    "all_to_all",
    "disable_sequence_parallel",
    "enable_sequence_parallel",
    "gather_sequence",
    "heads_to_sequence",
    "sequence_to_heads",
    "shard_sequence",
]
