"""The model on a CUDA GPU: the NSA kernels the operator dispatches to agree with its PyTorch reference."""

import contextlib

import pytest
import torch
from torch.autograd import DeviceType
from torch.nn.attention import SDPBackend, sdpa_kernel

from videonsa import testing
from videonsa.models.chunked_prefill import CACHE_KWARG
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
            logits = model(**inputs, **{CACHE_KWARG: cache}, use_cache=True).logits.float()
            tokens = model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0)
        runs.append((logits, tokens))
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(runs[1][0][real], runs[0][0][real], rtol=tolerance, atol=tolerance)
    if dtype == torch.float32:
        assert torch.equal(runs[0][1], runs[1][1])


class _DecodingProfile:
    """A generate() streamer that profiles the GPU from the first new token (the prefill is over) to the end,
    with SDPA limited to `backends` over that span when given."""

    def __init__(self, backends: list[SDPBackend] | None = None) -> None:
        self.puts = 0
        self.profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
        self.backends = sdpa_kernel(backends) if backends else contextlib.nullcontext()
        self.running = False

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 2:  # the prompt, then the first new token
            torch.cuda.synchronize()
            self.backends.__enter__()
            self.profile.start()
            self.running = True

    def end(self) -> None:
        if self.running:
            torch.cuda.synchronize()
            self.profile.stop()
            self.backends.__exit__(None, None, None)
            self.running = False


def _decoding_kernels(model, inputs, backends: list[SDPBackend] | None = None) -> list[str]:
    """Names of the GPU kernels of 3 greedy decoding steps after the prefill of `inputs`."""
    streamer = _DecodingProfile(backends)
    try:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0,
                           streamer=streamer)
    finally:
        streamer.end()  # never leave SDPA's backends limited
    return [event.name for event in streamer.profile.events() if event.device_type == DeviceType.CUDA]


def test_decoding_steps_on_gpu_run_no_cudnn_attention():
    # cuDNN's SDPA builds a plan at every new key length, i.e. at every decoding step (docs/layer.md).
    model = testing.tiny_model(seed=33, **BUDGET).to("cuda", torch.bfloat16)
    single = testing.tiny_video_batch(((2, 16, 16),), text_before=5, text_after=4, seed=3)
    inputs = {k: v.cuda() for k, v in single.as_kwargs().items()}
    try:
        forced = _decoding_kernels(model, inputs, [SDPBackend.CUDNN_ATTENTION])  # cuDNN alone: left as it is
    except RuntimeError as error:
        pytest.skip(f"cuDNN's SDPA does not run these decoding steps on this GPU: {error}")
    assert any("cudnn" in name.lower() for name in forced), forced  # the profile names cuDNN's kernels
    kernels = _decoding_kernels(model, inputs)
    assert not [name for name in kernels if "cudnn" in name.lower()]
    assert any("flash" in name.lower() for name in kernels), kernels
