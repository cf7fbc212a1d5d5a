"""Where does a call's host time go? On a GPU host: per-call wall time of problems small enough that the GPU finishes
each call long before the host launches the next (so wall time per call = host cost).

1. Every public op, forward (no_grad) and forward+backward (autograd.grad), ours against its PyTorch counterpart,
   µs per call; ours also through the dispatcher (torch.ops.triformer.*, as torch.compile and dispatch modes call
   it) beside the eager fast path that plain calls take (functional._library); "ours" with the fast launch
   (kernels/_launch.py), the "T-run" columns with every launch through Triton's JITFunction.run.
2. Launch paths: a bare Triton launch (through JITFunction.run, through _launch.launch, the compiled kernel's
   launcher, the C launch alone), a launcher, the norm kernels, the Gluon and Triton matmul launches.
3. cProfile of our heaviest paths.

Run: python tools/gpu_host_profile.py [--calls N]
"""

import argparse
import contextlib
import cProfile
import pstats

import torch
import triton
import triton.language as tl

from triformer.bench import host
from triformer.bench.host import fwd_bwd
from triformer.functional._library import through_dispatcher
from triformer.kernels import _launch, matmul_tma, norms
from triformer.kernels._runtime import overridden
from triformer.kernels.matmul import matmul
from triformer.kernels.reductions import column_sum

DEVICE, DTYPE = "cuda", torch.bfloat16


def per_call_us(fn, calls: int) -> float:
    return host.per_call_ms(fn, calls) * 1e3


def op_cases() -> dict:
    return host.op_cases(DEVICE, DTYPE)


def op_table(calls: int) -> None:
    columns = ("fwd ours", "fwd T-run", "fwd torch", "ratio", "f+b ours", "f+b T-run", "f+b disp.", "f+b torch")
    print(f"\n{'op (µs per call)':24s}" + "".join(f"{c:>11s}" for c in columns) + f"{'ratio':>11s}")
    for name, (ours, theirs, inputs) in op_cases().items():
        with torch.no_grad():
            fwd_ours, fwd_torch = per_call_us(ours, calls), per_call_us(theirs, calls)
            with overridden(_launch, FAST=False):
                fwd_triton_run = per_call_us(ours, calls)
        both_ours = per_call_us(fwd_bwd(ours, inputs), calls)
        with overridden(_launch, FAST=False):
            both_triton_run = per_call_us(fwd_bwd(ours, inputs), calls)
        with through_dispatcher():
            both_dispatched = per_call_us(fwd_bwd(ours, inputs), calls)
        both_torch = per_call_us(fwd_bwd(theirs, inputs), calls)
        row = (fwd_ours, fwd_triton_run, fwd_torch, fwd_ours / fwd_torch, both_ours, both_triton_run)
        row += (both_dispatched, both_torch, both_ours / both_torch)
        print(
            f"{name:24s}"
            + "".join(f"{value:11.2f}" if i in (3, 8) else f"{value:11.1f}" for i, value in enumerate(row)),
            flush=True,
        )


@triton.jit
def _empty_kernel(a, b, c, d, e, f, g, M, N, K, s0, s1, s2, s3, FLAG: tl.constexpr):
    pass


def launch_cases() -> dict:
    x = torch.randn(256, 256, device=DEVICE, dtype=DTYPE)
    w, b = torch.randn(256, device=DEVICE, dtype=DTYPE), torch.randn(256, device=DEVICE, dtype=DTYPE)
    dy, y = torch.randn_like(x), torch.empty_like(x)
    mean, rstd = torch.empty(256, device=DEVICE), torch.empty(256, device=DEVICE)
    _, x2, mean_s, rstd_s = norms.norm_forward(x, w, b, 1e-5, True)
    part = torch.randn(2, 16, 256, device=DEVICE)
    empty_args = (x, x, x, x, x, x, x, 256, 256, 256, 256, 1, 256, 1)
    compiled = _empty_kernel[(1,)](*empty_args, FLAG=True)
    launcher = compiled.run
    c_launch = launcher.launch
    flags = (launcher.launch_cooperative_grid, launcher.launch_pdl)

    def c_launch_alone():
        if hasattr(launcher, "arg_annotations"):  # Triton ≥ 3.7: metadata, hooks, scratch, annotations, args tuple
            c_launch(
                1,
                1,
                1,
                stream(),
                compiled.function,
                *flags,
                compiled.packed_metadata,
                None,
                None,
                None,
                None,
                None,
                launcher.arg_annotations,
                launcher.kernel_signature,
                (*empty_args, True),
            )
        else:  # Triton 3.6: scratch, metadata, hooks, then the arguments themselves
            c_launch(
                1,
                1,
                1,
                stream(),
                compiled.function,
                *flags,
                None,
                None,
                compiled.packed_metadata,
                None,
                None,
                None,
                *empty_args,
                True,
            )

    def stream():
        return torch._C._cuda_getCurrentRawStream(torch.cuda.current_device())

    cases = {
        "torch.empty_like": lambda: torch.empty_like(x),
        "triton empty kernel (7 ptr, 7 int)": lambda: _empty_kernel[(1,)](*empty_args, FLAG=True),
        "  the same through _launch.launch": lambda: _launch.launch(_empty_kernel, (1,), *empty_args, FLAG=True),
        "  the same, compiled kernel's launcher": lambda: compiled.run(
            1, 1, 1, stream(), compiled.function, compiled.packed_metadata, None, None, None, *empty_args, True
        ),
        "  the same, the C launch alone": c_launch_alone,
        "norm fwd kernel, direct launch": lambda: norms._norm_forward_kernel[(256,)](
            x,
            w,
            b,
            y,
            mean,
            rstd,
            256,
            256,
            256,
            256,
            1e-5,
            CENTER=True,
            HAS_W=True,
            HAS_B=True,
            BLOCK_M=1,
            BLOCK_N=256,
            ONE_BLOCK=True,
            num_warps=4,
        ),
        "norms.norm_forward (launcher)": lambda: norms.norm_forward(x, w, b, 1e-5, True),
        "norms.norm_backward (launcher)": lambda: norms.norm_backward(dy, x2, w, mean_s, rstd_s, DTYPE, DTYPE),
        "column_sum of [2, 16, 256]": lambda: column_sum(part, DTYPE, rows_per_program=16),
    }
    # The warp-specialized Gluon product (seven TMA descriptors a launch) beside the Triton TMA kernel, at a product
    # just large enough for the tuner to offer it (2²⁰ outputs) and small enough to leave the host the bottleneck.
    xg, wg, bg = (torch.randn(*shape, device=DEVICE, dtype=DTYPE) for shape in ((1024, 64), (1024, 64), (1024,)))
    cg = torch.empty(1024, 1024, device=DEVICE, dtype=DTYPE)
    ws = matmul_tma._gluon_kernel()
    if ws is not None:
        cases["matmul_ws.launch (Gluon kernel, direct)"] = lambda: ws.launch(
            xg, wg, cg, None, bg, 1, matmul_tma.WARP_SPECIALIZED_CONFIGS[0], 132
        )
    cases["matmul 1024x64x1024 (tuned, Gluon offered)"] = lambda: matmul(xg, wg.t(), bias=bg, activation="relu")

    def without_gluon():
        with matmul_tma.without_warp_specialization():
            return matmul(xg, wg.t(), bias=bg, activation="relu")

    cases["matmul 1024x64x1024 (tuned, Triton only)"] = without_gluon
    return cases


def profile(name: str, fn, calls: int = 300) -> None:
    fn()
    torch.cuda.synchronize()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    torch.cuda.synchronize()
    print(f"\n== cProfile, {calls} calls of {name} (tottime, s) ==")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(22)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls per measurement")
    parser.add_argument(
        "--sections", default="ops,launch,profile", help="comma-separated: ops (the op table), launch, profile"
    )
    parser.add_argument("--profile", default="linear relu,layer_norm,cross_entropy", help="ops to cProfile")
    args = parser.parse_args()
    sections = args.sections.split(",")
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    with overridden(_launch, FAST=True, CHECK=False):  # "ours" with the fast launch; the T-run columns without
        if "ops" in sections:
            op_table(args.calls)
        if "launch" in sections:
            print(f"\n{'launch path':44s} {'host µs/call':>12s}")
            for name, fn in launch_cases().items():
                try:
                    print(f"{name:44s} {per_call_us(fn, args.calls):12.1f}", flush=True)
                except Exception as exc:  # a launch path this Triton lacks must not end the table
                    print(f"{name:44s} {type(exc).__name__}: {exc}"[:160], flush=True)
        cases = op_cases()
        for name in args.profile.split(",") if "profile" in sections else ():
            ours, _, inputs = cases[name]
            for label, context in (("", contextlib.nullcontext), (", through the dispatcher", through_dispatcher)):
                with context():
                    profile(f"triformer {name} fwd+bwd (fast launch){label}", fwd_bwd(ours, inputs))


if __name__ == "__main__":
    main()
