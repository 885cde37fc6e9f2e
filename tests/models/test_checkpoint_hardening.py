"""Gates stored for some layers only: refused with the layers named, unless fresh gates are asked for; then the
stored gates are kept and the missing ones initialised fresh, with one warning naming the layers."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from videonsa import cli, testing
from videonsa.errors import UserError
from videonsa.models import VideoNSAForConditionalGeneration
from videonsa.models.checkpoint_checks import describe_layers, gate_coverage


def _drop(folder: Path, pattern: str) -> None:
    """Remove the tensors whose names match `pattern` from the checkpoint's model.safetensors."""
    tensors = load_file(folder / "model.safetensors")
    kept = {name: t for name, t in tensors.items() if not re.search(pattern, name)}
    assert len(kept) < len(tensors)
    save_file(kept, folder / "model.safetensors", metadata={"format": "pt"})


@pytest.fixture(params=[False, True], ids=["current-layout", "legacy-layout"])
def partly_gated(tmp_path, request) -> Path:
    """A 2-layer tiny checkpoint whose layer 1 has no gates."""
    folder = testing.save_tiny_checkpoint(tmp_path / "ckpt", seed=5, legacy_layout=request.param)
    _drop(folder, r"layers\.1\.self_attn\.g_proj_")
    return folder


def test_a_partly_gated_checkpoint_is_refused_naming_the_layers(partly_gated):
    with pytest.raises(UserError, match=r"gates are missing for layer\(s\) 1 of 2 \(stored for 0\).*fresh_gates=True"):
        VideoNSAForConditionalGeneration.from_pretrained(partly_gated)


def test_one_missing_gate_tensor_makes_its_layer_ungated(tmp_path):
    folder = testing.save_tiny_checkpoint(tmp_path / "ckpt", seed=5)
    _drop(folder, r"layers\.0\.self_attn\.g_proj_2\.bias$")
    with pytest.raises(UserError, match=r"missing for layer\(s\) 0 of 2 \(stored for 1\)"):
        VideoNSAForConditionalGeneration.from_pretrained(folder)


def test_fresh_gates_keeps_the_stored_gates_and_names_the_fresh_ones(partly_gated, message_log):
    stored = {testing_key: t for testing_key, t in load_file(partly_gated / "model.safetensors").items()}
    torch.manual_seed(0)
    model = VideoNSAForConditionalGeneration.from_pretrained(partly_gated, fresh_gates=True)
    state = model.state_dict()
    layer0 = {n: t for n, t in state.items() if re.search(r"layers\.0\.self_attn\.g_proj_", n)}
    assert len(layer0) == 4
    for name, tensor in layer0.items():
        stored_name = next(k for k in stored if k.endswith(name.removeprefix("model.language_model.")))
        assert torch.equal(tensor, stored[stored_name]), name
    fresh = {n: t for n, t in state.items() if re.search(r"layers\.1\.self_attn\.g_proj_", n)}
    assert all(torch.count_nonzero(t) == 0 for n, t in fresh.items() if n.endswith("bias"))
    weights = torch.cat([t.flatten() for n, t in fresh.items() if n.endswith("weight")])
    assert 0.015 < weights.std().item() < 0.025
    notices = [m for m in message_log.messages if "gates" in m]
    assert len(notices) == 1 and "no VideoNSA gates for layer(s) 1 of 2 layers" in notices[0], notices


def test_convert_refuses_a_partly_gated_source_unless_fresh_gates(partly_gated, tmp_path, capsys):
    assert cli.main(["convert", str(partly_gated), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "missing for layer(s) 1 of 2" in err and "--fresh-gates" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    assert cli.main(["convert", str(partly_gated), str(tmp_path / "out"), "--fresh-gates"]) == 0
    assert gate_coverage(load_file(tmp_path / "out" / "model.safetensors"), 2).complete


def test_convert_writes_a_folder_readable_per_umask(tmp_path):
    import os
    import stat

    source = testing.save_tiny_checkpoint(tmp_path / "src", seed=5)
    previous = os.umask(0o022)
    try:
        out = tmp_path / "out"
        assert cli.main(["convert", str(source), str(out)]) == 0
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}


def test_describe_layers():
    assert describe_layers([7, 0, 1, 2, 5, 8]) == "0-2, 5, 7-8"
    assert describe_layers([]) == ""


def test_videonsa_load_takes_fresh_gates_too(tmp_path):
    import videonsa.inference

    folder = testing.save_tiny_checkpoint(tmp_path / "ckpt", seed=5)
    _drop(folder, r"layers\.1\.self_attn\.g_proj_1\.weight$")
    with pytest.raises(UserError, match=r"missing for layer\(s\) 1 of 2"):
        videonsa.inference.load(str(folder), device="cpu")
    assert videonsa.inference.load(str(folder), device="cpu", fresh_gates=True) is not None
