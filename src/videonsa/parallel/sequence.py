"""Sequence parallelism of the VideoNSA text model: what changes when several ranks share one long sequence.

Every rank of the group gets the same batch. After the vision embeddings are merged, the text model keeps this
rank's contiguous slice of the sequence (padded at the end with masked tokens to T_pad, a multiple of the group
size P); rank r runs tokens [r T_pad / P, (r + 1) T_pad / P). Inside each attention layer an all-to-all trades
that slice for a slice of whole KV groups over the whole sequence, the single-process attention runs there, and a
second all-to-all trades the output back (`videonsa.parallel.ulysses`). The final hidden states are gathered
(`gather_output`), so that everything after the text model, the loss included, is the single-process code; or
each rank keeps its slice and the loss is summed over the group (`SequenceParallel.causal_lm_loss`).

The model opts in through one attribute: modules deriving from `SequenceParallelModule` (VideoNSA's text model
and attention layers) hold `sequence_parallel`, None for the single-process forward or the `SequenceParallel`
that `enable_sequence_parallel` set, whose `text_model_forward` and `attention` they call in its place.
Training only: no KV cache. docs/layer.md (sequence parallelism) states what it guarantees and its limits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from videonsa.errors import UserError
from videonsa.layers import TokenSplit, build_token_split, dense_text_attention, videonsa_attention
from videonsa.parallel.ulysses import (
    all_reduce_sum,
    gather_sequence,
    heads_to_sequence,
    sequence_to_heads,
    shard_sequence,
)


class SequenceParallelModule:
    """Mixin of the modules that run differently when sequence-parallel: `enable_sequence_parallel` sets their
    `sequence_parallel`, `disable_sequence_parallel` resets it to None."""

    sequence_parallel: SequenceParallel | None = None


@dataclass(frozen=True)
class SequenceParallel:
    """A sequence-parallel setting: the process group whose ranks share one sequence, and what the text model
    returns (the gathered hidden states of the whole sequence, or each rank's slice of them).

    Rank r keeps tokens [r * T_pad / P, (r + 1) * T_pad / P) of the sequence padded at the end to T_pad, a
    multiple of P. Gradients follow the data-parallel convention: their mean over the group (what DDP and FSDP
    compute when the group is part of their data-parallel group) equals the single-process gradient.
    """

    group: dist.ProcessGroup | None = None
    gather_output: bool = True

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    # ------------------------------------------------------------------------------------------------------
    # Layout of the sequence over the ranks

    def padded_length(self, seq_len: int) -> int:
        """The smallest multiple of the group size that holds `seq_len` tokens."""
        return -(-seq_len // self.world_size) * self.world_size

    def pad(self, x: Tensor, dim: int, value: float | int = 0, replicate: bool = False) -> Tensor:
        """x padded at the end of `dim` to `padded_length`; with `replicate`, by copies of its last entry."""
        dim = dim % x.dim()
        missing = self.padded_length(x.shape[dim]) - x.shape[dim]
        if not missing:
            return x
        if replicate:
            tail = x.narrow(dim, x.shape[dim] - 1, 1)
            filler = tail.expand(*x.shape[:dim], missing, *x.shape[dim + 1 :])
        else:
            filler = x.new_full((*x.shape[:dim], missing, *x.shape[dim + 1 :]), value)
        return torch.cat([x, filler], dim=dim)

    def shard(self, x: Tensor, dim: int, value: float | int = 0, replicate: bool = False) -> Tensor:
        """This rank's slice of `x` along `dim` after `pad`: [..., T, ...] -> [..., T_pad / P, ...]."""
        return shard_sequence(self.pad(x, dim, value, replicate), self.group, seq_dim=dim % x.dim())

    def gather(self, x: Tensor, seq_len: int, dim: int = 1) -> Tensor:
        """Differentiable inverse of `shard`: [..., T_pad / P, ...] -> [..., seq_len, ...]."""
        return gather_sequence(x, self.group, seq_dim=dim).narrow(dim, 0, seq_len)

    # ------------------------------------------------------------------------------------------------------
    # The text model

    def text_model_forward(
        self,
        forward: Callable[..., Any],
        embed_tokens: nn.Module,
        split: TokenSplit | None,
        *,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> Any:
        """The text model on this rank's slice of the whole sequence.

        Args:
            forward: the single-process text model forward, called as forward(split, inputs_embeds=...,
                position_ids=..., attention_mask=None, use_cache=False, **kwargs); it hands `split` to its layers.
            embed_tokens: the text model's embedding, for `input_ids`.
            split: the whole sequence's vision/text split; None (dense mode) makes every token text.
            input_ids / inputs_embeds [B, T, ...], attention_mask [B, T], position_ids [B, T], [3, B, T] or
                [4, B, T]: all of the whole sequence.

        Returns:
            `forward`'s output, whose last hidden state is gathered to [B, T, hidden] if `gather_output`, else
            this rank's [B, T_pad / P, hidden] slice (as are, always, the per-layer `output_hidden_states`).
        """
        caches = [kwargs.pop(name, None) for name in ("cache", "past_key_values")]  # 5.x names
        if use_cache or any(cache is not None for cache in caches):
            raise UserError(
                "sequence parallelism is for training and keeps no KV cache: pass use_cache=False, or call "
                "disable_sequence_parallel() before generating"
            )
        if inputs_embeds is None:
            inputs_embeds = embed_tokens(input_ids)
        batch, seq_len = inputs_embeds.shape[:2]
        if position_ids is None:
            position_ids = torch.arange(seq_len, device=inputs_embeds.device).expand(3, batch, seq_len)
        elif position_ids.ndim == 2:
            position_ids = position_ids.expand(3, batch, seq_len)
        if split is None:  # dense mode: every token is text
            vision = torch.zeros(batch, seq_len, dtype=torch.bool, device=inputs_embeds.device)
            split = build_token_split(vision, attention_mask)
        if split.shape != (batch, seq_len):
            raise ValueError(f"token split is for {split.shape} tokens but the input has {(batch, seq_len)}")
        # The whole sequence's split, padding included (masked text tokens at the end). The layers mask with it
        # and get no attention mask: a mask of the local slice would be wrong after the all-to-all.
        split = build_token_split(self.pad(split.vision_mask, 1, False), self.pad(split.token_mask, 1, False))
        outputs = forward(
            split,
            inputs_embeds=self.shard(inputs_embeds, 1),
            position_ids=self.shard(position_ids, -1, replicate=True),
            attention_mask=None,
            use_cache=False,
            **kwargs,
        )
        if self.gather_output:
            outputs.last_hidden_state = self.gather(outputs.last_hidden_state, seq_len)
        return outputs

    # ------------------------------------------------------------------------------------------------------
    # One attention layer

    def attention(
        self,
        layer: Any,
        hidden_states: Tensor,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        cache: Any,
        split: TokenSplit | None,
    ) -> Tensor:
        """Attention of this rank's slice of the sequence: hidden_states [B, T/P, hidden], q [B, HQ, T/P, D],
        k/v [B, HKV, T/P, D] -> [B, T/P, HQ, D] (the input of o_proj).

        q, k, v and the gates go to a head slice of the whole sequence ([B, T, H/P, ...]; P divides HKV, so each
        rank holds whole KV groups and the NSA selection of a group stays on one rank), the single-process
        attention runs there on the whole-sequence `split` (padded to T), and the output comes back.

        `layer` is the VideoNSA attention layer: its `settings`, `gates(x)`, `dense_attend`, `scaling`,
        `attention_dropout` and training flag are used.
        """
        if cache is not None:
            raise UserError("sequence parallelism keeps no KV cache: disable_sequence_parallel() before generating")
        if split is None:
            raise UserError("sequence-parallel VideoNSA attention got no token split: run it through VideoNSAModel")
        q, k, v = (sequence_to_heads(x.transpose(1, 2), self.group) for x in (query, key, value))
        if layer.settings.mode == "nsa" and split.has_vision:
            # Gates of every local token (one exchange for all three), then those of the packed vision tokens.
            gates = torch.stack(layer.gates(hidden_states), dim=-1)
            gates = split.gather_vision(sequence_to_heads(gates, self.group)).unbind(-1)
            output = videonsa_attention(
                q, k, v, gates, split, layer.settings, attend=layer.dense_attend, scale=layer.scaling
            )
        elif split.unpadded:
            # Dense causal attention without padding: the backend's causal kernel, no [T, T] mask. (The split
            # knows it has no padding: no host read of its mask in every layer.)
            dropout = 0.0 if not layer.training else layer.attention_dropout
            output, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](
                layer, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None,
                dropout=dropout, scaling=layer.scaling, is_causal=True,
            )
        else:
            # Padded batch without vision tokens: every token is text; the mask is [B, 1, T, T].
            text = dense_text_attention(q, k, v, split, layer.dense_attend)
            output = split.merge(q.new_zeros(1, 0, *q.shape[2:]), text)
        return heads_to_sequence(output, self.group)

    # ------------------------------------------------------------------------------------------------------
    # The loss of sliced logits

    def causal_lm_loss(
        self,
        logits: Tensor,
        labels: Tensor,
        vocab_size: int | None = None,
        num_items_in_batch: Tensor | int | None = None,
        ignore_index: int = -100,
        **kwargs: Any,
    ) -> Tensor:
        """Causal LM loss of the whole sequence from this rank's logits [B, T_pad / P, vocab] and the whole
        labels [B, T]: token t predicts label t + 1, as transformers' ForCausalLMLoss (float32). The mean over
        predicted tokens, or the sum over `num_items_in_batch` (gradient accumulation), same on every rank.
        The signature is transformers' `loss_function`'s."""
        targets = F.pad(labels[:, 1:], (0, 1), value=ignore_index).to(logits.device)
        local = self.shard(targets, 1, value=ignore_index)
        total = F.cross_entropy(
            logits.float().flatten(0, 1), local.flatten(), ignore_index=ignore_index, reduction="sum"
        )
        total = all_reduce_sum(total, self.group)
        count = num_items_in_batch if num_items_in_batch is not None else (targets != ignore_index).sum()
        return total / count


def enable_sequence_parallel(
    model: nn.Module, group: dist.ProcessGroup | None = None, *, gather_output: bool = True
) -> SequenceParallel:
    """Run `model`'s VideoNSA text model sequence-parallel (Ulysses) over `group` (default: the whole world).

    For training: every rank of the group gets the same batch; after the vision embeddings are merged, each
    rank keeps a contiguous slice of the sequence (padded to a multiple of the group size P), attention swaps it
    for a slice of whole KV groups over the whole sequence, and the final hidden states are gathered
    (`gather_output`) so that everything after the text model, the loss included, is the single-process one.
    With `gather_output=False` each rank's logits are its slice and the loss of `labels` is combined over the
    group. Gradients average over the group to the single-process gradient (the DDP / FSDP convention). The
    vision tower runs whole on every rank. P must divide the number of KV heads; no KV cache.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise UserError("sequence parallelism needs torch.distributed initialised (init_process_group) first")
    sp = SequenceParallel(group, gather_output)
    modules = [module for module in model.modules() if isinstance(module, SequenceParallelModule)]
    if not modules:
        raise UserError(f"{type(model).__name__} has no VideoNSA text model to run sequence-parallel")
    for config in {id(module.config): module.config for module in modules}.values():
        if config.num_key_value_heads % sp.world_size:
            raise UserError(
                f"sequence parallelism over {sp.world_size} ranks needs num_key_value_heads divisible by "
                f"{sp.world_size} (whole KV groups per rank), got {config.num_key_value_heads}"
            )
        if getattr(config, "use_sliding_window", False):
            raise UserError("sequence parallelism does not support use_sliding_window; turn it off in the config")
    for module in modules:
        module.sequence_parallel = sp
    return sp


def disable_sequence_parallel(model: nn.Module) -> None:
    """Back to the single-process forward for every VideoNSA text model of `model`."""
    for module in model.modules():
        if isinstance(module, SequenceParallelModule):
            module.sequence_parallel = None
