"""PackedVisionAttention: the vision tower with one attention call per chunk length equals the stock tower
(outputs and every gradient), its chunk layouts, and that the package's models use it."""

from itertools import accumulate
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from transformers import Qwen2_5_VLVisionConfig
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen

from videonsa import testing
from videonsa.models.chunked_prefill import ChunkedVisionTower, merged_output
from videonsa.models.vision_attention import ChunkLayoutCache, PackedVisionAttention, chunk_layout

PATCH_DIM = 3 * testing.TEMPORAL_PATCH_SIZE * testing.PATCH_SIZE**2

# Grids (t, h, w in patches; windows of 8x8 patches, merge 2x2) of the cases the packed path must get right.
GRIDS = {
    # 3 frames of 16x16 patches: every window 64 rows, every frame 256: one batch each, by a view.
    "equal frames": [[3, 16, 16]],
    # 20x12 patches: windows of 64, 32 and 16 rows interleaved in every frame: gathered by index.
    "mixed windows": [[2, 20, 12]],
    # Images and videos of different sizes: frames of 96 rows in two items apart (gathered), windows mixed.
    "mixed items": [[1, 8, 12], [3, 16, 16], [1, 20, 20], [2, 12, 8]],
    # Two items whose lengths each form one run (full blocks: 256, 256, 64): views, no reordering.
    "runs": [[2, 16, 16], [1, 8, 8]],
    # One window that is the whole frame: a single chunk in every block.
    "single chunk": [[1, 8, 8]],
}


def _config(implementation: str = "sdpa") -> Qwen2_5_VLVisionConfig:
    config = Qwen2_5_VLVisionConfig(**testing.tiny_vision_config_kwargs(depth=4, hidden_size=32))
    config.fullatt_block_indexes = [1, 3]  # window and full blocks alternate, as in the 7B tower's pattern
    config._attn_implementation = implementation
    return config


def _towers(implementation: str = "sdpa", seed: int = 0):
    """(stock tower, packed tower) with the same random weights, fp32, training mode (dropout is 0)."""
    torch.manual_seed(seed)
    stock = qwen.Qwen2_5_VisionTransformerPretrainedModel(_config(implementation))
    packed = ChunkedVisionTower(_config(implementation))
    packed.load_state_dict(stock.state_dict())
    return stock.train(), packed.train()


def _pixels(grid: list[list[int]], seed: int = 1) -> torch.Tensor:
    rows = sum(t * h * w for t, h, w in grid)
    return torch.randn(rows, PATCH_DIM, generator=torch.Generator().manual_seed(seed))


def _run(tower, pixels: torch.Tensor, grid: list[list[int]], weights: torch.Tensor | None = None):
    """Forward + backward of a random linear loss: (merged output, input gradient, {name: parameter gradient})."""
    pixels = pixels.clone().requires_grad_()
    output = merged_output(tower(pixels, grid_thw=torch.tensor(grid)))
    weights = torch.randn_like(output, generator=torch.Generator().manual_seed(2)) if weights is None else weights
    (output * weights).sum().backward()
    grads = {name: parameter.grad for name, parameter in tower.named_parameters()}
    return output.detach(), pixels.grad, grads


def _assert_same_run(ours, theirs):
    torch.testing.assert_close(ours[0], theirs[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours[1], theirs[1], rtol=1e-5, atol=1e-6)
    assert ours[2].keys() == theirs[2].keys()
    for name, grad in theirs[2].items():
        torch.testing.assert_close(ours[2][name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("case", list(GRIDS))
def test_packed_tower_equals_stock_tower(case, implementation):
    grid = GRIDS[case]
    stock, packed = _towers(implementation)
    pixels = _pixels(grid)
    _assert_same_run(_run(packed, pixels, grid), _run(stock, pixels, grid))
    assert packed.chunk_layouts.builds == 2  # the window and the full cu_seqlens, once each for four blocks


def test_packed_tower_makes_one_call_per_chunk_length(monkeypatch):
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
    batches = []

    def counted(module, query, *args, **kwargs):
        batches.append(tuple(query.shape[:3]))  # (chunks, heads, length)
        return sdpa(module, query, *args, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "sdpa", counted)
    _, packed = _towers()
    with torch.no_grad():
        packed(_pixels(GRIDS["equal frames"]), grid_thw=torch.tensor(GRIDS["equal frames"]))
    heads = packed.config.num_heads
    # Window blocks 0 and 2: the 12 windows of 64 rows in one call; full blocks 1 and 3: the 3 frames of 256.
    assert batches == [(12, heads, 64), (3, heads, 256)] * 2


@pytest.mark.parametrize("limit", ["chunks", "scores"])
def test_packed_tower_split_into_bounded_calls_equals_stock(limit):
    grid = GRIDS["mixed items"]
    stock, packed = _towers()
    for block in packed.blocks:
        if limit == "chunks":
            block.attn.max_chunks_per_call = 3
        else:  # room for two windows of 64 rows, or one of anything longer (a single frame of 256 exceeds it)
            block.attn.max_scores_per_call = 2 * block.attn.num_heads * 64 * 64
    assert packed.blocks[0].attn._chunks_per_call(64) == (3 if limit == "chunks" else 2)
    assert packed.blocks[0].attn._chunks_per_call(256) == (3 if limit == "chunks" else 1)
    pixels = _pixels(grid)
    _assert_same_run(_run(packed, pixels, grid), _run(stock, pixels, grid))


@pytest.mark.parametrize("reentrant", [False, True])
def test_packed_tower_under_gradient_checkpointing(reentrant):
    grid = GRIDS["mixed items"]
    stock, packed = _towers()
    pixels = _pixels(grid)
    expected = _run(stock, pixels, grid)
    testing.enable_checkpointing(packed, {"use_reentrant": reentrant})
    _assert_same_run(_run(packed, pixels, grid), expected)
    # The recompute finds the layouts of the forward (a reentrant recompute sees detached aliases of them).
    assert packed.chunk_layouts.builds == 2


def test_packed_tower_in_bf16_autocast_is_close_to_stock():
    grid = GRIDS["mixed windows"]
    stock, packed = _towers()
    pixels = _pixels(grid)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = merged_output(stock(pixels, grid_thw=torch.tensor(grid))).float()
        output = merged_output(packed(pixels, grid_thw=torch.tensor(grid))).float()
    torch.testing.assert_close(output, expected, rtol=2e-2, atol=2e-2)


def test_packed_tower_in_inference_mode_then_training():
    grid = GRIDS["mixed windows"]
    stock, packed = _towers()
    pixels = _pixels(grid)
    with torch.inference_mode():
        output = merged_output(packed(pixels, grid_thw=torch.tensor(grid)))
        expected = merged_output(stock(pixels, grid_thw=torch.tensor(grid)))
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-6)
    _assert_same_run(_run(packed, pixels, grid), _run(stock, pixels, grid))


def test_chunked_tower_pieces_still_equal_one_pass():
    grid = [[4, 16, 16], [1, 20, 12]]
    stock, packed = _towers()
    pixels = _pixels(grid)
    with torch.no_grad():
        expected = merged_output(stock(pixels, grid_thw=torch.tensor(grid)))
        packed.chunk_tokens = 64 * 2  # two temporal patches of 64 merged tokens per piece
        output = merged_output(packed(pixels, grid_thw=torch.tensor(grid)))
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-6)


def test_state_dict_keys_and_shapes_match_the_stock_tower():
    stock, packed = _towers()
    ours, theirs = packed.state_dict(), stock.state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[key].shape == theirs[key].shape for key in theirs)


def test_the_models_vision_tower_uses_packed_attention():
    model = testing.tiny_model()
    tower = model.model.visual
    attentions = [block.attn for block in tower.blocks]
    assert all(isinstance(attention, PackedVisionAttention) for attention in attentions)
    assert all(attention.layouts is tower.chunk_layouts for attention in attentions)
    stock = testing.tiny_model(videonsa=False)
    assert {k for k in model.state_dict() if "visual" in k} == {k for k in stock.state_dict() if "visual" in k}


def _per_chunk_attention(query, key, value, cu_seqlens):
    """The plain reference: SDPA over each chunk [1, heads, L, D] alone, outputs [1, S, heads, D]."""
    bounds = cu_seqlens.tolist()
    outputs = [
        torch.nn.functional.scaled_dot_product_attention(
            query[:, :, begin:end], key[:, :, begin:end], value[:, :, begin:end]
        )
        for begin, end in zip(bounds[:-1], bounds[1:])
        if end > begin
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2)


def test_flash_implementations_keep_the_stock_varlen_call(monkeypatch):
    calls = []

    def varlen(module, query, key, value, attention_mask, cu_seq_lens_q=None, **kwargs):
        calls.append(cu_seq_lens_q)
        return _per_chunk_attention(query, key, value, cu_seq_lens_q), None

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "test_flash_varlen", varlen)
    grid = GRIDS["mixed items"]
    stock, packed = _towers("sdpa")
    # Set after construction: a model built with a flash implementation looks for the flash-attn package.
    for block in packed.blocks:
        monkeypatch.setattr(block.attn.config, "_attn_implementation", "test_flash_varlen")
    with torch.no_grad():
        expected = merged_output(stock(_pixels(grid), grid_thw=torch.tensor(grid)))
        output = merged_output(packed(_pixels(grid), grid_thw=torch.tensor(grid)))
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-6)
    assert len(calls) == 4 and all(c is not None for c in calls)  # one varlen call per block
    assert packed.chunk_layouts.builds == 0


def test_other_implementations_keep_the_stock_per_chunk_loop(monkeypatch):
    shapes = []

    def plain(module, query, key, value, attention_mask, scaling=None, **kwargs):
        shapes.append(query.shape)
        output = torch.nn.functional.scaled_dot_product_attention(query, key, value, scale=scaling)
        return output.transpose(1, 2), None

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "test_custom_attention", plain)
    grid = GRIDS["single chunk"] + GRIDS["equal frames"]
    stock, _ = _towers("sdpa")
    _, packed = _towers("test_custom_attention")
    with torch.no_grad():
        expected = merged_output(stock(_pixels(grid), grid_thw=torch.tensor(grid)))
        output = merged_output(packed(_pixels(grid), grid_thw=torch.tensor(grid)))
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-6)
    assert all(shape[0] == 1 for shape in shapes)  # one chunk per call, as the stock loop does
    assert len(shapes) == 2 * (1 + 3 * 4) + 2 * (1 + 3)  # window blocks: 13 windows; full blocks: 4 frames


def _cu_seqlens(lengths: list[int], device: str = "cpu") -> torch.Tensor:
    """The cu_seqlens [chunks + 1] of chunks of `lengths` rows (int32, as the tower's)."""
    return torch.tensor([0, *accumulate(lengths)], dtype=torch.int32, device=device)


def _regroup(layout, rows: torch.Tensor) -> torch.Tensor:
    """rows [S, 1, 1] taken group by group as the attention does, then put back in sequence order: [S]."""
    parts = [group.take(rows).transpose(1, 2).reshape(-1) for group in layout.groups]
    out = torch.cat(parts) if parts else rows.new_zeros(0)
    return out if layout.inverse is None else out.index_select(0, layout.inverse)


@pytest.mark.parametrize("seed", range(5))
def test_layout_groups_every_chunk_once_by_length(seed):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 4, (12,), generator=generator) * 8  # some empty chunks, lengths 8, 16, 24
    cu_seqlens = _cu_seqlens(lengths.tolist())
    total = int(lengths.sum())
    layout = chunk_layout(cu_seqlens, total)
    assert sorted(group.length for group in layout.groups) == sorted(set(lengths[lengths > 0].tolist()))
    assert sum(group.count * group.length for group in layout.groups) == total
    rows = torch.arange(total, dtype=torch.float64).view(total, 1, 1)
    assert torch.equal(_regroup(layout, rows), rows.view(-1))
    for group in layout.groups:  # each chunk of a batch is one whole chunk of the sequence
        starts = group.take(rows)[:, 0, 0, 0].long()
        assert set(starts.tolist()) <= set(cu_seqlens.tolist())


def test_layout_of_equal_chunks_is_one_view():
    cu_seqlens = torch.arange(0, 5 * 64, 64, dtype=torch.int32)
    layout = chunk_layout(cu_seqlens, 4 * 64)
    assert layout.inverse is None and len(layout.groups) == 1
    states = torch.randn(4 * 64, 2, 8)
    batch = layout.groups[0].take(states)
    assert batch.shape == (4, 2, 64, 8) and batch.data_ptr() == states.data_ptr()


class _TorchCalls(TorchFunctionMode):
    """Records the name and keyword names of every torch function and tensor method called under it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple[str, ...]]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.calls.append((getattr(func, "__name__", str(func)), tuple(sorted(kwargs))))
        return func(*args, **kwargs)


# Calls that bring tensor values to the host (on a GPU, each waits for the device): reading values, branching on
# them, or producing a shape that depends on them.
HOST_READS = {
    "tolist",
    "item",
    "__bool__",
    "__int__",
    "__float__",
    "__index__",
    "__iter__",
    "numpy",
    "cpu",
    "nonzero",
    "argwhere",
    "equal",
    "allclose",
    "unique",
    "unique_consecutive",
    "masked_select",
}
# What the cache reads to recognise a tensor without its values: properties (__get__) and its memory's identity.
IDENTITY_READS = {"__get__", "is_inference", "data_ptr", "stride"}


@pytest.mark.parametrize(
    ("lengths", "by_views"),
    [
        ([64] * 12, True),
        ([0, 64, 64, 0], True),
        ([64] * 6 + [32] * 3 + [16], True),
        ([64, 32, 64, 32, 32, 16] * 3 + [256, 96, 256], False),
        ([64, 0, 64, 32], False),
    ],
    ids=["equal", "equal with empty chunks", "runs", "mixed", "mixed with an empty chunk"],
)
def test_building_a_layout_reads_cu_seqlens_once(lengths, by_views):
    """The CPU stand-in for the GPU sync count: one .tolist() of cu_seqlens, no other call that reads values;
    where every length is one run (equal, runs), nothing but that read and the cache's identity reads."""
    cu_seqlens = _cu_seqlens(lengths)
    with _TorchCalls() as recorded:
        layout = ChunkLayoutCache().layout(cu_seqlens, sum(lengths))
    names = [name for name, _ in recorded.calls]
    assert [name for name in names if name in HOST_READS] == ["tolist"]
    assert all("output_size" in keywords for name, keywords in recorded.calls if name == "repeat_interleave")
    assert (layout.inverse is None) == by_views
    if by_views:
        assert [name for name in names if name not in IDENTITY_READS] == ["tolist"]


def test_the_call_recorder_sees_host_reads():
    """The recorder behind the test above sees the reads it looks for, tensor methods and torch functions alike."""
    values = torch.tensor([0, 64, 64])
    with _TorchCalls() as recorded:
        if values.any():
            values.nonzero()
        torch.unique(values)
        values[0].item()
        torch.repeat_interleave(values, values, output_size=128)
    names = [name for name, _ in recorded.calls]
    assert {"__bool__", "nonzero", "unique", "item"} <= set(names) & HOST_READS
    assert ("repeat_interleave", ("output_size",)) in recorded.calls


def test_layout_refuses_cu_seqlens_that_do_not_cover_the_rows():
    with pytest.raises(ValueError, match="covers 64 rows but the hidden states hold 65"):
        chunk_layout(torch.tensor([0, 32, 64], dtype=torch.int32), 65)


def test_layout_refuses_decreasing_cu_seqlens():
    # Lengths 8, -4, 4 add up to the 8 rows, but the chunks [0, 8) and [4, 8) overlap.
    with pytest.raises(ValueError, match="decreases after chunk 1"):
        chunk_layout(torch.tensor([0, 8, 4, 8]), 8)


def test_layout_cache_keeps_its_last_entries_only():
    cache = ChunkLayoutCache(size=2)
    tensors = [torch.tensor([0, 64, 128 + step], dtype=torch.int32) for step in range(3)]
    layouts = [cache.layout(cu, 128 + step) for step, cu in enumerate(tensors)]
    assert cache.builds == 3 and len(cache._entries) == 2
    assert cache.layout(tensors[2], 130) is layouts[2] and cache.layout(tensors[1], 129) is layouts[1]
    cache.layout(tensors[0], 128)  # evicted by the third: built again
    assert cache.builds == 4
    cache.clear()
    assert not cache._entries


def test_layout_cache_copies_start_empty():
    import copy
    import pickle

    cache = ChunkLayoutCache(size=3)
    cache.layout(torch.tensor([0, 64, 128]), 128)
    for copied in (copy.deepcopy(cache), pickle.loads(pickle.dumps(cache))):
        assert copied.size == 3 and copied.builds == 1 and not copied._entries
        copied.layout(torch.tensor([0, 64]), 64)  # and work
        assert copied.builds == 2


def test_layout_cache_recognises_a_tensor_not_its_values():
    cache = ChunkLayoutCache(size=2)
    window = torch.tensor([0, 64, 128], dtype=torch.int32)
    full = torch.tensor([0, 128], dtype=torch.int32)
    first = cache.layout(window, 128)
    assert cache.layout(window, 128) is first and cache.layout(window.detach(), 128) is first
    cache.layout(full, 128)
    assert cache.builds == 2
    window.add_(0)  # changed in place: its version moves on, so it is read again
    assert cache.layout(window, 128) is not first and cache.builds == 3
    cache.layout(torch.tensor([0, 64, 128], dtype=torch.int32), 128)  # equal values, another tensor
    assert cache.builds == 4


def _attention_pair(device: str, seed: int = 0):
    """(stock attention, packed attention) with the same random weights: hidden 160, 2 heads of 80 (the 7B's
    head size)."""
    config = Qwen2_5_VLVisionConfig(**{**testing.tiny_vision_config_kwargs(hidden_size=160), "num_heads": 2})
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    stock = qwen.Qwen2_5_VLVisionAttention(config).to(device)
    packed = PackedVisionAttention(config).to(device)
    packed.load_state_dict(stock.state_dict())
    return stock, packed


def _attention_inputs(lengths: list[int], device: str):
    """hidden [S, 160] (requires grad), cu_seqlens int32, (cos, sin) [S, 80] for chunks of `lengths` rows."""
    total = sum(lengths)
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(total, 160, generator=generator).to(device).requires_grad_()
    angles = torch.rand(total, 40, generator=generator).to(device) * 6.0
    angles = torch.cat([angles, angles], dim=-1)
    cu_seqlens = _cu_seqlens(lengths, device)
    return hidden, cu_seqlens, (angles.cos(), angles.sin())


def _sync_sites(fn) -> list[str]:
    """Where `fn()` makes synchronising CUDA operations: "file:line" of the Python line behind each one (torch's
    sync debug mode warns once per operation, attributed to the line that called into torch).

    Garbage left by earlier tests is collected first, so that a finaliser running inside `fn()` cannot add a
    sync that is not `fn`'s own."""
    import gc
    import warnings

    gc.collect()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # Leaving "warn" mode is itself reported, once per process on torch 2.11, at set_sync_debug_mode's own line.
    own = Path(torch.cuda.__file__).resolve()
    return [
        f"{Path(w.filename).name}:{w.lineno} ({str(w.message).partition('Triggered internally at ')[2].rstrip('.)')})"
        for w in caught
        if "synchronizing" in str(w.message) and Path(w.filename).resolve() != own
    ]


@pytest.mark.gpu
@pytest.mark.parametrize("lengths", [[64] * 12, [64, 32, 64, 32, 32, 16] * 3 + [256, 96, 256]], ids=["equal", "mixed"])
def test_packed_attention_on_gpu_reads_the_host_once_per_cu_seqlens(lengths):
    stock, packed = _attention_pair("cuda")
    hidden, cu_seqlens, rotary = _attention_inputs(lengths, "cuda")
    expected = stock(hidden, cu_seqlens, rotary)
    expected.square().sum().backward()
    expected_grad, hidden.grad = hidden.grad, None

    outputs = []

    def step():
        outputs.append(packed(hidden, cu_seqlens, rotary))
        outputs[-1].square().sum().backward()

    # One sync, the .tolist() in chunk_layout; the sites name any other, should one appear.
    sites = _sync_sites(lambda: packed.layouts.layout(cu_seqlens, hidden.shape[0]))
    assert len(sites) == 1 and sites[0].startswith("vision_attention.py:"), sites
    assert _sync_sites(step) == []  # the layout is cached: no host read in the forward or the backward
    torch.testing.assert_close(outputs[0], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(hidden.grad, expected_grad, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_packed_attention_on_gpu_with_cu_seqlens_on_the_cpu():
    stock, packed = _attention_pair("cuda")
    hidden, cu_seqlens, rotary = _attention_inputs([64, 32, 64, 32, 32, 16] * 3, "cuda")
    expected = stock(hidden, cu_seqlens, rotary)
    torch.testing.assert_close(packed(hidden, cu_seqlens.cpu(), rotary), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_packed_attention_module_equals_stock_module_on_cpu(dtype):
    stock, packed = _attention_pair("cpu")
    hidden, cu_seqlens, rotary = _attention_inputs([64, 32, 64, 32, 32, 16] * 3 + [256, 96, 256], "cpu")
    expected = stock(hidden, cu_seqlens, rotary)
    output = packed(hidden, cu_seqlens.to(dtype), rotary)
    torch.testing.assert_close(output, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bounds", [[0], [0, 0]], ids=["no chunk", "one empty chunk"])
def test_packed_attention_of_no_rows(bounds):
    _, packed = _attention_pair("cpu")
    hidden = torch.zeros(0, 160, requires_grad=True)
    rotary = (torch.ones(0, 80), torch.zeros(0, 80))
    output = packed(hidden, torch.tensor(bounds, dtype=torch.int32), rotary)
    assert output.shape == (0, 160)
    output.sum().backward()
    assert hidden.grad.shape == (0, 160)
