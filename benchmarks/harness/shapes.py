"""The shapes every benchmark measures: one attention layer of Qwen2.5-VL-7B and its language model.

Operator shape: B = 1, HQ = 28 query heads, HKV = 4 key/value heads, head dim D = 128, bf16; the NSA budget is
the operator's default (`videonsa.ops.NSAConfig`: block 64, 32 selected blocks, window 256, init 0, local 1).
"""

from __future__ import annotations

import dataclasses

import torch

from videonsa.ops import NSAConfig

HQ, HKV, D = 28, 4, 128
DTYPE = torch.bfloat16
NSA = NSAConfig()
BLOCK, COUNT, WINDOW = NSA.block_size, NSA.block_count, NSA.window_size
INIT, LOCAL = NSA.init_blocks, NSA.local_blocks
# The same budget as the operator's keyword arguments: nsa_attention(**x, **BUDGET).
BUDGET = dataclasses.asdict(NSA)

# Sequence lengths of the operator tables (1K ... 128K), of the end-to-end prefill, and the two that the probes
# and tuning sweeps look at by default (where docs/performance.md judges the kernels).
OPERATOR_LENGTHS = [1024 << i for i in range(8)]
PREFILL_LENGTHS = [32768, 65536, 131072]
PROBE_LENGTHS = [32768, 131072]

# Qwen2.5-VL-7B-Instruct's language model.
QWEN2_5_VL_7B_TEXT = dict(
    vocab_size=152064,
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=HQ,
    num_key_value_heads=HKV,
    max_position_embeddings=262144,
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "mrope_section": [16, 24, 24]},
    tie_word_embeddings=False,
)
# Qwen2.5-VL-7B-Instruct's vision tower (its config.json's vision_config).
QWEN2_5_VL_7B_VISION = dict(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    in_channels=3,
    out_hidden_size=3584,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    tokens_per_second=2,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
    hidden_act="silu",
)


def nsa_flops(seq_len: int) -> dict[str, float]:
    """Forward matrix-product FLOPs of each NSA part at `seq_len` (2 per multiply-add; QK and PV products).

    compression: every query against its visible compressed keys; topk: the re-scoring of those keys (QK only);
    selection: COUNT * BLOCK keys per query (fewer near the start); window: WINDOW keys; dense: causal attention.
    """
    t = torch.arange(seq_len, dtype=torch.float64)
    visible = ((t + 1) // BLOCK).sum().item()
    selected = torch.minimum(torch.full_like(t, COUNT * BLOCK), t + 1).sum().item()
    window = torch.minimum(torch.full_like(t, WINDOW), t + 1).sum().item()
    per_key = 2 * HQ * D
    return {
        "compression": 2 * per_key * visible,
        "topk": per_key * visible,
        "selection": 2 * per_key * selected,
        "window": 2 * per_key * window,
        "dense": 2 * per_key * (seq_len * (seq_len + 1) / 2),
    }


def flop_floors_ms(seq_len: int, tflops: float) -> tuple[float, float]:
    """(forward, backward) milliseconds of the operator's matrix products at `tflops` TFLOP/s.

    The backward counts 2.5x the forward's attention products (dq, dk, dv and the recomputed scores) and no
    top-k (it has no gradient).
    """
    flops = nsa_flops(seq_len)
    rate = tflops * 1e12
    forward = (flops["compression"] + flops["topk"] + flops["selection"] + flops["window"]) / rate * 1e3
    backward = 2.5 * (flops["compression"] + flops["selection"] + flops["window"]) / rate * 1e3
    return forward, backward
