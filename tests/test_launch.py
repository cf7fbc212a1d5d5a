"""The fast launch path (kernels/_launch.py): its per-argument key separates every pair of values Triton
specializes differently, its recorded argument list is the one Triton binds, and on a GPU a repeated call
launches the kernel Triton would have chosen, with the same results."""

from __future__ import annotations

import itertools

import pytest
import torch
from harness import DEVICE, ON_GPU
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature
from triton.tools.tensor_descriptor import TensorDescriptor

from triformer.kernels import _launch
from triformer.kernels._runtime import overridden
from triformer.kernels.gated import _gated_forward_kernel
from triformer.kernels.matmul_tma import _matmul_tma_kernel


def triton_specialization(arg):
    """What Triton's binder makes of a specialized, alignment-checked argument."""
    return native_specialize_impl(BaseBackend, arg, False, True, True)


def sample_arguments():
    ints = [0, 1, -1, 2, 15, 16, 17, 32, -16, -17, 2**31 - 16, 2**31 - 1, 2**31, -(2**31), -(2**31) - 1, -(2**31) - 16]
    ints += [2**32, 2**40 + 3, 2**63 - 1, 2**63 - 16, 2**63, 2**64 - 16, 2**64 - 1]
    base = torch.zeros(64)
    tensors = [base.to(dtype)[offset:] for dtype in (torch.float32, torch.float16, torch.int64) for offset in range(9)]
    tensors.append(torch.nn.Parameter(torch.zeros(8)))
    tensors.append(torch.nn.Parameter(torch.zeros(9))[1:].detach())
    square = torch.zeros(64, 64)
    descriptors = [
        TensorDescriptor.from_tensor(square, [32, 32]),
        TensorDescriptor.from_tensor(square[:, :48], [32, 32]),
        TensorDescriptor.from_tensor(square, [64, 32]),
        TensorDescriptor.from_tensor(square.half(), [32, 32]),
    ]
    return [*ints, True, False, 0.5, 1.0, -2.0, None, *tensors, *descriptors]


def test_equal_keys_mean_equal_triton_specializations():
    samples = sample_arguments()
    keys = [_launch.arg_key(a) for a in samples]
    assert all(k is not _launch.UNKEYED for k in keys)
    for (a, key_a), (b, key_b) in itertools.combinations(zip(samples, keys), 2):
        if key_a == key_b:
            assert triton_specialization(a) == triton_specialization(b), (a, b, key_a)


def test_keys_tell_apart_alignment_one_and_width():
    x = torch.zeros(64)
    assert _launch.arg_key(x) != _launch.arg_key(x[1:])  # 4 bytes off: no 16-byte alignment
    assert _launch.arg_key(x) == _launch.arg_key(x[4:])
    assert len({_launch.arg_key(v) for v in (1, 16, 17, 2**31, 2**63)}) == 5


def test_unknown_kinds_are_not_keyed():
    assert _launch.arg_key("a") is _launch.UNKEYED
    assert _launch.arg_key((1, 2)) is _launch.UNKEYED


class _FakeCompiled:
    run = function = packed_metadata = None


def triton_bound_arguments(kernel, args, meta):
    binder = create_function_from_signature(kernel.signature, kernel.params, make_backend(GPUTarget("cuda", 90, 32)))
    bound, _, _ = binder(*args, **meta, debug=False, instrumentation_mode="")
    return list(bound.values())


def jit_function(kernel) -> JITFunction:
    """The kernel as a JITFunction (under the interpreter it is an InterpretedFunction around the same function)."""
    return kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)


def gated_call():
    x, h = torch.zeros(4, 32), torch.zeros(4, 16)
    return (
        jit_function(_gated_forward_kernel),
        (x, h, 4, 16, 32, 1, 16),
        dict(ACT=1, BLOCK_M=4, BLOCK_N=16, num_warps=4),
    )


def matmul_call():
    a, b, c = torch.zeros(32, 16), torch.zeros(16, 32), torch.zeros(32, 32)
    args = (a, b, c, None, None, c, 32, 32, 16, 16, 32, 0, 1, 1)
    flags = dict(HAS_BIAS=False, ACT=0, STORE_PREACT=False, A_TRANS=False, B_TRANS=False, NUM_SMS=1, PARTIAL=False)
    return (
        jit_function(_matmul_tma_kernel),
        args,
        dict(**flags, BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, GROUP_M=8, SPLIT_EPILOGUE=False, num_warps=4),
    )


@pytest.mark.parametrize("call", [gated_call, matmul_call], ids=["gated", "matmul_tma"])
def test_recorded_arguments_are_the_ones_triton_binds(call):
    kernel, args, meta = call()
    record = _launch._record(kernel, _FakeCompiled(), len(args), meta)
    assert record is not None
    recorded = [*args, *record.tail]
    bound = triton_bound_arguments(kernel, args, meta)
    assert len(recorded) == len(bound)
    assert all(r is b or (not isinstance(r, torch.Tensor) and r == b) for r, b in zip(recorded, bound))


def test_a_runtime_keyword_argument_is_not_recorded():
    kernel, args, meta = gated_call()
    assert _launch._record(kernel, _FakeCompiled(), len(args) - 1, {**meta, "stride_hm": args[-1]}) is None


def test_a_positional_constexpr_is_not_recorded():
    kernel, args, meta = gated_call()
    meta = dict(meta)
    act = meta.pop("ACT")
    assert _launch._record(kernel, _FakeCompiled(), len(args) + 1, meta) is None, "ACT passed positionally"
    assert _launch._record(kernel, _FakeCompiled(), len(args), {**meta, "ACT": act}) is not None


class _StubCompiled:
    """What launch reads of a compiled kernel; run records its arguments."""

    function, packed_metadata = "function", "packed"

    def __init__(self):
        self.calls = []

    def run(self, *launch_args):
        self.calls.append(launch_args)


class _StubJIT(JITFunction):
    """A JITFunction whose kernel[grid](...) (Triton's path) returns a stub compiled kernel and counts the calls."""

    def __getitem__(self, grid):
        def through_triton(*args, **meta):
            self.triton_calls += 1
            return self.compiled

        return through_triton


def stub_kernel(compiled):
    kernel = _StubJIT(_gated_forward_kernel.fn)
    kernel.compiled, kernel.triton_calls = compiled, 0
    return kernel


@pytest.fixture
def as_on_a_gpu(monkeypatch):
    """launch() as on a GPU, without one: a native kernel, device 0, stream 1234."""
    monkeypatch.setattr(_launch, "interpreter_active", lambda: False)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda device: 1234, raising=False)
    with _launch.fresh_records(), overridden(_launch, FAST=True, CHECK=False):
        yield


def test_a_repeated_call_calls_the_recorded_launcher_with_tritons_arguments(as_on_a_gpu):
    compiled = _StubCompiled()
    kernel = stub_kernel(compiled)
    _, args, meta = gated_call()
    before = _launch.fast_launches
    assert _launch.launch(kernel, (3, 2), *args, **meta) is compiled  # recorded, through Triton
    assert kernel.triton_calls == 1 and compiled.calls == []
    assert _launch.launch(kernel, (3, 2), *args, **meta) is compiled
    assert kernel.triton_calls == 1 and _launch.fast_launches == before + 1
    (call,) = compiled.calls
    assert call[:9] == (3, 2, 1, 1234, "function", "packed", None, None, None)
    bound = triton_bound_arguments(kernel, args, meta)
    assert len(call) - 9 == len(bound)
    assert all(c is b or (type(c) is type(b) and c == b) for c, b in zip(call[9:], bound))


def test_keys_tell_apart_keyword_values_of_another_type_and_other_alignment(as_on_a_gpu):
    kernel = stub_kernel(_StubCompiled())
    _, args, meta = gated_call()
    _launch.launch(kernel, (1,), *args, **meta)
    _launch.launch(kernel, (1,), *args, **{**meta, "ACT": True})  # 1 == True, but another Triton kernel
    x = torch.zeros(4 * 32 + 1)[1:].view(4, 32)  # 4 bytes off 16-byte alignment
    _launch.launch(kernel, (1,), x, *args[1:], **meta)
    assert kernel.triton_calls == 3 and len(_launch.recorded_calls()) == 3


def test_set_state_sends_calls_through_triton(as_on_a_gpu):
    from triton import knobs

    kernel = stub_kernel(_StubCompiled())
    _, args, meta = gated_call()
    _launch.launch(kernel, (1,), *args, **meta)
    with overridden(knobs.runtime, debug=True):
        _launch.launch(kernel, (1,), *args, **meta)
    kernel.pre_run_hooks.append(lambda *a, **k: None)
    _launch.launch(kernel, (1,), *args, **meta)
    kernel.pre_run_hooks.clear()
    assert kernel.triton_calls == 3
    _launch.launch(kernel, (1,), *args, **meta)
    assert kernel.triton_calls == 3, "the fast path again once nothing is set"


def test_records_stop_at_their_cap(as_on_a_gpu):
    kernel = stub_kernel(_StubCompiled())
    _, args, meta = gated_call()
    with overridden(_launch, MAX_RECORDS=2):
        for block in (16, 32, 64):
            _launch.launch(kernel, (1,), *args, **{**meta, "BLOCK_N": block})
    assert len(_launch.recorded_calls()) == 2


def test_check_mode_raises_on_another_kernel_or_argument():
    kernel, args, meta = gated_call()
    record = _launch._record(kernel, _FakeCompiled(), len(args), meta)
    with pytest.raises(AssertionError, match="another compiled kernel"):
        _launch._checked(stub_kernel(object()), (1,), args, meta, record)
    with pytest.raises(AssertionError, match="arguments"):
        _launch._checked(stub_kernel(record.compiled), (1,), args, {**meta, "ACT": True}, record)


def test_a_launch_hook_sends_calls_through_triton():
    from triton import knobs

    assert not _launch.launch_hooked(), "Triton's default hook chain is empty"
    chain = knobs.runtime.launch_enter_hook

    def hook(metadata):
        pass

    chain.add(hook)
    try:
        assert _launch.launch_hooked()
    finally:
        chain.remove(hook)
    assert not _launch.launch_hooked()


def test_interpreter_calls_are_not_recorded(seed):
    if ON_GPU:
        pytest.skip("the interpreter's answer")
    from triformer.functional import swiglu

    with _launch.fresh_records(), overridden(_launch, FAST=True):
        swiglu(torch.randn(3, 8))
        assert _launch.recorded_calls() == {}


# ------------------------------------------------------------------------------------------------------ GPU


def _model_step(model, inputs, targets):
    """Loss and every parameter gradient of one forward and backward (bf16 autocast)."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss = model(inputs, targets)
    loss.backward()
    return [loss.detach().clone()] + [p.grad.clone() for p in model.parameters()]


def _gpt_variants():
    from test_models import GPT_VARIANTS, gpt_config

    from triformer import GPT

    for variant in GPT_VARIANTS:
        config = gpt_config(variant)
        model = GPT(config).to(DEVICE)
        idx = torch.randint(0, config.vocab_size, (2, config.block_size), device=DEVICE)
        yield variant, model, idx, torch.randint(0, config.vocab_size, idx.shape, device=DEVICE)


@pytest.mark.skipif(not ON_GPU, reason="the fast path runs only natively on a GPU")
def test_repeated_calls_launch_what_triton_would(seed):
    for variant, model, idx, targets in _gpt_variants():
        with _launch.fresh_records(), overridden(_launch, FAST=True, CHECK=True):
            _model_step(model, idx, targets)  # records
            assert any(_launch.recorded_calls().values()), f"{variant}: no call was recorded"
            _model_step(model, idx, targets)  # every repeated call checked against Triton's choice


@pytest.mark.skipif(not ON_GPU, reason="the fast path runs only natively on a GPU")
def test_fast_path_gives_triton_path_results(seed):
    for variant, model, idx, targets in _gpt_variants():
        with overridden(_launch, FAST=False):
            expected = _model_step(model, idx, targets)
        with _launch.fresh_records(), overridden(_launch, FAST=True, CHECK=False):
            _model_step(model, idx, targets)
            before = _launch.fast_launches
            got = _model_step(model, idx, targets)
            assert _launch.fast_launches > before, f"{variant}: no launch took the fast path"
        for e, g in zip(expected, got, strict=True):
            assert torch.equal(e, g), f"{variant}: the fast path changed a result"
