"""The warp-specialized Gluon product (matmul_ws.py) on a Hopper GPU, launched directly with every tile the tuner
offers, against float64: every activation, with and without bias and stored preactivation, bf16 and fp16, edges
in every dimension (TMA zero-fills and clips them), one program for all tiles (the ring's phases wrap many times),
three (the ping-pong partitions get unequal tile counts) and one per tile (the second ping-pong partition idles).
Outputs are poisoned first. Also: the tuner offers it exactly for nn.Linear's forward layout.
Gluon has no interpreter: on the CPU, tests/test_matmul_ws_compile.py compiles it for sm_90 instead."""

from __future__ import annotations

import types

import pytest
import torch
from harness import ON_GPU, assert_close, randn, well_conditioned_norm
from test_linear import REFERENCE_ACTIVATION, make_inputs, run_and_compare

from triformer.kernels import _tiles, matmul_tma
from triformer.kernels.activation import activation_code

GLUON_TRITON = matmul_tma.gluon_triton()  # before any test patches the version
ON_HOPPER = ON_GPU and torch.cuda.get_device_capability()[0] == 9
needs_hopper = pytest.mark.skipif(
    not ON_HOPPER,
    reason="Gluon has no interpreter and its warpgroup MMAs need an sm_90 GPU (compiled on the CPU instead)",
)

# (M, N, K): edges in every dimension (K a multiple of 8: TMA's 16-byte rows), the second tile column only
# partly inside N (N1 block past N), a single row, a product of many tiles per program, and many tiles of one K
# step each (the ping-pong partitions' epilogues overlap: their staging buffers must not).
PRODUCTS = [(300, 200, 104), (129, 72, 48), (1, 8, 8), (1000, 328, 520), (640, 768, 256), (1024, 768, 16)]


# (activation, bias?, preactivation stored?, dtype): every activation, flag and dtype at least once, kept few
# because each is a compilation of its own.
EPILOGUES = [
    (None, True, False, torch.bfloat16),
    (None, False, True, torch.float16),
    ("relu", True, False, torch.bfloat16),
    ("relu", False, False, torch.float16),
    ("gelu", True, True, torch.bfloat16),
    ("silu", False, True, torch.float16),
]


def epilogue_id(epilogue) -> str:
    activation, has_bias, store_preact, dtype = epilogue
    return (
        f"{activation}-{'bias' if has_bias else 'no-bias'}-{'preact' if store_preact else 'out-only'}-"
        f"{str(dtype).removeprefix('torch.')}"
    )


@needs_hopper
@pytest.mark.parametrize("epilogue", EPILOGUES, ids=epilogue_id)
@pytest.mark.parametrize("programs", [1, 3, 10_000])
@pytest.mark.parametrize("config", matmul_tma.WARP_SPECIALIZED_CONFIGS, ids=str)
@pytest.mark.parametrize("M,N,K", PRODUCTS)
def test_warp_specialized_product(M, N, K, config, programs, epilogue, seed):
    activation, has_bias, store_preact, dtype = epilogue
    x, w = randn(M, K, dtype=dtype), randn(N, K, dtype=dtype)
    bias = randn(N, dtype=dtype) if has_bias else None
    c = torch.full((M, N), float("nan"), dtype=dtype, device=x.device)
    preact = torch.full_like(c, float("nan")) if store_preact else None
    matmul_tma._gluon_kernel().launch(x, w, c, preact, bias, activation_code(activation), config, programs)

    x64, w64 = x.double().cpu(), w.double().cpu()
    ref = x64 @ w64.t() + (bias.double().cpu() if has_bias else 0.0)
    floor = well_conditioned_norm(x64, w64.t())
    if store_preact:
        assert_close(preact, ref, dtype, "preactivation", scale_floor=floor)
    assert_close(c, REFERENCE_ACTIVATION[activation](ref), dtype, "output", scale_floor=floor)


def test_offered_for_the_forward_layout_only(monkeypatch):
    """The layout, size and device rules, with the device's answers stood in for (so they run on the CPU too)."""
    monkeypatch.setattr(matmul_tma, "device_properties", lambda device: types.SimpleNamespace(major=9, minor=0))
    monkeypatch.setattr(matmul_tma, "_gluon_kernel", lambda: object())
    cuda, big = torch.device("cuda"), matmul_tma.WARP_SPECIALIZED_MIN_OUTPUTS
    assert matmul_tma.warp_specialized_fits(False, True, cuda, big)
    assert not matmul_tma.warp_specialized_fits(False, False, cuda, big)  # dX = dZ·W: W as it lies
    assert not matmul_tma.warp_specialized_fits(True, False, cuda, big)  # dW = dZᵀ·X
    assert not matmul_tma.warp_specialized_fits(False, True, cuda, big - 1)
    assert not matmul_tma.warp_specialized_fits(False, True, torch.device("cpu"), big)
    with matmul_tma.without_warp_specialization():
        assert not matmul_tma.warp_specialized_fits(False, True, cuda, big)
    monkeypatch.setattr(matmul_tma, "device_properties", lambda device: types.SimpleNamespace(major=10, minor=0))
    assert not matmul_tma.warp_specialized_fits(False, True, cuda, big)  # Blackwell has no warpgroup MMA
    with_ws = matmul_tma._candidates(8192, 768, 3072, 132, warp_specialized=True)
    assert [m["WS_CONFIG"] for m in with_ws if "WS_CONFIG" in m] == matmul_tma.WARP_SPECIALIZED_CONFIGS
    training = matmul_tma._candidates(8192, 768, 3072, 132, warp_specialized=True, store_preact=True)
    offered = [m["WS_CONFIG"] for m in training if "WS_CONFIG" in m]
    assert offered and not set(offered) & set(matmul_tma.WARP_SPECIALIZED_INFERENCE_ONLY)
    assert set(offered) | set(matmul_tma.WARP_SPECIALIZED_INFERENCE_ONLY) == set(matmul_tma.WARP_SPECIALIZED_CONFIGS)
    assert not any("WS_CONFIG" in m for m in matmul_tma._candidates(8192, 768, 3072, 132))


@needs_hopper
@pytest.mark.parametrize(
    "activation,has_bias,store_preact", [(None, True, True), ("gelu", False, False), ("relu", True, False)]
)
@pytest.mark.parametrize("config", matmul_tma.WARP_SPECIALIZED_CONFIGS, ids=str)
def test_tuner_candidate_launches_it(config, activation, has_bias, store_preact, seed):
    """launch_on with a {"WS_CONFIG": ...} meta, as the tuner calls it for y = act(x·Wᵀ + b): B = Wᵀ arrives as
    W's memory (tma_views), and the flags choose bias and preactivation: the placeholders passed for those not
    used (NaN-filled tensors of their shapes) must stay untouched and unread."""
    M, N, K = 515, 392, 264
    x, w, bias = randn(M, K, dtype=torch.bfloat16), randn(N, K, dtype=torch.bfloat16), randn(N, dtype=torch.bfloat16)
    if not has_bias:
        bias = torch.full_like(bias, float("nan"))
    c = torch.full((M, N), float("nan"), dtype=torch.bfloat16, device=x.device)
    preact = torch.full_like(c, float("nan"))
    (a_view, a_trans), (b_view, b_trans) = matmul_tma.tma_views(x, w.t(), c)
    assert (a_trans, b_trans) == (False, True) and b_view.data_ptr() == w.data_ptr()
    args = (a_view, b_view, c, preact, bias, M, N, K, a_view.stride(0), b_view.stride(0))
    flags = dict(
        HAS_BIAS=has_bias, ACT=activation_code(activation), STORE_PREACT=store_preact, A_TRANS=False, B_TRANS=True
    )
    matmul_tma.launch_on(args, flags, {"WS_CONFIG": config}, 132)

    ref = x.double().cpu() @ w.double().cpu().t() + (bias.double().cpu() if has_bias else 0.0)
    floor = well_conditioned_norm(x.double().cpu(), w.double().cpu().t())
    if store_preact:
        assert_close(preact, ref, torch.bfloat16, "preactivation", scale_floor=floor)
    else:
        assert torch.isnan(preact).all(), "the preactivation was written though not asked for"
    assert_close(c, REFERENCE_ACTIVATION[activation](ref), torch.bfloat16, "output", scale_floor=floor)


@needs_hopper
@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_linear_forward_through_the_tuner(activation, monkeypatch, seed):
    """TritonLinear's functional form, forward and backward, with the tuner on and offered only this kernel for
    the forward (the backward's products keep the Triton kernels): every output and gradient against float64."""
    offered = matmul_tma._candidates

    def forward_only_warp_specialized(M, N, K, num_sms, warp_specialized=False, store_preact=False):
        candidates = offered(M, N, K, num_sms, warp_specialized, store_preact)
        return [c for c in candidates if "WS_CONFIG" in c] if warp_specialized else candidates

    monkeypatch.setattr(matmul_tma, "_candidates", forward_only_warp_specialized)
    monkeypatch.setenv("TRIFORMER_AUTOTUNE", "1")
    with _tiles.fresh_picks() as picks:
        run_and_compare(*make_inputs(2060, 768, 1536, torch.bfloat16), activation, True, torch.bfloat16)
    assert any(isinstance(choice, dict) and "WS_CONFIG" in choice for choice in picks.values())


@needs_hopper
@pytest.mark.parametrize("config", matmul_tma.WARP_SPECIALIZED_CONFIGS, ids=str)
def test_results_do_not_move_between_runs(config, seed):
    """Same inputs, same outputs bit for bit over runs of many tiles per program: a race in the ring would show."""
    x, w = randn(4100, 520, dtype=torch.bfloat16), randn(776, 520, dtype=torch.bfloat16)
    bias = randn(776, dtype=torch.bfloat16)
    outputs = []
    for _ in range(3):
        c, preact = (torch.full((4100, 776), float("nan"), dtype=torch.bfloat16, device=x.device) for _ in range(2))
        matmul_tma._gluon_kernel().launch(x, w, c, preact, bias, activation_code("gelu"), config, 7)
        outputs.append((c, preact))
    assert all(torch.equal(a, b) for other in outputs[1:] for a, b in zip(outputs[0], other))


def test_older_tritons_never_get_it(monkeypatch):
    """Gluon's API moves between Triton releases: below GLUON_MIN_TRITON the tuner never offers the kernel."""
    monkeypatch.setattr(matmul_tma.triton, "__version__", "3.5.1")
    matmul_tma._gluon_kernel.cache_clear()
    try:
        assert matmul_tma._gluon_kernel() is None
        assert not matmul_tma.warp_specialized_fits(False, True, torch.device("cuda"), 1 << 30)
    finally:
        monkeypatch.undo()
        matmul_tma._gluon_kernel.cache_clear()
    if GLUON_TRITON:  # the lock's 3.8 here, 3.6 on the GPU hosts
        assert matmul_tma._gluon_kernel() is not None
