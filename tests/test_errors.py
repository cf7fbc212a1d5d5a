"""Clear errors instead of garbage or internal errors, across ops: bf16 under the interpreter, meta tensors, empty
sizes (the result torch gives where it gives one), constructor arguments checked at construction."""

from __future__ import annotations

import pytest
import torch

import triformer.functional as TF
from harness import DEVICE, INTERPRETER
from triformer import TritonCrossEntropyLoss, TritonLinear, TritonRMSNorm

INTERPRETER_ONLY = "CPU autocast under the interpreter: a GPU computes bf16 natively"


def _ops(dtype, device=DEVICE):
    """(name, call) for every functional op on small inputs of this dtype and device."""
    def t(*shape):
        return torch.randn(*shape, device=device).to(dtype)

    targets = torch.zeros(4, dtype=torch.int64, device=device)
    return [
        ("linear", lambda: TF.linear(t(4, 8), t(5, 8), t(5), activation="relu")),
        ("layer_norm", lambda: TF.layer_norm(t(4, 8), 8, t(8), t(8))),
        ("layer_norm weight", lambda: TF.layer_norm(torch.randn(4, 8, device=device), 8, t(8))),
        ("rms_norm", lambda: TF.rms_norm(t(4, 8), 8, t(8))),
        ("softmax", lambda: TF.softmax(t(4, 8))),
        ("dropout", lambda: TF.dropout(t(4, 8), 0.5, 1)),
        ("cross_entropy", lambda: TF.cross_entropy(t(4, 8), targets)),
    ]


@pytest.mark.parametrize("op", range(len(_ops(torch.float32))), ids=[name for name, _ in _ops(torch.float32)])
def test_bf16_under_the_interpreter_says_it_needs_a_gpu(op):
    """The interpreter computes bf16 on the raw bits (2e10 for 1.8): every op refuses it with the reason. Natively
    on a GPU the same calls run."""
    name, call = _ops(torch.bfloat16)[op]
    if INTERPRETER:
        with pytest.raises(TypeError, match="bfloat16 under Triton's interpreter.*bf16 needs a GPU"):
            call()
    else:
        assert torch.isfinite(call()).all()


@pytest.mark.skipif(not INTERPRETER, reason=INTERPRETER_ONLY)
def test_cpu_autocast_to_bf16_says_it_needs_a_gpu(seed):
    """torch.autocast("cpu", dtype=torch.bfloat16) casts the linear's inputs to bf16: the same clear error."""
    layer = TritonLinear(8, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(TypeError, match="bf16 needs a GPU.*autocast"):
            layer(torch.randn(4, 8))
