"""Which launch shape should the gated-activation and RoPE kernels take? On a GPU host: GPU time (CUDA graph, L2
flushed) of the gated forward and forward+backward and of RoPE forward and forward+backward at the bench stage's
gpu shapes, for each candidate of the launcher's module constants, beside the current default.

gated: GPU_TILE (elements per program) × GPU_MAX_BLOCK_N (widest column block).
rope:  GPU_TILE (elements per program) × PROGRAMS_PER_SM (programs launched per SM before a program loops).
Prints, per shape and direction, ms per candidate and its speed against the default (> 1: faster); logs to
$OUT/tile_sweep.csv.

Run: python tools/gpu_tile_sweep.py [gated] [rope]
"""

import itertools
import os
import sys
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for experiments.common
import triformer.functional as TF  # noqa: E402
from experiments.common import load_params, stage_config  # noqa: E402
from triformer.bench.timing import gpu_ms  # noqa: E402
from triformer.kernels import gated, rope  # noqa: E402
from triformer.kernels._runtime import overridden  # noqa: E402

DTYPE = torch.bfloat16
CANDIDATES = {
    gated: {"GPU_TILE": [2048, 4096, 8192, 16384], "GPU_MAX_BLOCK_N": [512, 1024, 2048, 4096]},
    rope: {"GPU_TILE": [2048, 4096, 8192, 16384], "PROGRAMS_PER_SM": [4, 8, 16, 32]},
}


def gated_cases(shapes):
    """(shape name, fwd, fwd+bwd) for x [M, 2·hidden]."""
    for m, hidden in shapes:
        x = torch.randn(m, 2 * hidden, device="cuda", dtype=DTYPE, requires_grad=True)
        dh = torch.randn(m, hidden, device="cuda", dtype=DTYPE)

        def forward(x=x):
            return TF.swiglu(x)

        def both(x=x, dh=dh):
            return torch.autograd.grad(TF.swiglu(x), x, dh)

        yield f"swiglu {m}x{hidden}", forward, both


def rope_cases(shapes):
    """(shape name, fwd, fwd+bwd) for q and k [B, H, S, D]."""
    for b, h, s, d in shapes:
        q, k = (torch.randn(b, h, s, d, device="cuda", dtype=DTYPE, requires_grad=True) for _ in range(2))
        cos, sin = TF.rope_tables(d, s, device="cuda")
        dq, dk = torch.randn_like(q), torch.randn_like(k)

        def forward(q=q, k=k, cos=cos, sin=sin):
            return TF.rope(q, k, cos, sin)

        def both(q=q, k=k, cos=cos, sin=sin, dq=dq, dk=dk):
            return torch.autograd.grad(TF.rope(q, k, cos, sin), (q, k), (dq, dk))

        yield f"rope {b}x{h}x{s}x{d}", forward, both


def sweep(module, cases) -> list[dict]:
    names, values = zip(*CANDIDATES[module].items())
    default = {name: getattr(module, name) for name in names}
    rows = []
    for shape, forward, both in cases:
        for direction, fn in (("fwd", forward), ("fwd+bwd", both)):
            base = gpu_ms(fn)
            for combo in itertools.product(*values):
                setting = dict(zip(names, combo))
                with overridden(module, **setting):
                    ms = gpu_ms(fn)
                rows.append(
                    dict(shape=shape, mode=direction, **setting, ms=ms, speed_vs_default=base / ms, default=default)
                )
            mine = [r for r in rows if r["shape"] == shape and r["mode"] == direction]
            best = max(mine, key=lambda r: r["speed_vs_default"])
            picked = {name: best[name] for name in names}
            print(
                f"{shape} {direction}: default {default} {base:.4f} ms; best {picked} {best['ms']:.4f} ms "
                f"({best['speed_vs_default']:.2f}x)",
                flush=True,
            )
    return rows


def main() -> None:
    which = sys.argv[1:] or ["gated", "rope"]
    config = stage_config("bench", load_params(), "gpu")
    rows = []
    if "gated" in which:
        rows += sweep(gated, gated_cases(config["gated_mlp"]["shapes"]))
    if "rope" in which:
        rows += sweep(rope, rope_cases(config["rope"]["shapes"]))
    frame = pd.DataFrame(rows)
    out = Path(os.environ.get("OUT", "/tmp/out"))
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "tile_sweep.csv", index=False)
    pd.set_option("display.width", 200)
    print(frame.drop(columns="default").round(4).to_string())


if __name__ == "__main__":
    main()
