"""A KV cache that keeps each layer's keys and values in buffers sized for the whole answer, so that a decoding
step writes its token in place instead of copying the cache.

transformers' `DynamicCache` grows every layer by concatenation: each decoding step copies every layer's whole
cache (at 460K tokens of the 7B, about 26 GB read and 26 GB written per generated token, more than the step's
attention reads). `preallocated_cache(config, capacity)` is a `DynamicCache` whose full-attention layers are
`PreallocatedLayer`s: the first update allocates [B, HKV, capacity, D] buffers, later updates copy only the new
tokens into them, and `keys` / `values` are views of the filled part. Everything else about the cache (its
length, cropping, batch selection, chunked prefill reading it back) is `DynamicLayer`'s, on those views.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

# Room added when a layer outgrows its buffers (more tokens than the capacity it was given): a quarter more, so
# that a long answer reallocates a few times rather than at every step.
GROWTH = 1.25


class PreallocatedLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values are the first tokens of buffers with room for `capacity` tokens.

    An update writes the new tokens after the cached ones; when they do not fit, or the cached tensors are no
    longer views of the buffers (transformers replaced them: beam reordering, batch selection), the buffers are
    reallocated and the cached tokens copied once. Updates with gradients (in the new or the cached tokens)
    concatenate as `DynamicLayer` does: writing in place into tensors that autograd saved would break their
    backward. Offloading and reset drop the buffers, so that they free their memory.
    """

    def __init__(self, capacity: int) -> None:
        super().__init__()
        if capacity < 1:
            raise ValueError(f"a preallocated cache layer needs a capacity of at least 1 token, got {capacity}")
        self.capacity = capacity
        self._key_buffer: Tensor | None = None
        self._value_buffer: Tensor | None = None

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """key_states, value_states [B, HKV, L, D] -> all cached keys and values [B, HKV, P + L, D] (views)."""
        if torch.is_grad_enabled() and any(x is not None and x.requires_grad
                                           for x in (key_states, value_states, self.keys, self.values)):
            self._key_buffer = self._value_buffer = None
            return super().update(key_states, value_states, *args, **kwargs)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        end = length + key_states.shape[-2]
        if not self._buffers_hold(key_states, value_states, length, end):
            self._reallocate(key_states, value_states, length, end)
        self._key_buffer[..., length:end, :].copy_(key_states)
        self._value_buffer[..., length:end, :].copy_(value_states)
        self.keys = self._key_buffer[..., :end, :]
        self.values = self._value_buffer[..., :end, :]
        return self.keys, self.values

    def _buffers_hold(self, key_states: Tensor, value_states: Tensor, length: int, end: int) -> bool:
        """Whether the buffers take tokens [length, end) of these states, the cached ones being their first
        `length` tokens (the views this layer last handed out, possibly cropped)."""
        if self._key_buffer is None or self._value_buffer is None or end > self._key_buffer.shape[-2]:
            return False
        if self._key_buffer.is_inference() and not torch.is_inference_mode_enabled():
            return False  # an inference tensor cannot be written outside inference mode
        for buffer, states, cached in ((self._key_buffer, key_states, self.keys),
                                       (self._value_buffer, value_states, self.values)):
            if buffer.shape[:-2] != states.shape[:-2] or buffer.shape[-1] != states.shape[-1]:
                return False  # other batch, heads or head size
            if buffer.dtype != states.dtype or buffer.device != states.device:
                return False
            prefix = buffer[..., :length, :]
            if length and (cached.data_ptr(), cached.shape, cached.stride()) != (
                    prefix.data_ptr(), prefix.shape, prefix.stride()):
                return False
        return True

    def _reallocate(self, key_states: Tensor, value_states: Tensor, length: int, end: int) -> None:
        """New buffers with room for max(capacity, end) tokens (GROWTH x end past the capacity), holding the
        `length` cached tokens."""
        room = self.capacity if end <= self.capacity else max(end, int(GROWTH * end))
        buffers = []
        for states, cached in ((key_states, self.keys), (value_states, self.values)):
            buffer = states.new_empty(*states.shape[:-2], room, states.shape[-1])
            if length:
                buffer[..., :length, :].copy_(cached)
            buffers.append(buffer)
        self._key_buffer, self._value_buffer = buffers

    def offload(self) -> None:
        """Move the cached tokens off the device (transformers' offloading) and free the buffers."""
        super().offload()
        self._key_buffer = self._value_buffer = None

    def reset(self) -> None:
        """Empty the layer (its length back to 0) and free its buffers."""
        self.is_initialized = False  # first: transformers 5.17's reset would zero the views and keep their length
        super().reset()
        self._key_buffer = self._value_buffer = None


def preallocated_cache(config: Any, capacity: int) -> DynamicCache:
    """A `DynamicCache` for `config` (a model config or its text config) whose full-attention layers keep up to
    `capacity` tokens (the prompt plus the answer) without copying the cache at each step; more still fit, at the
    cost of a reallocation. Sliding-window layers, if any, stay as transformers makes them."""
    cache = DynamicCache(config=config)
    cache.layers = [PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache
