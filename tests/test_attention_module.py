"""TritonMultiheadAttention against its PyTorch twin (float64) with the same weights: output and every gradient;
q, k, v reach the kernel as views of one QKV projection; bad arguments give clear errors."""

from __future__ import annotations

import pytest
import torch
from harness import DEVICE, assert_close, randn, tolerance

import triformer.functional as F_tri
from triformer.nn import TorchMultiheadAttention, TorchRotaryEmbedding, TritonMultiheadAttention, TritonRotaryEmbedding

EMBED, HEADS = 64, 4  # head dim 16


def twins(num_kv_heads=None, causal=False, bias=True, rope=False):
    """The module under test and its float64 PyTorch twin with the same weights."""
    rotary = TritonRotaryEmbedding(EMBED // HEADS, max_seq_len=16) if rope else None
    ours = TritonMultiheadAttention(EMBED, HEADS, num_kv_heads, causal=causal, bias=bias, rotary=rotary).to(DEVICE)
    rotary_ref = TorchRotaryEmbedding(EMBED // HEADS, max_seq_len=16) if rope else None
    ref = TorchMultiheadAttention(EMBED, HEADS, num_kv_heads, causal=causal, bias=bias, rotary=rotary_ref)
    ref = ref.to(DEVICE).double()
    ref.load_state_dict(ours.state_dict())
    return ours, ref


@pytest.mark.parametrize("rope", [False, True], ids=["no-rope", "rope"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("num_kv_heads", [None, 2, 1], ids=["mha", "gqa", "mqa"])
def test_matches_torch_twin(num_kv_heads, causal, rope, seed):
    ours, ref = twins(num_kv_heads, causal, bias=not rope, rope=rope)
    x = randn(2, 7, EMBED, requires_grad=True)
    x_ref = x.detach().double().requires_grad_()
    out, out_ref = ours(x), ref(x_ref)
    assert out.shape == (2, 7, EMBED) and out.dtype == torch.float32
    assert_close(out, out_ref, torch.float32, "output")
    dy = randn(2, 7, EMBED)
    out.backward(dy)
    out_ref.backward(dy.double())
    assert_close(x.grad, x_ref.grad, torch.float32, "grad of x")
    for (name, p), (name_ref, p_ref) in zip(ours.named_parameters(), ref.named_parameters(), strict=True):
        assert name == name_ref
        assert_close(p.grad, p_ref.grad, torch.float32, f"grad of {name}")


def test_causal_output_ignores_later_tokens(seed):
    ours, _ = twins(causal=True)
    x = randn(1, 9, EMBED)
    changed = x.clone()
    changed[:, 5:] = randn(1, 4, EMBED)
    with torch.no_grad():
        out, out_changed = ours(x), ours(changed)
    assert_close(out_changed[:, :5], out[:, :5], torch.float32, "outputs before the changed tokens")
    assert (out_changed[:, 5:] - out[:, 5:]).abs().max() > 1e-3


def test_parameters_match_the_twin():
    ours, ref = twins(num_kv_heads=2)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    # one fused projection: 4 query heads, 2 key heads, 2 value heads of 16
    assert ours.qkv.weight.shape == ((4 + 2 * 2) * 16, EMBED) and ours.out_proj.weight.shape == (EMBED, EMBED)
    assert ours.qkv.activation is None and ours.out_proj.activation is None


def spy_on_attention(monkeypatch) -> dict:
    """q, k and v of the next attention calls, as they reach triformer.functional.attention."""
    seen = {}
    real = F_tri.attention

    def spy(q, k, v, **options):
        seen.update(q=q, k=k, v=v)
        return real(q, k, v, **options)

    monkeypatch.setattr(F_tri, "attention", spy)
    return seen


@pytest.mark.parametrize("rope", [False, True], ids=["no-rope", "rope"])
def test_heads_are_views_of_one_projection(monkeypatch, rope, seed):
    """q, k and v are strided views into the QKV projection's output: no copy before the kernel, with a rotary
    embedding too (q and k rotated in place there), with gradients or without."""
    seen = spy_on_attention(monkeypatch)
    ours, _ = twins(num_kv_heads=2, rope=rope)
    with torch.no_grad():
        ours(randn(2, 7, EMBED))
    q, k, v = seen["q"], seen["k"], seen["v"]
    assert q.shape == (2, 4, 7, 16) and k.shape == v.shape == (2, 2, 7, 16)
    storage = q.untyped_storage().data_ptr()
    assert k.untyped_storage().data_ptr() == storage == v.untyped_storage().data_ptr()
    assert not q.is_contiguous() and q.stride() == (7 * 128, 16, 128, 1)
    ours(randn(2, 7, EMBED, requires_grad=True)).sum().backward()
    assert seen["q"].untyped_storage().data_ptr() == seen["v"].untyped_storage().data_ptr()


def test_rope_in_place_only_where_the_projection_output_is_private(monkeypatch, seed):
    """A forward hook on the QKV projection may keep its output: then q and k are rotated into new tensors and the
    hook's tensor keeps the projection's values; a hook on the rotary embedding runs (it is called); the result is
    the same either way."""
    seen = spy_on_attention(monkeypatch)
    ours, _ = twins(num_kv_heads=2, rope=True)
    x = randn(2, 7, EMBED)
    with torch.no_grad():
        in_place = ours(x)
        kept, rotary_calls = [], []
        handle = ours.qkv.register_forward_hook(lambda module, args, out: kept.append(out))
        copied = ours(x)
        assert seen["q"].untyped_storage().data_ptr() != seen["v"].untyped_storage().data_ptr()
        assert torch.equal(kept[0], ours.qkv(x))
        handle.remove()
        ours.rotary.register_forward_pre_hook(lambda module, args: rotary_calls.append(len(args)))
        hooked_rotary = ours(x)
    assert rotary_calls == [2]
    assert torch.equal(in_place, copied) and torch.equal(in_place, hooked_rotary)


def test_an_overridden_rotated_heads_is_used(seed):
    """A subclass that changes rotated_heads (e.g. a norm on q and k) gets it called, not the in-place rotation."""

    class Scaled(TritonMultiheadAttention):
        def rotated_heads(self, qkv):
            q, k, v = super().rotated_heads(qkv)
            return q * 2, k, v

    rotary = TritonRotaryEmbedding(EMBED // HEADS, max_seq_len=16)
    plain = TritonMultiheadAttention(EMBED, HEADS, rotary=rotary).to(DEVICE)
    scaled = Scaled(EMBED, HEADS, rotary=rotary).to(DEVICE)
    scaled.load_state_dict(plain.state_dict())
    x = randn(2, 7, EMBED)
    with torch.no_grad():
        q, k, v = plain.rotated_heads(plain.qkv(x))
        expected = plain.out_proj(plain.attend(q * 2, k, v).transpose(1, 2).reshape(2, 7, EMBED))
        assert torch.equal(scaled(x), expected)


def test_rope_in_place_checks_positions_not_heads(seed):
    """More heads (query, key and value together) than max_seq_len: the table covers the T positions, and that is
    what is checked."""
    rotary = TritonRotaryEmbedding(8, max_seq_len=16)
    ours = TritonMultiheadAttention(64, 8, rotary=rotary).to(DEVICE)
    ours(randn(2, 4, 64, requires_grad=True)).sum().backward()
    with pytest.raises(ValueError, match="positions up to 16 exceed max_seq_len=16"):
        ours(randn(1, 17, 64))


def test_attention_dropout_while_training(seed):
    """dropout: the attention kernels' dropout on the probabilities while training (the seed drawn from torch's
    generator: manual_seed repeats it, the next call draws another), none in eval mode, where the module equals its
    twin."""
    ours, ref = twins(num_kv_heads=2, causal=True)
    ours.dropout = ref.dropout = 0.25
    x = randn(2, 7, EMBED, requires_grad=True)
    torch.manual_seed(seed)
    first = ours(x)
    torch.manual_seed(seed)
    assert torch.equal(ours(x), first)
    assert not torch.equal(ours(x), first)
    q, k, v = ours.heads(x)
    torch.manual_seed(seed)
    seed_drawn = int(torch.randint(0, 2**31 - 1, ()))
    by_hand = F_tri.attention(q, k, v, causal=True, dropout_p=0.25, seed=seed_drawn)
    assert torch.equal(ours.out_proj(by_hand.transpose(1, 2).reshape(2, 7, EMBED)), first)
    first.sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in ours.parameters())
    x64 = x.detach().double()
    assert not torch.equal(ref(x64), ref(x64))  # the twin drops too (SDPA's dropout_p)
    ours.eval(), ref.eval()
    assert_close(ours(x), ref(x64), torch.float32, "eval output (no dropout)")
    assert "dropout=0.25" in repr(ours)


@pytest.mark.parametrize("cls", [TritonMultiheadAttention, TorchMultiheadAttention])
def test_bad_arguments(cls):
    with pytest.raises(ValueError, match="embed_dim=30 is not divisible by num_heads=4"):
        cls(30, 4)
    with pytest.raises(ValueError, match="num_heads=4 is not a multiple of num_kv_heads=3"):
        cls(48, 4, num_kv_heads=3)
    with pytest.raises(ValueError, match=r"attention dropout must be a number in \[0, 1\), got 1.0"):
        cls(64, 4, dropout=1.0)
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        cls(64, 0)
    rotary = TorchRotaryEmbedding(32)
    with pytest.raises(ValueError, match="rotary embedding has head_dim=32 but the attention heads are .* 16 wide"):
        cls(64, 4, rotary=rotary)
    with pytest.raises(ValueError, match=r"x must be \(B, T, embed_dim=64\), got shape \(2, 7, 32\)"):
        cls(64, 4)(torch.randn(2, 7, 32))
    if cls is TritonMultiheadAttention:  # its kernel's head dims, refused at construction
        with pytest.raises(ValueError, match="head dim embed_dim / num_heads = 12 / 4 = 3 is not supported"):
            cls(12, 4)
    else:
        cls(12, 4)  # SDPA takes any head dim


def test_under_autocast_matches_twin(seed):
    """bf16 autocast on the GPU (fp16 on the CPU: the interpreter has no bf16): the projections and attention run in
    the autocast dtype, as the twin's nn.Linear and SDPA do."""
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    ours, ref = twins(num_kv_heads=2, causal=True)
    ref.float()
    x = randn(2, 7, EMBED)
    with torch.autocast(DEVICE, dtype=dtype):
        out, out_ref = ours(x), ref(x)
    assert out.dtype == dtype
    assert_close(out, out_ref, dtype, "output under autocast", tol=10 * tolerance(dtype))
