"""A tiny triformer GPT trained by triformer.training, alone (`python ddp_worker.py OUT`) or data-parallel
(`python -m torch.distributed.run --standalone --nproc_per_node 2 ddp_worker.py OUT`), for tests/test_ddp.py.

Process 0 writes OUT (JSON): the train/loss of every step, the validation losses, the step it resumed from, and
a checksum of the final weights. Options: --checkpoints DIR (a checkpoint every 2 steps, resumed from),
--hang-at STEP (process 0 stops for good at that step, after writing a file OUT.hanging, for the test to kill it).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from fake_datasets import pattern_tokens  # noqa: E402  (this script's folder, tests/, is on the path)

from triformer import distributed, training  # noqa: E402
from triformer.models import GPT, GPTConfig  # noqa: E402

VOCAB = 13


def stream(n: int, seed: int) -> training.TokenStream:
    return training.TokenStream(pattern_tokens(n, VOCAB, seed), block_size=8)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--checkpoints", type=Path)
    parser.add_argument("--hang-at", type=int, default=0)
    args = parser.parse_args()
    config = training.TrainConfig(
        iterations=6,
        eval_every=3,
        eval_batches=2,
        eval_batch_size=4,
        batch_size=4,
        lr=1e-2,
        grad_clip=1.0,
        log_every=1,
        checkpoint_every=2,
        progress=False,
    )
    losses = {}

    def log(metrics, step):
        if "train/loss" in metrics:
            losses[step] = metrics["train/loss"]
        if step == args.hang_at:
            args.out.with_suffix(".hanging").touch()
            time.sleep(3600)

    with distributed.process_group("cpu") as device:
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=VOCAB, block_size=8, n_layer=1, n_head=2, n_embd=16))
        result = training.fit(
            model,
            stream(600, 1),
            stream(200, 2),
            config,
            device,
            args.checkpoints,
            log=log,
            loss_fn=training.model_loss,
        )
        if distributed.rank() == 0:
            args.out.write_text(
                json.dumps(
                    {
                        "processes": distributed.world_size(),
                        "losses": losses,
                        "resumed_from_step": result["resumed_from_step"],
                        "val": [record["val/loss"] for record in result["history"]],
                        "weights": sum(p.double().abs().sum().item() for p in model.parameters()),
                    }
                )
            )


if __name__ == "__main__":
    main()
