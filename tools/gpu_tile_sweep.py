"""Which launch shape should the gated-activation and RoPE kernels take? On a GPU host: GPU time (CUDA graph, L2
flushed) of the gated forward and forward+backward and of RoPE forward and forward+backward at the bench stage's
gpu shapes, for each candidate of the launcher's module constants, beside the current default.

gated:    GPU_TILE (elements per program) × GPU_MAX_BLOCK_N (widest column block).
rope:     GPU_TILE (elements per program) × PROGRAMS_PER_SM (programs launched per SM before a program loops).
residual: the fused residual add + LayerNorm (a float32 stream, a bf16 branch, y in bf16 as a GPT block under
          autocast makes it) at the GPT shapes: TILE × WARPS × BACKWARD_RESIDENT_WARPS, beside the torch.compile'd
          and eager twins (x + h, layer_norm, cast) in the same run.
Prints, per shape and direction, ms per candidate and its speed against the default (> 1: faster), and the
baselines' ms; logs to $OUT/tile_sweep.csv.

Run: python tools/gpu_tile_sweep.py [gated] [rope] [residual]  (TILE_SWEEP_DEFAULT_ONLY=1: the defaults and
baselines only)
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
from triformer.kernels import gated, residual_norm, rope  # noqa: E402
from triformer.kernels._runtime import overridden  # noqa: E402

DTYPE = torch.bfloat16
# TILE_SWEEP_DEFAULT_ONLY=1: time the default launch beside the baselines, no other candidate.
DEFAULT_ONLY = os.environ.get("TILE_SWEEP_DEFAULT_ONLY") == "1"
CANDIDATES = {
    gated: {"GPU_TILE": [2048, 4096, 8192, 16384], "GPU_MAX_BLOCK_N": [512, 1024, 2048, 4096]},
    rope: {"GPU_TILE": [2048, 4096, 8192, 16384], "PROGRAMS_PER_SM": [4, 8, 16, 32]},
    residual_norm: {
        "TILE": [1024, 2048, 4096, 8192],
        "WARPS": [None, 2, 4, 8],
        "BACKWARD_RESIDENT_WARPS": [16, 32, 64],
    },
}
# rows × width of the residual stream × dropout rate: GPT-2 small (batch 16 × 1024 tokens, 768 wide, no dropout),
# the character GPT (64 × 256, 384 wide), without and with train_gpt's GPU-profile dropout (0.2).
RESIDUAL_SHAPES = [(16384, 768, 0.0), (16384, 384, 0.0), (16384, 384, 0.2)]


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


def residual_cases(shapes):
    """(shape name, fwd, fwd+bwd, {baseline: (fwd, fwd+bwd)}) for x float32 and h bf16 [M, N], dropout p on h, y in
    bf16."""
    for m, n, p in shapes:
        x = torch.randn(m, n, device="cuda", requires_grad=True)
        h = torch.randn(m, n, device="cuda", dtype=DTYPE, requires_grad=True)
        w, b = (torch.randn(n, device="cuda", requires_grad=True) for _ in range(2))
        ds, dy = torch.randn(m, n, device="cuda"), torch.randn(m, n, device="cuda", dtype=DTYPE)

        def ours(x, h, w, b, p=p):
            return TF.add_dropout_norm(x, h, p, w, b, y_dtype=DTYPE)

        def twin(x, h, w, b, p=p):
            s = x + torch.nn.functional.dropout(h, p)
            return s, torch.nn.functional.layer_norm(s, (n,), w, b, 1e-5).to(DTYPE)

        def directions(f):
            def forward():
                return f(x, h, w, b)

            def both():
                return torch.autograd.grad(f(x, h, w, b), (x, h, w, b), (ds, dy))

            return forward, both

        forward, both = directions(ours)
        yield (
            f"residual layernorm {m}x{n} p={p}",
            forward,
            both,
            {
                "torch.compile": directions(torch.compile(twin, dynamic=False)),  # one compile per shape, static
                "eager": directions(twin),
            },
        )


def sweep(module, cases) -> list[dict]:
    names, values = zip(*CANDIDATES[module].items())
    default = {name: getattr(module, name) for name in names}
    rows = []
    for shape, forward, both, *baselines in cases:
        for i, (direction, fn) in enumerate((("fwd", forward), ("fwd+bwd", both))):
            base = gpu_ms(fn)
            for name, fns in (baselines[0] if baselines else {}).items():
                ms = gpu_ms(fns[i])
                rows.append(dict(shape=shape, mode=direction, baseline=name, ms=ms, speed_vs_default=base / ms))
                print(
                    f"{shape} {direction}: {name} {ms:.4f} ms (its time ÷ the default's: {ms / base:.2f})", flush=True
                )
            combos = [tuple(default.values())] if DEFAULT_ONLY else itertools.product(*values)
            for combo in combos:
                setting = dict(zip(names, combo))
                with overridden(module, **setting):
                    ms = gpu_ms(fn)
                rows.append(
                    dict(shape=shape, mode=direction, **setting, ms=ms, speed_vs_default=base / ms, default=default)
                )
            mine = [r for r in rows if r["shape"] == shape and r["mode"] == direction and "baseline" not in r]
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
    if "residual" in which:
        rows += sweep(residual_norm, residual_cases(RESIDUAL_SHAPES))
    frame = pd.DataFrame(rows)
    out = Path(os.environ.get("OUT", "/tmp/out"))
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "tile_sweep.csv", index=False)
    pd.set_option("display.width", 200)
    print(frame.drop(columns="default", errors="ignore").round(4).to_string())


if __name__ == "__main__":
    main()
