"""On a GPU host: why the row kernels' forward sits below the copy bandwidth. GPU time (CUDA graph, L2 flushed) of
LayerNorm / RMSNorm forward by launch shape, against three ceilings measured in the same run: the 1 GiB device
copy rate, torch's copy of the same tensor, and a Triton kernel that only loads and stores the rows with the
norms' own tiling; then dropout against a variant that issues all its loads before the Philox rounds.
Prints one table; not part of the pipeline."""

import torch
import triton
import triton.language as tl

from triformer.bench.timing import copy_bandwidth_gbps, gpu_ms
from triformer.kernels import dropout, norms
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


if __name__ == "__main__":
    main()
