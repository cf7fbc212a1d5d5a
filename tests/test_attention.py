"""Flash attention (triformer.functional.attention): output and dq, dk, dv against a float64 reference."""

from __future__ import annotations

import math

import pytest
import torch
from harness import DEVICE, DTYPES, ON_GPU, assert_close, randn, relative_error, tolerance

import triformer.functional as F_tri
from triformer.kernels import attention as attention_kernels

GPU_ONLY_LONG = "sequences of 257+ tokens: GPU only (the interpreter would take minutes)"

# (B, Hq, Hkv, S, D): S not a multiple of any block, D padded (24, 40), grouped-query and multi-query heads.
SHAPES = [
    (1, 2, 2, 1, 16),
    (2, 1, 1, 7, 64),
    (1, 2, 2, 33, 16),
    (1, 1, 1, 129, 64),
    (1, 2, 2, 33, 40),
    (1, 4, 2, 33, 24),
    (1, 4, 1, 33, 16),
] + [
    pytest.param(shape, marks=pytest.mark.skipif(not ON_GPU, reason=GPU_ONLY_LONG))
    for shape in [
        (2, 4, 4, 257, 64),
        (2, 8, 8, 1000, 128),
        (1, 8, 2, 2048, 128),
        (1, 4, 4, 2048, 128),
        (1, 2, 1, 513, 256),
        (4, 6, 6, 256, 64),
        (1, 4, 4, 600, 72),
    ]
]
CAUSAL = [pytest.param(False, id="full"), pytest.param(True, id="causal")]


def reference_attention(q, k, v, causal: bool, scale: float, kept=None):
    """softmax(scale · q kᵀ) v in the inputs' dtype (float64 here), kv heads repeated over their query group; kept
    (optional, [B, Hq, S, S]): the probabilities are multiplied by it first (dropout's kept mask times its scale)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = (q @ k.transpose(-1, -2)) * scale
    if causal:
        s = q.shape[2]
        scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    probabilities = torch.softmax(scores, -1)
    return (probabilities if kept is None else probabilities * kept) @ v


def float64_copy(t: torch.Tensor) -> torch.Tensor:
    """A float64 leaf with t's values on t's device (large references run on the GPU in float64)."""
    return t.detach().double().requires_grad_(t.requires_grad)


def make_qkv(b, h, h_kv, s, d, dtype, q_scale=1.0):
    q = randn(b, h, s, d, dtype=dtype, scale=q_scale, requires_grad=True)
    k = randn(b, h_kv, s, d, dtype=dtype, requires_grad=True)
    v = randn(b, h_kv, s, d, dtype=dtype, requires_grad=True)
    return q, k, v


def run_and_compare(leaves, views, causal, scale, dtype, tol=None):
    """attention(*views) and its float64 twin on the same rounded values: output, then the gradient of every leaf
    (views are the leaves themselves or views of them, built by the same function of the leaves)."""
    refs = [float64_copy(t) for t in leaves]
    out = F_tri.attention(*views(leaves), causal=causal, scale=scale)
    d = out.shape[-1]
    ref = reference_attention(*views(refs), causal, 1 / math.sqrt(d) if scale is None else scale)
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close(out, ref, dtype, "output", tol)
    compare_gradients(out, ref, leaves, refs, dtype, tol)
    return out


def compare_gradients(out, ref, leaves, refs, dtype, tol=None):
    """One random incoming gradient through out and its float64 reference: the gradients of q, k, v (leaves) against
    those of their float64 copies (refs)."""
    dy = randn(*out.shape, dtype=dtype)
    out.backward(dy)
    ref.backward(dy.double())
    for name, tested, reference in zip("qkv", leaves, refs):
        assert tested.grad is not None, f"no gradient reached {name}"
        assert_close(tested.grad, reference.grad, dtype, f"grad of {name}", tol)


def as_is(leaves):
    return leaves


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_against_float64(shape, causal, dtype, seed):
    """Default scale 1/√D; every gradient."""
    run_and_compare(make_qkv(*shape, dtype), as_is, causal, None, dtype)


def dropout_kept(shape, p: float, seed: int) -> torch.Tensor:
    """The attention kernels' dropout on probabilities [B, Hq, S, S] as a float64 factor: triformer's dropout of ones
    of that shape (the kernels draw its mask, element (b·Hq + h, i, j) at index ((b·Hq + h)·S + i)·S + j), so kept
    entries hold 1 / (1 − p̂) and dropped ones 0."""
    return F_tri.dropout(torch.ones(shape, device=DEVICE), p, seed=seed).double()


DROPOUT_SHAPES = [(1, 2, 2, 7, 16), (2, 4, 2, 33, 16), (1, 2, 1, 19, 40)]  # S = 1: no gradient of q and k to compare


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("shape", DROPOUT_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_dropout_against_float64(shape, causal, dtype, seed):
    """Dropout on the probabilities (after the softmax's sum): o and every gradient against the float64 attention
    whose probabilities take the same mask; the same seed gives the same output."""
    b, h, _, s, _ = shape
    q, k, v = make_qkv(*shape, dtype)
    refs = [float64_copy(t) for t in (q, k, v)]
    out = F_tri.attention(q, k, v, causal=causal, dropout_p=0.3, seed=seed)
    ref = reference_attention(*refs, causal, 1 / math.sqrt(shape[-1]), dropout_kept((b, h, s, s), 0.3, seed))
    assert_close(out, ref, dtype, "output")
    compare_gradients(out, ref, (q, k, v), refs, dtype)
    assert torch.equal(F_tri.attention(q, k, v, causal=causal, dropout_p=0.3, seed=seed), out)


def test_dropout_rates_and_seeds(seed):
    """p = 0: the result without dropout, no seed drawn; p = 1: zeros and zero gradients; another seed another mask;
    seed None: drawn from torch's generator (manual_seed repeats it)."""
    q, k, v = make_qkv(1, 2, 2, 17, 16, torch.float32)
    state = torch.get_rng_state()
    assert torch.equal(F_tri.attention(q, k, v, dropout_p=0.0), F_tri.attention(q, k, v))
    assert torch.equal(torch.get_rng_state(), state)
    out = F_tri.attention(q, k, v, dropout_p=1.0, seed=3)
    assert not out.any()
    assert not any(g.any() for g in torch.autograd.grad(out, (q, k, v), randn(*out.shape)))
    assert not torch.equal(
        F_tri.attention(q, k, v, dropout_p=0.5, seed=1), F_tri.attention(q, k, v, dropout_p=0.5, seed=2)
    )
    torch.manual_seed(seed)
    first = F_tri.attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(seed)
    assert torch.equal(F_tri.attention(q, k, v, dropout_p=0.5), first)
    refs = [float64_copy(t) for t in (q, k, v)]
    kept = dropout_kept((1, 2, 17, 17), 0.99999, seed)  # p̂ = 1 − 2⁻¹⁶: kept ones scaled by 2¹⁶, not 10⁵
    assert_close(
        F_tri.attention(q, k, v, dropout_p=0.99999, seed=seed),
        reference_attention(*refs, False, 0.25, kept),
        torch.float32,
        "output at p = 0.99999",
    )
    with pytest.raises(ValueError, match=r"dropout probability p must be a number in \[0, 1\]"):
        F_tri.attention(q, k, v, dropout_p=1.5)
    with pytest.raises(ValueError, match="dropout_p = 0.5 needs a seed"):
        torch.ops.triformer.attention(q.detach(), k.detach(), v.detach(), False, 0.25, 0.5, None)


@pytest.mark.skipif(not ON_GPU, reason="a seed in device memory: GPU only")
@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_seed_on_the_device_and_large(dtype, seed):
    """A seed tensor on the GPU (read by the kernels, as under CUDA graphs) gives the int seed's mask; S 1000, D 128,
    grouped-query heads, against float64."""
    q, k, v = make_qkv(1, 8, 2, 1000, 128, dtype)
    refs = [float64_copy(t) for t in (q, k, v)]
    out = F_tri.attention(q, k, v, causal=True, dropout_p=0.1, seed=torch.tensor(seed, device=DEVICE))
    assert torch.equal(out, F_tri.attention(q, k, v, causal=True, dropout_p=0.1, seed=seed))
    ref = reference_attention(*refs, True, 1 / math.sqrt(128), dropout_kept((1, 8, 1000, 1000), 0.1, seed))
    assert_close(out, ref, dtype, "output")
    compare_gradients(out, ref, (q, k, v), refs, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", CAUSAL)
def test_explicit_scale(causal, dtype, seed):
    run_and_compare(make_qkv(1, 2, 1, 19, 32, dtype), as_is, causal, 0.37, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", CAUSAL)
def test_large_logits(causal, dtype, seed):
    """q scaled by 100: logits in the hundreds, far past exp's float32 range without the running max.
    The gradients are ill-conditioned (a relative change ε of the inputs moves the logits by ε·|logit|): a 16-bit
    computation's gradient error depends on the draw (float16 up to 4e-2 for torch's own attention in 150 draws on the
    CPU). So the tolerance is ten times the dtype's own, or twice the error of F.scaled_dot_product_attention in
    the same dtype on the same inputs, whichever is larger."""
    q, k, v = make_qkv(1, 2, 2, 33, 64, dtype, q_scale=100.0)
    logits = (q.detach().double() @ k.detach().double().transpose(-1, -2)) / 8
    assert logits.abs().max() > 100  # past exp's float32 range (e^88)
    refs = [float64_copy(t) for t in (q, k, v)]
    twins = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = F_tri.attention(q, k, v, causal=causal)
    ref = reference_attention(*refs, causal, 1 / 8)
    twin = torch.nn.functional.scaled_dot_product_attention(*twins, is_causal=causal)
    assert torch.isfinite(out).all()
    assert_close(out, ref, dtype, "output", 10 * tolerance(dtype))
    dy = randn(*out.shape, dtype=dtype)
    for o, grad in ((out, dy), (ref, dy.double()), (twin, dy)):
        o.backward(grad)
    for name, tested, reference, torch_own in zip("qkv", (q, k, v), refs, twins):
        tol = max(10 * tolerance(dtype), 2 * relative_error(torch_own.grad, reference.grad))
        assert_close(tested.grad, reference.grad, dtype, f"grad of {name}", tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_causal_first_row_sees_one_key(dtype, seed):
    """Query 0 of a causal head attends to key 0 alone: its output is v[0] exactly and its dq is zero (up to the
    rounding of dp − Δ, two sums of the same products in different orders)."""
    q, k, v = make_qkv(2, 4, 2, 9, 16, dtype)
    out = F_tri.attention(q, k, v, causal=True)
    assert torch.equal(out[:, :, 0], v.detach().repeat_interleave(2, 1)[:, :, 0])
    out.backward(randn(*out.shape, dtype=dtype))
    scale = q.grad.abs().max().item()
    assert q.grad[:, :, 0].abs().max().item() <= tolerance(dtype) * scale


def fused_qkv_views(h, h_kv):
    """q, k, v as [B, H, S, D] views of one fused projection [B, S, H + 2·H_kv, D] (no copies)."""

    def views(leaves):
        (qkv,) = leaves
        q, k, v = qkv.split([h, h_kv, h_kv], dim=2)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    return views


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("heads", [(2, 2), (4, 2)], ids=["mha", "gqa"])
def test_views_of_fused_qkv(heads, causal, dtype, seed):
    """Strided inputs: q, k, v read through the strides of a [B, S, 3, H, D]-style projection; the gradients
    reach the fused tensor."""
    h, h_kv = heads
    qkv = randn(2, 21, h + 2 * h_kv, 40, dtype=dtype, requires_grad=True)
    views = fused_qkv_views(h, h_kv)
    assert not views([qkv])[0].is_contiguous()
    run_and_compare((qkv,), views, causal, None, dtype)


def test_output_and_gradients_lie_heads_side_by_side(seed):
    """o [B, H, S, D] lies in memory as [B, S, H, D]: o.transpose(1, 2).reshape(B, S, H·D), what an output projection
    takes, is a view (no copy), as with SDPA's flash kernels. So do dq, dk and dv for views of a fused projection
    (whose gradient is then one concatenation of whole rows); contiguous inputs get contiguous gradients. The fake
    implementation (torch.compile's) agrees."""
    q, k, v = make_qkv(2, 3, 3, 11, 16, torch.float32)
    out = F_tri.attention(q, k, v, causal=True)
    heads_side_by_side = out.transpose(1, 2).reshape(2, 11, 48)
    assert out.transpose(1, 2).is_contiguous() and heads_side_by_side.data_ptr() == out.data_ptr()
    assert all(g.is_contiguous() for g in torch.autograd.grad(out, (q, k, v), randn(*out.shape)))
    qkv = randn(2, 11, 9, 16, requires_grad=True)
    views = fused_qkv_views(3, 3)([qkv])
    grads = torch.autograd.grad(F_tri.attention(*views, causal=True), views, randn(*out.shape))
    assert all(g.transpose(1, 2).is_contiguous() for g in grads)
    gqa_views = fused_qkv_views(4, 2)([randn(2, 11, 8, 16)])
    for inputs in ((q, k, v), views, gqa_views):  # the fakes' strides (torch.compile's) are the real ones'
        inputs = [t.detach() for t in inputs]
        o, lse = torch.ops.triformer.attention(*inputs, True, 0.25, 0.0, None)
        real = [o, *torch.ops.triformer.attention_backward(o, *inputs, o, lse, True, 0.25, True, True, 0.0, None)]
        mode = torch._subclasses.fake_tensor.FakeTensorMode()
        fakes = [mode.from_tensor(t) for t in (*inputs, o, lse)]
        with mode:
            fake_o, fake_lse = torch.ops.triformer.attention(*fakes[:3], True, 0.25, 0.0, None)
            fake = [fake_o, *torch.ops.triformer.attention_backward(fake_o, *fakes, True, 0.25, True, True, 0.0, None)]
        assert [(t.shape, t.stride()) for t in fake] == [(t.shape, t.stride()) for t in real]


def test_strided_incoming_gradient(seed):
    """A non-contiguous dy (here a transposed view) is read through its strides."""
    q, k, v = make_qkv(1, 2, 2, 17, 16, torch.float32)
    refs = [float64_copy(t) for t in (q, k, v)]
    out = F_tri.attention(q, k, v, causal=True)
    ref = reference_attention(*refs, True, 0.25)
    dy = randn(1, 2, 16, 17, dtype=torch.float32).transpose(-1, -2)
    assert not dy.is_contiguous()
    out.backward(dy)
    ref.backward(dy.double())
    for name, tested, reference in zip("qkv", (q, k, v), refs):
        assert_close(tested.grad, reference.grad, torch.float32, f"grad of {name}")


@pytest.mark.parametrize("needs", ["q", "kv"])
def test_gradients_of_some_inputs(needs, seed):
    """Only the inputs that require a gradient get one (the other kernel is not launched)."""
    q, k, v = make_qkv(1, 2, 1, 12, 16, torch.float32)
    for name, t in zip("qkv", (q, k, v)):
        t.requires_grad_(name in needs)
    refs = [float64_copy(t) for t in (q, k, v)]
    out = F_tri.attention(q, k, v)
    ref = reference_attention(*refs, False, 0.25)
    dy = randn(*out.shape)
    out.backward(dy)
    ref.backward(dy.double())
    for name, tested, reference in zip("qkv", (q, k, v), refs):
        if name in needs:
            assert_close(tested.grad, reference.grad, torch.float32, f"grad of {name}")
        else:
            assert tested.grad is None


def _bad(**changes):
    """Valid inputs q [2, 4, 9, 16], k, v [2, 2, 9, 16] with some replaced."""

    def make():
        args = dict(q=randn(2, 4, 9, 16), k=randn(2, 2, 9, 16), v=randn(2, 2, 9, 16), causal=False, scale=None)
        args.update({name: change() if callable(change) else change for name, change in changes.items()})
        return args

    return make


BAD_INPUTS = [
    ("3-D q", _bad(q=lambda: randn(4, 9, 16)), ValueError, "q must be 4-D"),
    (
        "heads not a multiple",
        _bad(k=lambda: randn(2, 3, 9, 16), v=lambda: randn(2, 3, 9, 16)),
        ValueError,
        "not a multiple",
    ),
    ("k and v differ", _bad(v=lambda: randn(2, 1, 9, 16)), ValueError, "k and v must have the same shape"),
    ("head dims differ", _bad(k=lambda: randn(2, 2, 9, 32), v=lambda: randn(2, 2, 9, 32)), ValueError, "head dim"),
    ("lengths differ", _bad(k=lambda: randn(2, 2, 8, 16), v=lambda: randn(2, 2, 8, 16)), ValueError, "sequence length"),
    ("batches differ", _bad(k=lambda: randn(1, 2, 9, 16), v=lambda: randn(1, 2, 9, 16)), ValueError, "batch size"),
    ("dtypes differ", _bad(k=lambda: randn(2, 2, 9, 16, dtype=torch.float16)), TypeError, "dtype"),
    ("integer q", _bad(q=lambda: torch.ones(2, 4, 9, 16, dtype=torch.int32, device=DEVICE)), TypeError, "dtype"),
    ("not a tensor", _bad(q=[[1.0]]), TypeError, "torch.Tensor"),
    ("v on another device (meta)", _bad(v=lambda: torch.empty(2, 2, 9, 16, device="meta")), ValueError, "v .*meta"),
    (
        "head dim 12",
        _bad(q=lambda: randn(2, 4, 9, 12), k=lambda: randn(2, 2, 9, 12), v=lambda: randn(2, 2, 9, 12)),
        ValueError,
        "multiple of 8",
    ),
    (
        "head dim 264",
        _bad(q=lambda: randn(1, 1, 2, 264), k=lambda: randn(1, 1, 2, 264), v=lambda: randn(1, 1, 2, 264)),
        ValueError,
        "at most 256",
    ),
    (
        "no heads",
        _bad(q=lambda: randn(2, 0, 9, 16), k=lambda: randn(2, 0, 9, 16), v=lambda: randn(2, 0, 9, 16)),
        ValueError,
        "no heads or an empty head dim",
    ),
    ("negative scale", _bad(scale=-0.5), ValueError, "scale"),
    ("scale not a number", _bad(scale="0.5"), TypeError, "scale"),
    ("causal not a bool", _bad(causal=1), TypeError, "causal"),
]


@pytest.mark.parametrize("shape", [(0, 4, 9, 16), (2, 4, 0, 16)], ids=["no batch", "no sequence"])
@pytest.mark.parametrize("causal", [False, True])
def test_empty_batch_or_sequence_gives_empty_results(shape, causal):
    """As SDPA: an empty batch or sequence gives an empty o and empty gradients, not an error."""
    b, h, s, d = shape
    q = randn(b, h, s, d, requires_grad=True)
    k, v = randn(b, 2, s, d, requires_grad=True), randn(b, 2, s, d, requires_grad=True)
    o = F_tri.attention(q, k, v, causal=causal)
    assert o.shape == q.shape
    o.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape


@pytest.mark.parametrize("make, error, message", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs(make, error, message):
    with pytest.raises(error, match=message):
        F_tri.attention(**make())


# ------------------------------------------------------------------------------------------------- GPU only

gpu_only = pytest.mark.skipif(not ON_GPU, reason="the Hopper tiles and autocast run natively on a GPU only")


def _config_cases():
    cases = []
    for d in (64, 128, 256):
        for kernel in ("forward", "dkdv", "dq"):
            for meta in attention_kernels.configs(kernel, d, 4096):
                cases.append(
                    pytest.param(
                        kernel,
                        d,
                        meta,
                        id=f"{kernel}-d{d}-{meta['BLOCK_M']}x{meta['BLOCK_N']}-"
                        f"w{meta['num_warps']}s{meta['num_stages']}",
                    )
                )
    return cases


@gpu_only
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("kernel, d, meta", _config_cases())
@pytest.mark.parametrize("dropout_p", [0.0, 0.2], ids=["", "dropout"])
def test_every_tile(kernel, d, meta, causal, dropout_p, seed):
    """Each Hopper candidate of each kernel (the tuner may pick any), bf16, GQA, S not a multiple of a block; with
    dropout on the probabilities too (its kernels compile differently)."""
    dtype = torch.bfloat16
    q, k, v = make_qkv(1, 4, 2, 700, d, dtype)
    scale = 1 / math.sqrt(d)
    refs = [float64_copy(t) for t in (q, k, v)]
    kept = dropout_kept((1, 4, 700, 700), dropout_p, seed) if dropout_p else None
    ref = reference_attention(*refs, causal, scale, kept)
    dy = randn(*ref.shape, dtype=dtype)
    ref.backward(dy.double())
    with torch.no_grad():
        o, lse = attention_kernels.attention_forward(
            q, k, v, causal, scale, meta=meta if kernel == "forward" else None, dropout_p=dropout_p, seed=seed
        )
        assert_close(o, ref, dtype, "output")
        dq, dk, dv = attention_kernels.attention_backward(
            dy,
            q,
            k,
            v,
            o,
            lse,
            causal,
            scale,
            meta_dkdv=meta if kernel == "dkdv" else None,
            meta_dq=meta if kernel == "dq" else None,
            dropout_p=dropout_p,
            seed=seed,
        )
    for name, tested, reference in zip("qkv", (dq, dk, dv), refs):
        assert_close(tested, reference.grad, dtype, f"grad of {name}")


@gpu_only
@pytest.mark.parametrize("causal", CAUSAL)
def test_extra_memory_is_per_row(causal, seed):
    """Forward+backward allocate o, dq, dk, dv and two float32 rows per query (lse, Δ): nothing of size S²."""
    b, h, s, d = 1, 4, 4096, 64
    q, k, v = make_qkv(b, h, h, s, d, torch.bfloat16)
    dy = randn(b, h, s, d, dtype=torch.bfloat16)
    F_tri.attention(q, k, v, causal=causal).backward(dy)  # compile outside the measurement
    q.grad = k.grad = v.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    F_tri.attention(q, k, v, causal=causal).backward(dy)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    tensors = 4 * q.numel() * q.element_size()  # o, dq, dk, dv
    rows = 2 * b * h * s * 4
    assert extra <= tensors + rows + 2**20, f"{extra} bytes beyond the inputs (S² scores would be {b * h * s * s * 2})"


@gpu_only
def test_autocast_runs_in_the_autocast_dtype(seed):
    q, k, v = make_qkv(2, 4, 4, 100, 64, torch.float32)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = F_tri.attention(q, k, v, causal=True)
    assert out.dtype == torch.bfloat16
    ref = reference_attention(*(float64_copy(t) for t in (q, k, v)), True, 1 / 8)
    assert relative_error(out, ref) < tolerance(torch.bfloat16)


def test_dropout_on_views_of_fused_qkv_and_nan(seed):
    """Dropout with q, k, v strided views of one fused projection (GQA): output and the projection's gradient against
    float64; a NaN in one value row reaches o wherever torch's float64 reference has it (a dropped NaN stays NaN)."""
    views = fused_qkv_views(4, 2)
    qkv = randn(2, 13, 8, 16, requires_grad=True)
    ref_qkv = float64_copy(qkv)
    out = F_tri.attention(*views([qkv]), causal=True, dropout_p=0.3, seed=seed)
    ref = reference_attention(*views([ref_qkv]), True, 0.25, dropout_kept((2, 4, 13, 13), 0.3, seed))
    assert_close(out, ref, torch.float32, "output")
    compare_gradients(out, ref, (qkv,), (ref_qkv,), torch.float32)
    poisoned = qkv.detach().clone()
    poisoned[0, 5, 6] = float("nan")  # batch 0, token 5, value head 0
    out = F_tri.attention(*views([poisoned]), causal=True, dropout_p=0.3, seed=seed)
    ref = reference_attention(*views([poisoned.double()]), True, 0.25, dropout_kept((2, 4, 13, 13), 0.3, seed))
    assert torch.equal(out.isnan(), ref.isnan()) and out.isnan().any()
