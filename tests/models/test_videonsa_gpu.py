"""The model on a CUDA GPU: the NSA kernels the operator dispatches to agree with its PyTorch reference."""

import pytest
import torch

from videonsa import testing
from videonsa.ops import available_backends

pytestmark = pytest.mark.gpu
# The Triton kernels take power-of-two blocks of at least 16 tokens: a budget to match, and videos of 128 and
# 32 vision tokens so that every branch has blocks to work on.
BUDGET = dict(block_size=16, block_counts=2, window_size=32)


@pytest.fixture
def gpu_batch():
    return testing.tiny_video_batch(((2, 16, 16), (2, 8, 8)), text_before=[5, 7], text_after=[4, 9], seed=3)


def _run(model, batch, backend, monkeypatch, backward=False):
    monkeypatch.setenv("VIDEONSA_NSA_BACKEND", backend)
    model.zero_grad(set_to_none=True)
    inputs = {k: v.cuda() for k, v in batch.as_kwargs().items()}
    with torch.set_grad_enabled(backward):
        out = model(**inputs, labels=inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100))
    if not backward:
        return out.logits.float(), None
    out.loss.backward()
    return out.logits.detach().float(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_on_gpu_with_the_fast_operator_matches_the_reference_operator(gpu_batch, monkeypatch, dtype):
    if "triton" not in available_backends():
        pytest.skip("no Triton NSA kernels in this build")
    model = testing.tiny_model(seed=30, **BUDGET).to("cuda", dtype)
    fast, _ = _run(model, gpu_batch, "auto", monkeypatch)
    reference, _ = _run(model, gpu_batch, "reference", monkeypatch)
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(fast, reference, rtol=tolerance, atol=tolerance)


def test_model_gradients_on_gpu_match_the_reference_operator(gpu_batch, monkeypatch):
    if "triton" not in available_backends():
        pytest.skip("no Triton NSA kernels in this build")
    model = testing.tiny_model(seed=31, **BUDGET).to("cuda").train()
    _, fast = _run(model, gpu_batch, "auto", monkeypatch, backward=True)
    _, reference = _run(model, gpu_batch, "reference", monkeypatch, backward=True)
    assert fast.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(fast[name], reference[name], rtol=1e-3, atol=1e-5)


def test_generation_on_gpu_gives_the_same_tokens_with_and_without_the_cache(gpu_batch):
    model = testing.tiny_model(seed=32, **BUDGET).to("cuda")
    inputs = {k: v.cuda() for k, v in gpu_batch.as_kwargs().items()}
    with torch.no_grad():
        cached, uncached = (
            model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=use, pad_token_id=0)
            for use in (True, False)
        )
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_prefill_on_gpu_with_the_fast_operator_matches_one_pass(gpu_batch, monkeypatch, dtype):
    # Chunk boundaries inside both videos and inside 16-token blocks; the Triton forward of queries that end a
    # longer key sequence against the one-pass Triton forward, and the chunked run's tokens after generation.
    from transformers import DynamicCache

    from videonsa.models.chunked_prefill import prefill_in_chunks

    if "triton" not in available_backends():
        pytest.skip("no Triton NSA kernels in this build")
    monkeypatch.setenv("VIDEONSA_NSA_BACKEND", "auto")
    model = testing.tiny_model(seed=31, **BUDGET).to("cuda", dtype)
    inputs = {k: v.cuda() for k, v in gpu_batch.as_kwargs().items()}
    runs = []
    for chunk in (None, 23):
        cache = DynamicCache(config=model.config.text_config)
        with torch.no_grad(), prefill_in_chunks(model, chunk):
            logits = model(**inputs, past_key_values=cache, use_cache=True).logits.float()
            tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
        runs.append((logits, tokens))
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(runs[1][0][real], runs[0][0][real], rtol=tolerance, atol=tolerance)
    if dtype == torch.float32:
        assert torch.equal(runs[0][1], runs[1][1])
