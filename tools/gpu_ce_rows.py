"""How should the cross-entropy kernel tile wide rows (a GPT's logits, a fused linear + CE chunk)? On a GPU host, for
rows × vocab shapes (bf16 logits, gradient written over them, reduction mean, as the fused linear + CE calls it): the
GPU time of the loss-and-gradient kernel with the library's own choice of tiling, with one row a program on each
vocabulary block and warps, and with the usual tiling, beside Liger-Kernel's cross-entropy kernel launched the way
its forward launches it (one program a row, 32 warps); the profiler's summed kernel time with L2 flushed before each
call, for every provider alike (in the fused linear + CE the chunk's logits are still in L2: the tool's times are
the colder case), and each tiling's loss against torch's float32 cross-entropy.

Run: python tools/gpu_ce_rows.py [--shapes 128x50304 256x128256 ...]
Logs to $OUT/ce_rows.csv.
"""

import argparse
import os
import sys
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from triformer.bench.timing import kernel_ms
from triformer.kernels import cross_entropy
from triformer.kernels._runtime import overridden

# name → overrides of cross_entropy.py's switches: the library's choice, one row a program on each block and warps
# (whatever the rows), the usual tiling
TILINGS = (
    {"library": {}}
    | {
        f"row {block} / {warps} warps": dict(FORCED_ONE_ROW=True, FORCED_ONE_ROW_BLOCK_V=block, _ONE_ROW_WARPS=warps)
        for block, warps in ((8192, 16), (16384, 32), (32768, 32))
    }
    | {"usual": dict(FORCED_ONE_ROW=False)}
)


def ours(logits, targets, n_valid):
    return cross_entropy.cross_entropy_forward(logits, targets, -100, 0.0, logits, 1, n_valid)


def liger(logits, targets):
    """Liger-Kernel's cross-entropy kernel as its cross_entropy_forward launches it on Hopper (without the host
    reads of the target count and range around it)."""
    from liger_kernel.ops.cross_entropy import MAX_FUSED_SIZE, liger_cross_entropy_kernel

    n, v = logits.shape
    loss = torch.zeros(n, dtype=logits.dtype, device=logits.device)
    liger_cross_entropy_kernel[(n,)](
        X_ptr=logits, X_stride=logits.stride(-2), Y_ptr=targets, Y_stride=targets.stride(-1), weight_ptr=None,
        loss_ptr=loss, z_loss_ptr=None, loss_stride=loss.stride(-1), token_accuracy_ptr=None,
        token_accuracy_stride=0, predicted_tokens_ptr=None, predicted_tokens_stride=0, n_cols=v,
        n_non_ignore=n, sum_non_ignore_weight=n, ignore_index=-100, weight_sum=0.0, lse_square_scale=0.0,
        label_smoothing=0.0, reduction="mean", softcap=None, RETURN_Z_LOSS=False, RETURN_TOKEN_ACCURACY=False,
        RETURN_PREDICTED_TOKENS=False, BLOCK_SIZE=min(MAX_FUSED_SIZE, 1 << (v - 1).bit_length()), HAS_WEIGHT=False,
        HAS_SOFTCAPPING=False, HAS_GRADIENTS=True, num_warps=32,
    )  # fmt: skip
    return loss


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shapes", nargs="+", default=["128x50304", "256x50304", "1024x50304", "256x128256", "8192x50304"]
    )
    args = parser.parse_args()
    out = Path(os.environ.get("OUT", "."))
    print(torch.cuda.get_device_name(), flush=True)
    rows = []
    for shape in args.shapes:
        m, v = map(int, shape.split("x"))
        torch.manual_seed(0)
        source = torch.randn(m, v, device="cuda", dtype=torch.bfloat16) * 2
        targets = torch.randint(0, v, (m,), device="cuda")
        n_valid = cross_entropy.count_targets(targets, v, -100)[0]
        ref = F.cross_entropy(source.float(), targets).item()
        gb = 3 * source.numel() * source.element_size() / 1e9  # two reads and a write of the logits
        # name → (the call timed: logits → per-row losses, those losses → the mean loss)
        providers = {
            name: (_with(o, lambda x: ours(x, targets, n_valid)), lambda loss: loss.mean().item())
            for name, o in TILINGS.items()
        }
        try:
            import liger_kernel  # noqa: F401

            providers["liger"] = (lambda x: liger(x, targets), lambda loss: loss.float().sum().item())
        except ImportError:
            print("liger: not installed (carry .whl-liger)", flush=True)
        for name, (run, mean) in providers.items():
            logits = source.clone()
            err = abs(mean(run(logits)) - ref) / abs(ref)
            ms = kernel_ms(lambda run=run, logits=logits: run(logits))
            rows.append(dict(shape=shape, provider=name, gpu_ms=ms, gb_per_s=gb / (ms * 1e-3), loss_rel_err=err))
            print(f"{shape:12s} {name:32s} {ms * 1e3:8.1f} µs  {gb / (ms * 1e-3):7.0f} GB/s  loss err {err:.1e}")
            pd.DataFrame(rows).to_csv(out / "ce_rows.csv", index=False)
    table = pd.DataFrame(rows).pivot(index="shape", columns="provider", values="gpu_ms")
    print("\nGPU µs per call\n" + (table * 1e3).round(1).to_string(), flush=True)


def _with(overrides: dict, fn):
    """fn, called with cross_entropy.py's switches overridden."""

    def call(x):
        with overridden(cross_entropy, **overrides):
            return fn(x)

    return call


if __name__ == "__main__":
    sys.exit(main())
