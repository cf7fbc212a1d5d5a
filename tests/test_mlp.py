"""TritonMLP: same function as the nn.Linear reference with the same weights, and it learns."""

from __future__ import annotations

import pytest
import torch
from harness import DEVICE, assert_close

from triformer import TritonMLP


def twin_models(fused: bool, hidden: int = 16, activation: str = "relu"):
    ours = TritonMLP(3 * 5 * 5, 10, hidden_size=hidden, fused=fused, activation=activation).to(DEVICE)
    ref = TritonMLP(3 * 5 * 5, 10, hidden_size=hidden, backend="torch", activation=activation).to(DEVICE)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_matches_nn_linear_mlp_with_same_weights(fused, activation, seed):
    ours, ref = twin_models(fused, activation=activation)
    images = torch.randn(9, 3, 5, 5, device=DEVICE)  # an image batch: flattened by the model
    labels = torch.randint(0, 10, (9,), device=DEVICE)
    out, out_ref = ours(images), ref(images)
    assert out.shape == (9, 10)
    assert (out < 0).any(), "logits must not go through relu"
    assert_close(out, out_ref, torch.float32, "logits", tol=1e-5)
    torch.nn.functional.cross_entropy(out, labels).backward()
    torch.nn.functional.cross_entropy(out_ref, labels).backward()
    for (name, p), p_ref in zip(ours.named_parameters(), ref.parameters()):
        assert_close(p.grad, p_ref.grad, torch.float32, f"grad of {name}", tol=1e-5)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_a_nan_pixel_gives_nan_logits_and_loss_as_in_torch(fused, seed):
    """Corrupted data does not pass silently: a NaN pixel makes its image's logits, the mean loss and the weight
    gradients NaN, as in the nn.Linear twin; the other images' logits stay finite."""
    ours, ref = twin_models(fused)
    images = torch.randn(4, 3, 5, 5, device=DEVICE)
    images[1, 0, 2, 2] = float("nan")
    labels = torch.randint(0, 10, (4,), device=DEVICE)
    out, out_ref = ours(images), ref(images)
    assert torch.equal(torch.isnan(out), torch.isnan(out_ref))
    assert torch.isnan(out[1]).all() and torch.isfinite(out[[0, 2, 3]]).all()
    loss = torch.nn.functional.cross_entropy(out, labels)
    assert torch.isnan(loss)
    loss.backward()
    assert torch.isnan(ours.fc1.weight.grad).any()


def test_learns_a_fixed_batch(seed):
    model = TritonMLP(3 * 5 * 5, 10, hidden_size=16).to(DEVICE)
    images = torch.randn(32, 3, 5, 5, device=DEVICE)
    labels = torch.randint(0, 10, (32,), device=DEVICE)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    accuracy = (model(images).argmax(1) == labels).float().mean().item()
    assert loss.item() < 0.2 * first and accuracy > 0.9, (first, loss.item(), accuracy)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_activation_is_the_one_asked_for_in_both_backends(backend, seed):
    """Between the layers, gelu (tanh form) computed by hand from the model's weights; the logits stay plain."""
    model = TritonMLP(3 * 5 * 5, 10, hidden_size=16, backend=backend, activation="gelu").to(DEVICE)
    assert model.activation == "gelu" and [m.activation for m in (model.fc1, model.fc2, model.fc3)] == [
        "gelu",
        "gelu",
        None,
    ]
    images = torch.randn(9, 3, 5, 5, device=DEVICE)
    x = images.flatten(1).double()
    for layer in (model.fc1, model.fc2):
        x = torch.nn.functional.gelu(x @ layer.weight.double().T + layer.bias.double(), approximate="tanh")
    expected = x @ model.fc3.weight.double().T + model.fc3.bias.double()
    assert_close(model(images), expected, torch.float32, "logits of the gelu MLP", tol=1e-5)
    with pytest.raises(ValueError, match="needs an activation"):
        TritonMLP(4, 2, backend=backend, activation="none")


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'jax'"):
        TritonMLP(4, 2, backend="jax")


def test_trains_under_autocast(seed):
    """bf16 autocast on the GPU (fp16 on the CPU, where the interpreter has no bf16): fp32 parameters, low-precision
    products, as F.linear does; the logits match the nn.Linear twin under the same autocast."""
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    ours, ref = twin_models(fused=True)
    images = torch.randn(9, 3, 5, 5, device=DEVICE)
    with torch.autocast(DEVICE, dtype=dtype):
        out, out_ref = ours(images), ref(images)
    assert out.dtype == dtype and out_ref.dtype == dtype
    assert_close(out, out_ref, dtype, "logits under autocast", tol=2e-2)
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in ours.parameters())
