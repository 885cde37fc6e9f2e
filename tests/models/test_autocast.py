"""Mixed precision: the NSA path under bf16 autocast (how the training recipe runs) trains like the float32 model."""

import dataclasses

import torch
from model_checks import capture_attention

from videonsa import testing


def _run(autocast: bool):
    """Loss, every layer's attention output and the gate gradients of one training step of a tiny model (its
    gates spread out, `testing.spread_gates_`: with new gates all near 0.5 a mix-up of the three branches'
    gates would change the output by less than bf16 rounding)."""
    model = testing.tiny_model().train()
    batch = dataclasses.asdict(testing.tiny_video_batch())
    captures = [capture_attention(layer.self_attn) for layer in model.model.language_model.layers]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    for capture in captures:
        capture.remove()
    gate_grads = {name: p.grad for name, p in model.named_parameters() if ".g_proj_" in name}
    return loss.detach(), [capture.output.detach().float() for capture in captures], gate_grads, batch


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


def test_nsa_forward_backward_under_bf16_autocast_matches_float32() -> None:
    reference, reference_outputs, reference_grads, batch = _run(autocast=False)
    loss, outputs, grads, _ = _run(autocast=True)
    torch.testing.assert_close(loss.float(), reference, rtol=0.02, atol=0.02)
    vision = batch["mm_token_type_ids"] > 0
    assert vision.any() and (~vision).any()
    # bf16 rounding: under 1e-2 on the vision and the text rows (measured); compression and selection gates
    # swapped under autocast only give 0.2 and more on the vision rows.
    for layer, (got, want) in enumerate(zip(outputs, reference_outputs, strict=True)):
        assert _relative(got[vision], want[vision]) < 0.05, f"layer {layer} vision outputs"
        assert _relative(got[~vision], want[~vision]) < 0.05, f"layer {layer} text outputs"
    # The gates are trained through the NSA path: their gradients agree with float32 within bf16 noise
    # (under 0.02 measured; compression and selection gates swapped under autocast only give about 0.9).
    assert grads.keys() == reference_grads.keys() and len(grads) == 4 * len(outputs)
    for name, grad in grads.items():
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
        assert _relative(grad, reference_grads[name]) < 0.4, name
