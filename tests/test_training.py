"""The training loop: schedule, logging, checkpoints, and resume after a crash equal to an uninterrupted run."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from harness import DEVICE
from triformer import TritonMLP, training

pytestmark = pytest.mark.pipeline
TIMING_KEYS = ("perf/images_per_s", "perf/step_ms")


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
    def on_epoch_end(epoch, metrics):
        if epoch == crash_after:
            raise Crash(f"crash after epoch {epoch}")

    model = make_model(backend)
    result = training.fit(model, tiny_data(config.batch_size * 3, 1), tiny_data(20, 2), config, DEVICE,
                          checkpoint_dir=checkpoint_dir, on_epoch_end=on_epoch_end, log=log)
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
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_0001.pt", "epoch_0002.pt"]
    assert training.checkpoint_extra(tmp_path) == {"run": "abc"}
    assert training.checkpoint_extra(tmp_path / "none") == {} and training.latest_checkpoint(None) is None
    # a finished run found again resumes past its last epoch: nothing to train, the same final metrics
    result = training.fit(make_model("torch"), tiny_data(16, 1), tiny_data(8, 2), config, checkpoint_dir=tmp_path)
    assert result["resumed_from_epoch"] == 3 and len(result["history"]) == 3
    with pytest.raises(ValueError, match="other settings"):
        training.fit(make_model("torch"), tiny_data(16, 1), tiny_data(8, 2),
                     training.TrainConfig(epochs=5, batch_size=8, progress=False), checkpoint_dir=tmp_path)


def test_logs_steps_and_epochs_and_learns():
    config = training.TrainConfig(epochs=3, batch_size=16, lr=2e-2, log_every=2, progress=False)
    logged = []
    _, result = run("torch", config, log=lambda metrics, step: logged.append((step, metrics)))
    steps = [step for step, m in logged if "train/loss" in m]
    assert steps == [2, 3, 4, 6, 8, 9]  # every log_every (2) steps and the last of each epoch (3 steps an epoch)
    epochs = [(step, m) for step, m in logged if "val/accuracy" in m]
    assert [step for step, _ in epochs] == [1, 2, 3]
    assert set(epochs[0][1]) >= {"train/epoch_loss", "val/loss", "val/accuracy", *TIMING_KEYS}
    assert result["val/accuracy"] > 0.6 and result["train/loss"] < result["history"][0]["train/epoch_loss"]


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
    torch.save({"extra": {}, "payload": PlantedCode(marker)}, tmp_path / "epoch_0000.pt")
    config = training.TrainConfig(epochs=1, batch_size=8, progress=False)
    with pytest.raises(ValueError, match="not a checkpoint of triformer.training"):
        training.checkpoint_extra(tmp_path)
    with pytest.raises(ValueError, match="not a checkpoint of triformer.training"):
        training.fit(make_model("torch"), tiny_data(8, 1), tiny_data(8, 2), config, checkpoint_dir=tmp_path)
    assert not marker.exists(), "loading the checkpoint ran the code planted in it"
