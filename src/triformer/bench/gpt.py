"""A full GPT training step — forward, backward and AdamW under autocast — of the triformer GPT against its torch twin
(backend="torch": nn.Linear, nn.LayerNorm, SDPA, F.cross_entropy), eager and under torch.compile.

Each model entry is a GPTConfig (n_layer, n_head, n_embd, block_size, vocab_size, ...) plus batch_size, trained on
synthetic tokens at the full context. Every provider starts from the same weights (same seed). Providers:
  triformer              the triformer GPT, LM head as logits + triformer cross-entropy
  triformer (fused head) the same with the fused linear + cross-entropy head (no (B, T, V) logits)
  triformer (compiled)   the first under torch.compile (a row with the error if it does not compile)
  torch                  the twin, eager
  torch.compile          the twin under torch.compile
A row: ms (wall time per step over `steps` steps after `warmup`, host included: what a training loop sees), gpu_ms
(the GPU's busy time per step from the profiler, host gaps left out; NaN without a GPU), tokens_per_s, rate in
model TFLOP/s (PaLM's 6·N + 12·L·C·T FLOPs per token, so the bench stage's fraction of the bf16 matmul ceiling is
the MFU), peak_mib (the step's peak allocated memory: weights, gradients, optimizer state and activations).
"""

from __future__ import annotations

import gc
import math
import time

import torch
from tqdm import tqdm

from ..models import GPT, GPTConfig
from .norms import COMPILE_CUDA_ONLY
from .timing import kernel_ms

PROVIDERS = ("triformer", "triformer (fused head)", "triformer (compiled)", "torch", "torch.compile")
OP, MODE = "gpt_train_step", "fwd+bwd+adamw"


def provider_model(provider: str, config: GPTConfig, device: str, seed: int):
    """(the model to train, the callable a step runs: the model or its torch.compile)."""
    backend = "torch" if provider.startswith("torch") else "triton"
    fused_head = provider == "triformer (fused head)"
    compiled = provider in ("torch.compile", "triformer (compiled)")
    if compiled and device != "cuda":
        raise RuntimeError(COMPILE_CUDA_ONLY)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**vars(config), "backend": backend, "fused_head": fused_head})).to(device)
    return model, torch.compile(model) if compiled else model


def train_step(model, forward, device: str, dtype: torch.dtype, batch_size: int):
    """step(): one training step on fixed synthetic tokens (B, T) at the full context."""
    config = model.config
    idx = torch.randint(0, config.vocab_size, (batch_size, config.block_size), device=device)
    targets = torch.randint(0, config.vocab_size, (batch_size, config.block_size), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device == "cuda")
    autocast = torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)

    def step():
        with autocast:
            loss = forward(idx, targets)[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def step_ms(step, device: str, steps: int, warmup: int) -> tuple[float, float]:
    """(wall ms per step over `steps` steps after `warmup`, peak allocated MiB during them (NaN on the CPU))."""
    for _ in range(warmup):
        step()
    _synchronize(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _synchronize(device)
    ms = (time.perf_counter() - start) * 1e3 / steps
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")
    return ms, peak


def _row(
    name: str,
    dtype,
    provider: str,
    ms=math.nan,
    gpu_ms=math.nan,
    tokens=0,
    flops_per_token=0,
    peak_mib=math.nan,
    error: str = "",
) -> dict:
    tokens_per_s = tokens / (ms * 1e-3) if ms > 0 else math.nan
    gpu_tokens_per_s = tokens / (gpu_ms * 1e-3) if gpu_ms > 0 else math.nan
    return dict(
        op=OP,
        shape=name,
        dtype=str(dtype).removeprefix("torch."),
        mode=MODE,
        provider=provider,
        ms=ms,
        gpu_ms=gpu_ms,
        tokens_per_s=tokens_per_s,
        rate=flops_per_token * tokens_per_s / 1e12,
        gpu_rate=flops_per_token * gpu_tokens_per_s / 1e12,
        unit="TFLOP/s",
        peak_mib=peak_mib,
        error=error,
    )


def shape_name(entry: dict) -> str:
    """e.g. "char L6-H6-C384-T256-B64-V65" (no "/": the name is one level of a metric key)."""
    return (
        f"{entry.get('name', 'gpt')} L{entry['n_layer']}-H{entry['n_head']}-C{entry['n_embd']}"
        f"-T{entry['block_size']}-B{entry['batch_size']}-V{entry['vocab_size']}"
    )


def run(
    models,
    steps: int,
    warmup: int,
    providers=PROVIDERS,
    profile_steps: int = 3,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    device: str = "cuda",
    progress: bool = True,
) -> list[dict]:
    """One row per (model, provider); a provider that fails (e.g. torch.compile of the triformer model) gets a row
    with its error. Model entries: GPTConfig fields plus batch_size (and an optional name)."""
    rows = []
    work = [(entry, provider) for entry in models for provider in providers]
    for entry, provider in tqdm(work, desc="gpt bench", disable=not progress):
        fields = {k: v for k, v in entry.items() if k not in ("name", "batch_size")}
        config, batch, name = GPTConfig(**fields), entry["batch_size"], shape_name(entry)
        try:
            model, forward = provider_model(provider, config, device, seed)
            step = train_step(model, forward, device, dtype, batch)
            ms, peak = step_ms(step, device, steps, warmup)
            gpu_ms = kernel_ms(step, profile_steps)
            rows.append(
                _row(
                    name,
                    dtype,
                    provider,
                    ms,
                    gpu_ms,
                    batch * config.block_size,
                    model.flops_per_token(config.block_size),
                    peak,
                )
            )
        except Exception as exc:  # the row says why (e.g. a compile failure on this host)
            rows.append(_row(name, dtype, provider, error=f"{type(exc).__name__}: {exc}"[:300]))
        finally:
            model = forward = step = None
            gc.collect()
            if device == "cuda":
                torch._dynamo.reset()
                torch.cuda.empty_cache()
    return rows
