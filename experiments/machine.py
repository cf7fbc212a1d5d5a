"""Stage `machine`: describe where the kernels run (profile, device, card, versions) in results/machine.json.

Every other stage depends on that file, and it is not committed: a fresh clone probes its machine again, so a GPU
run's dvc.lock makes a CPU machine rerun everything at the CPU profile (and vice versa), while a second `dvc repro`
on the same machine finds nothing changed.
"""

from . import common


def main() -> None:
    info = common.machine(common.load_params())
    common.write_json(common.MACHINE_FILE, info)
    print(f"machine: {info}")


if __name__ == "__main__":
    main()
