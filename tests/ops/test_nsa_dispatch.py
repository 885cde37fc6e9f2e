"""`nsa_attention` backend choice: argument, VIDEONSA_NSA_BACKEND, and the automatic choice on CPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from nsa_checks import Case, make_inputs

import videonsa.ops.nsa as nsa_module
from videonsa.ops import available_backends, nsa_attention, nsa_attention_parts, nsa_parts_reference

CASE = Case(q_heads=4, kv_heads=2, block_size=4, block_count=2, seq_len=14)
ENV = "VIDEONSA_NSA_BACKEND"


@pytest.fixture
def inputs() -> dict[str, torch.Tensor]:
    return {name: x.detach() for name, x in make_inputs(CASE, torch.float32, seed=1).items()}


@pytest.fixture
def recording_triton(monkeypatch) -> list[str]:
    """Stand in for the Triton module (it cannot run on a CPU without the interpreter) and record calls.

    The stand-in answers with the reference so that callers still get real results.
    """
    calls: list[str] = []

    def parts(*args, **kwargs):
        calls.append("parts")
        return nsa_parts_reference(*args, **kwargs)

    def attention(*args, **kwargs):
        calls.append("attention")
        return nsa_parts_reference(*args, **kwargs).o

    stand_in = SimpleNamespace(nsa_parts_triton=parts, nsa_attention_triton=attention)
    monkeypatch.setattr(nsa_module, "_triton_module", lambda: stand_in)
    return calls


def _expected(inputs: dict[str, torch.Tensor]):
    return nsa_parts_reference(**inputs, **CASE.settings())


def test_reference_is_always_available() -> None:
    assert "reference" in available_backends()


def test_forced_reference_backend(monkeypatch, inputs, recording_triton) -> None:
    monkeypatch.delenv(ENV, raising=False)
    o = nsa_attention(**inputs, **CASE.settings(), backend="reference")
    parts = nsa_attention_parts(**inputs, **CASE.settings(), backend="reference")
    expected = _expected(inputs)
    assert torch.equal(o, expected.o) and torch.equal(parts.o_slc, expected.o_slc)
    assert recording_triton == []


def test_auto_uses_the_reference_for_cpu_tensors(monkeypatch, inputs, recording_triton) -> None:
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert torch.equal(nsa_attention(**inputs, **CASE.settings()), _expected(inputs).o)
    assert torch.equal(nsa_attention(**inputs, **CASE.settings(), backend="auto"), _expected(inputs).o)
    assert recording_triton == []


def test_auto_uses_triton_under_the_interpreter(monkeypatch, recording_triton) -> None:
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    case = Case(q_heads=4, kv_heads=2, block_size=16, block_count=2, seq_len=40)
    inputs = {name: x.detach() for name, x in make_inputs(case, torch.float32, seed=2).items()}
    nsa_attention(**inputs, **case.settings())
    nsa_attention_parts(**inputs, **case.settings())
    assert recording_triton == ["attention", "parts"]


def test_auto_keeps_float64_on_the_reference(monkeypatch, recording_triton) -> None:
    """The kernels accumulate in float32; float64 callers (gradient checks, say) get the float64 reference."""
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    case = Case(q_heads=4, kv_heads=2, block_size=16, block_count=2, seq_len=40)
    inputs = {name: x.detach() for name, x in make_inputs(case, torch.float64, seed=2).items()}
    o = nsa_attention(**inputs, **case.settings())
    assert o.dtype == torch.float64 and torch.equal(o, nsa_parts_reference(**inputs, **case.settings()).o)
    assert recording_triton == []


def test_auto_falls_back_to_the_reference_for_budgets_the_kernels_cannot_take(
    monkeypatch, inputs, recording_triton
) -> None:
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    nsa_module._warn_reference_fallback.cache_clear()
    with pytest.warns(UserWarning, match="block_size=4"):
        o = nsa_attention(**inputs, **CASE.settings())  # block_size 4: not a tensor-core tile
    assert torch.equal(o, _expected(inputs).o)
    assert recording_triton == []
    assert not nsa_module.triton_supports(48) and nsa_module.triton_supports(64)


def test_environment_variable_selects_the_backend(monkeypatch, inputs, recording_triton) -> None:
    monkeypatch.setenv(ENV, "triton")
    nsa_attention(**inputs, **CASE.settings())
    assert recording_triton == ["attention"]
    monkeypatch.setenv(ENV, "reference")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # would pick Triton under "auto"
    assert torch.equal(nsa_attention(**inputs, **CASE.settings()), _expected(inputs).o)
    assert recording_triton == ["attention"]


def test_argument_overrides_the_environment_variable(monkeypatch, inputs, recording_triton) -> None:
    monkeypatch.setenv(ENV, "triton")
    nsa_attention(**inputs, **CASE.settings(), backend="reference")
    assert recording_triton == []


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_unknown_backend_is_a_clear_error(monkeypatch, inputs, how: str) -> None:
    if how == "argument":
        call = lambda: nsa_attention(**inputs, **CASE.settings(), backend="cuda-magic")  # noqa: E731
    else:
        monkeypatch.setenv(ENV, "cuda-magic")
        call = lambda: nsa_attention_parts(**inputs, **CASE.settings())  # noqa: E731
    with pytest.raises(ValueError, match=r"backend must be one of .*'reference'.*got 'cuda-magic'"):
        call()


def test_triton_requested_but_unavailable_is_a_clear_error(monkeypatch, inputs) -> None:
    monkeypatch.setattr(nsa_module, "_triton_module", lambda: None)
    monkeypatch.delenv(ENV, raising=False)
    with pytest.raises(ValueError, match=r"backend='triton' requested but Triton kernels are not available"):
        nsa_attention(**inputs, **CASE.settings(), backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # "auto" falls back to the reference instead of failing
    assert torch.equal(nsa_attention(**inputs, **CASE.settings()), _expected(inputs).o)


def test_the_package_lists_its_operators_though_they_load_on_first_use():
    import videonsa.ops as ops

    assert set(ops.__all__) <= set(dir(ops))
    assert all(getattr(ops, name) is not None for name in ops.__all__)
