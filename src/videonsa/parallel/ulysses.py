"""Ulysses sequence parallelism: each rank holds T/P tokens, except inside attention, where an all-to-all
trades the sequence shard for a head shard (all T tokens, H/P heads) and a second all-to-all trades it back.

Heads are split into P contiguous slices. Query heads of one KV group are contiguous (head h uses KV head
h // (HQ/HKV)), so when P divides HKV every rank gets whole KV groups: the NSA selection of a group (which is
shared by its query heads) never spans two ranks, and each rank runs the unmodified single-GPU attention on its
heads.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


class _AllToAll(torch.autograd.Function):
    """Split `x` into P chunks along `scatter_dim`, send chunk i to rank i, concatenate the received chunks
    along `gather_dim`. Its gradient is the same exchange with the two dims swapped."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup | None, scatter_dim: int, gather_dim: int) -> Tensor:
        ctx.group, ctx.scatter_dim, ctx.gather_dim = group, scatter_dim, gather_dim
        return _exchange(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:
        return _exchange(grad, ctx.group, ctx.gather_dim, ctx.scatter_dim), None, None, None


def _exchange(x: Tensor, group: dist.ProcessGroup | None, scatter_dim: int, gather_dim: int) -> Tensor:
    world = dist.get_world_size(group)
    if x.shape[scatter_dim] % world:
        size = x.shape[scatter_dim]
        raise ValueError(f"all_to_all: dim {scatter_dim} of size {size} does not split over {world} ranks")
    send = torch.stack(x.chunk(world, dim=scatter_dim)).contiguous()  # [P, ...] chunk i goes to rank i
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    return torch.cat(received.unbind(0), dim=gather_dim)


def all_to_all(x: Tensor, scatter_dim: int, gather_dim: int, group: dist.ProcessGroup | None = None) -> Tensor:
    """Differentiable all-to-all over `group` (identity on a single rank)."""
    if dist.get_world_size(group) == 1:
        return x
    return _AllToAll.apply(x, group, scatter_dim, gather_dim)


def sequence_to_heads(x: Tensor, group: dist.ProcessGroup | None = None, seq_dim: int = 1) -> Tensor:
    """[B, T/P, H, ...] (this rank's tokens, all heads) -> [B, T, H/P, ...] (all tokens, this rank's heads)."""
    return all_to_all(x, scatter_dim=seq_dim + 1, gather_dim=seq_dim, group=group)


def heads_to_sequence(x: Tensor, group: dist.ProcessGroup | None = None, seq_dim: int = 1) -> Tensor:
    """Inverse of `sequence_to_heads`: [B, T, H/P, ...] -> [B, T/P, H, ...]."""
    return all_to_all(x, scatter_dim=seq_dim, gather_dim=seq_dim + 1, group=group)


def shard_sequence(x: Tensor, group: dist.ProcessGroup | None = None, seq_dim: int = 1) -> Tensor:
    """This rank's contiguous slice of the sequence (T must be divisible by the group size; pad first)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if x.shape[seq_dim] % world:
        raise ValueError(f"shard_sequence: length {x.shape[seq_dim]} is not divisible by {world} ranks; pad it")
    return x.chunk(world, dim=seq_dim)[rank]


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup | None, seq_dim: int) -> Tensor:
        ctx.group, ctx.seq_dim = group, seq_dim
        pieces = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(pieces, x.contiguous(), group=group)
        return torch.cat(pieces, dim=seq_dim)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        # Every rank used the whole gathered tensor, so the gradient of this rank's shard sums over ranks.
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return shard_sequence(grad, ctx.group, ctx.seq_dim), None, None


def gather_sequence(x: Tensor, group: dist.ProcessGroup | None = None, seq_dim: int = 1) -> Tensor:
    """Differentiable all-gather of the sequence shards: [B, T/P, ...] -> [B, T, ...]."""
    if dist.get_world_size(group) == 1:
        return x
    return _GatherSequence.apply(x, group, seq_dim)


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        # Every rank holds the sum and backpropagates its own copy: the same convention as `gather_sequence`.
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def all_reduce_sum(x: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """Differentiable sum of `x` over `group`, the same value on every rank (identity on a single rank).

    Like `gather_sequence`, every rank backpropagates the reduced value, so the gradients of the ranks average
    (not sum) to the gradient of one process computing the total."""
    if dist.get_world_size(group) == 1:
        return x
    return _AllReduceSum.apply(x, group)

