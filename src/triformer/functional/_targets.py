"""The out-of-range target check of cross_entropy and linear_cross_entropy, without a host sync on the hot path.

A target outside [0, V) (and not ignore_index) never gives a wrong loss: the kernel makes its row's loss and
gradient NaN, on the device, in every mode (eager, torch.compile, CUDA graphs). The clear error is raised from the
host, which must not wait for the device to find out: kernels.cross_entropy.count_targets leaves
(valid, out of range, first out of range) on the device; `note` copies the last two into pinned host memory with a
non-blocking copy, first set to -1 so the host sees when the copy has landed. Every later call of either loss (its
forward and its backward) and `check_targets()` look at the copies that have landed and raise a ValueError for
the first with a target out of range, naming it. On the CPU (Triton's interpreter) the counts are host memory
already: the call that saw the target raises. Under CUDA graph capture nothing is noted (a replay runs no Python):
the NaN loss is the report.
"""

from __future__ import annotations

import collections

import torch

# (host view of [out of range, first out of range], V, ignore_index, device), oldest first.
_pending: collections.deque = collections.deque()


def _message(first: int, v: int, ignore_index: int) -> str:
    return (
        f"targets must lie in [0, {v}) or equal ignore_index={ignore_index}; found {first} (the rows with such "
        "targets got a NaN loss and gradient)"
    )


def note(counts: torch.Tensor, v: int, ignore_index: int) -> None:
    """Queue the check of count_targets' counts; raise for any check that has landed with a bad target."""
    if counts.device.type == "cpu":
        _pending.append((counts[1:].numpy(), v, ignore_index, counts.device))
    elif not torch.cuda.is_current_stream_capturing():
        host = torch.empty(2, dtype=torch.int64, pin_memory=True)
        view = host.numpy()
        view[0] = -1
        host.copy_(counts[1:], non_blocking=True)
        _pending.append((view, v, ignore_index, counts.device))
    poll()


def poll(wait: bool = False) -> None:
    """Raise a ValueError for the oldest noted check that found a target out of range, among those that have
    landed (wait: all of them, waiting for the device)."""
    while _pending:
        view, v, ignore_index, device = _pending[0]
        if view[0] < 0:
            if not wait:
                return
            torch.cuda.synchronize(device)
        _pending.popleft()
        if view[0] > 0:
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # the error path: the first bad target has surely landed too
            raise ValueError(_message(int(view[1]), v, ignore_index))


def check_targets() -> None:
    """Wait for every cross-entropy target check still in flight and raise a ValueError naming the first target
    out of range, if any call had one (on a GPU the call itself does not wait for its check; see this module)."""
    poll(wait=True)
