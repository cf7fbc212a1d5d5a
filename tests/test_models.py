"""GPT and ViT on triformer's kernels against their PyTorch twins (backend="torch", float64) with the same weights:
logits, loss and the gradient of every parameter; the same seed builds the same weights; generation; bad configs.

The whole model chains some thirty kernels, each within float32 rounding of float64: the outputs and gradients
agree to the harness's float32 tolerance (1e-5 relative) with room to spare on these sizes (measured ≤ 4e-7).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from harness import DEVICE, ON_GPU, assert_close, relative_error, tolerance

from triformer import GPT, GPTConfig, TritonDropout, TritonLinear, ViT, ViTConfig
from triformer.models import blocks
from triformer.models.blocks import PARTS, Block, can_fuse

TINY_GPT = dict(vocab_size=37, block_size=9, n_layer=2, n_head=2, n_embd=32)
GPT_VARIANTS = {
    "gpt2": dict(),  # LayerNorm with bias, learned positions, GELU MLP, logits + cross-entropy
    "fused-head": dict(fused_head=True, vocab_size=65),
    "llama": dict(
        norm="rmsnorm", mlp="swiglu", rope=True, n_head=4, n_kv_head=2, n_embd=64, bias=False, fused_head=True
    ),
    "geglu-mqa": dict(mlp="geglu", rope=True, n_head=4, n_kv_head=1, n_embd=64, bias=False, vocab_size=11),
}
TINY_VIT = dict(image_size=12, patch_size=4, channels=3, num_classes=5, n_layer=2, n_head=2, n_embd=32, mlp_ratio=2.0)


def gpt_config(variant="gpt2", **overrides) -> GPTConfig:
    return GPTConfig(**{**TINY_GPT, **GPT_VARIANTS[variant], **overrides})


def with_reference(model_cls, config):
    """The Triton model and its float64 torch twin carrying the same weights."""
    ours = model_cls(config).to(DEVICE)
    ref = model_cls(type(config)(**{**vars(config), "backend": "torch"})).to(DEVICE).double()
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def assert_same_parameter_grads(ours, ref, tol=None):
    for (name, p), (name_ref, p_ref) in zip(ours.named_parameters(), ref.named_parameters(), strict=True):
        assert name == name_ref
        assert p.grad is not None, f"no gradient reached {name}"
        assert_close(p.grad, p_ref.grad, torch.float32, f"grad of {name}", tol)


def assert_bf16_no_worse_than_twin(model_cls, config, inputs, targets):
    """Under bf16 autocast, the loss and every parameter's gradient of the triformer model are as close to the
    float64 twin as the torch twin's own bf16 run is (within 2x, plus 1e-3); all three start from the same weights."""
    ours, ref = with_reference(model_cls, config)
    twin = model_cls(type(config)(**{**vars(config), "backend": "torch"})).to(DEVICE)
    twin.load_state_dict(ours.state_dict())
    loss_ref = ref(inputs.double() if inputs.is_floating_point() else inputs, targets)[1]
    loss_ref.backward()
    errors = {}
    for name, model in (("ours", ours), ("twin", twin)):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = model(inputs, targets)[1]
        loss.backward()
        errors[name] = {"loss": relative_error(loss, loss_ref)}
        errors[name].update(
            {n: relative_error(p.grad, p_ref.grad) for (n, p), p_ref in zip(model.named_parameters(), ref.parameters())}
        )
    for key, ours_error in errors["ours"].items():
        assert ours_error <= 2 * errors["twin"][key] + 1e-3, (key, ours_error, errors["twin"][key])


def tokens(config, batch=2, length=None):
    return torch.randint(0, config.vocab_size, (batch, length or config.block_size), device=DEVICE)


# ------------------------------------------------------------------------------------------------------ GPT


@pytest.mark.parametrize("variant", GPT_VARIANTS)
def test_gpt_matches_torch_twin(variant, seed):
    config = gpt_config(variant)
    ours, ref = with_reference(GPT, config)
    idx, targets = tokens(config), tokens(config)
    targets[0, :2] = -100  # ignored positions
    logits, none = ours(idx)
    logits_ref, _ = ref(idx)
    assert none is None and logits.shape == (2, config.block_size, config.vocab_size)
    assert_close(logits, logits_ref, torch.float32, "logits")
    logits_with_loss, loss = ours(idx, targets)
    _, loss_ref = ref(idx, targets)
    assert loss.shape == () and loss.dtype == torch.float32
    assert_close(loss, loss_ref, torch.float32, "loss")
    loss.backward()
    loss_ref.backward()
    assert_same_parameter_grads(ours, ref)
    if config.fused_head:
        assert logits_with_loss is None, "the fused head makes no logits"
    else:
        assert_close(logits_with_loss, logits_ref, torch.float32, "logits returned with the loss, after backward")


def assert_same_loss_and_grads(ours, ref, config) -> None:
    """The model and its twin give the same loss on fresh tokens, and the same parameter gradients."""
    idx, targets = tokens(config), tokens(config)
    loss, loss_ref = ours(idx, targets)[1], ref(idx, targets)[1]
    assert_close(loss, loss_ref, torch.float32, "loss")
    loss.backward()
    loss_ref.backward()
    assert_same_parameter_grads(ours, ref)


@pytest.mark.parametrize("part", PARTS)
def test_gpt_with_one_part_on_torch_matches_twin(part, seed):
    """torch_parts puts that part (and only it) on PyTorch inside the triformer model: the same parameters and
    function."""
    config = gpt_config("llama", dropout=0.1 if part == "dropout" else 0.0, torch_parts=[part])
    ours, ref = with_reference(GPT, config)
    block = ours.blocks[0]
    on_torch = {
        "attention": type(block.attn).__name__ == "TorchMultiheadAttention"
        and type(ours.rotary).__name__ == "TorchRotaryEmbedding",
        "norm": type(block.ln_1) is type(ours.ln_f) is torch.nn.RMSNorm,
        "mlp": type(block.mlp).__name__ == "TorchGatedMLP",
        "head": type(ours.lm_head).__name__ == "TorchLinear"
        and type(ours.loss_fn).__name__ == "TorchLinearCrossEntropyLoss",
        "dropout": type(block.drop) is type(ours.drop) is torch.nn.Dropout,
    }
    assert [name for name, torch_part in on_torch.items() if torch_part] == [part]
    assert config.torch_parts == (part,)
    ours.eval()
    ref.eval()
    assert_same_loss_and_grads(ours, ref, config)
    with pytest.raises(ValueError, match=r"torch_parts \['attn'\] are not parts of the model"):
        GPTConfig(torch_parts=["attn"])


@pytest.mark.parametrize("part", ["attention", "mlp"])
def test_gpt_with_a_biased_branch_on_torch_matches_twin(part, seed):
    """A branch on PyTorch with biases (GPT-2's) inside the fused residual path: the torch branch runs without its
    output bias, which the residual op adds; the same function and gradients as the twin."""
    config = gpt_config("gpt2", torch_parts=[part])
    ours, ref = with_reference(GPT, config)
    assert config.bias and can_fuse(ours.blocks, ours.ln_f)
    assert_same_loss_and_grads(ours, ref, config)


def test_gpt_shorter_sequence_matches_twin(seed):
    """T below block_size: learned positions sliced, causal attention over T only."""
    config = gpt_config()
    ours, ref = with_reference(GPT, config)
    idx = tokens(config, batch=3, length=5)
    assert_close(ours(idx)[0], ref(idx)[0], torch.float32, "logits at T=5")


@pytest.mark.parametrize("variant", ["gpt2", "llama"])
def test_gpt_same_seed_same_weights_and_training_run(variant, seed):
    """A run and its twin built with the same seed start from identical weights and follow each other under AdamW."""
    config = gpt_config(variant)
    torch.manual_seed(seed)
    ours = GPT(config).to(DEVICE)
    torch.manual_seed(seed)
    twin = GPT(GPTConfig(**{**vars(config), "backend": "torch"})).to(DEVICE)
    state, twin_state = ours.state_dict(), twin.state_dict()
    assert list(state) == list(twin_state)
    assert all(torch.equal(state[k], twin_state[k]) for k in state)
    idx, targets = tokens(config), tokens(config)
    losses = {}
    for name, model in (("triton", ours), ("torch", twin)):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        losses[name] = []
        for _ in range(3):
            loss = model(idx, targets)[1]
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses[name].append(loss.item())
    assert losses["triton"][-1] < losses["triton"][0]
    for a, b in zip(losses["triton"], losses["torch"]):
        assert abs(a - b) < 1e-4 * abs(b), losses


def test_gpt_tied_embeddings(seed):
    model = GPT(gpt_config())
    assert model.lm_head.weight is model.wte.weight
    assert sum(p is model.wte.weight for p in model.parameters()) == 1
    with torch.no_grad():
        model.wte.weight[3] += 1.0
    assert torch.equal(model.lm_head.weight[3], model.wte.weight[3])


def test_gpt_initialisation():
    """GPT-2's: matrices N(0, 0.02²), residual projections N(0, (0.02/√(2·n_layer))²), biases 0, norms 1."""
    config = GPTConfig(vocab_size=512, block_size=64, n_layer=4, n_head=4, n_embd=128, backend="torch")
    model = GPT(config)
    residual = {f"blocks.{i}.{name}" for i in range(4) for name in ("attn.out_proj.weight", "mlp.proj.weight")}
    for name, p in model.named_parameters():
        if name in residual:
            assert abs(p.std().item() / (0.02 / math.sqrt(8)) - 1) < 0.05, name
        elif p.dim() == 2:
            assert abs(p.std().item() / 0.02 - 1) < 0.05 and abs(p.mean().item()) < 2e-3, name
        elif name.endswith("bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        else:
            assert torch.equal(p, torch.ones_like(p)), name


def test_gpt_rope_has_no_position_embedding():
    model = GPT(gpt_config("llama"))
    assert model.wpe is None and not any("wpe" in name for name, _ in model.named_parameters())
    assert all(block.attn.rotary is model.rotary for block in model.blocks)  # one table for every layer


def test_gpt_dropout_in_training_only(seed):
    config = gpt_config(dropout=0.3)
    ours, ref = with_reference(GPT, config)
    idx = tokens(config)
    first, second = ours(idx)[0], ours(idx)[0]
    assert not torch.allclose(first, second), "training mode: a fresh dropout mask each call"
    ours.eval()
    ref.eval()
    assert_close(ours(idx)[0], ref(idx)[0], torch.float32, "logits in eval mode (no dropout)")


def assert_fused_residual_trains_as_separate_ops(model_cls, config, inputs, seed, monkeypatch):
    """fused_residual (each residual add, its dropout and the next norm as one op) draws the same dropout seeds in
    the same order as the separate ops: the same loss and gradients, dropout on, in training; two fused ops a
    block."""
    import triformer.functional as F_tri

    calls = []
    fused_op = F_tri.add_dropout_norm
    monkeypatch.setattr(F_tri, "add_dropout_norm", lambda *a, **k: calls.append(1) or fused_op(*a, **k))
    fused = model_cls(config).to(DEVICE)
    separate = model_cls(type(config)(**{**vars(config), "fused_residual": False})).to(DEVICE)
    separate.load_state_dict(fused.state_dict())
    losses = []
    for model in (fused, separate):
        torch.manual_seed(seed)
        loss = model(*inputs)[1]
        loss.backward()
        losses.append(loss)
    assert len(calls) == 2 * config.n_layer  # none in the separate run
    assert_close(losses[0], losses[1], torch.float32, "loss")
    for (name, p), q in zip(fused.named_parameters(), separate.parameters()):
        assert_close(p.grad, q.grad, torch.float32, f"grad of {name}")


@pytest.mark.parametrize("variant", ["gpt2", "llama"])
def test_gpt_fused_residual_trains_as_the_separate_ops(variant, seed, monkeypatch):
    config = gpt_config(variant, dropout=0.2)
    inputs = tokens(config), tokens(config)
    assert_fused_residual_trains_as_separate_ops(GPT, config, inputs, seed, monkeypatch)


def test_vit_fused_residual_trains_as_the_separate_ops(seed, monkeypatch):
    config = ViTConfig(**TINY_VIT, dropout=0.2)
    inputs = torch.randn(3, 3, 12, 12, device=DEVICE), torch.randint(0, 5, (3,), device=DEVICE)
    assert_fused_residual_trains_as_separate_ops(ViT, config, inputs, seed, monkeypatch)


def fused_and_separate(config):
    """A GPT on the fused residual path and one on the separate ops with the same weights."""
    fused = GPT(config).to(DEVICE)
    separate = GPT(GPTConfig(**{**vars(config), "fused_residual": False})).to(DEVICE)
    separate.load_state_dict(fused.state_dict())
    return fused, separate


def assert_same_training_loss(models, idx, seed):
    """The same loss from each model in training mode, each drawing its dropout seeds from the same RNG state."""
    losses = []
    for model in models:
        torch.manual_seed(seed)
        losses.append(model(idx, idx)[1])
    assert_close(losses[0], losses[1], torch.float32, "loss")
    return losses


@pytest.mark.parametrize(
    "config",
    [
        *(pytest.param(gpt_config(v), id=v) for v in GPT_VARIANTS),
        *(pytest.param(gpt_config(torch_parts=[part]), id=f"{part} on torch") for part in ("attention", "mlp", "head")),
        pytest.param(gpt_config(dropout=0.1), id="dropout"),
        pytest.param(ViTConfig(**TINY_VIT), id="vit"),
    ],
)
def test_fused_residual_path_is_taken(config):
    """The default configs, their branches on torch and the no-dropout nn.Identity all take the fused path."""
    model = (GPT if isinstance(config, GPTConfig) else ViT)(config)
    assert can_fuse(model.blocks, model.ln_f)


def test_fused_residual_reads_the_dropout_modules_rate(seed):
    """A dropout rate changed on the modules after construction (a schedule, say) holds on the fused path too."""
    fused, separate = fused_and_separate(gpt_config(dropout=0.2))
    for model in (fused, separate):
        for module in model.modules():
            if isinstance(module, TritonDropout):
                module.p = 0.6
    assert can_fuse(fused.blocks, fused.ln_f)
    idx = tokens(fused.config)
    losses = assert_same_training_loss((fused, separate), idx, seed)
    for module in separate.modules():
        if isinstance(module, TritonDropout):
            module.p = 0.2
    torch.manual_seed(seed)
    assert relative_error(separate(idx, idx)[1], losses[1]) > 1e-3  # the rate matters at this size


def test_fused_residual_draws_as_many_seeds_at_rate_zero(seed):
    """Dropout annealed to 0 on the modules: the fused and the separate path draw the same seeds from torch's
    generator (none), so whatever is drawn next is the same."""
    fused, separate = fused_and_separate(gpt_config(dropout=0.2))
    drawn = []
    for model in (fused, separate):
        for module in model.modules():
            if isinstance(module, TritonDropout):
                module.p = 0.0
        torch.manual_seed(seed)
        model(tokens(model.config))
        drawn.append(torch.randint(0, 2**31 - 1, ()).item())
    assert drawn[0] == drawn[1]


HOOKED_MODULES = {
    "block": lambda m: m.blocks[1],
    "ln_2": lambda m: m.blocks[0].ln_2,
    "next ln_1": lambda m: m.blocks[1].ln_1,
    "attn": lambda m: m.blocks[0].attn,
    "out_proj": lambda m: m.blocks[0].attn.out_proj,
    "mlp": lambda m: m.blocks[1].mlp,
    "mlp proj": lambda m: m.blocks[1].mlp.proj,
    "dropout": lambda m: m.blocks[0].drop,
    "ln_f": lambda m: m.ln_f,
}


@pytest.mark.parametrize("where", HOOKED_MODULES)
def test_fused_residual_runs_forward_hooks(where, seed):
    """A forward hook on a module whose work the fused path does itself (it applies norms and dropout through their
    parameters and calls the branches' parts): the model runs block by block instead, so the hook runs and what it
    changes shows."""
    fused, separate = fused_and_separate(gpt_config(dropout=0.1))
    calls = {fused: 0, separate: 0}
    for model in (fused, separate):

        def double(module, args, output, model=model):
            calls[model] += 1
            return output * 2

        HOOKED_MODULES[where](model).register_forward_hook(double)
    assert not fused.blocks[0].fusable or not fused.blocks[1].fusable or where == "ln_f"
    assert_same_training_loss((fused, separate), tokens(fused.config), seed)
    assert calls[fused] == calls[separate] > 0


def test_fused_residual_runs_global_hooks(seed):
    """A hook registered for every module runs on every module of the fused model, as on the separate one."""
    fused, separate = fused_and_separate(gpt_config())
    idx = tokens(fused.config)
    for model in (fused, separate):
        called = set()
        handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: called.add(m))
        try:
            model(idx)
        finally:
            handle.remove()
        assert called == {m for m in model.modules() if not isinstance(m, torch.nn.ModuleList)} - {model.loss_fn}


def test_fused_residual_with_a_replaced_output_linear(seed):
    """An output projection replaced by a subclass that computes something else (a LoRA-style wrapper): the fused
    path, which would read only its weight, is not taken."""

    class Scaled(TritonLinear):
        def forward(self, x):
            return super().forward(x) * 3

    fused, separate = fused_and_separate(gpt_config())
    for model in (fused, separate):
        old = model.blocks[0].attn.out_proj
        model.blocks[0].attn.out_proj = Scaled(old.in_features, old.out_features, bias=True).to(DEVICE)
        model.blocks[0].attn.out_proj.load_state_dict(old.state_dict())
    assert not fused.blocks[0].fusable
    assert_same_training_loss((fused, separate), tokens(fused.config), seed)


class ScaledBlock(Block):
    """A block whose forward differs from Block's (layer scale on the output)."""

    def forward(self, x):
        return 0.5 * super().forward(x)


def scaled_forward(model):
    """A per-instance forward on one attention module."""
    attn = model.blocks[0].attn
    attn.forward = lambda x, original=attn.forward: 2 * original(x)


def swapped_block(model):
    """Block 1 replaced by a subclass with its own forward (same weights)."""
    old = model.blocks[1]
    model.blocks[1] = ScaledBlock(32, 2, causal=True, dropout=0.1).to(DEVICE)
    model.blocks[1].load_state_dict(old.state_dict())


def pruned_block(model):
    model.blocks[1] = torch.nn.Identity()


def activated_output(model):
    """The MLP's output projection replaced by one with an activation (same weights)."""
    old = model.blocks[0].mlp.proj
    model.blocks[0].mlp.proj = TritonLinear(old.in_features, old.out_features, activation="relu").to(DEVICE)
    model.blocks[0].mlp.proj.load_state_dict(old.state_dict())


@pytest.mark.parametrize("change", [swapped_block, pruned_block, scaled_forward, activated_output])
def test_fused_residual_steps_aside_for_changed_blocks(change, seed):
    """A block of another class, a pruned block, a forward set on an instance, an output linear with an activation:
    the model runs block by block, so it computes what its modules' forwards say."""
    fused, separate = fused_and_separate(gpt_config(dropout=0.1))
    for model in (fused, separate):
        change(model)
    assert not can_fuse(fused.blocks, fused.ln_f)
    assert_same_training_loss((fused, separate), tokens(fused.config), seed)


def test_generate_shape_range_and_context_crop(seed):
    config = gpt_config(dropout=0.1)
    model = GPT(config).to(DEVICE)
    prompt = tokens(config, batch=2, length=3)
    out = model.generate(prompt, max_new_tokens=8)  # 11 tokens > block_size 9: the context is cropped
    assert out.shape == (2, 11) and out.dtype == torch.int64
    assert torch.equal(out[:, :3], prompt)
    assert ((out >= 0) & (out < config.vocab_size)).all()
    assert model.training, "generate restores the training mode it found"


def test_generate_respects_top_k(seed):
    config = gpt_config()
    model = GPT(config).to(DEVICE).eval()
    prompt = tokens(config, batch=3, length=2)
    greedy = model.generate(prompt, max_new_tokens=3, top_k=1)
    sampled = model.generate(prompt, max_new_tokens=3, top_k=3, temperature=2.0)
    for out, k in ((greedy, 1), (sampled, 3)):
        for t in range(2, 5):
            with torch.no_grad():
                logits = model(out[:, :t])[0][:, -1]  # (B, V)
            top = logits.topk(k).indices
            assert (top == out[:, t : t + 1]).any(dim=1).all(), f"token {t} outside the top {k}"


def test_gpt_bad_configs():
    with pytest.raises(ValueError, match="n_embd=30 is not divisible by n_head=4"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="num_heads=4 is not a multiple of num_kv_heads=3"):
        GPT(gpt_config(n_head=4, n_kv_head=3, n_embd=64))
    with pytest.raises(ValueError, match=r"norm='batchnorm' is not one of \('layernorm', 'rmsnorm'\)"):
        GPTConfig(norm="batchnorm")
    with pytest.raises(ValueError, match="mlp='relu' is not one of"):
        GPTConfig(mlp="relu")
    with pytest.raises(ValueError, match="backend='jax' is not one of"):
        GPTConfig(backend="jax")
    with pytest.raises(ValueError, match="GPTConfig.vocab_size must be a positive int"):
        GPTConfig(vocab_size=0)
    with pytest.raises(ValueError, match="rope needs an even head dim"):
        GPTConfig(n_embd=18, n_head=2, rope=True, torch_parts=["attention"])
    with pytest.raises(ValueError, match="head dim n_embd / n_head = 12 is not supported"):
        GPTConfig(n_embd=48, n_head=4)
    GPTConfig(n_embd=48, n_head=4, torch_parts=["attention"])  # torch's attention takes it
    GPT(gpt_config(dropout=np.float32(0.1)))  # a numpy rate is a number
    with pytest.raises(ValueError, match="idx must be a prompt"):
        GPT(gpt_config()).generate(torch.zeros(2, 0, dtype=torch.long, device=DEVICE), 3)
    with pytest.raises(ValueError, match=r"dropout must be a number in \[0, 1\)"):
        GPT(gpt_config(dropout=1.0))
    model = GPT(gpt_config(backend="torch"))
    with pytest.raises(ValueError, match="sequence of length 10 is longer than block_size=9"):
        model(torch.zeros(1, 10, dtype=torch.int64))
    with pytest.raises(ValueError, match="targets must have the shape of idx"):
        model(torch.zeros(2, 5, dtype=torch.int64), torch.zeros(2, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        model.generate(torch.zeros(1, 2, dtype=torch.int64), 1, temperature=0.0)
    with pytest.raises(ValueError, match="top_k must be a positive int"):
        model.generate(torch.zeros(1, 2, dtype=torch.int64), 1, top_k=0)
    with pytest.raises(ValueError, match=r"attention dropout must be a number in \[0, 1\), got 1.0"):
        GPT(gpt_config(attn_dropout=1.0))
    with pytest.raises(ValueError, match="max_new_tokens must be a non-negative int, got -1"):
        model.generate(torch.zeros(1, 2, dtype=torch.int64), -1)
    with pytest.raises(ValueError, match="GPTConfig.mlp_hidden must be a positive int, got 0"):
        GPTConfig(mlp_hidden=0)
    with pytest.raises(TypeError, match="torch_parts must be a list or tuple of part names"):
        GPTConfig(torch_parts="attention")


def test_attention_dropout_reaches_every_attention(seed):
    """attn_dropout: every block's attention drops probabilities while training (a finite loss whose gradient
    reaches every parameter), none in eval mode, where the GPT equals its twin; the ViT takes it too."""
    config = gpt_config(attn_dropout=0.2)
    ours, ref = with_reference(GPT, config)
    assert all(block.attn.dropout == 0.2 for model in (ours, ref) for block in model.blocks)
    idx, targets = tokens(config), tokens(config)
    _, loss = ours(idx, targets)
    loss.backward()
    assert loss.isfinite() and all(p.grad is not None for p in ours.parameters())
    ours.eval(), ref.eval()
    assert_close(ours(idx)[0], ref(idx)[0], torch.float32, "eval logits")
    assert all(block.attn.dropout == 0.1 for block in ViT(ViTConfig(n_layer=2, attn_dropout=0.1)).blocks)


@pytest.mark.parametrize("variant", ["gpt2", "llama"])
def test_gpt_under_autocast_matches_twin(variant, seed):
    """bf16 autocast on the GPU (fp16 on the CPU: the interpreter has no bf16): the loss matches the twin under the
    same autocast, and the gradients reach the float32 parameters."""
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    config = gpt_config(variant)
    ours, ref = with_reference(GPT, config)
    ref.float()
    idx, targets = tokens(config), tokens(config)
    with torch.autocast(DEVICE, dtype=dtype):
        loss, loss_ref = ours(idx, targets)[1], ref(idx, targets)[1]
    assert_close(loss, loss_ref, dtype, "loss under autocast", tol=10 * tolerance(dtype))
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in ours.parameters())


@pytest.mark.parametrize("variant", ["gpt2", "llama"])
def test_norms_into_linears_come_in_the_autocast_dtype_with_the_same_results(variant, monkeypatch, seed):
    """Under autocast the blocks' norms whose output only feeds linears make it in the autocast dtype: the loss and
    every gradient equal those of the float32 outputs that the linears cast (bf16 on the GPU, fp16 on the CPU)."""
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    config = gpt_config(variant)
    model = GPT(config).to(DEVICE)
    idx, targets = tokens(config), tokens(config)
    made = []
    real = blocks.F_tri.add_dropout_norm

    def results(wide: bool):
        def spying(*args, y_dtype, **kwargs):  # wide: the float32 output, cast by the linears
            made.append(y_dtype)
            return real(*args, y_dtype=None if wide else y_dtype, **kwargs)

        model.zero_grad(set_to_none=True)
        with monkeypatch.context() as patch:
            patch.setattr(blocks.F_tri, "add_dropout_norm", spying)
            with torch.autocast(DEVICE, dtype=dtype):
                loss = model(idx, targets)[1]
        loss.backward()
        return loss.detach(), {name: p.grad for name, p in model.named_parameters()}

    (loss, grads), (loss_wide, grads_wide) = results(wide=False), results(wide=True)
    assert made == [dtype] * (4 * config.n_layer)
    assert torch.equal(loss, loss_wide)
    for name, grad in grads.items():
        assert torch.equal(grad, grads_wide[name]), name


@pytest.mark.skipif(not ON_GPU, reason="bf16 and the character GPT's size need a GPU (the interpreter has no bf16)")
@pytest.mark.parametrize("variant", ["gpt2", "llama"])
def test_gpt_char_size_bf16_no_worse_than_twin(variant, seed):
    """The character GPT (6 layers, 6 heads, 384 wide, T 256) under bf16 autocast: the loss and every parameter's
    gradient are as close to the float64 twin as the torch twin's own bf16 run is (within 2x, plus 1e-3)."""
    config = gpt_config(
        variant,
        vocab_size=65,
        block_size=256,
        n_layer=6,
        n_head=6,
        n_embd=384,
        n_kv_head=2 if variant == "llama" else None,
    )
    idx, targets = tokens(config, batch=8), tokens(config, batch=8)
    assert_bf16_no_worse_than_twin(GPT, config, idx, targets)


# ------------------------------------------------------------------------------------------------------ ViT


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_vit_matches_torch_twin(pool, seed):
    config = ViTConfig(**TINY_VIT, pool=pool)
    ours, ref = with_reference(ViT, config)
    images = torch.randn(3, 3, 12, 12, device=DEVICE)
    labels = torch.randint(0, 5, (3,), device=DEVICE)
    logits, loss = ours(images, labels)
    logits_ref, loss_ref = ref(images.double(), labels)
    assert logits.shape == (3, 5)
    assert_close(logits, logits_ref, torch.float32, "logits")
    assert_close(loss, loss_ref, torch.float32, "loss")
    kept = logits.detach().clone()
    loss.backward()
    loss_ref.backward()
    assert torch.equal(logits.detach(), kept), "the logits returned with the loss stay logits after backward"
    assert_same_parameter_grads(ours, ref)
    assert (ours.cls_token is None) == (pool == "mean")
    assert ours.pos_embed.shape == (1, 9 + (pool == "cls"), 32)


@pytest.mark.skipif(not ON_GPU, reason="bf16 and the ViT's training size need a GPU (the interpreter has no bf16)")
@pytest.mark.parametrize("fused_residual", [False, True])
def test_vit_training_size_bf16_no_worse_than_twin(fused_residual, seed):
    """train_vit's GPU model (28×28 FashionMNIST-shaped images, patch 4, 6 layers, 4 heads, 128 wide, MLP ratio 2)
    under bf16 autocast: the loss and every parameter's gradient are as close to the float64 twin as the torch twin's
    own bf16 run is (within 2x, plus 1e-3)."""
    config = ViTConfig(n_layer=6, n_head=4, n_embd=128, mlp_ratio=2.0, fused_residual=fused_residual)
    images = torch.randn(64, 1, 28, 28, device=DEVICE)
    labels = torch.randint(0, 10, (64,), device=DEVICE)
    assert_bf16_no_worse_than_twin(ViT, config, images, labels)


def test_vit_patches_are_a_strided_convolution(seed):
    """The patch embedding over flattened patches equals a Conv2d with kernel = stride = patch and the same weight."""
    model = ViT(ViTConfig(**TINY_VIT, backend="torch"))
    images = torch.randn(2, 3, 12, 12)
    embedded = model.patch_embed(model.patchify(images))  # (B, N, C)
    weight = model.patch_embed.weight.view(32, 3, 4, 4)
    conv = torch.nn.functional.conv2d(images, weight, model.patch_embed.bias, stride=4)  # (B, C, 3, 3)
    assert_close(embedded, conv.flatten(2).transpose(1, 2), torch.float32, "patch embedding")


def test_gpt_and_vit_share_the_block():
    gpt, vit = GPT(gpt_config(backend="torch")), ViT(ViTConfig(**TINY_VIT, backend="torch"))
    assert type(gpt.blocks[0]) is type(vit.blocks[0]) is Block
    assert gpt.blocks[0].attn.causal and not vit.blocks[0].attn.causal


def test_vit_bad_configs_and_inputs():
    with pytest.raises(ValueError, match="image_size=28 is not divisible by patch_size=5"):
        ViTConfig(patch_size=5)
    with pytest.raises(ValueError, match="pool='max' is not one of"):
        ViTConfig(pool="max")
    with pytest.raises(ValueError, match="mlp_ratio must be > 0"):
        ViTConfig(mlp_ratio=0)
    with pytest.raises(ValueError, match="n_embd=64 is not divisible by n_head=3"):
        ViTConfig(n_embd=64, n_head=3)
    with pytest.raises(ValueError, match="head dim n_embd / n_head = 4 is not supported"):
        ViTConfig(n_embd=16, n_head=4)
    model = ViT(ViTConfig(**TINY_VIT, backend="torch"))
    with pytest.raises(ValueError, match=r"images must be \(B, 3, 12, 12\), got shape \(2, 1, 12, 12\)"):
        model(torch.randn(2, 1, 12, 12))


def test_gpt_bench_suite_rows(seed):
    """The bench suite's training step runs both backends from the same weights and reports a rate per row."""
    from triformer.bench import gpt as gpt_bench

    tiny = dict(name="tiny", n_layer=2, n_head=2, n_embd=32, block_size=8, batch_size=2, vocab_size=65)
    rows = gpt_bench.run(
        [tiny], providers=("triformer", "torch"), steps=1, warmup=0, device=DEVICE, dtype=torch.float32, progress=False
    )
    assert [row["provider"] for row in rows] == ["triformer", "torch"]
    for row in rows:
        assert row["error"] == "" and row["ms"] > 0 and row["tokens_per_s"] > 0 and row["rate"] > 0, row
        assert row["unit"] == "TFLOP/s" and row["shape"] == "tiny L2-H2-C32-T8-B2-V65"


GRAPHED_PROVIDERS = (
    "triformer (CUDA graph)",
    "torch (CUDA graph)",
    "triformer (reduce-overhead)",
    "torch (reduce-overhead)",
)
TINY_BENCH_GPT = dict(name="tiny", n_layer=2, n_head=2, n_embd=32, block_size=8, batch_size=2, vocab_size=65)


@pytest.mark.skipif(ON_GPU, reason="the CPU's answer: CUDA graphs need CUDA")
def test_gpt_bench_graphed_providers_say_they_need_cuda():
    """On the CPU each CUDA-graph provider gets a row with the clear error, no time and no rate."""
    from triformer.bench import gpt as gpt_bench

    rows = gpt_bench.run(
        [TINY_BENCH_GPT],
        providers=GRAPHED_PROVIDERS,
        steps=1,
        warmup=0,
        device="cpu",
        dtype=torch.float32,
        progress=False,
    )
    assert [row["provider"] for row in rows] == list(GRAPHED_PROVIDERS)
    for row in rows:
        assert row["error"] == f"RuntimeError: {gpt_bench.GRAPH_CUDA_ONLY}", row
        assert math.isnan(row["ms"]) and math.isnan(row["tokens_per_s"]) and math.isnan(row["rate"]), row


def test_gpt_bench_knows_its_providers():
    from triformer.bench import gpt as gpt_bench

    assert set(GRAPHED_PROVIDERS) <= set(gpt_bench.PROVIDERS)
    with pytest.raises(ValueError, match=r"provider 'triformer \(CUDA graphs\)' is not one of"):
        gpt_bench.provider_model("triformer (CUDA graphs)", GPTConfig(**TINY_GPT), DEVICE, seed=0)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_gpt_bench_graphed_provider_rows(seed):
    """On the GPU each CUDA-graph provider measures a step: finite time and rate, a peak that counts the weights, and
    a GPU time from the profiler (or NaN with the note saying the profiler saw no work of the replay)."""
    from triformer.bench import gpt as gpt_bench

    rows = gpt_bench.run(
        [TINY_BENCH_GPT],
        providers=GRAPHED_PROVIDERS,
        steps=2,
        warmup=1,
        device=DEVICE,
        dtype=torch.bfloat16,
        progress=False,
        seed=seed,
    )
    assert [row["provider"] for row in rows] == list(GRAPHED_PROVIDERS)
    for row in rows:
        assert row["error"] == "", row
        assert math.isfinite(row["ms"]) and row["ms"] > 0 and row["tokens_per_s"] > 0 and row["rate"] > 0, row
        assert math.isfinite(row["peak_mib"]) and row["peak_mib"] > 0, row
        assert row["gpu_ms"] > 0 or (math.isnan(row["gpu_ms"]) and row["note"] == gpt_bench.NO_GRAPH_KERNELS), row
        assert gpt_bench.CUDAGRAPH_SKIPPED not in row["note"], row  # reduce-overhead really ran CUDA graphs


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("graphed,eager", [("triformer (CUDA graph)", "triformer"), ("torch (CUDA graph)", "torch")])
def test_gpt_bench_graph_replays_train_like_eager_steps(graphed, eager, seed):
    """The bench's CUDA-graph step really trains: from the same seed (weights and tokens), the losses of N replays are
    those of N eager steps, to bf16 tolerance, and they fall by far more than that tolerance."""
    from triformer.bench import gpt as gpt_bench

    config = GPTConfig(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=64)
    steps, tol = 6, tolerance(torch.bfloat16)
    losses = {}
    for provider in (eager, graphed):
        _, step = gpt_bench.provider_step(provider, config, DEVICE, torch.bfloat16, 4, seed=seed, lr=3e-3)
        losses[provider] = torch.stack([step().float().clone() for _ in range(steps)]).cpu()
        step = None
    expected, got = losses[eager], losses[graphed]
    assert expected[0] - expected[-1] > 5 * tol * expected[0], f"eager steps do not train: losses {expected}"
    assert torch.allclose(got, expected, rtol=tol, atol=0), f"replayed losses {got} against eager {expected}"
