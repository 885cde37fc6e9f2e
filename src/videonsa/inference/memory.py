"""How many tokens fit on a device, and whether (and in what chunks) to prefill a prompt.

A prefill holds, besides the weights, two kinds of memory (docs/long-videos.md, "Memory model"):

- resident, growing with the prompt: the KV cache (every layer's k and v of every token), the vision tower's
  input and output (a merged token's pixel rows and hidden vector, kept through the prefill), and a chunk's pass
  over the cache (copies of one layer's k and v over every cached token: gathered vision streams, the cache's
  concatenation);
- working, growing with the tokens of one forward: one decoder layer's activations (hidden states, q/k/v, the
  MLP's intermediate, the rotary embedding's float32 copies), and the vision tower's over one piece of frames.

One pass over S tokens needs S x (resident + working); chunks of C tokens need S x resident + C x working. The
per-token costs come from the model's config; `WORKING_FACTOR` and `CACHE_PASS_COPIES` are measured with
`benchmarks/bench/bench_chunked_prefill.py`, which prints the measured peak next to this estimate
(docs/performance.md, "Chunked prefill").
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import torch

from videonsa.errors import UserError

# Working memory estimate x this = what a forward is taken to need: the 7B's one-pass prefill measured 0.82 of the
# plain count (H100, 131K tokens); 1.0 leaves a margin.
WORKING_FACTOR = 1.0
# Copies of one layer's k and v over every cached token that a chunk's forward holds at its peak: measured ~5 (7B,
# 524K tokens in 16K chunks, H100) with transformers' concatenating cache; `ask`'s preallocated cache
# (models.kv_cache) makes one fewer, so the estimate keeps a margin there.
CACHE_PASS_COPIES = 5
# Share of the free memory a plan may use; the rest is left for the allocator's fragmentation and the decoding.
USABLE_SHARE = 0.9
# Chunk sizes are multiples of this (whole NSA blocks of the default 64 and friendly kernel tiles).
CHUNK_QUANTUM = 1024
# The smallest chunk chosen automatically: below it the per-chunk overhead dominates.
MIN_AUTO_CHUNK = 2048
# Chunk for the planner's budget estimate (the working memory it sets aside).
PLANNING_CHUNK = 16384


@dataclass(frozen=True)
class PrefillMemory:
    """Per-token memory of a model's prefill, in bytes, and its weights' size.

    weight_bytes: parameters in the run's dtype. resident_per_token: KV cache of all layers, a vision token's
    pixel rows and feature, and a chunk's copies of one layer's cache (x CACHE_PASS_COPIES).
    working_per_token: one forward's activations per token (x WORKING_FACTOR).
    """

    weight_bytes: int
    resident_per_token: int
    working_per_token: int

    @classmethod
    def from_config(
        cls, config: dict[str, Any], dtype: torch.dtype, pixel_dtype: torch.dtype | None = None
    ) -> PrefillMemory:
        """The estimate for a checkpoint's config.json (`ModelFiles.config`) run in `dtype`, its pixel rows held
        in `pixel_dtype` through the prefill (None: `dtype`, as `ask` holds them: cast to the vision tower's
        dtype on the host)."""
        text = config.get("text_config") or config
        vision = config.get("vision_config") or {}
        size = torch.empty((), dtype=dtype).element_size()
        pixel_size = torch.empty((), dtype=pixel_dtype or dtype).element_size()
        hidden, inter = text["hidden_size"], text["intermediate_size"]
        heads_q, heads_kv = text["num_attention_heads"], text.get("num_key_value_heads", text["num_attention_heads"])
        head_dim = text.get("head_dim") or hidden // heads_q
        layers = text["num_hidden_layers"]
        layer_kv = 2 * heads_kv * head_dim * size
        merge, patch = vision.get("spatial_merge_size", 2), vision.get("patch_size", 14)
        pixels = merge**2 * 3 * vision.get("temporal_patch_size", 2) * patch**2 * pixel_size if vision else 0
        resident = layers * layer_kv + hidden * size + pixels + CACHE_PASS_COPIES * layer_kv
        qkv = (heads_q + 2 * heads_kv) * head_dim
        # A layer: residual, normed input and output (3 H), q/k/v and the attention output (qkv + HQ D), the
        # MLP's gate, up and product (3 I), the gate MLP's hidden (H); q and k again in float32 after the rotary.
        working = size * (4 * hidden + qkv + heads_q * head_dim + 3 * inter) + 4 * (heads_q + heads_kv) * head_dim
        return cls(
            weight_bytes=_parameter_count(text, vision, tied=_tied_embeddings(config)) * size,
            resident_per_token=resident,
            working_per_token=int(working * WORKING_FACTOR),
        )

    def one_pass_tokens(self, free_bytes: int) -> int:
        """The longest prompt whose one-pass prefill fits in `free_bytes` (weights already loaded)."""
        return max(0, int(free_bytes * USABLE_SHARE) // (self.resident_per_token + self.working_per_token))

    def chunk_for(self, prompt_tokens: int, free_bytes: int) -> int | None:
        """The prefill chunk for a prompt of `prompt_tokens` with `free_bytes` free (weights loaded): None (one
        pass) when the whole prompt fits at once, else the largest whole number of CHUNK_QUANTUM tokens whose
        working memory fits beside the prompt's resident memory (at least MIN_AUTO_CHUNK)."""
        if prompt_tokens <= self.one_pass_tokens(free_bytes):
            return None
        room = int(free_bytes * USABLE_SHARE) - prompt_tokens * self.resident_per_token
        chunk = room // self.working_per_token // CHUNK_QUANTUM * CHUNK_QUANTUM
        return max(MIN_AUTO_CHUNK, chunk)

    def budget_tokens(self, free_bytes: int, chunk: int | None = PLANNING_CHUNK) -> int:
        """The most tokens a prefill in chunks of `chunk` tokens (None: one pass) fits in `free_bytes` of a device
        the weights are not on yet, in whole CHUNK_QUANTUM; 0 when not even the weights and one chunk fit."""
        room = int(free_bytes * USABLE_SHARE) - self.weight_bytes
        if chunk is None:  # one pass: every token's working memory at once
            return max(0, room // (self.resident_per_token + self.working_per_token) // CHUNK_QUANTUM * CHUNK_QUANTUM)
        room -= chunk * self.working_per_token
        return max(0, room // self.resident_per_token // CHUNK_QUANTUM * CHUNK_QUANTUM)


def _tied_embeddings(config: dict[str, Any]) -> bool:
    """Whether the LM head shares the embedding's weights: Qwen2.5-VL's config keeps the flag at its top level
    (Qwen2.5-VL-3B sets it), and transformers also ties when only the text config says so (older saves)."""
    text = config.get("text_config") or {}
    return bool(config.get("tie_word_embeddings") or text.get("tie_word_embeddings"))


def _parameter_count(text: dict[str, Any], vision: dict[str, Any], *, tied: bool) -> int:
    """Parameters of Qwen2.5-VL (with VideoNSA's gates) from its config, biases included; `tied`: one matrix for
    the embedding and the LM head."""
    hidden, inter, vocab = text["hidden_size"], text["intermediate_size"], text["vocab_size"]
    heads_q = text["num_attention_heads"]
    heads_kv = text.get("num_key_value_heads", heads_q)
    head_dim = text.get("head_dim") or hidden // heads_q
    q, kv = heads_q * head_dim, heads_kv * head_dim
    attention = hidden * (q + 2 * kv) + (q + 2 * kv) + q * hidden
    gates = hidden * hidden + hidden + hidden * 3 * heads_q + 3 * heads_q
    layer = attention + gates + 3 * hidden * inter + 2 * hidden
    heads = 1 if tied else 2
    total = text["num_hidden_layers"] * layer + heads * vocab * hidden + hidden
    if vision:
        width, depth = vision.get("hidden_size", 1280), vision.get("depth", 32)
        v_inter = vision.get("intermediate_size", 4 * width)
        merged = width * vision.get("spatial_merge_size", 2) ** 2
        patch = 3 * vision.get("temporal_patch_size", 2) * vision.get("patch_size", 14) ** 2
        block = 4 * width * width + 4 * width + 3 * width * v_inter + 2 * v_inter + width + 2 * width
        merger = merged * merged + merged + merged * vision.get("out_hidden_size", hidden) + width
        total += depth * block + patch * width + merger
    return total


def free_memory(device: torch.device) -> int:
    """Bytes free for this process on `device`: the CUDA allocator's view plus what it has cached, or the
    machine's available memory for the CPU."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        allocated = torch.cuda.memory_allocated(device)
        available = free + torch.cuda.memory_reserved(device) - allocated
        # A cap set with torch.cuda.set_per_process_memory_fraction binds the allocator before the device does.
        index = device.index if device.index is not None else torch.cuda.current_device()
        fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda _: 1.0)(index)
        return min(available, int(total * fraction) - allocated) if fraction < 1 else available
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # no sysconf: assume the one-pass prefill fits
        return 1 << 50


def check_chunk_setting(value: Any, name: str = "prefill_chunk_size") -> int | str | None:
    """"auto", None (one pass) or a positive integer; `UserError` naming `name` otherwise."""
    if value is None or value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{name} must be 'auto', a positive number of tokens, or one pass (None / 0 on the command "
                        f"line), got {value!r}")
    return value


def choose_prefill_chunk(
    setting: int | str | None, prompt_tokens: int, memory: PrefillMemory, device: torch.device, mode: str
) -> int | None:
    """The chunk size a prefill runs with: the user's number, None for one pass, or for "auto" what fits the
    device (one pass when the prompt fits at once; always one pass in official mode, which cannot chunk)."""
    if setting != "auto":
        return setting
    if mode == "official":
        return None
    return memory.chunk_for(prompt_tokens, free_memory(device))


def planning_chunk(setting: int | str | None, mode: str) -> int | None:
    """The chunk a budget is planned for, from the prefill setting ("auto", tokens, None) and the attention mode:
    None when the prefill will run in one pass (asked for, or official mode), the chunk asked for, else
    PLANNING_CHUNK (the automatic choice's chunk is not known before the prompt is)."""
    if setting is None or mode == "official":
        return None
    return PLANNING_CHUNK if setting == "auto" else setting


def default_budget_tokens(
    files_config: dict[str, Any],
    device: torch.device,
    dtype: torch.dtype,
    *,
    loaded_bytes: int = 0,
    chunk: int | None = PLANNING_CHUNK,
) -> int | None:
    """The planner's default token budget on a CUDA device: what a prefill in chunks of `chunk` tokens (None: one
    pass; `planning_chunk`) fits in its free memory beside the weights (None elsewhere: the planner keeps its fixed
    default). `loaded_bytes`: the weights already on the device (their memory is not free any more, and not
    needed again). `UserError` when not even the weights and one chunk fit."""
    if device.type != "cuda":
        return None
    memory = PrefillMemory.from_config(files_config, dtype)
    free = free_memory(device)
    budget = dataclasses.replace(memory, weight_bytes=memory.weight_bytes - loaded_bytes).budget_tokens(free, chunk)
    if budget <= 0:
        raise UserError(
            f"device {device}: {free / 2**30:.1f} GiB free, the weights take ~{memory.weight_bytes / 2**30:.1f} GiB; "
            "no room for a prompt: free the GPU or pass --budget"
        )
    return budget
