"""A full GPT training step — forward, backward and AdamW under autocast — of the triformer GPT against its torch twin
(backend="torch": nn.Linear, nn.LayerNorm, SDPA, F.cross_entropy), eager, under torch.compile and in CUDA graphs.

Each model entry is a GPTConfig (n_layer, n_head, n_embd, block_size, vocab_size, ...) plus batch_size, trained on
synthetic tokens at the full context. Every provider starts from the same weights and tokens (same seed). Providers:
  triformer                    the triformer GPT, LM head as logits + triformer cross-entropy
  triformer (fused head)       the same with the fused linear + cross-entropy head (no (B, T, V) logits)
  triformer (compiled)         the first under torch.compile (a row with the error if it does not compile)
  torch                        the twin, eager
  torch.compile                the twin under torch.compile
  triformer (CUDA graph)       the whole step of the first (forward, backward, fused capturable AdamW) captured once in
                               a torch.cuda.CUDAGraph on static tokens; a step is one graph.replay()
  torch (CUDA graph)           the same for the twin
  triformer (reduce-overhead)  the first under torch.compile(mode="reduce-overhead", fullgraph=True): Inductor with
                               CUDA graphs (cudagraph trees) for forward and backward, AdamW eager
  torch (reduce-overhead)      the twin under torch.compile(mode="reduce-overhead")
The compiled and graphed providers run on CUDA only: on the CPU their row carries the error.
A row: ms (wall time per step over `steps` steps after `warmup`, host included: what a training loop sees), gpu_ms
(the GPU's busy time per step from the profiler, host gaps left out; NaN without a GPU, and NaN with a `note` where
the profiler records no GPU work of a graph replay), tokens_per_s, rate in model TFLOP/s (PaLM's 6·N + 12·L·C·T FLOPs
per token, so the bench stage's fraction of the bf16 matmul ceiling is the MFU), peak_mib (the step's peak allocated
memory: weights, gradients, optimizer state and activations; for the graphed providers the peak from building the
model on, since a graph allocates its activations once, at capture, and replays reuse them). reduce-overhead rows
warm up at least RECORD_WARMUP steps (no recording timed) and carry the note CUDAGRAPH_SKIPPED where Inductor ran a
graph of the step without CUDA graphs.
"""

from __future__ import annotations

import gc
import math
import time

import torch
from torch._dynamo.utils import counters
from tqdm import tqdm

from ..models import GPT, GPTConfig
from .norms import COMPILE_CUDA_ONLY
from .timing import kernel_ms

PROVIDERS = (
    "triformer",
    "triformer (fused head)",
    "triformer (compiled)",
    "torch",
    "torch.compile",
    "triformer (CUDA graph)",
    "torch (CUDA graph)",
    "triformer (reduce-overhead)",
    "torch (reduce-overhead)",
)
OP, MODE = "gpt_train_step", "fwd+bwd+adamw"
GRAPH_CUDA_ONLY = "CUDA graph and reduce-overhead providers run on CUDA only (a CUDA graph captures CUDA work)"
NO_GRAPH_KERNELS = "the profiler recorded no GPU work of the graph replay: gpu_ms not measured"
CUDAGRAPH_SKIPPED = "Inductor ran part of the step without CUDA graphs (TORCH_LOGS=cudagraphs says why)"
RECORD_WARMUP = 2  # reduce-overhead: cudagraph trees run a graph eagerly on its first call and record it on the second
CAPTURE_WARMUP = 3  # eager steps on a side stream before the capture: tuner picks, compiled kernels, optimizer state


def cuda_graphed(provider: str) -> bool:
    """Whether the provider's step runs as CUDA graph replays (a plain capture or reduce-overhead)."""
    return provider.endswith(("(CUDA graph)", "(reduce-overhead)"))


def provider_model(provider: str, config: GPTConfig, device: str, seed: int):
    """(the model to train, the callable a step runs: the model or its torch.compile)."""
    if provider not in PROVIDERS:
        raise ValueError(f"provider {provider!r} is not one of {PROVIDERS}")
    if cuda_graphed(provider) and device != "cuda":
        raise RuntimeError(GRAPH_CUDA_ONLY)
    backend = "torch" if provider.startswith("torch") else "triton"
    fused_head = provider == "triformer (fused head)"
    compiled = provider in ("torch.compile", "triformer (compiled)")
    if compiled and device != "cuda":
        raise RuntimeError(COMPILE_CUDA_ONLY)
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**vars(config), "backend": backend, "fused_head": fused_head})).to(device)
    if provider.endswith("(reduce-overhead)"):
        return model, torch.compile(model, mode="reduce-overhead", fullgraph=backend == "triton")
    return model, torch.compile(model) if compiled else model


def provider_step(
    provider: str, config: GPTConfig, device: str, dtype: torch.dtype, batch_size: int, seed: int = 0, lr=1e-4
):
    """(the model, step): step() runs one training step of the provider and returns its loss (a tensor that the next
    step may overwrite: clone it to keep it)."""
    model, forward = provider_model(provider, config, device, seed)
    if provider.endswith("(CUDA graph)"):
        return model, GraphedStep(model, dtype, batch_size, lr)
    mark_step = provider.endswith("(reduce-overhead)")
    return model, train_step(model, forward, device, dtype, batch_size, lr, mark_step)


def _tokens(config: GPTConfig, batch_size: int, device: str):
    """(idx, targets): fixed synthetic tokens (B, T) at the full context."""
    shape = (batch_size, config.block_size)
    return tuple(torch.randint(0, config.vocab_size, shape, device=device) for _ in range(2))


def train_step(model, forward, device: str, dtype: torch.dtype, batch_size: int, lr=1e-4, mark_step=False):
    """step(): one training step on fixed synthetic tokens (B, T) at the full context; it returns the loss.
    mark_step: tell cudagraph trees (reduce-overhead) that each step starts a new iteration."""
    idx, targets = _tokens(model.config, batch_size, device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, fused=device == "cuda")
    autocast = torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)

    def step():
        if mark_step:
            torch.compiler.cudagraph_mark_step_begin()
        with autocast:
            loss = forward(idx, targets)[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


class GraphedStep:
    """A whole training step (forward under autocast, backward, fused capturable AdamW) captured once in a
    torch.cuda.CUDAGraph; calling it replays the graph and returns the static loss tensor the replay wrote.

    As torch.cuda.graphs asks: CAPTURE_WARMUP eager steps on a side stream first (tuner picks, Triton compiles and the
    optimizer's state happen outside the capture), static tokens, gradients kept between steps and zeroed inside the
    graph (so the graph writes the same gradient tensors each replay), autocast without its weight cache (the rule
    torch.cuda.make_graphed_callables states). After the capture the weights and the optimizer state are put back to
    where they were before the warm-up, so the first replay is the first training step from the seed's weights.
    The object holds every tensor the graph reads or writes (tokens, optimizer state): freeing one would let the
    allocator hand out memory that a replay still touches.
    """

    def __init__(self, model, dtype: torch.dtype, batch_size: int, lr=1e-4):
        self.model = model
        self.idx, self.targets = _tokens(model.config, batch_size, "cuda")
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=True, capturable=True)
        self.autocast = torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32, cache_enabled=False)
        start = [p.detach().cpu() for p in model.parameters()]  # on the host: no weight copy in the peak
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(CAPTURE_WARMUP):
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss = self._step()
        with torch.no_grad():
            for p, p0 in zip(model.parameters(), start, strict=True):
                p.copy_(p0)
            for state in self.optimizer.state.values():
                for value in state.values():
                    if torch.is_tensor(value):
                        value.zero_()

    def _step(self) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=False)
        with self.autocast:
            loss = self.model(self.idx, self.targets)[1]
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def __call__(self) -> torch.Tensor:
        self.graph.replay()
        return self.loss


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def step_ms(step, device: str, steps: int, warmup: int, reset_peak: bool = True) -> tuple[float, float]:
    """(wall ms per step over `steps` steps after `warmup`, peak allocated MiB (NaN on the CPU): during the timed
    steps, or since the caller last reset the peak when reset_peak is False)."""
    for _ in range(warmup):
        step()
    _synchronize(device)
    if device == "cuda" and reset_peak:
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
    note: str = "",
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
        note=note,
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
        graphed = cuda_graphed(provider)
        # the recording call of reduce-overhead is warm-up, never a timed step
        warmed = max(warmup, RECORD_WARMUP) if provider.endswith("(reduce-overhead)") else warmup
        try:
            if graphed and device == "cuda":
                torch.cuda.reset_peak_memory_stats()  # the capture allocates what every replay uses
            skips = counters["inductor"]["cudagraph_skips"]
            model, step = provider_step(provider, config, device, dtype, batch, seed)
            ms, peak = step_ms(step, device, steps, warmed, reset_peak=not graphed)
            gpu_ms, notes = kernel_ms(step, profile_steps), []
            if graphed and not gpu_ms > 0:
                gpu_ms, notes = math.nan, [NO_GRAPH_KERNELS]
            if counters["inductor"]["cudagraph_skips"] > skips:
                notes.append(CUDAGRAPH_SKIPPED)
            note = "; ".join(notes)
            tokens, flops = batch * config.block_size, model.flops_per_token(config.block_size)
            rows.append(_row(name, dtype, provider, ms, gpu_ms, tokens, flops, peak, note=note))
        except Exception as exc:  # the row says why (e.g. a compile failure on this host)
            rows.append(_row(name, dtype, provider, error=f"{type(exc).__name__}: {exc}"[:300]))
        finally:
            model = step = None
            gc.collect()
            if device == "cuda":
                torch._dynamo.reset()
                torch.cuda.empty_cache()
    return rows
