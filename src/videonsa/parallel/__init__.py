"""Sequence parallelism (Ulysses) for contexts longer than one GPU holds."""

from videonsa.parallel.ulysses import (
    SequenceParallel,
    all_reduce_sum,
    all_to_all,
    gather_sequence,
    heads_to_sequence,
    sequence_to_heads,
    shard_sequence,
)

__all__ = [
    "SequenceParallel",
    "all_reduce_sum",
    "all_to_all",
    "gather_sequence",
    "heads_to_sequence",
    "sequence_to_heads",
    "shard_sequence",
]
