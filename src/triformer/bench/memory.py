"""Which allocations make a call's peak memory: the blocks live at the peak of one call, each with the source line
that allocated it, from the CUDA caching allocator's recorded history (`torch.cuda.memory._record_memory_history`).
Where two providers' peaks differ by a few KiB, the two lists name the blocks that differ."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable

import torch

# Allocator trace actions that start and end a block's life (a block counts from its allocation until the caller
# frees it, as torch.cuda.memory_allocated counts it).
_ALLOC, _FREE = "alloc", "free_requested"


def live_at_peak(events: Iterable[dict]) -> tuple[int, list[dict]]:
    """(peak bytes, the blocks live at the peak) over allocator trace events in order (dicts with "action", "addr"
    and "size"); the count starts at 0, so only blocks allocated during the trace are counted."""
    live: dict[int, dict] = {}
    current = peak = 0
    at_peak: list[dict] = []
    for event in events:
        if event["action"] == _ALLOC:
            live[event["addr"]] = event
            current += event["size"]
            if current > peak:
                peak, at_peak = current, list(live.values())
        elif event["action"] == _FREE and event["addr"] in live:
            current -= live.pop(event["addr"])["size"]
    return peak, at_peak


def allocation_site(event: dict, packages: tuple[str, ...] = ("triformer", "liger_kernel", "tools")) -> str:
    """file:line (function) of the innermost stack frame of a block's allocation inside one of `packages`, else the
    innermost Python frame; "?" without frames."""
    frames = [f for f in event.get("frames", ()) if f.get("filename", "").endswith(".py")]
    for frame in frames:
        if any(f"/{package}/" in frame["filename"] for package in packages):
            break
    else:
        frame = frames[0] if frames else None
    if frame is None:
        return "?"
    path = frame["filename"]
    for package in packages:
        if f"/{package}/" in path:
            path = package + "/" + path.split(f"/{package}/", 1)[1]
            break
    return f"{path}:{frame['line']} ({frame['name']})"


def blocks_by_site(blocks: list[dict]) -> list[tuple[str, int, int]]:
    """(allocation site, blocks, bytes) for each site of `blocks`, most bytes first."""
    sizes, counts = Counter(), Counter()
    for block in blocks:
        site = allocation_site(block)
        sizes[site] += block["size"]
        counts[site] += 1
    return [(site, counts[site], size) for site, size in sizes.most_common()]


def peak_blocks(fn: Callable[[], object], max_entries: int = 200_000) -> tuple[int, list[tuple[str, int, int]]]:
    """(peak bytes above what was allocated before, blocks live at that peak by allocation site) of one call of fn on
    the current CUDA device."""
    torch.cuda.synchronize()
    torch.cuda.memory._record_memory_history(max_entries=max_entries)
    try:
        fn()
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    events = snapshot["device_traces"][torch.cuda.current_device()]
    peak, blocks = live_at_peak(events)
    return peak, blocks_by_site(blocks)
