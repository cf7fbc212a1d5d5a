"""The row-wise kernels compile for an H100 (sm_90) with the launch meta a GPU run uses, without spilling registers.

The interpreter runs kernels in numpy and never sees Triton's GPU code generation; this compiles them to a
cubin on the CPU (triton ships ptxas), so a kernel that cannot compile, or that spills, fails here first.
Kernels imported under TRITON_INTERPRET=1 are interpreter objects, so the compiling happens in one child
process started without it (this file run as a script), which reports every case as JSON.
"""

from __future__ import annotations

import functools
import json

import pytest
from harness import ON_GPU
from sm90_compile import child_report, compile_for_sm90, report_each, spilled_bytes

pytestmark = pytest.mark.skipif(ON_GPU, reason="on a GPU every other test compiles these kernels natively")

NORM_FWD = dict(
    x_ptr="*bf16",
    w_ptr="*bf16",
    b_ptr="*bf16",
    y_ptr="*bf16",
    mean_ptr="*fp32",
    rstd_ptr="*fp32",
    M="i32",
    N="i32",
    stride_xm="i32",
    stride_ym="i32",
    eps="fp32",
)
NORM_BWD = dict(
    dy_ptr="*bf16",
    x_ptr="*bf16",
    w_ptr="*bf16",
    mean_ptr="*fp32",
    rstd_ptr="*fp32",
    dx_ptr="*bf16",
    partial_ptr="*fp32",
    M="i32",
    N="i32",
    stride_dym="i32",
    stride_xm="i32",
    stride_dxm="i32",
    rows_per_program="i32",
)
SOFTMAX_FWD = dict(x_ptr="*bf16", y_ptr="*bf16", M="i32", N="i32", SQ="i32", stride_xm="i32", stride_ym="i32")
SOFTMAX_BWD = dict(
    y_ptr="*bf16",
    dy_ptr="*bf16",
    dx_ptr="*bf16",
    M="i32",
    N="i32",
    SQ="i32",
    stride_ym="i32",
    stride_dym="i32",
    stride_dxm="i32",
)
CROSS_ENTROPY = dict(
    logits_ptr="*bf16",
    targets_ptr="*i64",
    loss_ptr="*fp32",
    grad_ptr="*bf16",
    n_valid_ptr="*i64",
    stats_ptr="*fp32",
    M="i32",
    V="i32",
    stride_lm="i32",
    stride_lv="i32",
    stride_gm="i32",
    stride_gv="i32",
    ignore_index="i32",
    smoothing="fp32",
    stride_stats="i32",
)
COUNT_TARGETS = dict(targets_ptr="*i64", counts_ptr="*i64", M="i32", V="i32", ignore_index="i32")
SCALE_ROWS = dict(
    g_ptr="*bf16",
    scale_ptr="*fp32",
    targets_ptr="*i64",
    M="i32",
    V="i32",
    stride_gm="i32",
    stride_gv="i32",
    stride_s="i32",
    ignore_index="i32",
)
DROPOUT = dict(x_ptr="*bf16", y_ptr="*bf16", n="i32", threshold="i32", scale="fp32", seed="i32")
SLAB_GRAD = dict(
    z_ptr="*bf16",
    stats_ptr="*fp32",
    targets_ptr="*i64",
    row_scale_ptr="*fp32",
    M="i32",
    SLAB="i32",
    V="i32",
    first_col="i32",
    stride_zm="i32",
    stride_stats="i32",
    ignore_index="i32",
    smoothing="fp32",
)

RESIDUAL_NORM_FWD = dict(
    x_ptr="*fp32",  # a float32 residual stream, a bf16 branch and its float32 bias, y in bf16: as a GPT's blocks
    h_ptr="*bf16",  # have them under bf16 autocast
    c_ptr="*fp32",
    w_ptr="*fp32",
    b_ptr="*fp32",
    s_ptr="*fp32",
    y_ptr="*bf16",
    mean_ptr="*fp32",
    rstd_ptr="*fp32",
    M="i32",
    N="i32",
    stride_xm="i32",
    stride_hm="i32",
    eps="fp32",
    threshold="i32",
    scale="fp32",
    seed="i32",
)
RESIDUAL_NORM_BWD = dict(
    dy_ptr="*bf16",
    ds_ptr="*fp32",
    s_ptr="*fp32",
    w_ptr="*fp32",
    mean_ptr="*fp32",
    rstd_ptr="*fp32",
    dx_ptr="*fp32",
    dh_ptr="*bf16",
    partial_ptr="*fp32",
    M="i32",
    N="i32",
    stride_dym="i32",
    stride_dsm="i32",
    rows_per_program="i32",
    threshold="i32",
    scale="fp32",
    seed="i32",
)

NORM_WIDTHS = [768, 4096, 8192, 12288, 32768]
RESIDUAL_NORM_WIDTHS = [384, 768, 999, 1000, 4096]  # 999: one Philox call a element (not a multiple of 8)
SOFTMAX_WIDTHS = [768, 4096, 8192, 32768]
CASES = (
    [f"{op}-{w}" for op in ("layer_norm", "rms_norm") for w in NORM_WIDTHS]
    + [f"softmax{'-causal' if c else ''}-{w}" for c in (False, True) for w in SOFTMAX_WIDTHS]
    + ["cross_entropy-inplace", "cross_entropy-buffer", "dropout", "dropout-seed-in-memory"]
    + ["slab_grad", "slab_grad-row-scale"]
    + [f"residual_norm-{op}-{w}" for op in ("layer_norm", "rms_norm") for w in RESIDUAL_NORM_WIDTHS]
)


def compile_all() -> dict:
    """In a process without the interpreter: case → {kernel: spilled bytes} or the error that stopped it."""
    from triformer.kernels import _rows, cross_entropy, dropout, linear_cross_entropy, norms, residual_norm, softmax

    def spills(kernel, types, constexprs, num_warps):
        return spilled_bytes(compile_for_sm90(kernel, types, constexprs, num_warps))

    def meta(width, **kwargs):
        m = _rows.row_tiling(4096, width, **kwargs)
        return m.pop("num_warps"), m

    def case(name):
        op, _, rest = name.partition("-")
        if op in ("layer_norm", "rms_norm"):
            width, center = int(rest), op == "layer_norm"
            flags = dict(CENTER=center, HAS_W=True)
            m = _rows.launch_meta(4096, width, **norms.forward_launch_options(width))
            warps = m.pop("num_warps")
            fwd = spills(
                norms._norm_forward_kernel,
                NORM_FWD,
                {**flags, "HAS_B": center, **m, **norms.forward_flags(width, center)},
                warps,
            )
            warps, m = meta(width, max_block=norms._BACKWARD_MAX_BLOCK, gpu_tile=norms.BACKWARD_TILE)
            flags = {
                **flags,
                "DW": True,
                "DB": center,
                "STAGES": norms.BACKWARD_STAGES,
                "PREFETCH": norms.backward_prefetch(m),
                **m,
            }
            bwd = spills(norms._norm_backward_kernel, NORM_BWD, flags, warps)
            return {"forward": fwd, "backward": bwd}
        if op == "softmax":
            causal = rest.startswith("causal")
            width = int(rest.rpartition("-")[2])
            result = {}
            for name, kernel, types, options in (
                ("forward", softmax._softmax_forward_kernel, SOFTMAX_FWD, softmax.FORWARD_LAUNCH),
                ("backward", softmax._softmax_backward_kernel, SOFTMAX_BWD, softmax.BACKWARD_LAUNCH),
            ):
                m = _rows.launch_meta(4096, width, **options)
                warps = m.pop("num_warps")
                result[name] = spills(kernel, types, {"CAUSAL": causal, **m}, warps)
            return result
        if op == "cross_entropy":
            flags = dict(
                MEAN=True,
                SMOOTH=rest == "buffer",
                GRAD=True,
                INPLACE=rest == "inplace",
                STORE_STATS=rest == "inplace",
            )

            def loss_and_grad(meta):
                warps = meta.pop("num_warps")
                return spills(cross_entropy._cross_entropy_kernel, CROSS_ENTROPY, {**flags, **meta}, warps)

            return {
                "loss+grad": loss_and_grad(cross_entropy.launch_meta(4096, 8192)),
                # one row a program: a GPT's logits, and a fused linear + CE chunk of 128 rows on 132 SMs
                "one row": loss_and_grad(cross_entropy.launch_meta(8192, 50304, one_row=True, sms=132)),
                "one row, few": loss_and_grad(
                    cross_entropy.launch_meta(128, 50304, one_row=True, sms=132, smooth=flags["SMOOTH"])
                ),
                "scale": spills(
                    cross_entropy._scale_rows_kernel, SCALE_ROWS, {"HAS_TARGETS": True, "BLOCK_N": 4096}, 8
                ),
                "count": spills(
                    cross_entropy._count_targets_kernel,
                    COUNT_TARGETS,
                    {"BLOCK": cross_entropy._COUNT_BLOCK},
                    cross_entropy._COUNT_WARPS,
                ),
            }
        if op == "slab_grad":
            block_m, block_n = linear_cross_entropy._SLAB_BLOCK
            flags = dict(SMOOTH=True, ROW_SCALE=rest == "row-scale", BLOCK_M=block_m, BLOCK_N=block_n)
            return {
                "slab_grad": spills(
                    linear_cross_entropy._slab_grad_kernel, SLAB_GRAD, flags, linear_cross_entropy._SLAB_WARPS
                )
            }
        if op == "residual_norm":
            norm, _, width = rest.partition("-")
            center = norm == "layer_norm"
            m = residual_norm._tiling(4096, int(width))
            warps = m.pop("num_warps")
            flags = dict(
                CENTER=center,
                HAS_W=True,
                T_IS_H=False,
                DROPOUT=True,
                SEED_IN_MEMORY=False,
                ROW_CALLS=int(width) % 8 == 0,
                **m,
            )
            return {
                "forward": spills(
                    residual_norm._residual_norm_forward_kernel,
                    RESIDUAL_NORM_FWD,
                    {**flags, "HAS_B": center, "HAS_C": True},
                    warps,
                ),
                "backward": spills(
                    residual_norm._residual_norm_backward_kernel,
                    RESIDUAL_NORM_BWD,
                    {**flags, "HAS_DY": True, "HAS_DS": True, "DW": True, "DB": center, "DC": True},
                    warps,
                ),
            }
        in_memory = rest == "seed-in-memory"
        types = {**DROPOUT, "seed": "*i64"} if in_memory else DROPOUT
        constexprs = {"BLOCK": dropout.BLOCK, "SEED_IN_MEMORY": in_memory}
        return {"dropout": spills(dropout._dropout_kernel, types, constexprs, 4)}

    return report_each({name: functools.partial(case, name) for name in CASES})


@pytest.fixture(scope="module")
def compiled():
    return child_report(__file__)


@pytest.mark.parametrize("case", CASES)
def test_compiles_for_sm90_without_spills(case, compiled):
    result = compiled[case]
    assert isinstance(result, dict), f"{case} does not compile for sm_90: {result}"
    assert not any(result.values()), f"{case} spills registers (bytes per kernel): {result}"


if __name__ == "__main__":
    print(json.dumps(compile_all()))
