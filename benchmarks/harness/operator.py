"""The operator's intermediate tensors at a real shape, for the scripts that time one kernel on its own.

This is the harness's only import of kernel internals (packing, compression, top-k): when `videonsa.ops`
moves them, this module is the one place to follow. Scripts that time the whole operator use the public
`videonsa.ops.nsa_attention` instead.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from harness.inputs import make_inputs
from harness.shapes import BLOCK, COUNT, HKV, HQ, INIT, LOCAL, D
from videonsa.ops.triton import selection as slc
from videonsa.ops.triton.compression import compressed_attention_fwd, mean_pool_fwd
from videonsa.ops.triton.topk import select_blocks_topk
from videonsa.ops.triton.utils import pack, tile_shape


class PackedInputs(NamedTuple):
    """Packed operator inputs: q [T, HQ, D], k, v [T, HKV, D] (bf16), cu_seqlens int32 [2]."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu: torch.Tensor


class Compressed(NamedTuple):
    """Mean-pooled keys and values k_cmp, v_cmp [T / BLOCK, HKV, D], their cu_seqlens, and the compression
    branch's output o_cmp [T, HQ, D] and log-sum-exp lse_cmp (what the top-k re-scores against)."""

    k_cmp: torch.Tensor
    v_cmp: torch.Tensor
    cu_cmp: torch.Tensor
    o_cmp: torch.Tensor
    lse_cmp: torch.Tensor


def pack_inputs(x: dict[str, torch.Tensor]) -> PackedInputs:
    """`make_inputs`' q, k, v packed along T as the operator packs them (one sequence per batch row)."""
    q, cu = pack(x["q"], None)
    k, _ = pack(x["k"], None)
    v, _ = pack(x["v"], None)
    return PackedInputs(q, k, v, cu)


def packed_inputs(seq_len: int, structured: bool = False, seed: int = 0, device: str = "cuda") -> PackedInputs:
    """`make_inputs(seq_len, seed, structured)` packed (`pack_inputs`)."""
    return pack_inputs(make_inputs(seq_len, seed=seed, structured=structured, device=device))


def compress(x: PackedInputs) -> Compressed:
    """The compression branch on packed inputs (mean pooling, then attention over the compressed keys)."""
    k_cmp, v_cmp, cu_cmp = mean_pool_fwd(x.k, x.v, x.cu, BLOCK)
    o_cmp, lse_cmp = compressed_attention_fwd(x.q, k_cmp, v_cmp, x.cu, cu_cmp, BLOCK, D**-0.5)
    return Compressed(k_cmp, v_cmp, cu_cmp, o_cmp, lse_cmp)


def select_blocks(x: PackedInputs, c: Compressed, **launch) -> torch.Tensor:
    """The operator's block choice, int32 [T, HKV, COUNT] (-1 = unused); `launch` goes to the top-k launcher."""
    return select_blocks_topk(x.q, c.k_cmp, c.lse_cmp, x.cu, c.cu_cmp, block_size=BLOCK, block_count=COUNT,
                              init_blocks=INIT, local_blocks=LOCAL, scale=D**-0.5, **launch)


def operator_selection(seq_len: int, structured: bool = False, seed: int = 0, device: str = "cuda"):
    """(q, k, v, cu_seqlens, block_indices) as the selection kernels receive them inside the operator."""
    x = packed_inputs(seq_len, structured, seed, device)
    indices = select_blocks(x, compress(x))
    return x.q, x.k, x.v, x.cu, indices.to(torch.int32).contiguous()


class ByBlockWork(NamedTuple):
    """The block-major selection forward's work in one call, cut as `launch_fwd_by_block` cuts it (training chunk
    size, the default settings), with one chunk's partial buffers: what the probes of its kernels launch on.

    q [T, HQ, D], k, v [T, HKV, D], cu int32 [2], indices int32 [T, HKV, COUNT] (`operator_selection`); chunk:
    tokens per chunk; key_blocks: the key-block table; lists: the sorted (block, group, token) triples per chunk;
    work: their work items per chunk; o_part [chunk * HKV * COUNT * G, D] and lse_part float32 [chunk * HKV *
    COUNT * G] (G = HQ / HKV); block_m, bt: the main kernel's tile (rows, tokens per step).
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu: torch.Tensor
    indices: torch.Tensor
    chunk: int
    key_blocks: torch.Tensor
    lists: slc.BlockLists
    work: slc.BlockItems
    o_part: torch.Tensor
    lse_part: torch.Tensor
    block_m: int
    bt: int


def by_block_work(seq_len: int, structured: bool = False, seed: int = 0, device: str = "cuda") -> ByBlockWork:
    """`ByBlockWork` on the operator's own selection of `make_inputs(seq_len, seed, structured)`."""
    q, k, v, cu, indices = operator_selection(seq_len, structured, seed, device)
    group = HQ // HKV
    settings = slc.SELECTION_SETTINGS
    chunk = min(slc.by_block_chunk_tokens(HQ, HKV, COUNT, D, q.element_size()), seq_len)
    key_blocks, units = slc.key_block_table(cu, seq_len, BLOCK)
    lists = slc.block_lists(indices, cu, BLOCK, chunk, n_blocks=key_blocks.shape[0], units=units)
    work = slc.by_block_items(lists, HKV, settings.by_block_split)
    o_part = torch.empty((chunk * HKV * COUNT * group, D), dtype=q.dtype, device=q.device)
    lse_part = torch.empty(chunk * HKV * COUNT * group, dtype=torch.float32, device=q.device)
    block_m, bt = tile_shape(group, settings.by_block_rows)
    return ByBlockWork(q, k, v, cu, indices, chunk, key_blocks, lists, work, o_part, lse_part, block_m, bt)
