"""Whether two views share memory (functional._overlap), against the elements each view actually addresses."""

from __future__ import annotations

import itertools

import pytest
import torch

from triformer.functional._overlap import may_share_elements, overlaps_itself


def addressed(t: torch.Tensor) -> set[int]:
    """The storage offsets of every element of t."""
    offsets = {t.storage_offset()}
    for n, s in zip(t.shape, t.stride()):
        offsets = {o + i * s for o in offsets for i in range(n)}
    return offsets if t.numel() else set()


def random_view(buffer: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random as_strided view of buffer with up to three dims, each longer than 1 in most draws."""
    dims = int(torch.randint(1, 4, (), generator=generator))
    shape = [int(torch.randint(1, 5, (), generator=generator)) for _ in range(dims)]
    stride = [int(torch.randint(1, 6, (), generator=generator)) for _ in range(dims)]
    last = sum((n - 1) * s for n, s in zip(shape, stride))
    offset = int(torch.randint(0, buffer.numel() - last, (), generator=generator))
    return buffer.as_strided(shape, stride, offset)


def test_agrees_with_the_addressed_elements():
    """Over random views of one buffer free of internal overlap: False exactly when no element is shared, for
    pairs with the same strides (the case it decides exactly, sizes free), and never False when one is shared."""
    generator = torch.Generator().manual_seed(0)
    buffer = torch.zeros(64)
    exact = 0
    for _ in range(4000):
        a = random_view(buffer, generator)
        if int(torch.randint(0, 2, (), generator=generator)):  # a's strides, other sizes, elsewhere
            shape = [int(torch.randint(1, 5, (), generator=generator)) for _ in a.shape]
            span = sum((n - 1) * s for n, s in zip(shape, a.stride()))
            b = buffer.as_strided(shape, a.stride(), int(torch.randint(0, 64 - span, (), generator=generator)))
        else:
            b = random_view(buffer, generator)
        if overlaps_itself(a) or overlaps_itself(b):
            continue
        shared = bool(addressed(a) & addressed(b))
        answer = may_share_elements(a, b)
        assert answer or not shared, (a.shape, a.stride(), a.storage_offset(), b.shape, b.stride(), b.storage_offset())
        if a.dim() == b.dim() and all(sa == sb for sa, sb in zip(a.stride(), b.stride())):
            exact += 1
            assert answer == shared, (a.shape, a.stride(), a.storage_offset(), b.storage_offset())
    assert exact > 300


def test_views_of_a_fused_projection():
    """q, k and v of [B, S, 3, H, D] permuted to [B, H, S, D] share nothing; slices that overlap do."""
    fused = torch.zeros(2, 5, 3, 4, 8)
    q, k, v = (fused[:, :, i].permute(0, 2, 1, 3) for i in range(3))
    for a, b in itertools.combinations((q, k, v), 2):
        assert not may_share_elements(a, b)
    assert may_share_elements(q, q)
    wide = torch.zeros(2, 4, 24)
    assert may_share_elements(wide[..., :16], wide[..., 8:])
    assert not may_share_elements(wide[..., :8], wide[..., 8:16])
    assert not may_share_elements(torch.zeros(3), torch.zeros(3))
    assert not may_share_elements(fused[:0], fused)
    heads = torch.zeros(2, 5, 4 + 2 * 1, 8)  # grouped-query [B, T, H + 2·Hkv, D], split as the attention module does
    q, k, v = (t.transpose(1, 2) for t in heads.split([4, 1, 1], dim=2))
    assert not may_share_elements(q, k) and not may_share_elements(k, v) and not may_share_elements(q, v)
    assert may_share_elements(heads[:, :, :3].transpose(1, 2), heads[:, :, 2:4].transpose(1, 2))


@pytest.mark.parametrize(
    "view, overlapping",
    [
        (lambda t: t, False),
        (lambda t: t.transpose(0, 1), False),
        (lambda t: t[:, :1].expand(4, 6), True),
        (lambda t: t.as_strided((4, 6), (1, 1)), True),
        (lambda t: t.view(2, 2, 6)[:, 0].t(), False),  # nested strides that torch's check cannot decide
        (lambda t: t.as_strided((2, 3), (3, 2)), False),  # offsets 0 2 4 3 5 7: none twice, strides not nested
    ],
)
def test_overlaps_itself(view, overlapping):
    assert overlaps_itself(view(torch.zeros(4, 6))) == overlapping
