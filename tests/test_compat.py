"""dame-cell/Triformer's (the original triformer package, ≤ 3.0.6) import paths and argument names keep working:
old imports give the current classes, old argument names give the same results as the current ones, and an old
name passed together with its current name is a clear TypeError."""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch
import torch.nn.functional as F
from harness import DEVICE, assert_close, randn, reference_copy

import triformer
from triformer import TritonCrossEntropyLoss, TritonDropout, TritonLinear, TritonSoftmax

# Masked rows and ignored targets compute −inf − (−inf) and log 0 in numpy under the interpreter (all masked, as
# in test_softmax.py and test_cross_entropy.py).
pytestmark = pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning", "ignore:divide by zero encountered:RuntimeWarning"
)

OLD_IMPORTS = [
    ("triformer.layernorm", "TritonLayerNorm"),
    ("triformer.rms_norm", "TritonRMSNorm"),
    ("triformer.softmax", "TritonSoftmax"),
    ("triformer.dropout", "TritonDropout"),
    ("triformer.cross_entropy", "TritonCrossEntropyLoss"),
    ("triformer.mlp", "TritonLinear"),
    ("triformer.forward_mlp", "TritonLinear"),
]


@pytest.mark.parametrize("module, name", OLD_IMPORTS, ids=[m for m, _ in OLD_IMPORTS])
def test_old_import_paths_give_the_current_classes(module, name):
    assert getattr(importlib.import_module(module), name) is getattr(triformer, name)


def test_causal_softmax_by_its_old_name(seed):
    """TritonSoftmax(is_causal=...) as in dame-cell/Triformer's README: same output and gradient as causal=...;
    float64 check."""
    x = randn(2, 7, 7, requires_grad=True)
    for flag in (True, False):
        old, new = TritonSoftmax(is_causal=flag), TritonSoftmax(causal=flag)
        assert old.causal is flag
        y_old, y_new = old(x), new(x)
        assert torch.equal(y_old, y_new)
        dy = torch.randn_like(y_old)
        (g_old,), (g_new,) = torch.autograd.grad(y_old, x, dy), torch.autograd.grad(y_new, x, dy)
        assert torch.equal(g_old, g_new)
    xr = reference_copy(x).detach()
    ref = torch.softmax(xr.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf")), -1)
    assert_close(TritonSoftmax(is_causal=True)(x), ref, torch.float32, "is_causal=True")


def test_cross_entropy_by_its_old_names(seed):
    """TritonCrossEntropyLoss(pad_token_id=0, reduction='mean', n_chunks=1) as in dame-cell/Triformer's README: padding
    targets ignored, same loss and logits gradient as ignore_index=0."""
    vocab = 33
    targets = torch.randint(0, vocab, (3, 5), device=DEVICE)
    targets[0, :2] = 0  # padding
    logits = randn(3, 5, vocab)
    results = []
    for loss_fn in (
        TritonCrossEntropyLoss(pad_token_id=0, reduction="mean", n_chunks=1),
        TritonCrossEntropyLoss(ignore_index=0, reduction="mean", n_chunks=1),
    ):
        leaf = logits.clone().requires_grad_(True)
        loss = loss_fn(leaf, targets)
        loss.backward()
        results.append((loss.detach(), leaf.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert TritonCrossEntropyLoss(pad_token_id=0, reduction="sum").ignore_index == 0
    ref = F.cross_entropy(reference_copy(logits).reshape(-1, vocab), targets.cpu().reshape(-1), ignore_index=0)
    assert_close(results[0][0], ref, torch.float32, "pad_token_id=0 loss")


def test_linear_use_relu_by_its_old_name(seed):
    """The 1.x TritonLinear(in, out, use_relu=...): use_relu=True is the fused ReLU, False no activation."""
    x = randn(5, 33)
    for use_relu, activation in ((True, "relu"), (False, None)):
        old = TritonLinear(33, 17, use_relu=use_relu, device=DEVICE)
        new = TritonLinear(33, 17, activation=activation, device=DEVICE)
        new.load_state_dict(old.state_dict())
        assert old.activation == activation
        assert torch.equal(old(x), new(x))


def test_dropout_apply_by_its_old_argument_name(seed):
    """TritonDropout.apply(x, dropout_prob=0.5, seed=42), the call dame-cell/Triformer's README shows."""
    x = randn(3, 1000)
    assert torch.equal(TritonDropout.apply(x, dropout_prob=0.25, seed=seed), TritonDropout.apply(x, 0.25, seed))


@pytest.mark.parametrize(
    "make, names",
    [
        (lambda: TritonSoftmax(causal=True, is_causal=True), ("is_causal=", "causal=")),
        (lambda: TritonSoftmax(-1, False, is_causal=True), ("is_causal=", "causal=")),
        (lambda: TritonCrossEntropyLoss(-100, pad_token_id=0), ("pad_token_id=", "ignore_index=")),
        (lambda: TritonCrossEntropyLoss(ignore_index=0, pad_token_id=0), ("pad_token_id=", "ignore_index=")),
        (lambda: TritonLinear(4, 5, activation="gelu", use_relu=True), ("use_relu=", "activation=")),
        (lambda: TritonDropout.apply(randn(4), 0.5, dropout_prob=0.5), ("dropout_prob=", "p=")),
    ],
    ids=["softmax", "softmax-positional", "cross-entropy-positional", "cross-entropy", "linear", "dropout"],
)
def test_an_old_name_with_its_current_name_is_an_error(make, names):
    old, new = names
    with pytest.raises(TypeError, match=f"{old} .*dame-cell/Triformer.* and {new} are the same argument"):
        make()


def test_softmax_flag_first_as_in_the_original_is_an_error():
    """dame-cell/Triformer's TritonSoftmax took is_causal first; here the first argument is dim, so
    TritonSoftmax(True) must not pass."""
    with pytest.raises(TypeError, match="dim must be an int, got a bool.*is_causal"):
        TritonSoftmax(True)


def test_signatures_show_the_current_names():
    assert "is_causal" not in inspect.signature(TritonSoftmax).parameters
    assert "pad_token_id" not in inspect.signature(TritonCrossEntropyLoss).parameters
    assert list(inspect.signature(TritonSoftmax).parameters) == ["dim", "causal"]
