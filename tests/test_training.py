"""The training loop: schedule, logging, checkpoints, and resume after a crash equal to an uninterrupted run."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch
from fake_datasets import pattern_tokens
from harness import DEVICE, ON_GPU
from torch import nn
from torch._dynamo.utils import counters
from torch.utils.data import TensorDataset

from triformer import GPT, GPTConfig, TritonMLP, training

pytestmark = pytest.mark.pipeline
TIMING_KEYS = ("perf/images_per_s", "perf/tokens_per_s", "perf/step_ms", "perf/mfu")


class Crash(RuntimeError):
    pass


def tiny_data(n: int, seed: int) -> TensorDataset:
    """Images [n, 1, 4, 4] whose class (of 3) is the brightest row among the first three."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 3, (n,), generator=g)
    images = torch.randn(n, 1, 4, 4, generator=g) * 0.3
    images[torch.arange(n), 0, labels] += 2.0
    return TensorDataset(images, labels)


def make_model(backend: str) -> nn.Module:
    """Dropout in front, so the run also depends on the global RNG that checkpoints must restore."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Dropout(0.1), TritonMLP(16, 3, hidden_size=8, backend=backend))


def run(backend, config, checkpoint_dir=None, crash_after=None, log=None):
    def after_eval(epoch, metrics):
        if epoch == crash_after:
            raise Crash(f"crash after epoch {epoch}")

    model = make_model(backend)
    result = training.fit(
        model,
        tiny_data(config.batch_size * 3, 1),
        tiny_data(20, 2),
        config,
        DEVICE,
        checkpoint_dir=checkpoint_dir,
        after_eval=after_eval,
        log=log,
    )
    return model, result


def without_timings(history):
    return [{k: v for k, v in record.items() if k not in TIMING_KEYS} for record in history]


@pytest.mark.parametrize("backend,epochs,crash_after", [("torch", 4, 1), ("triton", 2, 0)])
def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, backend, epochs, crash_after):
    config = training.TrainConfig(epochs=epochs, batch_size=8, lr=1e-2, warmup_frac=0.2, progress=False)
    reference, expected = run(backend, config)
    with pytest.raises(Crash):
        run(backend, config, tmp_path, crash_after=crash_after)
    torch.manual_seed(12345)  # a different global RNG state in between: the checkpoint must restore its own
    resumed, result = run(backend, config, tmp_path)
    assert result["resumed_from_epoch"] == crash_after + 1
    for (name, p), p_ref in zip(resumed.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(p, p_ref), f"{name} differs after resuming"
    assert without_timings(result["history"]) == without_timings(expected["history"])
    assert result["val/accuracy"] == expected["val/accuracy"]


def test_checkpoints_kept_and_their_extra(tmp_path):
    config = training.TrainConfig(epochs=3, batch_size=8, max_checkpoints=2, progress=False)
    model = make_model("torch")
    training.fit(model, tiny_data(16, 1), tiny_data(8, 2), config, checkpoint_dir=tmp_path, extra={"run": "abc"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004.pt", "step_00000006.pt"]  # 2 steps an epoch
    assert training.checkpoint_extra(tmp_path) == {"run": "abc"}
    assert training.checkpoint_extra(tmp_path / "none") == {} and training.latest_checkpoint(None) is None
    # a finished run found again resumes past its last epoch: nothing to train, the same final metrics
    result = training.fit(make_model("torch"), tiny_data(16, 1), tiny_data(8, 2), config, checkpoint_dir=tmp_path)
    assert result["resumed_from_epoch"] == 3 and len(result["history"]) == 3
    with pytest.raises(ValueError, match="other settings"):
        training.fit(
            make_model("torch"),
            tiny_data(16, 1),
            tiny_data(8, 2),
            training.TrainConfig(epochs=5, batch_size=8, progress=False),
            checkpoint_dir=tmp_path,
        )


def test_logs_steps_and_epochs_and_learns():
    config = training.TrainConfig(epochs=3, batch_size=16, lr=2e-2, log_every=2, progress=False)
    logged = []
    _, result = run("torch", config, log=lambda metrics, step: logged.append((step, metrics)))
    steps = [step for step, m in logged if "train/loss" in m]
    assert steps == [2, 3, 4, 6, 8, 9]  # every log_every (2) steps and the last of each epoch (3 steps an epoch)
    epochs = [(step, m) for step, m in logged if "val/accuracy" in m]
    assert [step for step, _ in epochs] == [1, 2, 3]
    assert set(epochs[0][1]) >= {"train/epoch_loss", "val/loss", "val/accuracy", "perf/images_per_s", "perf/step_ms"}
    assert result["val/accuracy"] > 0.6 and result["train/epoch_loss"] < result["history"][0]["train/epoch_loss"]


def test_warmup_then_cosine():
    values = [training.warmup_cosine(s, warmup=4, total=20, min_frac=0.1) for s in range(21)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(values[3:], values[4:]))
    assert values[20] == pytest.approx(0.1)


def test_amp_must_be_known():
    config = training.TrainConfig(epochs=1, amp="fp8", progress=False)
    with pytest.raises(ValueError, match="amp"):
        training.fit(make_model("torch"), tiny_data(8, 1), tiny_data(8, 2), config)


class PlantedCode:
    """Unpickling this runs code: it creates the folder `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return os.mkdir, (self.marker,)


def test_a_planted_checkpoint_is_refused_and_runs_no_code(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"extra": {}, "payload": PlantedCode(marker)}, tmp_path / "step_00000001.pt")
    config = training.TrainConfig(epochs=1, batch_size=8, progress=False)
    with pytest.raises(ValueError, match="not a checkpoint of triformer.training"):
        training.checkpoint_extra(tmp_path)
    with pytest.raises(ValueError, match="not a checkpoint of triformer.training"):
        training.fit(make_model("torch"), tiny_data(8, 1), tiny_data(8, 2), config, checkpoint_dir=tmp_path)
    assert not marker.exists(), "loading the checkpoint ran the code planted in it"


# ------------------------------------------------------------------------------------------------ step-based runs

VOCAB = 11


def token_stream(n: int, seed: int) -> training.TokenStream:
    return training.TokenStream(pattern_tokens(n, VOCAB, seed), block_size=8)


def tiny_gpt(backend: str, dropout: float = 0.1) -> GPT:
    torch.manual_seed(0)
    return GPT(
        GPTConfig(vocab_size=VOCAB, block_size=8, n_layer=1, n_head=2, n_embd=16, dropout=dropout, backend=backend)
    )


def lm_config(**overrides) -> training.TrainConfig:
    return training.TrainConfig(
        **{
            **dict(
                iterations=9,
                eval_every=4,
                eval_batches=2,
                eval_batch_size=4,
                batch_size=4,
                lr=1e-2,
                log_every=3,
                progress=False,
            ),
            **overrides,
        }
    )


def test_a_step_based_run_evaluates_every_n_steps_in_tokens():
    logged = []
    model = tiny_gpt("torch")
    result = training.fit(
        model,
        token_stream(500, 1),
        token_stream(200, 2),
        lm_config(),
        DEVICE,
        log=lambda metrics, step: logged.append((step, metrics)),
        loss_fn=training.model_loss,
        flops_per_item=1e6,
        peak_tflops=2.0,
    )
    history = result["history"]
    assert [record["step"] for record in history] == [4, 8, 9]  # every eval_every steps and the last
    assert [step for step, m in logged if "train/loss" in m] == [3, 4, 6, 8, 9]
    assert [step for step, m in logged if "val/loss" in m] == [4, 8, 9]
    record = history[-1]
    assert set(record) == {
        "step",
        "train/interval_loss",
        "val/loss",
        "perf/tokens_per_s",
        "perf/step_ms",
        "perf/mfu",
        *(["mem/peak_mib"] if DEVICE == "cuda" else []),
    }
    assert record["perf/mfu"] == pytest.approx(1e6 * record["perf/tokens_per_s"] / 2e12)
    assert "train/loss" not in result and result["resumed_from_step"] == 0
    assert history[-1]["val/loss"] < history[0]["val/loss"]
    # the same evaluation batches every time: evaluating twice gives one number
    val = token_stream(200, 2)
    first, second = (
        training.evaluate(model, val, lm_config(), torch.device(DEVICE), training.model_loss) for _ in range(2)
    )
    assert first == second and set(first) == {"val/loss"}


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_resume_between_evaluations_equals_an_uninterrupted_run(tmp_path, backend):
    """checkpoint_every 3, evaluation every 4: a crash at step 4 resumes from step 3, inside an interval whose loss
    sum the checkpoint carries; dropout draws from the restored RNG."""
    config = lm_config(iterations=5, checkpoint_every=3, log_every=1, eval_batches=1)

    def run(checkpoint_dir=None, crash_at=None):
        def log(metrics, step):
            if step == crash_at:
                raise Crash(f"crash at step {step}")

        model = tiny_gpt(backend)
        return model, training.fit(
            model,
            token_stream(500, 1),
            token_stream(200, 2),
            config,
            DEVICE,
            checkpoint_dir,
            log=log,
            loss_fn=training.model_loss,
        )

    reference, expected = run()
    with pytest.raises(Crash):
        run(tmp_path, crash_at=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003.pt"]
    torch.manual_seed(12345)
    resumed, result = run(tmp_path)
    assert result["resumed_from_step"] == 3 and "resumed_from_epoch" not in result
    assert without_timings(result["history"]) == without_timings(expected["history"])
    for (name, p), p_ref in zip(resumed.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(p, p_ref), f"{name} differs after resuming"


def test_gradients_clipped_to_grad_clip(monkeypatch):
    norms = []
    real = torch.nn.utils.clip_grad_norm_

    def spy(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        total = real(parameters, max_norm, *args, **kwargs)
        norms.append((total.item(), torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in parameters])).item()))
        return total

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    training.fit(
        tiny_gpt("torch"),
        token_stream(500, 1),
        token_stream(200, 2),
        lm_config(iterations=3, grad_clip=0.05),
        DEVICE,
        loss_fn=training.model_loss,
    )
    assert len(norms) == 3
    assert all(before > 0.05 and after == pytest.approx(0.05, rel=1e-4) for before, after in norms), norms
    norms.clear()
    training.fit(
        tiny_gpt("torch"),
        token_stream(500, 1),
        token_stream(200, 2),
        lm_config(iterations=2),
        DEVICE,
        loss_fn=training.model_loss,
    )
    assert norms == []  # grad_clip 0: no clipping


def test_batch_sources():
    stream = token_stream(100, 3)
    x, y = stream.batch(7, 5, seed=1)
    assert x.shape == y.shape == (5, 8) and torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(stream.batch(7, 5, seed=1)[0], x) and not torch.equal(stream.batch(8, 5, seed=1)[0], x)
    windows = torch.cat([x for x, _ in stream.eval_batches(5, 0, seed=0)])  # count 0: every consecutive window
    assert torch.equal(windows.flatten(), stream.tokens[:96])  # 12 windows of 8 (a 13th would need 105 tokens)
    examples = training.Examples(torch.arange(10.0)[:, None], torch.arange(10))
    epoch = torch.cat([examples.batch(step, 4, seed=0)[1] for step in range(3)])  # 3 steps: one epoch
    assert sorted(epoch.tolist()) == list(range(10)) and examples.steps_per_epoch(4) == 3
    with pytest.raises(ValueError, match="has no epochs"):
        training.fit(tiny_gpt("torch"), stream, stream, training.TrainConfig(epochs=1, progress=False))
    with pytest.raises(ValueError, match="eval_every is for step-based runs"):
        training.fit(
            make_model("torch"),
            tiny_data(8, 1),
            tiny_data(8, 2),
            training.TrainConfig(epochs=1, eval_every=2, progress=False),
        )


def moved(image: torch.Tensor, dy: int, dx: int, mirrored: bool, fill: torch.Tensor) -> torch.Tensor:
    """image [C, H, W] mirrored left to right (when asked) and moved by (dy, dx) pixels, element by element (the
    tests try every move of either sign, so the order of the two does not matter)."""
    channels, h, w = image.shape
    source = image.flip(-1) if mirrored else image
    out = fill.reshape(channels, 1, 1).expand(channels, h, w).clone()
    for i in range(h):
        for j in range(w):
            if 0 <= i - dy < h and 0 <= j - dx < w:
                out[:, i, j] = source[:, i - dy, j - dx]
    return out


@pytest.mark.parametrize("shift, flip", [(2, True), (1, False), (0, True)])
def test_augmented_batches_are_moved_and_mirrored_images(shift, flip):
    """Every training image of an augmented batch is its example mirrored (flip) and moved by at most `shift`
    pixels each way, the uncovered pixels taking each channel's fill; the draws repeat for the same (seed, step),
    differ between steps and cover every move; evaluation batches are the examples untouched."""
    torch.manual_seed(0)
    images = torch.randn(40, 2, 5, 6, dtype=torch.float64)  # distinct values: a match says which move it was
    labels = torch.arange(40)
    fill = torch.tensor([-0.5, 7.0], dtype=torch.float64)
    examples = training.Examples(images, labels, shift=shift, flip=flip, fill=fill.tolist()).to(DEVICE)
    all_moves = [
        (dy, dx, m)
        for dy in range(-shift, shift + 1)
        for dx in range(-shift, shift + 1)
        for m in ((False, True) if flip else (False,))
    ]
    candidates = {move: torch.stack([moved(image, *move, fill) for image in images]) for move in all_moves}
    seen = set()
    for step in range(12):  # 192 draws
        x, y = examples.batch(step, 16, seed=3)
        assert x.shape == (len(y), 2, 5, 6) and x.dtype == images.dtype
        for out, label in zip(x.cpu(), y.cpu()):
            moves = [move for move in all_moves if torch.equal(out, candidates[move][label])]
            assert moves, f"example {label.item()} is not a move of at most {shift} pixels"
            seen.add(moves[0])
    assert {(dy, dx) for dy, dx, _ in seen} == {(dy, dx) for dy, dx, _ in all_moves}
    assert {m for _, _, m in seen} == ({False, True} if flip else {False})
    again = examples.batch(2, 16, seed=3)[0]
    assert torch.equal(again, examples.batch(2, 16, seed=3)[0])
    eval_x, eval_y = next(examples.eval_batches(16, 1, seed=0))
    assert torch.equal(eval_x.cpu(), images[:16]) and torch.equal(eval_y.cpu(), labels[:16])


def test_augmentation_settings_are_checked():
    images, labels = torch.zeros(4, 3, 8, 8), torch.arange(4)
    with pytest.raises(ValueError, match="shift must be a whole number"):
        training.Examples(images, labels, shift=-1)
    with pytest.raises(ValueError, match="augment images"):
        training.Examples(torch.zeros(4, 8), labels, flip=True)
    with pytest.raises(ValueError, match="one per channel"):
        training.Examples(images, labels, shift=1, fill=[0.0, 1.0])
    plain = training.Examples(images, labels)
    assert torch.equal(plain.batch(0, 4, seed=0)[0], images[plain.batch(0, 4, seed=0)[1]])


# ------------------------------------------------------------------------------------------------ torch.compile


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_a_compiled_run_matches_eager_and_resumes_uncompiled(tmp_path, mode):
    """compile runs the training steps' forward through torch.compile (Dynamo captures a graph) and trains as eager
    mode does; the module itself stays uncompiled: its checkpoint has the eager parameter names (no `_orig_mod.`)
    and a crashed compiled run resumes without compile to the uninterrupted eager run's result."""
    if mode == "reduce-overhead" and not ON_GPU:
        pytest.skip("CUDA graphs need CUDA (test_compile_mode_checked_before_any_work: refused elsewhere)")
    config = lm_config(iterations=6, eval_every=3, eval_batches=1, amp="none")

    def run(compile_mode, checkpoint_dir=None, crash=False):
        def after_eval(index, metrics):
            if crash and index == 0:
                raise Crash("crash after the first evaluation")

        model = tiny_gpt("triton", dropout=0.0)
        settings = training.TrainConfig(**{**asdict(config), "compile": compile_mode})
        result = training.fit(
            model,
            token_stream(500, 1),
            token_stream(200, 2),
            settings,
            DEVICE,
            checkpoint_dir,
            after_eval=after_eval,
            loss_fn=training.model_loss,
        )
        return model, result

    reference, expected = run("none")
    torch._dynamo.reset()  # no graph cached by an earlier test: the compiled run captures its own
    graphs, skips = counters["stats"]["unique_graphs"], counters["inductor"]["cudagraph_skips"]
    with pytest.raises(Crash):
        run(mode, tmp_path, crash=True)
    assert counters["stats"]["unique_graphs"] > graphs, "the compiled run captured no graph"
    if mode == "reduce-overhead":  # Inductor falls back to no CUDA graphs with a log line only
        assert counters["inductor"]["cudagraph_skips"] == skips, "Inductor skipped CUDA graphs (TORCH_LOGS=cudagraphs)"
    state = training.load_checkpoint(training.latest_checkpoint(tmp_path))
    assert state["step"] == 3 and state["config"]["compile"] == mode
    assert list(state["model"]) == list(reference.state_dict())
    resumed, result = run("none", tmp_path)
    assert result["resumed_from_step"] == 3
    for got, want in zip(result["history"], expected["history"]):
        assert got["val/loss"] == pytest.approx(want["val/loss"], rel=1e-4)
    for (name, p), p_ref in zip(resumed.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(p, p_ref, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_compile_mode_checked_before_any_work():
    """An unknown mode anywhere, reduce-overhead (CUDA graphs) off CUDA: a ValueError before the first step."""
    data = tiny_data(8, 1)
    with pytest.raises(ValueError, match=r"compile must be one of \['none', 'default', 'reduce-overhead'\]"):
        training.fit(make_model("torch"), data, data, training.TrainConfig(epochs=1, compile="max", progress=False))
    with pytest.raises(ValueError, match="compile reduce-overhead records CUDA graphs, which need CUDA; this run is"):
        config = training.TrainConfig(epochs=1, compile="reduce-overhead", progress=False)
        training.fit(make_model("torch"), data, data, config, "cpu")
    assert training.compile_problem("reduce-overhead", "cuda") is None
