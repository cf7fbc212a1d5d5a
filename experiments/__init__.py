"""DVC stage entry points (`python -m experiments.<stage>`): read params.yaml, call triformer, log to MLflow, write
results/. Kept thin; what several stages share is in `common.py`.

Importing this package chooses how Triton runs, because TRITON_INTERPRET must be set before triton is imported:
natively on a CUDA GPU, else (or with `common.device: cpu`) through Triton's interpreter on the CPU.
"""

import os
from pathlib import Path


def _choose_runner() -> None:
    if "TRITON_INTERPRET" in os.environ:
        return
    import torch
    import yaml

    params = Path("params.yaml")
    device = (
        (yaml.safe_load(params.read_text()) or {}).get("common", {}).get("device", "auto")
        if params.exists()
        else "auto"
    )
    if device == "cpu" or not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


_choose_runner()
