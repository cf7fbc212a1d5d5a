"""Stage `data@<name>`: prepare one dataset under data/<name> (`python -m experiments.data fashion_mnist`).

fashion_mnist: torchvision's raw folder from Debian's dataset-fashion-mnist, or torchvision's download;
cifar10: torchvision's download; shakespeare: the character-level corpus with its fixed split. Options: params
`data.<name>`, passed as keyword arguments to `triformer.data.<name>.prepare`.
"""

import sys

from triformer import data

from . import common, schema


def main(name: str) -> None:
    params = common.load_params()
    datasets = params.get("data") or {}
    if name not in datasets:
        raise SystemExit(f"params.yaml has no data.{name}; datasets: {sorted(datasets)}")
    module = getattr(data, name, None)
    if module is None or not hasattr(module, "prepare"):
        raise SystemExit(f"no dataset module triformer.data.{name}")
    with schema.exit_on_error():
        schema.validate(params, f"data.{name}")
    origin = module.prepare(common.DATA_ROOT / name, **(datasets[name] or {}))
    print(f"{name}: prepared under {common.DATA_ROOT / name} ({origin if isinstance(origin, str) else 'ok'})")


if __name__ == "__main__":
    main(*sys.argv[1:])
