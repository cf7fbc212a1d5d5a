"""The warp-specialized Gluon product (matmul_ws.py) compiles for an H100 (sm_90) on the CPU, for every tile the
tuner offers: it fits the shared memory of one SM, and its inference path (ReLU, no preactivation) spills nothing
(the ping-pong 128×(128+64) tile: a few hundred bytes).
Gluon has no interpreter, so this is all the CPU can check; tests/test_matmul_ws.py runs it on a Hopper GPU."""

from __future__ import annotations

import functools
import json

import pytest
from harness import ON_GPU
from sm90_compile import child_report, compile_for_sm90, report_each, spilled_bytes

from triformer.kernels.matmul_tma import (
    GLUON_MIN_TRITON,
    WARP_SPECIALIZED_CONFIGS,
    WARP_SPECIALIZED_INFERENCE_ONLY,
    gluon_triton,
)

pytestmark = [
    pytest.mark.skipif(ON_GPU, reason="on a GPU test_matmul_ws.py compiles and runs the kernel natively"),
    pytest.mark.skipif(not gluon_triton(), reason=f"the Gluon kernel is offered from Triton {GLUON_MIN_TRITON} on"),
]

SM90_SHARED_MEMORY = 227 * 1024  # the most one block may opt into on an H100
# (activation, preactivation stored, dtype): inference with ReLU, training with GELU (fp16) and SiLU (bf16)
EPILOGUES = [("relu", False, "bf16"), ("gelu", True, "fp16"), ("silu", True, "bf16")]


def case_name(config: tuple, epilogue: tuple) -> str:
    (n0, n1, stages, schedule), (act, preact, dtype) = config, epilogue
    return f"{n0}+{n1}s{stages}-{schedule}-{act}-{'preact' if preact else 'out'}-{dtype}"


CASES = [case_name(config, epilogue) for config in WARP_SPECIALIZED_CONFIGS for epilogue in EPILOGUES]
INFERENCE_ONLY_CASES = {
    case_name(config, epilogue) for config in WARP_SPECIALIZED_INFERENCE_ONLY for epilogue in EPILOGUES
}


def compile_all() -> dict:
    """In a process without the interpreter: case → {"spills": bytes, "shared": bytes} or the error."""
    import torch
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    from triformer.kernels import matmul_ws
    from triformer.kernels.activation import activation_code

    def case(n0, n1, stages, schedule, act, preact, dtype_name):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
        x, w, c = (torch.empty(shape, dtype=dtype) for shape in ((512, 256), (256, 256), (512, 256)))
        rows = matmul_ws.BLOCK_M if schedule == "pingpong" else matmul_ws.BLOCK_M // 2
        descriptors = dict(
            x_desc=(x, [matmul_ws.BLOCK_M, matmul_ws.BLOCK_K]),
            w_desc_0=(w, [n0, matmul_ws.BLOCK_K]),
            w_desc_1=(w, [n1, matmul_ws.BLOCK_K]),
            c_desc_0=(c, [rows, n0]),
            c_desc_1=(c, [rows, n1]),
            **(dict(preact_desc_0=(c, [rows, n0]), preact_desc_1=(c, [rows, n1])) if preact else {}),
        )
        types = {name: mangle_type(matmul_ws._descriptor(*d)) for name, d in descriptors.items()}
        types.update(bias_ptr=f"*{dtype_name}", M="i32", N="i32", K="i32")
        constexprs = dict(
            STAGES=stages,
            PINGPONG=schedule == "pingpong",
            HAS_BIAS=True,
            ACT=activation_code(act),
            STORE_PREACT=preact,
            PRODUCER_REGS=matmul_ws._PRODUCER_REGS,
            MMA_REGS=matmul_ws._MMA_REGS,
        )
        if not preact:  # launch passes None for the preactivation's descriptors
            constexprs.update(preact_desc_0=None, preact_desc_1=None)
        compiled = compile_for_sm90(matmul_ws._linear_ws_kernel, types, constexprs, 4, GluonASTSource)
        return {"spills": spilled_bytes(compiled), "shared": compiled.metadata.shared}

    return report_each(
        {
            case_name(config, epilogue): functools.partial(case, *config, *epilogue)
            for config in WARP_SPECIALIZED_CONFIGS
            for epilogue in EPILOGUES
        }
    )


@pytest.fixture(scope="module")
def compiled():
    return child_report(__file__)


@pytest.mark.parametrize("case", CASES)
def test_compiles_for_sm90_and_fits(case, compiled):
    result = compiled[case]
    assert isinstance(result, dict), f"{case} does not compile for sm_90: {result}"
    assert result["shared"] <= SM90_SHARED_MEMORY, f"{case} needs {result['shared']} bytes of shared memory"
    if case in INFERENCE_ONLY_CASES:
        # 192 accumulator registers a thread: it spills a few hundred bytes (triton 3.8: 216; it measured fastest at
        # N = 768 all the same); with the preactivation stored, kilobytes: the tuner does not offer it then.
        if "-relu-out-" in case:
            assert result["spills"] <= 256, f"{case} spills {result['spills']} bytes"
    elif "-relu-out-" in case:
        assert result["spills"] == 0, f"{case} spills {result['spills']} bytes"
    else:  # with the preactivation stored, the 128×(128+128) tile spills a few bytes (triton 3.8: GELU 16, SiLU 40)
        assert result["spills"] <= 64, f"{case} spills {result['spills']} bytes"


if __name__ == "__main__":
    print(json.dumps(compile_all()))
