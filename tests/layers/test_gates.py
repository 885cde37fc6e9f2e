"""The gate MLP: formula, branch order, initialisation, recomputation in training."""

import functools

import torch
import torch.nn.functional as F

from videonsa.layers import GATE_INIT_STD, branch_gates, make_gate_projections


def test_gates_are_the_temperature_scaled_sigmoid_of_the_two_layer_mlp():
    torch.manual_seed(0)
    proj_1, proj_2 = make_gate_projections(hidden_size=16, num_heads=4)
    for proj in (proj_1, proj_2):
        torch.nn.init.normal_(proj.weight, std=0.5)
        torch.nn.init.normal_(proj.bias, std=0.5)
    x = torch.randn(2, 5, 16)
    g_cmp, g_slc, g_swa = branch_gates(x, proj_1, proj_2, num_heads=4, temperature=0.3)

    logits = (x @ proj_1.weight.T + proj_1.bias)
    logits = F.gelu(logits) @ proj_2.weight.T + proj_2.bias
    expected = torch.sigmoid(logits / 0.3).view(2, 5, 4, 3)
    for got, branch in ((g_cmp, 0), (g_slc, 1), (g_swa, 2)):
        assert got.shape == (2, 5, 4)
        torch.testing.assert_close(got, expected[..., branch])


def test_outputs_are_ordered_head_major_then_cmp_slc_swa():
    proj_1, proj_2 = make_gate_projections(hidden_size=8, num_heads=2)
    torch.nn.init.zeros_(proj_2.weight)
    # Output unit 3 * head + branch: give each its own bias and read it back through the sigmoid.
    bias = torch.tensor([-3.0, 0.0, 3.0, -1.0, 1.0, 2.0])
    proj_2.bias.data.copy_(bias)
    gates = branch_gates(torch.randn(1, 1, 8), proj_1, proj_2, num_heads=2, temperature=1.0)
    for branch, got in enumerate(gates):
        for head in range(2):
            assert got[0, 0, head].item() == torch.sigmoid(bias[3 * head + branch]).item()


def test_new_gates_start_with_small_normal_weights_and_zero_bias():
    torch.manual_seed(0)
    proj_1, proj_2 = make_gate_projections(hidden_size=256, num_heads=8)
    assert proj_1.weight.shape == (256, 256) and proj_2.weight.shape == (24, 256)
    for proj in (proj_1, proj_2):
        assert abs(proj.weight.std().item() - GATE_INIT_STD) < 0.1 * GATE_INIT_STD
        assert abs(proj.weight.mean().item()) < 0.1 * GATE_INIT_STD
        assert torch.count_nonzero(proj.bias) == 0


def _spread_projections(hidden: int, heads: int) -> tuple[torch.nn.Linear, torch.nn.Linear]:
    proj_1, proj_2 = make_gate_projections(hidden_size=hidden, num_heads=heads)
    for proj in (proj_1, proj_2):
        torch.nn.init.normal_(proj.weight, std=0.5)
        torch.nn.init.normal_(proj.bias, std=0.5)
    return proj_1, proj_2


def _saved_activations(run, x: torch.Tensor) -> tuple[object, int]:
    """run()'s result and how many tensors of x's size autograd saves for the backward while it runs, x itself
    (which any layer keeps: the q/k/v projections read it) not counted."""
    count = 0

    def pack(tensor):
        nonlocal count
        count += tensor.numel() == x.numel() and tensor.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = run()
    return result, count


def test_recomputed_gates_keep_no_hidden_activations_and_give_the_same_gradients():
    torch.manual_seed(1)
    hidden, heads = 32, 4
    proj_1, proj_2 = _spread_projections(hidden, heads)
    x = torch.randn(2, 7, hidden, requires_grad=True)
    weights = torch.randn(3, 2, 7, heads)
    parameters = [x, *proj_1.parameters(), *proj_2.parameters()]

    results = {}
    for recompute in (False, True):
        gates, kept = _saved_activations(
            functools.partial(branch_gates, x, proj_1, proj_2, num_heads=heads, temperature=0.3, recompute=recompute),
            x,
        )
        loss = sum((g * w).sum() for g, w in zip(gates, weights, strict=True))
        results[recompute] = (gates, torch.autograd.grad(loss, parameters), kept)
    # Kept: g_proj_1's output and its gelu; recomputed: neither.
    assert results[False][2] == 2 and results[True][2] == 0
    for plain, again in zip(results[False][:2], results[True][:2], strict=True):
        for a, b in zip(plain, again, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_layer_recomputes_its_gates_in_training_only():
    from videonsa import testing

    model = testing.tiny_model()
    attention = model.model.language_model.layers[0].self_attn
    x = torch.randn(1, 6, model.config.text_config.hidden_size, requires_grad=True)
    _, evaluating = _saved_activations(lambda: attention.gates(x), x)
    attention.train()
    _, training = _saved_activations(lambda: attention.gates(x), x)
    assert evaluating == 2 and training == 0
