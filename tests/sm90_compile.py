"""Compiling kernels for an H100 (sm_90) on a machine without a GPU: triton ships ptxas, so code generation,
register spills and shared memory are checked here even though the interpreter never sees them. Used by the
compile tests from a child process started without TRITON_INTERPRET (kernels imported under it are interpreter
objects), which prints its report as JSON on its last line (`child_report`)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile


def compile_for_sm90(kernel, types: dict, constexprs: dict, num_warps: int, source_class=None):
    """kernel compiled for sm_90 with argument types (Triton signature strings) and constexpr values; source_class:
    the AST source of its dialect (Triton's ASTSource by default, GluonASTSource for Gluon kernels)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    signature = {n: "constexpr" if n in constexprs else types[n] for n in names}
    source = (source_class or ASTSource)(
        kernel, signature, constexprs={(names.index(k),): v for k, v in constexprs.items()}
    )
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def spilled_bytes(compiled) -> int:
    """Bytes of registers a compiled kernel spills, as ptxas reports for sm_90a."""
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compiled.asm["ptx"])
    try:
        report = subprocess.run(
            [ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True, text=True, check=True
        ).stderr
    finally:
        os.unlink(f.name)
    return sum(int(b) for b in re.findall(r"(\d+) bytes spill stores", report))


def child_report(script: str) -> dict:
    """Run script (a test file whose __main__ prints a JSON report) without the interpreter; its report."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def report_each(cases: dict) -> dict:
    """name → what cases[name]() returns, or the exception it raised as text (each test reports its own case)."""
    results = {}
    for name, case in cases.items():
        try:
            results[name] = case()
        except Exception as exc:
            results[name] = f"{type(exc).__name__}: {exc}"
    return results


def assert_compiled_without_spills(compiled: dict, case: str) -> None:
    """A compile test's verdict on one case of a child_report: it compiled, and no kernel of it spills."""
    result = compiled[case]
    assert isinstance(result, dict), f"{case} does not compile for sm_90: {result}"
    assert not any(result.values()), f"{case} spills registers (bytes per kernel): {result}"
