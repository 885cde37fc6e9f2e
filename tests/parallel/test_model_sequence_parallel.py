"""The VideoNSA model run sequence-parallel (Ulysses) over 2 CPU processes (gloo) gives the single-process loss,
logits and parameter gradients; misuse is refused with one-line errors."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from videonsa import testing
from videonsa.errors import UserError
from videonsa.models import enable_sequence_parallel

WORLD = 2
# (attention mode, gather_output, padded batch): the gathered path runs transformers' own loss on full logits;
# the sliced one computes the loss per rank and sums it over the group. Dense attention of an unpadded batch
# takes its own path (the backend's causal kernel, no mask).
CASES = [("nsa", True, True), ("nsa", False, True), ("dense", True, True), ("dense", True, False)]


def _model(mode: str, **config_kwargs):
    model = testing.tiny_model(seed=31, attention_mode=mode, **config_kwargs).double()
    return model


def _batch(padded: bool = True):
    # Padded: two samples, left padded, T = 43 (odd: the sequence is padded to 44 for 2 ranks); the first
    # sample's video tokens (positions 6..37) straddle the two ranks' slices. Unpadded: two samples of 44 tokens.
    if padded:
        batch = testing.tiny_video_batch(((2, 8, 8), (2, 4, 4)), text_before=[5, 7], text_after=[4, 9], seed=1)
    else:
        batch = testing.tiny_video_batch(((2, 8, 8), (2, 8, 8)), text_before=5, text_after=5, seed=4)
        assert batch.attention_mask.all() and batch.input_ids.shape[1] % WORLD == 0
    kwargs = batch.as_kwargs()
    kwargs["pixel_values_videos"] = kwargs["pixel_values_videos"].double()
    # No label is predicted from a padding token (the first real token of each sample is not a target either):
    # a left-padding token attends to nothing, and what the backends make of that row is no model behaviour.
    first_real = batch.attention_mask.cumsum(1) == 1
    labels = batch.input_ids.masked_fill((batch.attention_mask == 0) | first_real, -100)
    return kwargs, labels


def _run(model, kwargs, labels):
    model.zero_grad(set_to_none=True)
    out = model(**kwargs, labels=labels)
    out.loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.logits.detach(), grads


def _worker(rank: int, init_file: str, result_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    results = {}
    for mode, gather, padded in CASES:
        kwargs, labels = _batch(padded)
        model = _model(mode)
        model.enable_sequence_parallel(gather_output=gather)
        loss, logits, grads = _run(model, kwargs, labels)
        # The DDP convention: the mean of the ranks' gradients is the single-process gradient.
        names = [name for name, _ in model.named_parameters()]
        for name in names:
            grad = grads.get(name, torch.zeros_like(model.get_parameter(name)))
            dist.all_reduce(grad)
            grads[name] = grad / WORLD
        if not gather:  # each rank holds its slice of the logits, [B, 44 / 2, vocab]
            pieces = [torch.empty_like(logits) for _ in range(WORLD)]
            dist.all_gather(pieces, logits)
            logits = torch.cat(pieces, dim=1)[:, : labels.shape[1]]
        losses = [torch.empty_like(loss) for _ in range(WORLD)]
        dist.all_gather(losses, loss)
        results[(mode, gather, padded)] = {"loss": losses, "logits": logits, "grads": grads}

    kwargs, _ = _batch()
    errors = {}
    model = _model("nsa")
    model.enable_sequence_parallel()
    try:
        model(**kwargs, use_cache=True)
    except UserError as error:
        errors["use_cache"] = str(error)
    try:
        enable_sequence_parallel(_model("nsa", num_heads=4, num_kv_heads=1))
    except UserError as error:
        errors["kv_heads"] = str(error)
    try:
        enable_sequence_parallel(torch.nn.Linear(2, 2))
    except UserError as error:
        errors["no_text_model"] = str(error)
    official = _model("official").eval()
    official.enable_sequence_parallel()
    one_sample = testing.tiny_video_batch(((2, 4, 4),), seed=2).as_kwargs()
    one_sample["pixel_values_videos"] = one_sample["pixel_values_videos"].double()
    try:
        with torch.no_grad():
            official(**one_sample)
    except UserError as error:
        errors["official"] = str(error)
    model.disable_sequence_parallel()
    errors["disabled_logits"] = model(**kwargs).logits.detach()
    if rank == 0:
        torch.save({"results": results, "errors": errors}, result_file)
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_results():
    with tempfile.TemporaryDirectory() as tmp:
        init_file, result_file = os.path.join(tmp, "init"), os.path.join(tmp, "result.pt")
        mp.spawn(_worker, args=(init_file, result_file), nprocs=WORLD, join=True)
        return torch.load(result_file)


@pytest.mark.parametrize("mode,gather,padded", CASES)
def test_sequence_parallel_model_matches_single_process(distributed_results, mode, gather, padded):
    got = distributed_results["results"][(mode, gather, padded)]
    kwargs, labels = _batch(padded)
    model = _model(mode)
    loss, logits, grads = _run(model, kwargs, labels)
    # transformers computes the loss in float32: the sliced loss (a sum in another order) agrees to float32.
    loss_tol = dict(rtol=1e-10, atol=0) if gather else dict(rtol=1e-6, atol=0)
    grad_tol = dict(rtol=1e-8, atol=1e-11) if gather else dict(rtol=1e-5, atol=1e-8)
    for rank_loss in got["loss"]:  # every rank reports the whole sequence's loss
        torch.testing.assert_close(rank_loss, loss, **loss_tol)
    torch.testing.assert_close(got["logits"], logits, rtol=1e-9, atol=1e-10)
    assert grads.keys() <= got["grads"].keys()
    gate = "model.language_model.layers.0.self_attn.g_proj_1.weight"
    if mode == "nsa":
        assert grads[gate].abs().sum() > 0  # the gates are trained through the all-to-all
    for name, want in grads.items():
        message = lambda m, name=name: f"gradient of {name}: {m}"  # noqa: E731
        torch.testing.assert_close(got["grads"][name], want, **grad_tol, msg=message)
    for name, grad in got["grads"].items():
        if name not in grads:
            assert not grad.any(), f"{name} has a gradient only in the sequence-parallel run"


def test_misuse_is_refused_and_disabling_restores_the_single_process_model(distributed_results):
    errors = distributed_results["errors"]
    assert "no KV cache" in errors["use_cache"]
    assert "num_key_value_heads divisible by 2" in errors["kv_heads"]
    assert "no VideoNSA text model" in errors["no_text_model"]
    assert "'official' does not run sequence-parallel" in errors["official"]
    kwargs, _ = _batch()
    with torch.no_grad():
        want = _model("nsa")(**kwargs).logits
    torch.testing.assert_close(errors["disabled_logits"], want, rtol=0, atol=0)


def test_enabling_without_torch_distributed_is_refused():
    if dist.is_initialized():
        pytest.skip("torch.distributed is initialised in this process")
    with pytest.raises(UserError, match="init_process_group"):
        _model("nsa").enable_sequence_parallel()
