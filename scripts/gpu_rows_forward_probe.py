"""On a GPU host: why the row kernels' forward sits below the copy bandwidth. GPU time (CUDA graph, L2 flushed) of
LayerNorm / RMSNorm forward by launch shape, against three ceilings measured in the same run: the 1 GiB device
copy rate, torch's copy of the same tensor, and a Triton kernel that only loads and stores the rows with the
norms' own tiling; then dropout against a variant that issues all its loads before the Philox rounds.
With the argument `persistent`: the norms' forward as a persistent kernel (a few programs per SM, each looping
over rows with Triton's software pipelining, so the next rows' loads are in flight while this row is reduced)
against the library's one-program-per-tile launch. With `hints`: the forwards of LayerNorm, RMSNorm, softmax and
dropout with cache hints on every load and store (copies of the library's kernel modules, tl.load / tl.store
swapped for hinted ones) against the library. With `softmax`: the softmax forward by warps, and as a one-row 1-D
kernel, beside Liger-Kernel's when installed. With `liger`: the norms' forward kernel by rows per program and warps
(and LayerNorm as a one-row 1-D kernel) beside Liger-Kernel's modules, in five interleaved rounds (medians), to see
whether any launch shape is faster than Liger's where the library is level with it. With `softmax-liger`:
the softmax forward and backward by launch beside Liger-Kernel's kernels (timed twice, to show the spread); with
`launch`: the norm forwards at
4096 and 8192 columns by parameter order, rows per program and warps; with `flags`: the norm forwards with
either order of the parameter loads at the library's launch; with `softmax-pair`: the softmax forward
and backward as one pair, with and without cache hints, beside Liger-Kernel's pair (`softmax-pair-launch`:
at 4096² by each kernel's launch); with `softmax-precision`: the softmax backward's error against float64,
ours and Liger's. Prints tables; not part of the
pipeline."""

import importlib.util
import itertools
import sys
import tempfile
from pathlib import Path

import torch
import triton
import triton.language as tl

from triformer.bench.timing import copy_bandwidth_gbps, gpu_ms, interleaved_gpu_ms
from triformer import kernels
from triformer.kernels import dropout, norms, softmax
from triformer.kernels._runtime import cdiv

SIZES = [(4096, 4096), (16384, 1024), (4096, 768), (4096, 8192)]
bf = torch.bfloat16


@triton.jit
def _row_copy_kernel(x_ptr, y_ptr, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mask = (rows < M)[:, None] & (cols < N)[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask), mask=mask)


@triton.jit
def _dropout_loads_first(x_ptr, y_ptr, n, threshold, scale, seed, BLOCK: tl.constexpr):
    """dropout._dropout_kernel's mask, with the eight runs' loads issued before the Philox call."""
    base = tl.program_id(0).to(tl.int64) * (8 * BLOCK) + tl.arange(0, BLOCK)
    offs = base[None, :] + (tl.arange(0, 8) * BLOCK).to(tl.int64)[:, None]  # [8, BLOCK], run j = row j
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    r0, r1, r2, r3 = tl.randint4x(seed, base)
    lo = tl.join(tl.join(r0 & 0xFFFF, r1 & 0xFFFF), tl.join(r2 & 0xFFFF, r3 & 0xFFFF))  # [BLOCK, 2, 2]
    hi = tl.join(tl.join(r0 >> 16, r1 >> 16), tl.join(r2 >> 16, r3 >> 16))
    u = tl.reshape(tl.permute(tl.join(lo, hi), (2, 1, 3, 0)), (8, BLOCK))  # run 2i + h ← half h of r_i
    y = tl.where(u.to(tl.int32) >= threshold, x * scale, 0.0)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm_forward_persistent(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, M, N, eps, CENTER: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr):
    """LayerNorm (CENTER) / RMSNorm forward of whole rows, program p taking row blocks p, p + programs, ..."""
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    for r0 in tl.range(tl.program_id(0) * BLOCK_M, M, tl.num_programs(0) * BLOCK_M, num_stages=STAGES):
        rows = r0 + tl.arange(0, BLOCK_M)
        mask = (rows < M)[:, None] & col_mask[None, :]
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if CENTER:
            mean = tl.sum(x, axis=1) / N
            x = tl.where(mask, x - mean[:, None], 0.0)
            tl.store(mean_ptr + rows, mean, mask=rows < M)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / N + eps)
        y = x * rstd[:, None] * w[None, :]
        if CENTER:
            y += b[None, :]
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + rows, rstd, mask=rows < M)


def persistent():
    copy = copy_bandwidth_gbps("cuda")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    print(f"\n{torch.cuda.get_device_name()}: norms forward, library launch vs persistent (÷ 1 GiB copy {copy:.0f} GB/s)")
    for m, n in SIZES[:2]:
        x = torch.randn(m, n, device="cuda", dtype=bf)
        y = torch.empty_like(x)
        w, b = torch.randn(n, device="cuda", dtype=bf), torch.randn(n, device="cuda", dtype=bf)
        mean, rstd = (torch.empty(m, device="cuda") for _ in range(2))
        gb = 2 * x.numel() * 2 / 1e9
        for center in (True, False):
            name = "layer_norm" if center else "rms_norm"
            lib = gpu_ms(lambda: norms.norm_forward(x, w, b if center else None, 1e-5, center)) * 1e3
            cells = [f"library {gb / (lib * 1e-6) / copy:.3f}"]
            bn = triton.next_power_of_2(n)
            for bm in sorted({1, max(1, 2048 // bn)}):
                for warps in (4, 8):
                    for per_sm in (4, 8, 16):
                        for stages in (1, 2, 3):
                            grid = (min(cdiv(m, bm), per_sm * sms),)
                            try:
                                us = gpu_ms(lambda: _norm_forward_persistent[grid](
                                    x, w, b, y, mean, rstd, m, n, 1e-5, CENTER=center, BLOCK_M=bm, BLOCK_N=bn,
                                    STAGES=stages, num_warps=warps)) * 1e3
                            except Exception as error:
                                cells.append(f"{bm}x{bn} w{warps} p{per_sm} s{stages} {type(error).__name__}")
                                continue
                            cells.append(f"{bm}x{bn} w{warps} p{per_sm} s{stages} {gb / (us * 1e-6) / copy:.3f}")
            print(f"{m}x{n} {name}: " + "; ".join(cells), flush=True)


HINTS = {"store .cs": ("", ', cache_modifier=".cs"'),
         "load evict_first, store .cs": (', eviction_policy="evict_first"', ', cache_modifier=".cs"'),
         "load .ca, store .cs": (', cache_modifier=".ca"', ', cache_modifier=".cs"')}
_HINTED = """

@triton.jit
def _hinted_load(ptr, mask=None, other=None):
    return tl.load(ptr, mask=mask, other=other{load})


@triton.jit
def _hinted_store(ptr, value, mask=None):
    tl.store(ptr, value, mask=mask{store})
"""


def _module_variant(name: str, stem: str, edit):
    """A copy of triformer.kernels.<name> whose source edit(source) rewrote, imported as module `stem`."""
    src = (Path(kernels.__file__).parent / f"{name}.py").read_text().replace("from .", "from triformer.kernels.")
    path = Path(tempfile.mkdtemp()) / f"{stem}.py"
    path.write_text(edit(src))
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _hinted_module(name: str, tag: int, load: str, store: str):
    """A copy of triformer.kernels.<name> whose kernels load and store with the given keyword hints."""
    return _module_variant(name, f"hinted_{name}_{tag}", lambda src: src.replace(
        "tl.load(", "_hinted_load(").replace("tl.store(", "_hinted_store(") + _HINTED.format(load=load, store=store))


def hints():
    copy = copy_bandwidth_gbps("cuda")
    print(f"\n{torch.cuda.get_device_name()}: row forwards with cache hints, fraction of the 1 GiB copy ({copy:.0f} GB/s)")
    variants = {"library": (norms, softmax, dropout)}
    for tag, (hint, (load, store)) in enumerate(HINTS.items()):
        variants[hint] = tuple(_hinted_module(name, tag, load, store) for name in ("norms", "softmax", "dropout"))
    for m, n in [(4096, 4096), (16384, 1024), (4096, 8192), (4096, 768)]:
        x = torch.randn(m, n, device="cuda", dtype=bf)
        w, b = torch.randn(n, device="cuda", dtype=bf), torch.randn(n, device="cuda", dtype=bf)
        gb = 2 * x.numel() * 2 / 1e9
        ops = {"layer_norm": lambda mods: mods[0].norm_forward(x, w, b, 1e-5, True),
               "rms_norm": lambda mods: mods[0].norm_forward(x, w, None, 1e-5, False),
               "softmax": lambda mods: mods[1].softmax_forward(x, False),
               "dropout": lambda mods: mods[2].dropout(x, 0.1, 1234)}
        for op, fn in ops.items():
            cells = []
            for hint, mods in variants.items():
                us = gpu_ms(lambda: fn(mods)) * 1e3
                cells.append(f"{hint} {gb / (us * 1e-6) / copy:.3f}")
            print(f"{m}x{n} {op:10s}: " + "; ".join(cells), flush=True)


@triton.jit
def _softmax_row_kernel(x_ptr, y_ptr, N, BLOCK_N: tl.constexpr, RECIPROCAL: tl.constexpr = False):
    """softmax of one row per program, as a 1-D block; RECIPROCAL: multiplying by 1 / Σ e^(x − m) instead of
    dividing by it."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    x = tl.load(x_ptr + row * N + cols, mask=cols < N, other=float("-inf")).to(tl.float32)
    e = tl.exp(x - tl.max(x, axis=0))
    if RECIPROCAL:
        y = e * (1.0 / tl.sum(e, axis=0))
    else:
        y = e / tl.sum(e, axis=0)
    tl.store(y_ptr + row * N + cols, y.to(y_ptr.dtype.element_ty), mask=cols < N)


def softmax_warps():
    copy = copy_bandwidth_gbps("cuda")
    print(f"\n{torch.cuda.get_device_name()}: softmax forward, fraction of the 1 GiB copy ({copy:.0f} GB/s)")
    try:
        from liger_kernel.ops.softmax import LigerSoftmaxFunction
    except ImportError:
        LigerSoftmaxFunction = None
    for m, n in [(4096, 4096), (4096, 8192), (16384, 1024), (4096, 768)]:
        x = torch.randn(m, n, device="cuda", dtype=bf)
        y = torch.empty_like(x)
        gb = 2 * x.numel() * 2 / 1e9
        bn = triton.next_power_of_2(n)
        cases = {"library": lambda: softmax.softmax_forward(x, False)}
        if LigerSoftmaxFunction is not None:
            cases["liger"] = lambda: LigerSoftmaxFunction.apply(x)
        for warps in (4, 8, 16, 32):
            if bn // (32 * warps) >= 2:
                cases[f"2-D 1x{bn} w{warps}"] = (lambda w=warps: softmax._softmax_forward_kernel[(m,)](
                    x, y, m, n, 1, n, n, CAUSAL=False, BLOCK_M=1, BLOCK_N=bn, ONE_BLOCK=True, num_warps=w))
                cases[f"1-D w{warps}"] = (lambda w=warps: _softmax_row_kernel[(m,)](x, y, n, BLOCK_N=bn, num_warps=w))
        cells = [f"{name} {gb / (gpu_ms(fn) * 1e-3) / copy:.3f}" for name, fn in cases.items()]
        print(f"{m}x{n}: " + "; ".join(cells), flush=True)


def main():
    copy = copy_bandwidth_gbps("cuda")
    print(f"{torch.cuda.get_device_name()}: 1 GiB copy {copy:.0f} GB/s; columns: µs, then that rate ÷ the ceiling")
    print(f"{'size':>11s} {'case':40s} {'µs':>7s} {'÷1GiB copy':>10s} {'÷same copy':>10s} {'÷row copy':>10s}")
    for m, n in SIZES:
        x = torch.randn(m, n, device="cuda", dtype=bf)
        y = torch.empty_like(x)
        w, b = torch.randn(n, device="cuda", dtype=bf), torch.randn(n, device="cuda", dtype=bf)
        mean, rstd = (torch.empty(m, device="cuda") for _ in range(2))
        gb = 2 * x.numel() * 2 / 1e9
        same_copy = gpu_ms(lambda: y.copy_(x)) * 1e3
        rows = []
        for tile in (1024, 2048, 4096, 8192):
            bn = triton.next_power_of_2(n)
            bm = max(1, tile // bn)
            if bm * bn != max(tile, bn):
                continue
            for warps in (2, 4, 8, 16):
                if bm * bn // (32 * warps) < 4 or bm * bn // (32 * warps) > 64:
                    continue
                grid = (cdiv(m, bm),)
                rc = gpu_ms(lambda: _row_copy_kernel[grid](x, y, m, n, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps)) * 1e3
                for center in (True, False):
                    ln = gpu_ms(lambda: norms._norm_forward_kernel[grid](
                        x, w, b, y, mean, rstd, m, n, n, n, 1e-5, CENTER=center, HAS_W=True, HAS_B=center,
                        BLOCK_M=bm, BLOCK_N=bn, ONE_BLOCK=True, num_warps=warps)) * 1e3
                    rows.append((f"{'layer' if center else 'rms'}_norm {bm}x{bn} w{warps}", ln, rc))
        for name, us, rc in rows:
            rate = gb / (us * 1e-6)
            print(f"{m:>5d}x{n:<5d} {name:40s} {us:7.1f} {rate / copy:10.2f} {same_copy / us:10.2f} "
                  f"{rc / us:10.2f}", flush=True)
        print(f"{m:>5d}x{n:<5d} {'torch copy of the tensor':40s} {same_copy:7.1f} "
              f"{gb / (same_copy * 1e-6) / copy:10.2f}", flush=True)

        for warps in (4, 8):
            n_el = x.numel()
            grid = (cdiv(n_el, 8 * dropout.BLOCK),)
            args = (x, y, n_el, round(0.1 * 2**16), 1 / 0.9, 1234)
            ref = gpu_ms(lambda: dropout._dropout_kernel[grid](*args, BLOCK=dropout.BLOCK, num_warps=warps)) * 1e3
            y_ref = y.clone()
            alt = gpu_ms(lambda: _dropout_loads_first[grid](*args, BLOCK=dropout.BLOCK, num_warps=warps)) * 1e3
            same = torch.equal(y, y_ref)
            for name, us in ((f"dropout w{warps}", ref), (f"dropout loads first w{warps} (same mask: {same})", alt)):
                print(f"{m:>5d}x{n:<5d} {name:40s} {us:7.1f} {gb / (us * 1e-6) / copy:10.2f} {same_copy / us:10.2f}",
                      flush=True)


@triton.jit
def _layer_norm_row_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, N, eps, BLOCK_N: tl.constexpr,
                           PIVOT: tl.constexpr):
    """LayerNorm of one row per program as a 1-D block: y = (x − μ) · rstd · w + b, μ and rstd stored; PIVOT:
    the row's first element is subtracted first, as the library does (the stored μ is then of x − x₀)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(x_ptr + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    if PIVOT:
        x = tl.where(mask, x - tl.load(x_ptr + row * N).to(tl.float32), 0.0)
    mean = tl.sum(x, axis=0) / N
    centered = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / N + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * N + cols, (centered * rstd * w + b).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + row, mean)
    tl.store(rstd_ptr + row, rstd)


def norms_against_liger():
    from liger_kernel.transformers import LigerLayerNorm, LigerRMSNorm

    copy = copy_bandwidth_gbps("cuda")
    print(f"\n{torch.cuda.get_device_name()}: norm forwards, fraction of the 1 GiB copy ({copy:.0f} GB/s), medians "
          "of 5 interleaved rounds; in brackets Liger's time ÷ the case's (> 1: faster than Liger)")
    for m, n in SIZES:
        x = torch.randn(m, n, device="cuda", dtype=bf)
        y = torch.empty_like(x)
        w, b = torch.randn(n, device="cuda", dtype=bf), torch.randn(n, device="cuda", dtype=bf)
        mean, rstd = (torch.empty(m, device="cuda", dtype=torch.float32) for _ in range(2))
        bn = triton.next_power_of_2(n)
        for center, liger in ((True, LigerLayerNorm(n)), (False, LigerRMSNorm(n, eps=1e-6))):
            liger = liger.to("cuda", bf)
            cases = {"liger": lambda liger=liger: liger(x),
                     "library": lambda c=center: norms.norm_forward(x, w, b if c else None, 1e-5, c)}
            for rows in (1, 2, 4):
                for warps in (2, 4, 8, 16):
                    # (shapes the first run found slow are left out: two warps or four rows on rows ≥ 4096)
                    if rows * bn // (32 * warps) < 4 or rows * bn > 16384 or (bn >= 4096 and (warps == 2 or rows == 4)):
                        continue
                    cases[f"{rows}x{bn} w{warps}"] = (lambda r=rows, wp=warps, c=center: norms._norm_forward_kernel[
                        (cdiv(m, r),)](x, w, b, y, mean, rstd, m, n, n, n, 1e-5, CENTER=c, HAS_W=True, HAS_B=c,
                                       BLOCK_M=r, BLOCK_N=bn, ONE_BLOCK=True, num_warps=wp))
            if center and bn >= 2048:
                for warps, pivot in itertools.product((4, 8, 16), (False, True)):
                    cases[f"1-D row w{warps}{' pivot' if pivot else ''}"] = (
                        lambda wp=warps, pv=pivot: _layer_norm_row_kernel[(m,)](
                            x, w, b, y, mean, rstd, n, 1e-5, BLOCK_N=bn, PIVOT=pv, num_warps=wp))
            with torch.no_grad():
                times = interleaved_gpu_ms(cases, rounds=5)
            gb = 2 * x.numel() * 2 / 1e9
            cells = [f"{name} {gb / (ms * 1e-3) / copy:.3f} ({times['liger'] / ms:.2f})" for name, ms in times.items()]
            print(f"{m}x{n} {'layer_norm' if center else 'rms_norm'}: " + "; ".join(cells), flush=True)


@triton.jit
def _softmax_backward_row_kernel(y_ptr, dy_ptr, dx_ptr, N, BLOCK_N: tl.constexpr):
    """dx = y ⊙ (dy − Σ y ⊙ dy) of one row per program, as a 1-D block (float32 math)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    y = tl.load(y_ptr + row * N + cols, mask=cols < N, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + row * N + cols, mask=cols < N, other=0.0).to(tl.float32)
    dx = y * (dy - tl.sum(y * dy, axis=0))
    tl.store(dx_ptr + row * N + cols, dx.to(dx_ptr.dtype.element_ty), mask=cols < N)


def _against_liger_report():
    """report(label, cases, gb): prints each case's fraction of the 1 GiB copy and Liger's time ÷ its time, from
    medians of 7 interleaved rounds (cases["liger"] is Liger's)."""
    copy = copy_bandwidth_gbps("cuda")
    print(f"\n{torch.cuda.get_device_name()}: fraction of the 1 GiB copy ({copy:.0f} GB/s), medians of 7 interleaved "
          "rounds; in brackets Liger's time ÷ the case's (> 1: faster than Liger)")

    def report(label, cases, gb):
        with torch.no_grad():
            times = interleaved_gpu_ms(cases, rounds=7, rep_ms=50)
        cells = [f"{name} {gb / (ms * 1e-3) / copy:.3f} ({times['liger'] / ms:.3f})" for name, ms in times.items()]
        print(f"{label}: " + "; ".join(cells), flush=True)

    return report


def params_launch():
    """The norm forwards at 4096 and 8192 columns by parameter order (w and b loaded before or after the row's
    reductions), rows per program and warps, beside Liger-Kernel's (timed twice)."""
    from liger_kernel.transformers import LigerLayerNorm, LigerRMSNorm

    report = _against_liger_report()
    for m, n in [(4096, 4096), (4096, 8192)]:
        x = torch.randn(m, n, device="cuda", dtype=bf)
        y = torch.empty_like(x)
        w, b = torch.randn(n, device="cuda", dtype=bf), torch.randn(n, device="cuda", dtype=bf)
        mean, rstd = (torch.empty(m, device="cuda", dtype=torch.float32) for _ in range(2))
        launches = [(1, 8), (1, 16), (2, 16), (2, 8)] if n == 4096 else [(1, 8), (1, 16), (2, 16), (2, 32)]
        for center, liger in ((True, LigerLayerNorm(n)), (False, LigerRMSNorm(n, eps=1e-6))):
            liger = liger.to("cuda", bf)
            cases = {"liger": lambda liger=liger: liger(x), "liger again": lambda liger=liger: liger(x),
                     "library": lambda: norms.norm_forward(x, w, b if center else None, 1e-5, center)}
            for first, (rows, warps) in itertools.product((True, False), launches):
                cases[f"{'first' if first else 'after'} {rows}x{n} w{warps}"] = (
                    lambda first=first, rows=rows, warps=warps: norms._norm_forward_kernel[(cdiv(m, rows),)](
                        x, w, b, y, mean, rstd, m, n, n, n, 1e-5, CENTER=center, HAS_W=True, HAS_B=center,
                        BLOCK_M=rows, BLOCK_N=n, ONE_BLOCK=True, PARAMS_FIRST=first, num_warps=warps))
            report(f"{m}x{n} {'layer_norm' if center else 'rms_norm'} forward", cases, 2 * x.numel() * 2 / 1e9)


def softmax_against_liger():
    """The softmax forward and backward by launch (2-D tiles and 1-D rows, warps; a forward that multiplies by the
    reciprocal of the sum), beside Liger-Kernel's kernels, timed twice (how far two timings of one kernel differ)."""
    from liger_kernel.ops.softmax import _softmax_backward, _softmax_forward

    report = _against_liger_report()
    for m, n in [(4096, 4096), (4096, 8192)]:
        x = torch.randn(m, n, device="cuda", dtype=bf)
        y = torch.empty_like(x)
        bn = triton.next_power_of_2(n)
        gb = 2 * x.numel() * 2 / 1e9
        liger_y, block, warps, multi = _softmax_forward(x)
        dy = torch.randn_like(x)
        cases = {"liger": lambda: _softmax_forward(x), "liger again": lambda: _softmax_forward(x),
                 "library": lambda: softmax.softmax_forward(x, False)}
        for wp in (8, 16):
            cases[f"1-D w{wp}"] = lambda wp=wp: _softmax_row_kernel[(m,)](x, y, n, BLOCK_N=bn, num_warps=wp)
            cases[f"1-D reciprocal w{wp}"] = lambda wp=wp: _softmax_row_kernel[(m,)](
                x, y, n, BLOCK_N=bn, RECIPROCAL=True, num_warps=wp)
        report(f"{m}x{n} softmax forward", cases, gb)
        cases = {"liger": lambda: _softmax_backward(dy, liger_y, block, warps, multi),
                 "liger again": lambda: _softmax_backward(dy, liger_y, block, warps, multi),
                 "library": lambda: softmax.softmax_backward(liger_y, dy, False)}
        for wp in (4, 8, 16):
            cases[f"2-D 1x{bn} w{wp}"] = lambda wp=wp: softmax._softmax_backward_kernel[(m,)](
                liger_y, dy, y, m, n, 1, n, n, n, CAUSAL=False, BLOCK_M=1, BLOCK_N=bn, ONE_BLOCK=True, num_warps=wp)
            cases[f"1-D w{wp}"] = lambda wp=wp: _softmax_backward_row_kernel[(m,)](
                liger_y, dy, y, n, BLOCK_N=bn, num_warps=wp)
        report(f"{m}x{n} softmax backward", cases, 1.5 * gb)


def flag_combinations():
    """The norm forwards at the library's launch with either order of the parameter loads (PARAMS_FIRST), beside
    the library's own choice and Liger-Kernel's (timed twice). (The run of 2026-11-26 logged in
    `h100-2026-11-26h-forward-flags-probe.log` also tried a flag for rows that fill their block, since dropped.)"""
    from liger_kernel.transformers import LigerLayerNorm, LigerRMSNorm

    from triformer.kernels._rows import launch_meta

    report = _against_liger_report()
    for m, n in [(4096, 4096), (4096, 8192), (16384, 1024), (4096, 768)]:
        x = torch.randn(m, n, device="cuda", dtype=bf)
        y = torch.empty_like(x)
        w, b = torch.randn(n, device="cuda", dtype=bf), torch.randn(n, device="cuda", dtype=bf)
        mean, rstd = (torch.empty(m, device="cuda", dtype=torch.float32) for _ in range(2))
        meta = launch_meta(m, n, **norms.forward_launch_options(n))
        for center, liger in ((True, LigerLayerNorm(n)), (False, LigerRMSNorm(n, eps=1e-6))):
            liger = liger.to("cuda", bf)
            cases = {"liger": lambda liger=liger: liger(x), "liger again": lambda liger=liger: liger(x),
                     "library": lambda: norms.norm_forward(x, w, b if center else None, 1e-5, center)}
            for first in (True, False):
                cases["first" if first else "after"] = (
                    lambda first=first: norms._norm_forward_kernel[(cdiv(m, meta["BLOCK_M"]),)](
                        x, w, b, y, mean, rstd, m, n, n, n, 1e-5, CENTER=center, HAS_W=True, HAS_B=center,
                        PARAMS_FIRST=first, **meta))
            report(f"{m}x{n} {'layer_norm' if center else 'rms_norm'} forward {norms.forward_flags(n, center)} "
                   f"{meta}", cases, 2 * x.numel() * 2 / 1e9)

def softmax_pair():
    """The softmax forward and backward as one pair (the backward reading the y the forward just wrote, as in
    training), the library's kernels with and without cache hints on every load and store, beside Liger-Kernel's
    pair (timed twice)."""
    from liger_kernel.ops.softmax import _softmax_backward, _softmax_forward

    variants = {"library": softmax}
    for tag, (hint, (load, store)) in enumerate(HINTS.items()):
        variants[hint] = _hinted_module("softmax", tag, load, store)
    report = _against_liger_report()
    for m, n in [(4096, 4096), (4096, 8192), (16384, 1024), (4096, 768)]:
        x, dy = torch.randn(m, n, device="cuda", dtype=bf), torch.randn(m, n, device="cuda", dtype=bf)

        def liger_pair():
            y, block, warps, multi = _softmax_forward(x)
            _softmax_backward(dy, y, block, warps, multi)

        cases = {"liger": liger_pair, "liger again": liger_pair}
        for name, module in variants.items():
            cases[name] = lambda module=module: module.softmax_backward(module.softmax_forward(x, False), dy, False)
        streaming = variants["store .cs"]
        cases["forward store .cs only"] = lambda: softmax.softmax_backward(streaming.softmax_forward(x, False), dy,
                                                                           False)
        cases["backward store .cs only"] = lambda: streaming.softmax_backward(softmax.softmax_forward(x, False), dy,
                                                                              False)
        report(f"{m}x{n} softmax forward+backward", cases, 2.5 * 2 * x.numel() * 2 / 1e9)


def softmax_pair_launch():
    """The softmax forward+backward pair at 4096² with each kernel launched by rows per program and warps (the
    other kernel as the library launches it), beside Liger-Kernel's pair (timed twice)."""
    from liger_kernel.ops.softmax import _softmax_backward, _softmax_forward

    report = _against_liger_report()
    m = n = 4096
    x, dy = torch.randn(m, n, device="cuda", dtype=bf), torch.randn(m, n, device="cuda", dtype=bf)
    y, dx = torch.empty_like(x), torch.empty_like(x)

    def liger_pair():
        ly, block, warps, multi = _softmax_forward(x)
        _softmax_backward(dy, ly, block, warps, multi)

    def forward(rows, warps):
        softmax._softmax_forward_kernel[(cdiv(m, rows),)](x, y, m, n, 1, n, n, CAUSAL=False, BLOCK_M=rows,
                                                          BLOCK_N=n, ONE_BLOCK=True, num_warps=warps)

    def backward(rows, warps):
        softmax._softmax_backward_kernel[(cdiv(m, rows),)](y, dy, dx, m, n, 1, n, n, n, CAUSAL=False,
                                                           BLOCK_M=rows, BLOCK_N=n, ONE_BLOCK=True, num_warps=warps)

    library = (1, 8)  # the library's launch for rows of 4096
    cases = {"liger": liger_pair, "liger again": liger_pair,
             "library": lambda: softmax.softmax_backward(softmax.softmax_forward(x, False), dy, False)}
    for rows, warps in [(1, 4), (1, 8), (2, 8), (2, 16)]:
        cases[f"backward {rows}x{n} w{warps}"] = lambda r=rows, w=warps: (forward(*library), backward(r, w))
        if (rows, warps) != library:
            cases[f"forward {rows}x{n} w{warps}"] = lambda r=rows, w=warps: (forward(r, w), backward(*library))
    report(f"{m}x{n} softmax forward+backward", cases, 2.5 * 2 * x.numel() * 2 / 1e9)


def softmax_backward_precision():
    """dx of the softmax backward, ours and Liger-Kernel's, against float64 on the same bf16 y and dy: the error
    each leaves (Liger's backward multiplies and sums y · dy in bf16, ours in float32)."""
    from liger_kernel.ops.softmax import _softmax_backward, _softmax_forward

    print(f"\n{torch.cuda.get_device_name()}: softmax backward dx against float64 (same bf16 y and dy)")
    for m, n in [(4096, 4096), (4096, 8192), (16384, 1024)]:
        x, dy = torch.randn(m, n, device="cuda", dtype=bf), torch.randn(m, n, device="cuda", dtype=bf)
        y, block, warps, multi = _softmax_forward(x)
        y64, dy64 = y.double(), dy.double()
        reference = y64 * (dy64 - (y64 * dy64).sum(-1, keepdim=True))
        for name, dx in (("library", softmax.softmax_backward(y, dy, False)),
                         ("liger", _softmax_backward(dy, y, block, warps, multi))):
            error = (dx.double() - reference).abs()
            rounding = (reference.to(bf).double() - reference).norm() / reference.norm()
            print(f"{m}x{n} {name:8s}: max |dx − ref| {error.max().item():.3e}, ‖dx − ref‖ / ‖ref‖ "
                  f"{(error.norm() / reference.norm()).item():.3e} (bf16 rounding of ref alone: {rounding.item():.3e})",
                  flush=True)


if __name__ == "__main__":
    parts = sys.argv[1:] or ["shapes"]
    if "liger" in parts:
        norms_against_liger()
    if "shapes" in parts:
        main()
    if "persistent" in parts:
        persistent()
    if "hints" in parts:
        hints()
    if "softmax" in parts:
        softmax_warps()
    if "softmax-liger" in parts:
        softmax_against_liger()
    if "launch" in parts:
        params_launch()
    if "flags" in parts:
        flag_combinations()
    if "softmax-pair" in parts:
        softmax_pair()
    if "softmax-pair-launch" in parts:
        softmax_pair_launch()
    if "softmax-precision" in parts:
        softmax_backward_precision()
