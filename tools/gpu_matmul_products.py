"""On a GPU host: the three products of a linear layer's forward and backward (Y = X·Wᵀ, dX = dZ·W, dW = dZᵀ·X)
at the benchmark shapes, cuBLAS (torch.mm) beside our TMA kernel, each tile forced in turn and the tuner's pick;
GPU time (CUDA graph, L2 flushed). With the argument `configs`: every tile, with a few outside the tuning space,
whole and cut, at the first two shapes. With `forward`: the fused forward relu(X·Wᵀ + b) per tile (some outside
the tuning space) beside eager and torch._addmm_activation. With the argument `gated` (as well as or instead of
`products`): the backward's gated pass (dZ = dY ⊙ relu'(Y) and db) by tile and warps against torch's dY·mask of
the same bytes. Not part of the pipeline."""

import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for experiments.common
from experiments.common import load_params, stage_config  # noqa: E402
from triformer.bench.timing import gpu_ms  # noqa: E402
from triformer.kernels import _tiles, matmul_tma, reductions  # noqa: E402
from triformer.kernels.matmul import matmul  # noqa: E402

# The linear benchmark's shapes (M, K, N), from params.yaml's bench group at its gpu profile.
SHAPES = [tuple(shape) for shape in stage_config("bench", load_params(), "gpu")["linear"]["shapes"]]
bf = torch.bfloat16
SMS = torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() else 132


def products(M, K, N):
    """name → (a, b) of the three products of a linear layer [M, K] → [M, N] (views as the layer makes them)."""
    x = torch.randn(M, K, device="cuda", dtype=bf)
    w = torch.randn(N, K, device="cuda", dtype=bf) * K**-0.5
    dz = torch.randn(M, N, device="cuda", dtype=bf)
    return {"Y = X·Wᵀ": (x, w.t()), "dX = dZ·W": (dz, w), "dW = dZᵀ·X": (dz.t(), x)}


def best_tile(a, b, cut):
    """(µs, tile) of the best fitting tile, each tile forced in turn, all tiles whole (cut False) or scheduled as
    matmul_tma.schedule_for says (tiles it would not cut are skipped); 'w132 k8': 132 tiles whole, the rest cut
    into 8 runs."""
    best = (float("inf"), "-")
    M, K, N = a.shape[0], a.shape[1], b.shape[1]
    for config in _tiles.fitting_configs(matmul_tma._TMA_CONFIGS, M, N, 2):
        k = config.kwargs
        tiles = matmul_tma.count_tiles(M, N, k)
        whole, split = matmul_tma.schedule_for(M, N, K, config.all_kwargs(), SMS) if cut else (tiles, 1)
        if cut and split == 1:
            continue
        with matmul_tma.forced(config, (whole / tiles, split)):
            us = gpu_ms(lambda: matmul(a, b)) * 1e3
        label = f"{k['BLOCK_M']}x{k['BLOCK_N']} s{config.num_stages}" + (f" w{whole} k{split}" if cut else "")
        best = min(best, (us, label), key=lambda t: t[0])
    return best


def ws_label(config: tuple) -> str:
    """matmul_ws.py's config (BLOCK_N0, BLOCK_N1, STAGES, schedule) in short: 'ws128x(128+64)s4', '…pp'."""
    n0, n1, stages, schedule = config
    return f"ws128x({n0}+{n1})s{stages}" + ("pp" if schedule == "pingpong" else "")


def candidate_label(meta: dict) -> str:
    """A tuner candidate in short: '128x256s3' (whole tiles), '128x256s3/k2' (the last wave cut two ways),
    'ws128x(128+64)s4' (the warp-specialized Gluon kernel; 'pp' appended for its ping-pong schedule)."""
    if "WS_CONFIG" in meta:
        return ws_label(meta["WS_CONFIG"])
    tile = f"{meta['BLOCK_M']}x{meta['BLOCK_N']}s{meta['num_stages']}"
    return tile + (f"/k{meta['SPLIT_K']}" if meta["SPLIT_K"] > 1 else "")


def product_table():
    print(torch.cuda.get_device_name(), "— GPU time (µs) of each product; ratios = torch.mm ÷ ours")
    print(
        f"{'M,K,N':16s} {'product':12s} {'torch.mm':>9s} {'best whole tiles':>24s} {'best cut':>29s} "
        f"{'tuned':>9s} {'mm÷tuned':>9s}  pick"
    )
    for M, K, N in SHAPES:
        for name, (a, b) in products(M, K, N).items():
            ref = gpu_ms(lambda: torch.mm(a, b)) * 1e3
            whole, cut = best_tile(a, b, False), best_tile(a, b, True)
            tuned = gpu_ms(lambda: matmul(a, b)) * 1e3  # first call (inside gpu_ms, before capture) tunes
            keys = [k for k in _tiles._CHOSEN if k[:4] == ("tma", a.shape[0], b.shape[1], a.shape[1])]
            pick = [_tiles._CHOSEN[k] for k in keys]
            print(
                f"{M},{K},{N:<8d} {name:12s} {ref:9.1f} {whole[0]:9.1f} {whole[1]:>14s} {cut[0]:9.1f} "
                f"{cut[1]:>19s} {tuned:9.1f} {ref / tuned:9.2f}  {candidate_label(pick[-1]) if pick else '?'}",
                flush=True,
            )
            if keys and keys[-1] in _tiles.TIMED:
                print(
                    "    tuner (µs, queued): "
                    + ", ".join(f"{candidate_label(m)} {ms * 1e3:.1f}" for m, ms in _tiles.TIMED[keys[-1]]),
                    flush=True,
                )


# Tiles outside the tuning space, timed by `configs` beside it: two warpgroups on a 128×128 tile, deeper pipelines.
EXTRA_CONFIGS = [
    matmul_tma._config(128, 128, 64, 4, 8),
    matmul_tma._config(128, 128, 64, 5, 8),
    matmul_tma._config(128, 128, 64, 6, 4),
    matmul_tma._config(64, 256, 64, 5, 4),
]


def config_table():
    """Every tile of the tuning space and EXTRA_CONFIGS, whole and cut as schedule_for says, at the first two
    shapes."""
    print("\nPer tile (µs, GPU time): whole tiles / cut as schedule_for says ('-': not cut)")
    for M, K, N in SHAPES[:2]:
        for name, (a, b) in products(M, K, N).items():
            Mp, Kp, Np = a.shape[0], a.shape[1], b.shape[1]
            cells = [f"torch.mm {gpu_ms(lambda: torch.mm(a, b)) * 1e3:.1f}"]
            for config in matmul_tma._TMA_CONFIGS + EXTRA_CONFIGS:
                k = config.kwargs
                tiles = matmul_tma.count_tiles(Mp, Np, k)
                whole, split = matmul_tma.schedule_for(Mp, Np, Kp, config.all_kwargs(), SMS)
                times = []
                for schedule in [(1.0, 1)] + ([(whole / tiles, split)] if split > 1 else []):
                    try:
                        with matmul_tma.forced(config, schedule):
                            times.append(f"{gpu_ms(lambda: matmul(a, b)) * 1e3:.1f}")
                    except Exception as error:  # a tile that does not compile here
                        times.append(type(error).__name__)
                cells.append(
                    f"{k['BLOCK_M']}x{k['BLOCK_N']} w{config.num_warps} s{config.num_stages}: "
                    + " / ".join(times + ["-"] * (2 - len(times)))
                )
            print(f"{M},{K},{N:<8d} {name:12s} " + "; ".join(cells), flush=True)


# Tiles tried for the fused forward only (`forward`): deeper K steps, 256-row tiles.
FORWARD_CONFIGS = [
    matmul_tma._config(128, 256, 128, 2, 8),
    matmul_tma._config(128, 128, 128, 3, 4),
    matmul_tma._config(256, 128, 64, 3, 8),
    matmul_tma._config(256, 128, 64, 4, 8, split=True),
    matmul_tma._config(128, 128, 64, 6, 4),
]


def forward_table():
    """The fused forward act(X·Wᵀ + b) (relu) per tile, beside eager relu(F.linear) and torch._addmm_activation,
    at the first two shapes: which tile, if any, reaches 1.4× eager."""
    print("\nFused forward relu(X·Wᵀ + b), GPU µs per tile (÷ eager in brackets)")
    for M, K, N in SHAPES[:2]:
        x = torch.randn(M, K, device="cuda", dtype=bf)
        w = torch.randn(N, K, device="cuda", dtype=bf) * K**-0.5
        b = torch.randn(N, device="cuda", dtype=bf)
        eager = gpu_ms(lambda: torch.relu(torch.nn.functional.linear(x, w, b))) * 1e3
        addmm = gpu_ms(lambda: torch._addmm_activation(b, x, w.t())) * 1e3
        cells = [f"eager {eager:.1f}", f"addmm_activation {addmm:.1f} ({eager / addmm:.2f})"]
        for config in matmul_tma._TMA_CONFIGS + FORWARD_CONFIGS:
            k = config.kwargs
            with matmul_tma.forced(config):
                us = gpu_ms(lambda: matmul(x, w.t(), bias=b, activation="relu")) * 1e3
            split = "-split" if k["SPLIT_EPILOGUE"] else ""
            cells.append(
                f"{k['BLOCK_M']}x{k['BLOCK_N']}x{k['BLOCK_K']} w{config.num_warps} s{config.num_stages}"
                f"{split} {us:.1f} ({eager / us:.2f})"
            )
        print(f"{M},{K},{N:<8d} " + "; ".join(cells), flush=True)


def gated_table():
    print(
        "\nGated pass dZ = dY ⊙ relu'(Y), db = Σ_rows dZ: GPU µs by (BLOCK_M, BLOCK_N, warps, rows per program);"
        " 'of mul' = torch.mul(dY, mask, out=dZ) time ÷ ours (same bytes, no db)"
    )
    default = (
        reductions.GATED_BLOCK_M,
        reductions.GATED_BLOCK_N,
        reductions.GATED_WARPS,
        reductions.GATED_ROWS_PER_PROGRAM,
    )
    for M, _K, N in SHAPES[:3]:
        dy, y = (torch.randn(M, N, device="cuda", dtype=bf) for _ in range(2))
        keep = y > 0
        dz = torch.empty_like(dy)
        ref = gpu_ms(lambda: torch.mul(dy, keep, out=dz)) * 1e3
        results = []
        for bm, bn, warps, rows in itertools.product((16, 32, 64), (64, 128, 256), (4, 8), (64, 128)):
            if bm * bn > 8192 or bm > rows:
                continue
            with reductions.gated_launch(bm, bn, warps, rows):
                us = gpu_ms(lambda: reductions.gated_column_sum(dy, y, "relu")) * 1e3
            results.append((us, bm, bn, warps, rows))
        results.sort()
        print(
            f"{M}x{N}: torch.mul {ref:.1f} µs; best five: "
            + "; ".join(
                f"{us:.1f} µs ({bm}, {bn}, w{w}, r{r}, of mul {ref / us:.2f})" for us, bm, bn, w, r in results[:5]
            ),
            flush=True,
        )
        current = [r for r in results if r[1:] == default]
        if current:
            print(f"    current default {default}: {current[0][0]:.1f} µs", flush=True)


if __name__ == "__main__":
    parts = sys.argv[1:] or ["products"]
    if "products" in parts:
        product_table()
    if "configs" in parts:
        config_table()
    if "forward" in parts:
        forward_table()
    if "gated" in parts:
        gated_table()
