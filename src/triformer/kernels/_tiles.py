"""What the matmul kernels (matmul.py's pointer kernel, the TMA kernels) share: the grouped tile order, the bias
epilogue, which tiles fit a product, and the tuner that picks a product's launch."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import triton
import triton.language as tl
import triton.testing
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources, PTXASError

from ._runtime import overridden


@triton.jit
def row_major_tile(tile, N, BLOCK_N: tl.constexpr):
    """(row, column) of tile number `tile` over N columns in BLOCK_N-column tiles, in row-major order: a row of
    tiles one after another, so programs launched together read consecutive memory."""
    tiles_n = tl.cdiv(N, BLOCK_N)
    return tile // tiles_n, tile % tiles_n


@triton.jit
def grouped_tile(tile, tiles_m, tiles_n, GROUP_M: tl.constexpr):
    """(row, column) of tile number `tile` in grouped order: GROUP_M rows of tiles sweep the columns together,
    so tiles that run at the same time share their B tiles in L2."""
    tiles_per_group = GROUP_M * tiles_n
    first_m = (tile // tiles_per_group) * GROUP_M
    group_rows = min(tiles_m - first_m, GROUP_M)
    return first_m + (tile % tiles_per_group) % group_rows, (tile % tiles_per_group) // group_rows


@triton.jit
def add_bias(acc, bias_ptr, offs_n, N, HAS_BIAS: tl.constexpr):
    """acc + bias[n] (float32) for a tile whose columns are offs_n; acc itself without a bias."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    return acc


def fitting_configs(configs, M: int, N: int, element_size: int):
    """The tiles that fit the product (no tile more than twice the size it covers); 4-byte inputs get
    half-deep K tiles so the pipelined shared-memory buffers still fit Hopper's 228 KB."""
    fits = [
        c for c in configs if c.kwargs["BLOCK_M"] <= max(64, 2 * M) and c.kwargs["BLOCK_N"] <= max(64, 2 * N)
    ] or configs[-1:]
    if element_size == 4:
        fits = [
            triton.Config({**c.kwargs, "BLOCK_K": 32}, num_warps=c.num_warps, num_stages=min(c.num_stages, 3))
            for c in fits
        ]
    return fits


def autotune_enabled() -> bool:
    """TRIFORMER_AUTOTUNE=0 replaces autotuning by one fixed tile per shape (the GPU test suite uses it)."""
    return os.environ.get("TRIFORMER_AUTOTUNE", "1") != "0"


def fixed_config(configs, forced: triton.Config | None, M: int, N: int, element_size: int) -> triton.Config | None:
    """None while autotuning; without it (forced config or TRIFORMER_AUTOTUNE=0): the forced config, else the
    largest fitting tile up to 128×128."""
    if forced is None and autotune_enabled():
        return None
    fits = fitting_configs([forced] if forced else configs, M, N, element_size)
    return next((c for c in fits if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 128), fits[-1])


# The tuner's pick per product key. A key's first call times every candidate; later calls launch the pick
# directly (Triton's own autotuner rebuilds argument dicts and its key on every call, which costs more host time
# than the launch itself on a slow host, and it times the kernel alone, where a schedule may need a second one).
_CHOSEN: dict[tuple, object] = {}


@contextlib.contextmanager
def fresh_picks():
    """Within the block the tuner starts with no picks (every key's first call times its candidates again; the
    stored picks are neither read nor written) and yields the dict of the picks it makes; the earlier picks come
    back on exit."""
    with overridden(sys.modules[__name__], _CHOSEN={}, _USE_STORED=False):
        yield _CHOSEN


# TRIFORMER_TUNING_CACHE=<file.json>: picks kept across processes, per GPU model and Triton version. A key's first
# call in a process launches the stored pick when it is still one of the key's candidates (compared by repr),
# else times the candidates and adds its pick to the file. Processes adding picks take turns (a lock file beside
# it); a file that cannot be read or written is warned about and the tuner works as without it.
_USE_STORED = True


def _stored_picks_path() -> Path | None:
    path = os.environ.get("TRIFORMER_TUNING_CACHE")
    return Path(path) if path and _USE_STORED else None


def _stored_key(key: tuple) -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{gpu} | triton {triton.__version__} | {key!r}"


@contextlib.contextmanager
def _locked(path: Path):
    """Within the block no other process holds path's lock (path + ".lock")."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _read_stored(path: Path) -> dict:
    """The store's picks ({} before the first): no lock needed, writers replace the file whole."""
    if not path.exists():
        return {}
    stored = json.loads(path.read_text())
    if not isinstance(stored, dict):
        raise ValueError("not a JSON object")
    return stored


def _stored_pick(key: tuple, candidates: list):
    """The stored pick for key among candidates, or None (no file, no entry, or no longer a candidate)."""
    path = _stored_picks_path()
    if path is None:
        return None
    try:
        wanted = _read_stored(path).get(_stored_key(key))
    except (OSError, ValueError) as error:
        warnings.warn(f"TRIFORMER_TUNING_CACHE {path} is unreadable ({error}): tuning instead", stacklevel=3)
        return None
    return next((c for c in candidates if repr(c) == wanted), None)


def _store_pick(key: tuple, choice) -> None:
    """Adds key's pick to the file, under the lock (written whole to a temporary file, then renamed over it)."""
    path = _stored_picks_path()
    if path is None:
        return
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with _locked(path):
            try:
                stored = _read_stored(path)
            except ValueError:  # warned about when read: replaced by what this process knows
                stored = {}
            stored[_stored_key(key)] = repr(choice)
            temporary.write_text(json.dumps(stored, indent=1, sort_keys=True))
            os.replace(temporary, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            temporary.unlink()
        warnings.warn(f"TRIFORMER_TUNING_CACHE {path} cannot be written ({error}): pick not kept", stacklevel=3)


# What each candidate took (ms per call) on its key's first call, by key: for tools that show the tuner's view.
TIMED: dict[tuple, list] = {}

# Per candidate: batches of calls queued behind a GPU-side wait of about _TUNE_HOLD_CYCLES clock cycles (a few ms).
_TUNE_CALLS, _TUNE_BATCHES, _TUNE_HOLD_CYCLES, _TUNE_MAX_HOLDS = 10, 3, 10_000_000, 4


def launch_tuned(key: tuple, candidates, run) -> None:
    """run(the fastest of candidates() for this product key): on the key's first call each candidate is timed
    end to end (`run(candidate)`, every kernel it launches; one that does not compile is skipped), later calls
    reuse the pick (so do later processes, through TRIFORMER_TUNING_CACHE)."""
    choice = _CHOSEN.get(key)
    if choice is None:
        listed = candidates()
        choice = _stored_pick(key, listed)
        if choice is None:
            choice = _fastest(key, listed, run)
            _store_pick(key, choice)
        _CHOSEN[key] = choice
    run(choice)


def _fastest(key: tuple, candidates: list, run):
    if len(candidates) == 1:
        return candidates[0]

    def time_ms(candidate) -> float:
        try:
            return queued_ms(lambda: run(candidate))
        except (OutOfResources, PTXASError, CompilationError):
            return float("inf")

    times = [time_ms(c) for c in candidates]
    TIMED[key] = list(zip(candidates, times))
    return candidates[times.index(min(times))]


def queued_ms(fn) -> float:
    """GPU time of one call of fn() in ms with the host out of the way: the stream is held by a GPU-side wait
    (torch.cuda._sleep) while _TUNE_CALLS calls are queued behind it, so they run back to back and a schedule of
    two launches is not charged the host's time between them; median of _TUNE_BATCHES batches. A batch whose
    queuing took the host longer than the wait lasted on the GPU is timed again with a wait twice as long (up to
    _TUNE_MAX_HOLDS times; then it counts as it is). (do_bench, where torch has no _sleep.)"""
    fn()  # compile
    if not hasattr(torch.cuda, "_sleep"):
        return triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median")
    times, hold = [], _TUNE_HOLD_CYCLES
    for _ in range(_TUNE_BATCHES):
        for attempt in range(_TUNE_MAX_HOLDS):
            held, start, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
            held.record()
            torch.cuda._sleep(hold)
            start.record()
            queuing = time.perf_counter()
            for _ in range(_TUNE_CALLS):
                fn()
            queuing_ms = (time.perf_counter() - queuing) * 1e3
            end.record()
            end.synchronize()
            if queuing_ms <= held.elapsed_time(start) or attempt == _TUNE_MAX_HOLDS - 1:
                break
            hold *= 2
        times.append(start.elapsed_time(end) / _TUNE_CALLS)
    return sorted(times)[len(times) // 2]
