"""One benchmark case timed for every provider in one run: what the rope and gated_mlp suites share.

A provider is a setup function that allocates its own inputs and returns (the call to time, bytes it moves); a
setup or a call that fails gives a row with the error instead. Each call gets its host-inclusive time (median_ms),
its peak extra memory (peak_extra_mib) and its GPU time as the median of `rounds` interleaved rounds over all
providers (interleaved_gpu_ms), so ratios between providers are not decided by the drift between measurements.
"""

from __future__ import annotations

from .norms import failure_row, peak_extra_mib, result_row
from .timing import interleaved_gpu_ms, median_ms


def time_providers(op: str, shape, dtype, mode: str, setups: dict, device: str, rounds: int = 3) -> list[dict]:
    """One row per provider of setups (name → setup() → (call, nbytes)), in GB/s of nbytes."""
    rows, calls, ms, nbytes, peaks = [], {}, {}, {}, {}
    for provider, setup in setups.items():
        try:
            call, nbytes[provider] = setup()
            ms[provider] = median_ms(call)  # compiles and warms up too
            peaks[provider] = peak_extra_mib(call, device)
        except Exception as exc:  # e.g. torch.compile failing on this host: the row says why
            rows.append(failure_row(op, shape, dtype, mode, provider, exc))
            continue
        calls[provider] = call
    gpu = interleaved_gpu_ms(calls, rounds)
    for provider in calls:
        times = {"ms": ms[provider], "gpu_ms": gpu[provider]}
        rows.append(result_row(op, shape, dtype, mode, provider, times, nbytes[provider], peaks[provider]))
    return rows
