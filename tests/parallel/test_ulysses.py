"""Ulysses all-to-all: NSA run head-sharded over 2 CPU processes (gloo) equals the single-process result."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from videonsa.ops import nsa_attention
from videonsa.parallel import gather_sequence, heads_to_sequence, sequence_to_heads, shard_sequence

WORLD = 2
SETTINGS = dict(block_size=8, block_count=3, window_size=12, backend="reference")


def _problem(seed: int, heads_q: int, heads_kv: int, seq_len: int = 64, head_dim: int = 8):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q = rand(1, seq_len, heads_q, head_dim)
    k, v = rand(1, seq_len, heads_kv, head_dim), rand(1, seq_len, heads_kv, head_dim)
    gates = [torch.rand(1, seq_len, heads_q, generator=gen, dtype=torch.float64) for _ in range(3)]
    weight = rand(1, seq_len, heads_q, head_dim)  # loss = sum(o * weight)
    return [q, k, v, *gates], weight


def _single_process(inputs, weight):
    inputs = [x.clone().requires_grad_() for x in inputs]
    o = nsa_attention(*inputs, **SETTINGS)
    (o * weight).sum().backward()
    return o.detach(), [x.grad for x in inputs]


def _worker(rank: int, init_file: str, heads_q: int, heads_kv: int, result_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    inputs, weight = _problem(0, heads_q, heads_kv)
    local = [shard_sequence(x).clone().requires_grad_() for x in inputs]
    q, k, v, *gates = (sequence_to_heads(x) for x in local)
    o = heads_to_sequence(nsa_attention(q, k, v, *gates, **SETTINGS))
    (o * shard_sequence(weight)).sum().backward()
    full_o = gather_sequence(o.detach())
    full_grads = [gather_sequence(x.grad) for x in local]
    if rank == 0:
        torch.save({"o": full_o, "grads": full_grads}, result_file)
    dist.destroy_process_group()


@pytest.mark.parametrize("heads_q,heads_kv", [(14, 2), (4, 4)])
def test_head_sharded_nsa_matches_single_process(heads_q: int, heads_kv: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        init_file, result_file = os.path.join(tmp, "init"), os.path.join(tmp, "result.pt")
        mp.spawn(_worker, args=(init_file, heads_q, heads_kv, result_file), nprocs=WORLD, join=True)
        result = torch.load(result_file)
    inputs, weight = _problem(0, heads_q, heads_kv)
    o, grads = _single_process(inputs, weight)
    torch.testing.assert_close(result["o"], o, rtol=1e-10, atol=1e-10)
    for name, got, want in zip(["q", "k", "v", "g_cmp", "g_slc", "g_swa"], result["grads"], grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=f"gradient of {name} differs")
