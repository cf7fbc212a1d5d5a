"""How should the fused linear + cross-entropy chunk its rows, and where should dW accumulate? On a GPU host, for
each shape [N, H, V] (bf16, no bias, as an LM head): every chunk size × dW accumulator (float32 precision by the
vocabulary-slab pass, or summed in the weight's dtype) with the tuner on, beside Liger-Kernel (where installed) and
eager F.linear + F.cross_entropy: GPU time (CUDA graph; the profiler's kernel time for Liger), wall time with host
launches (do_bench), peak memory above the inputs (returned gradients included), and the error of dx and dW against
a float64 reference (‖ours − ref‖ / ‖ref‖).

Run: python tools/gpu_lce_chunks.py [--shapes 8192x768x50304 8192x4096x128256] [--chunks 128 256 512 1024]
                                    [--breakdown] [--memory] [--dw float32 bf16]
                                    [--ce-tilings library "row 16384 / 32 warps" ...]
Logs to $OUT/lce_chunks.csv; with --breakdown also each provider's GPU time by kernel (one step under
torch.profiler, no L2 flush) to $OUT/lce_kernels.csv and the heaviest kernels to the log; with --memory the blocks
live at each provider's peak by allocation site (triformer.bench.memory) to $OUT/lce_memory.csv and the log.
"""

import argparse
import os
import sys
from pathlib import Path

import pandas as pd
import torch
from gpu_ce_rows import TILINGS  # tools/, beside this script

import triformer.functional as TF
from triformer.bench.linear_cross_entropy import liger_chunk_rows, providers
from triformer.bench.memory import peak_blocks
from triformer.bench.norms import peak_extra_mib
from triformer.bench.timing import timings
from triformer.kernels import cross_entropy
from triformer.kernels._runtime import overridden

DTYPE = torch.bfloat16


def reference_grads(x, w, targets):
    """(dx, dW) of the mean cross-entropy of x·Wᵀ in float64, the logits in row blocks (a float64 [N, V] would not
    fit at the larger shapes)."""
    x64, w64 = x.double(), w.double()
    dx, dw = torch.zeros_like(x64), torch.zeros_like(w64)
    n = x.shape[0]
    for start in range(0, n, 1024):
        rows = slice(start, min(n, start + 1024))
        g = torch.softmax(x64[rows] @ w64.t(), dim=1)
        g[torch.arange(g.shape[0], device=g.device), targets[rows]] -= 1.0
        g /= n
        dx[rows] = g @ w64
        dw += g.t() @ x64[rows]
    return dx, dw


def relative_error(ours, ref) -> float:
    return ((ours.double() - ref).norm() / ref.norm()).item()


def kernel_breakdown(step, steps: int = 3) -> pd.DataFrame:
    """GPU time per kernel name (ms per step, launches per step) of `steps` calls of step() under torch.profiler."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    table = pd.DataFrame(
        {"kernel": [e.name[:60] for e in events], "ms": [e.time_range.elapsed_us() / 1e3 for e in events]}
    )
    grouped = table.groupby("kernel")["ms"].agg(["sum", "count"]) / steps
    return grouped.rename(columns={"sum": "ms_per_step", "count": "launches_per_step"}).sort_values(
        "ms_per_step", ascending=False
    )


def variants(chunks, accumulators, ce_tilings):
    """name → loss(x, w, targets): every chunk size × dW accumulator × cross-entropy tiling (gpu_ce_rows.TILINGS,
    taken whatever the chunk's rows; none named: the library's own choice), then Liger-Kernel and torch."""
    table = {}
    for tiling in ce_tilings or [None]:
        overrides = TILINGS[tiling] if tiling else {}
        for c in chunks:
            for acc in accumulators:
                a = torch.float32 if acc == "float32" else None

                def loss(x, w, t, c=c, a=a, overrides=overrides):
                    with overridden(cross_entropy, **overrides):
                        return TF.linear_cross_entropy(x, w, t, chunk_size=c, accum_dtype=a)

                table[f"triformer chunk {c} dW {acc}" + (f" [{tiling}]" if tiling else "")] = loss
    others = providers("cuda")
    if "liger" not in others:
        print("liger: not installed (carry .whl-liger)", flush=True)
    for name in ("liger", "torch"):
        if name in others:
            table[name] = others[name]
    return table


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["8192x768x50304", "8192x4096x128256"])
    parser.add_argument("--chunks", nargs="+", type=int, default=[128, 256, 512, 1024])
    parser.add_argument("--breakdown", action="store_true", help="also GPU time per kernel of each provider")
    parser.add_argument("--memory", action="store_true", help="also the blocks live at each provider's peak, by site")
    parser.add_argument("--dw", nargs="+", default=["float32", "bf16"], choices=["float32", "bf16"])
    parser.add_argument("--ce-tilings", nargs="*", default=[], choices=sorted(TILINGS), metavar="TILING")
    args = parser.parse_args()
    rows, kernels, memory = [], [], []
    out = Path(os.environ.get("OUT", "."))
    print(torch.cuda.get_device_name(), flush=True)
    for shape in args.shapes:
        n, h, v = map(int, shape.split("x"))
        torch.manual_seed(0)
        x = torch.randn(n, h, device="cuda", dtype=DTYPE).requires_grad_()
        w = (torch.randn(v, h, device="cuda", dtype=DTYPE) * h**-0.5).requires_grad_()
        targets = torch.randint(0, v, (n,), device="cuda")
        ref_dx, ref_dw = reference_grads(x.detach(), w.detach(), targets)
        print(
            f"== {shape}: full logits {n * v * 2 / 2**20:.0f} MiB, Liger's chunk {liger_chunk_rows(n, h, v)} rows",
            flush=True,
        )
        for name, loss_fn in variants(args.chunks, args.dw, args.ce_tilings).items():

            def step():
                return torch.autograd.grad(loss_fn(x, w, targets), (x, w))

            try:
                dx, dw = step()
                err_dx, err_dw = relative_error(dx, ref_dx), relative_error(dw, ref_dw)
                del dx, dw
                times = timings(step, capture=name != "liger")
                peak = peak_extra_mib(step, "cuda")
            except Exception as exc:  # e.g. out of memory at the larger shape: the row says so
                print(f"{name:32s} failed: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
                torch.cuda.empty_cache()
                continue
            row = dict(shape=shape, provider=name, **times, peak_extra_mib=peak, err_dx=err_dx, err_dw=err_dw)
            rows.append(row)
            print(
                f"{name:32s} gpu {times['gpu_ms']:8.3f} ms  wall {times['ms']:8.3f} ms  peak {peak:8.1f} MiB  "
                f"err dx {err_dx:.2e} dW {err_dw:.2e}",
                flush=True,
            )
            pd.DataFrame(rows).to_csv(out / "lce_chunks.csv", index=False)
            if args.memory:
                peak_bytes, sites = peak_blocks(step)
                print(f"-- blocks live at the peak ({peak_bytes} bytes), by allocation site --", flush=True)
                for site, blocks, size in sites[:12]:
                    print(f"{size:>14,d} B in {blocks:3d} blocks  {site}", flush=True)
                memory += [dict(shape=shape, provider=name, site=s, blocks=b, bytes=z) for s, b, z in sites]
                pd.DataFrame(memory).to_csv(out / "lce_memory.csv", index=False)
            if args.breakdown:
                breakdown = kernel_breakdown(step)
                print(breakdown.head(8).to_string(float_format="%.3f"), flush=True)
                kernels.append(breakdown.reset_index().assign(shape=shape, provider=name))
                pd.concat(kernels).to_csv(out / "lce_kernels.csv", index=False)
        del ref_dx, ref_dw
        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
