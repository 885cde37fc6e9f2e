"""Mixed precision: the NSA path under bf16 autocast (how the training recipe runs) trains like the float32 model."""

import dataclasses

import torch

from videonsa import testing


def test_nsa_forward_backward_under_bf16_autocast_matches_float32() -> None:
    model = testing.tiny_model().train()
    batch = dataclasses.asdict(testing.tiny_video_batch())
    reference = model(**batch, labels=batch["input_ids"]).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    torch.testing.assert_close(loss.float(), reference, rtol=0.02, atol=0.02)
    gates = model.model.language_model.layers[0].self_attn.g_proj_2.weight.grad
    assert gates is not None and torch.isfinite(gates).all() and gates.abs().sum() > 0
