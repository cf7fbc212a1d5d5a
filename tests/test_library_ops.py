"""triformer's ops as torch.library custom ops: torch.library.opcheck of every op (schema, autograd registration, fake
implementation, AOT dispatch with dynamic shapes); the eager fast path against the dispatcher; torch.compile of the
models with fullgraph=True (zero graph breaks) matching eager forward and backward; the cross-entropy target check
that reports without a host sync; on a GPU, whole training steps under torch.compile(mode="reduce-overhead") and a
plain CUDA graph capture.

On the CPU the ops run through Triton's interpreter (tiny fp32 shapes: opcheck runs each op several times), and the
models compile with Inductor as on a GPU (about 40 s from a cold Inductor cache for the four: the ops are opaque to
Inductor, which builds only the glue between them).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from harness import DEVICE, ON_GPU, assert_close, randn

import triformer.functional as TF
from triformer import GPT, GPTConfig, ViT, ViTConfig
from triformer.functional import _targets
from triformer.functional._library import OPS, through_dispatcher
from triformer.kernels import dropout as dropout_kernels
from triformer.models.mlp import TritonMLP

pytestmark = pytest.mark.filterwarnings(
    "ignore:invalid value encountered:RuntimeWarning",
    "ignore:divide by zero encountered:RuntimeWarning",
    "ignore:overflow encountered:RuntimeWarning",
)

ops = torch.ops.triformer


def leaf(*shape, dtype=torch.float32):
    return randn(*shape, dtype=dtype, requires_grad=True)


def targets(shape, v, ignored=True):
    t = torch.randint(0, v, shape, device=DEVICE)
    if ignored:
        t.view(-1)[::3] = -100
    return t


def tables(s, d):
    return TF.rope_tables(d, s, device=DEVICE)


def norm_outputs(center):
    x, w, b = randn(2, 3, 9), randn(9), randn(9)
    _, mean, rstd = ops.norm(x, w, b if center else None, 1e-5, center)
    return x, w, mean, rstd


def attention_saved(dropout_p=0.0, seed=None):
    q, k, v = randn(1, 2, 5, 8), randn(1, 1, 5, 8), randn(1, 1, 5, 8)
    o, lse = ops.attention(q, k, v, True, 0.3, dropout_p, seed)
    return q, k, v, o, lse


def residual_saved():
    x, h, w = randn(2, 3, 9), randn(2, 3, 9), randn(9)
    s, _, mean, rstd = ops.add_dropout_norm(x, h, w, randn(9), 1e-5, True, 0.2, torch.tensor(5))
    return s, w, mean, rstd


def mixed_residual_args(*extra):
    """add_dropout_norm's arguments for a float16 branch on a float32 stream, then `extra` (y_dtype, branch_bias)."""
    return (leaf(4, 9), leaf(4, 9, dtype=torch.float16), leaf(9), leaf(9), 1e-5, True, 0.3, torch.tensor(2), *extra)


def residual_backward_args(dy, need_sums: bool, h_dtype=torch.float32, *extra):
    """add_dropout_norm_backward's arguments for a saved forward, dw and db wanted or not, then `extra` (t_dtype,
    need_dc)."""
    saved = residual_saved()
    return (
        dy,
        randn(2, 3, 9),
        *saved,
        0.2,
        torch.tensor(5),
        torch.float32,
        h_dtype,
        need_sums,
        need_sums,
        torch.float32,
        *extra,
    )


# op name, arguments (built per test: fresh random inputs)
OPCHECK_CASES = {
    "linear-fused-gelu": lambda: (ops.linear, (leaf(2, 3, 7), leaf(5, 7), leaf(5), "gelu", True, True)),
    "linear-fused-relu": lambda: (ops.linear, (leaf(4, 7), leaf(5, 7), leaf(5), "relu", True, True)),
    "linear-unfused-silu": lambda: (ops.linear, (leaf(4, 7), leaf(5, 7), None, "silu", False, True)),
    "linear-no-grad": lambda: (ops.linear, (randn(4, 7), randn(5, 7), randn(5), None, True, False)),
    "linear_backward": lambda: (
        ops.linear_backward,
        (randn(2, 3, 5), randn(2, 3, 7), randn(5, 7), randn(2, 3, 5), "gelu", True, True, True, True),
    ),
    "layer_norm": lambda: (ops.norm, (leaf(2, 3, 9), leaf(9), leaf(9), 1e-5, True)),
    "rms_norm": lambda: (ops.norm, (leaf(5, 9), leaf(9), None, 1e-6, False)),
    "norm-no-affine": lambda: (ops.norm, (leaf(5, 9), None, None, 1e-5, True)),
    "norm_backward": lambda: (
        ops.norm_backward,
        (randn(2, 3, 9), *norm_outputs(True)[:2], *norm_outputs(True)[2:], True, False, torch.float32),
    ),
    "softmax": lambda: (ops.softmax, (leaf(3, 11), False)),
    "softmax-causal": lambda: (ops.softmax, (leaf(2, 5, 5), True)),
    "softmax_backward": lambda: (ops.softmax_backward, (torch.softmax(randn(2, 5, 5), -1), randn(2, 5, 5), True)),
    "dropout": lambda: (ops.dropout, (leaf(3, 33), 0.3, torch.tensor(1234))),
    "cross_entropy-mean": lambda: (
        ops.cross_entropy,
        (leaf(2, 3, 10), targets((2, 3), 10), -100, "mean", 0.1, 1, True),
    ),
    "cross_entropy-none": lambda: (ops.cross_entropy, (leaf(5, 10), targets((5,), 10), -100, "none", 0.0, 2, True)),
    "cross_entropy-no-grad": lambda: (ops.cross_entropy, (randn(5, 10), targets((5,), 10), -100, "sum", 0.0, 1, False)),
    "scale_rows_": lambda: (
        ops.scale_rows_,
        (randn(4, 10), randn(4), torch.tensor([1, -100, 3, 0], device=DEVICE), -100),
    ),
    "attention": lambda: (ops.attention, (leaf(1, 2, 5, 8), leaf(1, 1, 5, 8), leaf(1, 1, 5, 8), True, 0.3, 0.0, None)),
    "attention-dropout": lambda: (
        ops.attention,
        (leaf(1, 2, 5, 8), leaf(1, 1, 5, 8), leaf(1, 1, 5, 8), False, 0.3, 0.25, torch.tensor(7)),
    ),
    "attention_backward": lambda: (
        ops.attention_backward,
        (randn(1, 2, 5, 8), *attention_saved(), True, 0.3, True, True, 0.0, None),
    ),
    "attention_backward-dropout": lambda: (
        ops.attention_backward,
        (randn(1, 2, 5, 8), *attention_saved(0.25, torch.tensor(7)), True, 0.3, True, True, 0.25, torch.tensor(7)),
    ),
    "rope": lambda: (ops.rope, (leaf(1, 2, 5, 8), leaf(1, 1, 5, 8), *tables(7, 8), 1, False)),
    "rope-inverse-k-only": lambda: (ops.rope, (None, randn(1, 1, 5, 8), *tables(7, 8), 2, True)),
    "rope_-q-only": lambda: (ops.rope_, (randn(1, 2, 5, 8), None, *tables(7, 8), 0, True)),
    "rope_": lambda: (ops.rope_, (randn(1, 2, 5, 8), randn(1, 1, 8, 5).transpose(2, 3), *tables(7, 8), 1, False)),
    "gated": lambda: (ops.gated, (leaf(2, 3, 10), "silu", False)),
    "gated-in-place": lambda: (ops.gated, (leaf(4, 10) * 1, "gelu", True)),
    "gated_backward": lambda: (ops.gated_backward, (randn(4, 5), randn(4, 10), "gelu")),
    "gated_backward_into_x_": lambda: (ops.gated_backward_into_x_, (randn(4, 5), randn(4, 10), "silu")),
    "linear_cross_entropy-mean": lambda: (
        ops.linear_cross_entropy,
        (leaf(2, 3, 8), leaf(10, 8), leaf(10), targets((2, 3), 10), -100, "mean", 0.1, 4, True, True, True, True),
    ),
    "linear_cross_entropy-none": lambda: (
        ops.linear_cross_entropy,
        (leaf(5, 8), leaf(10, 8), None, targets((5,), 10), -100, "none", 0.0, 2, False, True, True, False),
    ),
    "add_dropout_norm": lambda: (
        ops.add_dropout_norm,
        (leaf(2, 3, 9), leaf(2, 3, 9), leaf(9), leaf(9), 1e-5, True, 0.2, torch.tensor(5)),
    ),
    "add_dropout_norm-narrow-y": lambda: (ops.add_dropout_norm, mixed_residual_args(torch.float16)),
    "add_dropout_norm-branch-bias": lambda: (ops.add_dropout_norm, mixed_residual_args(None, leaf(9))),
    "add_dropout_norm-rms-mixed": lambda: (
        ops.add_dropout_norm,
        (leaf(5, 9), leaf(5, 9, dtype=torch.float16), leaf(9), None, 1e-6, False, 0.0, torch.tensor(0)),
    ),
    "add_dropout_norm_backward": lambda: (ops.add_dropout_norm_backward, residual_backward_args(randn(2, 3, 9), True)),
    "add_dropout_norm_backward-s-only": lambda: (ops.add_dropout_norm_backward, residual_backward_args(None, False)),
    "add_dropout_norm_backward-branch-bias": lambda: (
        ops.add_dropout_norm_backward,
        residual_backward_args(randn(2, 3, 9), True, torch.float16, torch.float32, True),
    ),
    "linear_cross_entropy_backward": lambda: (
        ops.linear_cross_entropy_backward,
        (randn(5), randn(5, 8), randn(10, 8), randn(10), targets((5,), 10), -100, 0.0, 2, True, True, True, True),
    ),
}


def test_every_op_is_checked():
    """Every op in the triformer namespace has an opcheck case here."""
    checked = {case()[0]._qualified_op_name.split("::")[1] for case in OPCHECK_CASES.values()}
    registered = set(OPS)
    assert registered == checked, f"ops without an opcheck case: {registered - checked}"


# These ops return the gradient they compute in the forward (their second output) for their backward to scale in
# place. opcheck's AOT test makes every output a user output, and AOT autograd cannot scale in the backward a tensor
# the forward already handed out; the functional API never hands it out (it returns the loss alone), and its AOT path
# is checked by compiling it (test_compiled_losses_match_eager).
GRADIENT_IN_FORWARD = {"cross_entropy-mean", "cross_entropy-none", "linear_cross_entropy-mean"}


@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck(case, seed):
    op, args = OPCHECK_CASES[case]()
    checks = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if case in GRADIENT_IN_FORWARD:
        checks = checks[:-1]
    torch.library.opcheck(op, args, test_utils=checks)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_losses_match_eager(backend, seed):
    """Both losses through AOT autograd (functionalization of the in-place scaling of the gradient they computed in
    the forward; Inductor's re-inplacing), every reduction, an incoming gradient other than 1: the gradients of
    eager mode."""
    x, w, h = leaf(6, 10), leaf(10, 8), leaf(6, 8)
    t = targets((6,), 10)

    def losses(x, w, h):
        return (
            TF.cross_entropy(x * 1.5, t, label_smoothing=0.1) * 3.0
            + (TF.cross_entropy(x, t, reduction="none") * torch.arange(6, device=DEVICE)).sum()
            + TF.linear_cross_entropy(h, w, t, reduction="sum") * 2.0
            + TF.linear_cross_entropy(h, w, t, reduction="none").sum()
            - TF.linear_cross_entropy(h, w, t)
        )

    torch._dynamo.reset()
    expected = torch.autograd.grad(losses(x, w, h), (x, w, h))
    got = torch.autograd.grad(torch.compile(losses, fullgraph=True, backend=backend)(x, w, h), (x, w, h))
    for name, a, b in zip("xwh", got, expected):
        assert_close(a, b, torch.float32, f"grad of {name}")


# ------------------------------------------------------------------------------------ eager fast path


def run_both(fn, *leaves):
    """fn() and the gradients of its outputs' weighted sum w.r.t. leaves, on the eager fast path and through the
    dispatcher (torch.ops.triformer)."""
    results = []
    for context in (contextlib.nullcontext(), through_dispatcher()):
        with context:
            torch.manual_seed(0)
            out = fn()
            outs = out if isinstance(out, tuple) else (out,)
            loss = sum(
                (o.float() * torch.linspace(-1, 1, o.numel(), device=o.device).view(o.shape)).sum() for o in outs
            )
            results.append((outs, torch.autograd.grad(loss, leaves)))
    return results


EAGER_CASES = {
    "linear": lambda x: TF.linear(x, *(leaf(6, 9), leaf(6)), activation="silu"),
    "layer_norm": lambda x: TF.layer_norm(x, 9, leaf(9), leaf(9)),
    "softmax": lambda x: TF.softmax(x, causal=False),
    "dropout": lambda x: TF.dropout(x, 0.25, 7),
    "add_dropout_norm": lambda x: TF.add_dropout_norm(x, x * 0.5, 0.25, leaf(9), leaf(9), seed=7),
    "cross_entropy": lambda x: TF.cross_entropy(x, targets((3, 4), 9), label_smoothing=0.1),
    "gated-in-place": lambda x: TF.swiglu(x * 1.5, inplace_grad=None),
}


@pytest.mark.parametrize("case", EAGER_CASES)
def test_eager_fast_path_matches_the_dispatcher(case, seed):
    """Eager calls skip the dispatcher through a Function made from the op's own implementation, setup_context and
    backward: bit for bit the same outputs and gradients as torch.ops.triformer."""
    x = leaf(3, 4, 9) if case != "gated-in-place" else leaf(3, 4, 10)
    (outs, grads), (outs_d, grads_d) = run_both(lambda: EAGER_CASES[case](x), x)
    for a, b in zip(outs + grads, outs_d + grads_d):
        assert torch.equal(a, b)


def test_fast_path_avoids_the_dispatcher():
    """A plain eager call reaches the implementation without a dispatcher hop (no TorchDispatchMode sees it), a
    call under a dispatch mode goes through torch.ops.triformer."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    x = randn(4, 9)
    expected = TF.softmax(x)
    with Record():
        assert torch.equal(TF.softmax(x), expected)
    assert "triformer.softmax.default" in seen


def test_a_dispatcher_call_without_gradient_goes_straight_to_the_implementation(monkeypatch):
    """A call through torch.ops.triformer in plain eager mode that wants no gradient (what a compiled graph's code
    makes) runs the implementation from the autograd key, without descending to the backend key; one that wants a
    gradient runs the op's Function, whose backward gives the fast path's gradients."""
    op = OPS["softmax"]
    impl, direct = op.impl, []

    def counted(*args):
        direct.append(1)
        return impl(*args)

    monkeypatch.setattr(op, "impl", counted)
    x = leaf(4, 9)
    with torch.no_grad():
        y = op.overload(x, False)
    assert direct and torch.equal(y, TF.softmax(x.detach()))
    with through_dispatcher():
        (g,) = torch.autograd.grad(TF.softmax(x).square().sum(), x)
    (expected,) = torch.autograd.grad(TF.softmax(x).square().sum(), x)
    assert torch.equal(g, expected)


def test_a_mutating_op_bumps_the_version_on_every_path():
    """scale_rows_ writes into g: eager, through the dispatcher, under no_grad and through a view, g's version (its
    base's for a view) moves as an in-place torch op's would, so autograd catches a write into a saved tensor."""
    g, scale = randn(4, 8), torch.tensor(2.0, device=DEVICE)
    for call in (OPS["scale_rows_"], torch.ops.triformer.scale_rows_):
        for context in (contextlib.nullcontext(), torch.no_grad()):
            before = g._version
            with context:
                call(g, scale, None, -100)
            assert g._version == before + 1
    base = randn(4, 8)
    torch.ops.triformer.scale_rows_(base[1:], scale, None, -100)
    assert base._version == 1
    with through_dispatcher(), pytest.raises(RuntimeError, match="modified by an inplace operation"):
        x, c = leaf(4, 8) * 1.0, leaf(4, 8)
        y = x * c  # saves x for c's gradient
        h = TF.swiglu(x, inplace_grad=True)  # its backward writes into x
        (h.sum() + y.sum()).backward()


def test_ops_without_a_gradient_formula_say_so():
    """A backward op differentiated (double backward) raises, naming the op; so does a write into a tensor that
    requires a gradient."""
    x = leaf(3, 5)
    (g,) = torch.autograd.grad(TF.softmax(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="softmax_backward has no gradient formula"):
        g.sum().backward()
    with pytest.raises(RuntimeError, match="scale_rows_ writes into its argument 0"):
        OPS["scale_rows_"](leaf(4, 8), torch.tensor(2.0, device=DEVICE), None, -100)


def test_meta_tensors_take_the_fake_implementation():
    """Through the dispatcher a meta tensor gets the fake implementation's output (the autograd key never runs the
    implementation on it); every op is tagged PT2-compliant."""
    y = torch.ops.triformer.softmax(torch.empty(3, 5, device="meta"), False)
    assert y.device.type == "meta" and y.shape == (3, 5)
    for name in OPS:
        assert torch.Tag.pt2_compliant_tag in getattr(torch.ops.triformer, name).default.tags, name


# ------------------------------------------------------------------------------------ the target check


def test_target_check_reports_landed_checks_only():
    """A check whose copy has not landed (-1) holds back the ones after it; once it lands a later call raises for
    the first target out of range, and the queue is then empty."""
    landed_good = torch.tensor([0, 0]).numpy()
    pending = torch.tensor([-1, 0]).numpy()
    _targets._pending.extend([(landed_good, 10, -100, torch.device("cpu")), (pending, 10, -100, torch.device("cpu"))])
    try:
        _targets.poll()  # the first passes; the second has not landed
        assert len(_targets._pending) == 1
        pending[:] = (2, 12)  # lands: two targets out of range, the first 12
        with pytest.raises(ValueError, match=r"\[0, 10\) or equal ignore_index=-100; found 12"):
            _targets.poll()
        assert not _targets._pending
    finally:
        _targets._pending.clear()


def test_bad_targets_give_nan_never_a_wrong_loss(seed, monkeypatch):
    """Where the error is not raised at the call (a GPU, a CUDA graph), the loss the call returns is NaN."""
    monkeypatch.setattr(_targets, "note", lambda counts, v, ignore_index: None)  # as under capture: nothing read
    bad = torch.tensor([1, 10, 2, -100], device=DEVICE)
    assert torch.isnan(TF.cross_entropy(randn(4, 10), bad))
    assert torch.isnan(TF.linear_cross_entropy(randn(4, 8), randn(10, 8), bad))


def test_dropout_seed_read_from_device_memory(seed):
    """A seed given as a tensor is read by the kernel (no host sync): the same mask as the same int seed."""
    x = randn(5, 300)
    assert torch.equal(
        dropout_kernels.dropout(x, 0.4, torch.tensor([seed % 2**31], device=DEVICE)),
        dropout_kernels.dropout(x, 0.4, seed % 2**31),
    )


# ------------------------------------------------------------------------------------ torch.compile

TINY_GPT = dict(vocab_size=37, block_size=9, n_layer=2, n_head=2, n_embd=32)
LLAMA_GPT = dict(norm="rmsnorm", mlp="swiglu", rope=True, n_head=4, n_kv_head=2, n_embd=64, bias=False, fused_head=True)
TINY_VIT = dict(image_size=12, patch_size=4, channels=3, num_classes=5, n_layer=2, n_head=2, n_embd=32, mlp_ratio=2.0)


def gpt_inputs(config):
    idx = torch.randint(0, config.vocab_size, (2, config.block_size), device=DEVICE)
    return idx, torch.randint(0, config.vocab_size, (2, config.block_size), device=DEVICE)


MODELS = {
    "mlp": lambda: (TritonMLP(20, 5, hidden_size=16, activation="gelu"), lambda: (randn(7, 20),)),
    "gpt": lambda: (GPT(GPTConfig(**TINY_GPT)), lambda: gpt_inputs(GPTConfig(**TINY_GPT))),
    "gpt-llama": lambda: (
        GPT(GPTConfig(**{**TINY_GPT, **LLAMA_GPT})),
        lambda: gpt_inputs(GPTConfig(**{**TINY_GPT, **LLAMA_GPT})),
    ),
    "vit": lambda: (
        ViT(ViTConfig(**TINY_VIT)),
        lambda: (randn(3, 3, 12, 12), torch.randint(0, 5, (3,), device=DEVICE)),
    ),
}


def scalar_loss(out):
    """The loss of a model's output: its own (GPT, ViT), else a fixed weighting of the logits."""
    if isinstance(out, tuple):
        return out[1]
    return (out * torch.linspace(-1, 1, out.shape[-1], device=out.device)).sum()


@pytest.mark.parametrize("name", MODELS)
def test_models_compile_without_graph_breaks(name, seed):
    model, make_inputs = MODELS[name]()
    explanation = torch._dynamo.explain(model.to(DEVICE))(*make_inputs())
    assert explanation.graph_break_count == 0, [str(r.reason) for r in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_dropout_model_compiles_without_graph_breaks(seed):
    """Dropout draws its seed inside the graph (on the device under torch.compile): still one graph."""
    model = GPT(GPTConfig(**TINY_GPT, dropout=0.1)).to(DEVICE).train()
    explanation = torch._dynamo.explain(model)(*gpt_inputs(model.config))
    assert explanation.graph_break_count == 0, [str(r.reason) for r in explanation.break_reasons]


@pytest.mark.parametrize("name", MODELS)
def test_compiled_model_matches_eager(name, seed):
    """torch.compile(model, fullgraph=True) (it raises at any graph break): loss and every parameter's gradient as
    eager mode gives them."""
    model, make_inputs = MODELS[name]()
    model = model.to(DEVICE)
    inputs = make_inputs()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    results = []
    for run in (model, compiled):
        model.zero_grad(set_to_none=True)
        loss = scalar_loss(run(*inputs))
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss, grads), (loss_c, grads_c) = results
    assert_close(loss_c, loss, torch.float32, "loss")
    for n in grads:
        assert_close(grads_c[n], grads[n], torch.float32, f"grad of {n}")


# ------------------------------------------------------------------------------------ CUDA graphs (GPU)


def train_step(model, optimizer, inputs):
    optimizer.zero_grad(set_to_none=False)
    loss = scalar_loss(model(*inputs))
    loss.backward()
    optimizer.step()
    return loss.detach()


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("name", ["mlp", "gpt", "gpt-llama", "vit"])
def test_training_step_in_a_cuda_graph(name, seed):
    """A whole training step (forward, backward, AdamW) captured by torch.cuda.CUDAGraph replays the losses and
    weights of eager steps: no op waits for the host."""
    model, make_inputs = MODELS[name]()
    model = model.to(DEVICE)
    inputs = make_inputs()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, capturable=True)

    def restart():
        """The start weights and a fresh optimizer state (its tensors kept: the graph reads them)."""
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(start[n])
            for state in optimizer.state.values():
                for value in state.values():
                    value.zero_()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream: tuner picks, compiled kernels, optimizer state
        for _ in range(2):
            train_step(model, optimizer, inputs)
    torch.cuda.current_stream().wait_stream(side)
    restart()
    eager = [train_step(model, optimizer, inputs) for _ in range(3)]
    after_eager = {n: p.detach().clone() for n, p in model.named_parameters()}
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = train_step(model, optimizer, inputs)
    restart()
    replayed = []
    for _ in range(3):
        graph.replay()
        replayed.append(captured.clone())
    torch.cuda.synchronize()
    for a, b in zip(replayed, eager):
        assert_close(a, b, torch.float32, "loss replayed from the graph", tol=1e-4)
    for n, p in model.named_parameters():
        assert_close(p, after_eager[n], torch.float32, f"{n} after 3 replayed steps", tol=1e-4)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("name", ["mlp", "gpt"])
def test_reduce_overhead_mode_matches_eager(name, seed):
    """torch.compile(mode="reduce-overhead", fullgraph=True) (Inductor with CUDA graphs): forward and backward as
    eager mode gives them, replay after replay."""
    model, make_inputs = MODELS[name]()
    model = model.to(DEVICE)
    inputs = make_inputs()
    torch._dynamo.reset()
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    model.zero_grad(set_to_none=True)
    loss = scalar_loss(model(*inputs))
    loss.backward()
    expected = loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    for _ in range(4):  # warm-up runs, the capture, then replays
        model.zero_grad(set_to_none=True)
        loss = scalar_loss(compiled(*inputs))
        loss.backward()
        assert_close(loss.detach(), expected[0], torch.float32, "loss")
        for n, p in model.named_parameters():
            assert_close(p.grad, expected[1][n], torch.float32, f"grad of {n}")
