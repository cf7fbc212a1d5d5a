"""Whether tensors share memory: what an op that writes into its inputs must rule out before it does."""

from __future__ import annotations

import torch

# Index combinations one question may visit before the answer is "may overlap" (the safe answer).
_SEARCH_LIMIT = 4096


class _Search:
    """Whether a target offset is Σ cⱼ·strideⱼ with integers lowⱼ ≤ cⱼ ≤ highⱼ over a layout
    [(stride, low, high), ...] sorted by stride (positive strides), searched dim by dim from the largest stride, a
    dim's coefficient bounded by what the smaller strides can still reach; `exhausted` once the visits pass the
    limit."""

    def __init__(self, layout: list[tuple[int, int, int]]):
        self.layout = layout
        self.lowest, self.highest = [0], [0]  # the least and the largest Σ cᵢ·strideᵢ over the first j dims
        for stride, low, high in layout:
            self.lowest.append(self.lowest[-1] + low * stride)
            self.highest.append(self.highest[-1] + high * stride)
        self.visits = 0
        self.exhausted = False

    def representable(self, target: int, dims: int) -> bool:
        """Over the first `dims` dims of the layout (True, the safe answer, once exhausted)."""
        self.visits += 1
        if self.visits > _SEARCH_LIMIT:
            self.exhausted = True
        if self.exhausted or dims == 0:
            return self.exhausted or target == 0
        stride, low, high = self.layout[dims - 1]
        first = max(low, -((self.highest[dims - 1] - target) // stride))  # ceil((target − highest) / stride)
        last = min(high, (target - self.lowest[dims - 1]) // stride)
        return any(self.representable(target - c * stride, dims - 1) for c in range(first, last + 1))


def _layout(t: torch.Tensor) -> list[tuple[int, int, int]]:
    """(stride, −(size − 1), size − 1) of t's dims longer than 1, by stride: the differences of two indices."""
    return sorted((s, 1 - n, n - 1) for n, s in zip(t.shape, t.stride()) if n > 1)


def overlaps_itself(t: torch.Tensor) -> bool:
    """Whether two indices of t may address one element (expanded, stride-0 or otherwise overlapping views); False
    only when that is ruled out: two indices meet exactly when Σ cⱼ·strideⱼ = 0 for integers |cⱼ| < sizeⱼ, not
    all 0 (the largest dim with cⱼ ≠ 0 may take cⱼ > 0)."""
    verdict = torch._debug_has_internal_overlap(t)  # 0: no overlap; 1: overlap; 2: torch could not tell
    if verdict != 2:
        return verdict == 1
    layout = _layout(t)
    if any(stride == 0 for stride, _, _ in layout):
        return True
    search = _Search(layout)
    return any(
        search.representable(-c * stride, j)
        for j, (stride, _, high) in enumerate(layout)
        for c in range(1, min(high, search.highest[j] // stride) + 1)  # c·strideⱼ within the smaller dims' reach
    )


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    """[first, last] byte addressed by t (strides are never negative in torch)."""
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size() - 1


def may_share_elements(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b, each free of internal overlap, may address a common element; False only when that is
    ruled out.

    Disjoint byte ranges rule it out. Otherwise (views of one buffer, e.g. q and k of a fused QKV projection
    [B, T, H + 2·Hkv, D]) a and b must have the same dtype, rank and strides (sizes may differ: grouped-query
    heads), so that index i of b addresses a's element i + c exactly when d = b's offset − a's = Σⱼ cⱼ·strideⱼ: they
    share one exactly when some cⱼ = iⱼ − i'ⱼ with iⱼ < a's sizeⱼ, i'ⱼ < b's sizeⱼ solves it."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    (a_first, a_last), (b_first, b_last) = _byte_range(a), _byte_range(b)
    if a_last < b_first or b_last < a_first:
        return False
    size = a.element_size()
    shift, misaligned = divmod(b.data_ptr() - a.data_ptr(), size)
    dims = [(s, 1 - nb, na - 1) for na, nb, s in zip(a.shape, b.shape, a.stride()) if max(na, nb) > 1]
    if a.dtype != b.dtype or a.dim() != b.dim() or misaligned or any(s <= 0 for s, _, _ in dims):
        return True
    if any(sa != sb for sa, sb, na, nb in zip(a.stride(), b.stride(), a.shape, b.shape) if max(na, nb) > 1):
        return True
    return _Search(sorted(dims)).representable(shift, len(dims))
