"""Check `official_attention` against the original VideoNSA code itself, run on the GPU.

The original attention (the released checkpoint's) is not part of this project. To run it, put its files in a
scratch directory outside git and point `--orig` there:

    ORIG/fla/...                  the original repository's vendored fla 0.3.1 (lmms-eval/fla), with fla/__init__.py
                                  and fla/ops/__init__.py emptied so that importing the NSA ops does not import
                                  every other layer and model of fla
    ORIG/nsa/...                  the original NSA files (ms-swift/nsa: nsa.py, compression.py, selection.py)
    ORIG/flash_attn/__init__.py   a stand-in `flash_attn_func` (exact banded-mask SDPA): flash-attn has no build here
    ORIG/loguru.py                a stand-in logger, if loguru is not installed
    ORIG/modeling_qwen2_5_vl.py   the original evaluation model file (lmms-eval/.../qwen25_vl/modeling_qwen2_5_vl.py)

The layer's mixed-path method (`_mixed_attention`) is read from that model file and executed as written, on a
stand-in `self` holding the gate projections and settings, so the comparison covers the original glue (masking,
head padding, gates, copy averaging, the added dense pass) as well as the original kernels (flex-attention
compression, fla top-k and selection). Two comparisons per length, on random inputs at the 7B head shape
(28 query heads, 4 KV heads, head dim 128) with a video prompt (text, vision, text; a few vision tokens labelled
text as the position heuristic does):

- semantics: the original in float32 against our reference path in float64 (differences are float32 rounding
  plus whatever the functions disagree on);
- as used: the original in bf16 against our CUDA path in bf16;
- the top-k alone: the blocks the original's fla top-k picks against ours, on the same inputs.

    python benchmarks/check/check_official_original.py --orig .orig/py --lengths 2048 8192 32768

Writes OUT/check_official_original.{jsonl,json,md} (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import ast
import math
import sys
import textwrap
import types
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the shared harness
from harness import (  # noqa: E402
    BLOCK,
    COUNT,
    HKV,
    HQ,
    WINDOW,
    D,
    Results,
    add_output_arguments,
    describe,
    environment,
    markdown_table,
    rel_error,
)
from harness.shapes import QWEN2_5_VL_7B_TEXT  # noqa: E402
from videonsa.options import DEFAULT_GATE_TEMPERATURE  # noqa: E402

HIDDEN = QWEN2_5_VL_7B_TEXT["hidden_size"]  # the gate projections' input (3584)


def load_mixed_attention(model_file: Path):
    """The original `_mixed_attention` method, compiled from its source, with the names it uses bound."""
    source = model_file.read_text()
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "_mixed_attention":
            method_source = textwrap.dedent(ast.get_source_segment(source, node))
            break
    else:
        raise SystemExit(f"{model_file}: no _mixed_attention method found")
    from flash_attn import flash_attn_func
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import repeat_kv

    def flash_attention_forward(q, k, v, attention_mask, q_len, dropout=0.0, sliding_window=None, is_causal=True,
                                use_top_left_mask=False, **_):
        # Batch 1 without padding: the original's helper reduces to flash_attn_func(q, k, v, causal=True).
        assert attention_mask is None and sliding_window is None
        return flash_attn_func(q, k, v, dropout, causal=is_causal)

    namespace = {"torch": torch, "F": F, "repeat_kv": repeat_kv, "_flash_attention_forward": flash_attention_forward}
    exec(compile(method_source, str(model_file), "exec"), namespace)
    return namespace["_mixed_attention"]


def original_layer(g_proj_1, g_proj_2, *, block_size, block_counts, window_size):
    """A stand-in for the original attention module: the attributes `_mixed_attention` reads."""
    return types.SimpleNamespace(
        g_proj_1=g_proj_1, g_proj_2=g_proj_2, num_heads=HQ, gate_temperature=DEFAULT_GATE_TEMPERATURE,
        block_counts=block_counts, block_size=block_size, window_size=window_size, layer_idx=0,
        num_kv_groups=HQ // HKV, q_proj=types.SimpleNamespace(weight=g_proj_1.weight),
        config=types.SimpleNamespace(use_sliding_window=False, sliding_window=None, max_window_layers=0),
        training=False, attention_dropout=0.0, is_causal=True, _flash_attn_uses_top_left_mask=False,
        _pure_flash_attention=None, _pure_nsa_attention=None,
    )


def video_prompt_mask(seq_len: int, device: torch.device, text_before: int = 40, text_after: int = 60) -> torch.Tensor:
    """bool [1, T]: text, then vision, then text; every 997th vision token labelled text (the heuristic's slips)."""
    is_vision = torch.zeros(1, seq_len, dtype=torch.bool, device=device)
    is_vision[:, text_before : seq_len - text_after] = True
    is_vision[:, text_before::997] = False
    return is_vision


def compare(actual: torch.Tensor, expected: torch.Tensor, is_vision: torch.Tensor) -> dict:
    """Relative L2 errors (`harness.rel_error`, the measure every check reports) over all, vision and text rows;
    the largest absolute difference; NaN check."""
    return {
        "rel_all": rel_error(actual, expected),
        "rel_vision": rel_error(actual, expected, is_vision),
        "rel_text": rel_error(actual, expected, ~is_vision),
        "max_abs": float((actual.double() - expected.double()).abs().max()),
        "finite": bool(torch.isfinite(actual).all()),
    }


def topk_agreement(seq_len: int, device: torch.device, block_size: int, block_counts: int) -> dict:
    """Same q64 / k_cmp / lse into the original fla top-k and ours: fraction of (token, group) rows whose block
    lists are identical slot by slot, and whose block sets are identical."""
    from fla.ops.nsa.parallel import parallel_nsa_topk

    from videonsa.ops.official import PADDED_HEADS, original_topk_reference

    try:
        from videonsa.ops.triton.official_topk import original_topk_triton
    except ImportError:
        original_topk_triton = None
    generator = torch.Generator(device=device).manual_seed(seq_len + 1)
    q = torch.randn(1, seq_len, PADDED_HEADS, D, device=device, generator=generator).bfloat16()
    q[:, :, 56:] = 0
    n_blocks = math.ceil(seq_len / block_size)
    k_cmp = torch.randn(1, n_blocks, HKV, D, device=device, generator=generator).bfloat16()
    lse = (torch.rand(1, PADDED_HEADS, seq_len, device=device, generator=generator) * 4 + 2).float()
    scale = D**-0.5
    theirs = parallel_nsa_topk(q=q, k=k_cmp, lse=lse, block_counts=block_counts, block_size=block_size, scale=scale)
    results = {}
    candidates = {"reference": original_topk_reference}
    if original_topk_triton is not None:
        candidates["triton"] = original_topk_triton
    for name, fn in candidates.items():
        ours = fn(q, k_cmp, lse, block_counts, block_size, scale)
        same_slots = (ours.long() == theirs.long()).all(-1)
        same_sets = (ours.long().sort(-1).values == theirs.long().sort(-1).values).all(-1)
        results[name] = {
            "rows_same_order": float(same_slots.float().mean()),
            "rows_same_set": float(same_sets.float().mean()),
        }
    return results


def heads_last(q, k, v, dtype):
    """[B, H, T, D] -> [B, T, H, D] in dtype, as `official_attention` takes them."""
    return tuple(x.to(dtype).transpose(1, 2) for x in (q, k, v))


def run_original(mixed_attention, q, k, v, hidden, is_vision, dtype, g_proj_1, g_proj_2, options):
    """The original mixed path in dtype -> ([T, 28, D], the gate logits it computed, [1, T, 28, 3])."""
    layer = original_layer(g_proj_1.to(dtype), g_proj_2.to(dtype), **options)
    seq_len = q.shape[2]
    out = mixed_attention(layer, q.to(dtype), k.to(dtype), v.to(dtype), is_vision, hidden.to(dtype), None, seq_len)
    logits = layer.g_proj_2(F.gelu(layer.g_proj_1(hidden.to(dtype)))).view(1, seq_len, HQ, 3)
    return out[0], logits


def check_length(seq_len: int, mixed_attention, device: torch.device, block_size: int, block_counts: int,
                 window_size: int) -> dict:
    from videonsa.layers.official import official_attention

    generator = torch.Generator(device=device).manual_seed(seq_len)
    randn = lambda *shape: torch.randn(*shape, device=device, generator=generator)  # noqa: E731
    q = randn(1, HQ, seq_len, D)
    k, v = randn(1, HKV, seq_len, D), randn(1, HKV, seq_len, D)
    hidden = randn(1, seq_len, HIDDEN)
    g_proj_1 = torch.nn.Linear(HIDDEN, HIDDEN, device=device)
    g_proj_2 = torch.nn.Linear(HIDDEN, 3 * HQ, device=device)
    for proj in (g_proj_1, g_proj_2):
        torch.nn.init.normal_(proj.weight, std=0.02, generator=generator)
        torch.nn.init.normal_(proj.bias, std=0.5, generator=generator)
    is_vision = video_prompt_mask(seq_len, device)
    row_vision = is_vision[0]
    result: dict = {"tokens": seq_len, "vision_tokens": int(is_vision.sum())}

    options = dict(block_size=block_size, block_counts=block_counts, window_size=window_size)
    with torch.no_grad():
        original_fp32, logits_fp32 = run_original(mixed_attention, q, k, v, hidden, is_vision, torch.float32,
                                                  g_proj_1, g_proj_2, options)
        original_bf16, logits_bf16 = run_original(mixed_attention, q, k, v, hidden, is_vision, torch.bfloat16,
                                                  g_proj_1, g_proj_2, options)
        # Semantics: our reference path in float64 against the original in float32.
        ours_f64 = official_attention(*heads_last(q, k, v, torch.float64), is_vision, logits_fp32.double(),
                                      **options)[0]
        # As used: our CUDA path in bf16 against the original in bf16.
        ours_bf16 = official_attention(*heads_last(q, k, v, torch.bfloat16), is_vision, logits_bf16, **options)[0]
    result["float32_original_vs_float64_reference"] = compare(ours_f64, original_fp32, row_vision)
    result["bf16_original_vs_bf16_cuda"] = compare(ours_bf16, original_bf16, row_vision)
    result["bf16_cuda_vs_float32_original"] = compare(ours_bf16, original_fp32, row_vision)
    result["bf16_original_vs_float32_original"] = compare(original_bf16, original_fp32, row_vision)
    result["topk"] = topk_agreement(seq_len, device, block_size, block_counts)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--orig", type=Path, required=True, help="scratch directory with the original files")
    parser.add_argument("--modeling", type=Path, help="the original model file (default ORIG/modeling_qwen2_5_vl.py)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--block-size", type=int, default=BLOCK)
    parser.add_argument("--block-counts", type=int, default=COUNT)
    parser.add_argument("--window-size", type=int, default=WINDOW)
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (the original compression is flex attention compiled for CUDA)")
    sys.path.insert(0, str(args.orig.resolve()))
    mixed_attention = load_mixed_attention(args.modeling or args.orig / "modeling_qwen2_5_vl.py")
    device = torch.device("cuda")
    env = environment()
    results = Results("check_official_original", args.out, env)
    for seq_len in args.lengths:
        results.row(check_length(seq_len, mixed_attention, device, args.block_size, args.block_counts,
                                 args.window_size))
    results.write_json()
    lines = []
    for row in results.rows:
        topk = row["topk"]
        lines.append([row["tokens"], f"{row['float32_original_vs_float64_reference']['rel_all']:.2e}",
                      f"{row['bf16_original_vs_bf16_cuda']['rel_all']:.2e}",
                      f"{row['bf16_original_vs_float32_original']['rel_all']:.2e}",
                      "/".join(f"{topk[name]['rows_same_order']:.4f}" for name in topk)])
    results.write_markdown(
        f"official_attention against the original code; {describe(env)}\n\n"
        + markdown_table(["T", "fp32 orig vs f64 ours", "bf16 orig vs bf16 ours", "bf16 orig vs fp32 orig",
                          "top-k same order (ref/triton)"], lines))


if __name__ == "__main__":
    main()
