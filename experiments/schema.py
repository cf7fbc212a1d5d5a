"""The schema of params.yaml, one per group, checked by every stage before it does any work.

A group maps each of its keys to a check and says which keys its stage needs; the group's `cpu:` and `gpu:` profile
sub-groups take the same keys (both are checked, whichever runs). An unknown key (`epoch` for `epochs`), a value of
the wrong type (the string "1e-3" where a number belongs) or out of range (`epochs: -1`, `train_subset: -5`) is
reported by its full name (`train_mlp.cpu.epoch`), every problem of the group in one ParamsError. A new stage's group
gets its schema here.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import inspect
import operator
from collections.abc import Callable, Iterator

from triformer import training
from triformer.bench.suites import load_suite
from triformer.data import IMAGE_DATASETS
from triformer.data.shakespeare import EDITIONS
from triformer.kernels.activation import ACTIVATIONS
from triformer.models.blocks import MLPS, NORMS, PARTS
from triformer.models.vit import POOLS

PROFILES = ("cpu", "gpu")
Check = Callable[[object], "str | None"]  # None when the value is fine, else what is wrong with it


class ParamsError(ValueError):
    """params.yaml does not fit its schema; the message names every bad key."""


@contextlib.contextmanager
def exit_on_error() -> Iterator[None]:
    """A ParamsError inside ends the stage process with its message alone (exit status 1, no traceback)."""
    try:
        yield
    except ParamsError as error:
        raise SystemExit(str(error)) from None


# ------------------------------------------------------------------------------------------------ checks


def _got(value) -> str:
    return f"got {value!r} ({type(value).__name__})"


def integer(minimum: int | None = None) -> Check:
    def check(value):
        if isinstance(value, bool) or not isinstance(value, int):
            return f"must be an integer, {_got(value)}"
        if minimum is not None and value < minimum:
            return f"must be ≥ {minimum}, got {value}"
        return None

    return check


def number(
    minimum: float | None = None,
    maximum: float | None = None,
    *,
    above: float | None = None,
    below: float | None = None,
) -> Check:
    """A real number (an integer too) within [minimum, maximum] and (above, below)."""
    limits = [
        (minimum, operator.ge, "≥"),
        (maximum, operator.le, "≤"),
        (above, operator.gt, ">"),
        (below, operator.lt, "<"),
    ]

    def check(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            hint = " (write a number such as 0.001, not a quoted string)" if isinstance(value, str) else ""
            return f"must be a number, {_got(value)}{hint}"
        broken = [f"{sign} {limit}" for limit, holds, sign in limits if limit is not None and not holds(value, limit)]
        return f"must be {' and '.join(broken)}, got {value}" if broken else None

    return check


def boolean(value) -> str | None:
    return None if isinstance(value, bool) else f"must be true or false, {_got(value)}"


def text(value) -> str | None:
    return None if isinstance(value, str) else f"must be a string, {_got(value)}"


def one_of(*choices) -> Check:
    def check(value):
        return None if value in choices else f"must be one of {list(choices)}, {_got(value)}"

    return check


def list_of(item: Check, *, nonempty: bool = True) -> Check:
    def check(value):
        if not isinstance(value, list):
            return f"must be a list, {_got(value)}"
        if nonempty and not value:
            return "must not be empty"
        problems = [f"item {i}: {problem}" for i, v in enumerate(value) if (problem := item(v))]
        return "; ".join(problems) or None

    return check


def shape(length: int) -> Check:
    """[d1, ..., d_length], every d a positive integer."""
    positive = integer(1)

    def check(value):
        if not isinstance(value, list) or len(value) != length:
            return f"must be a list of {length} positive integers, {_got(value)}"
        return next((problem for d in value if (problem := positive(d))), None)

    return check


def optional(check: Check) -> Check:
    """null (None), or what `check` accepts."""
    return lambda value: None if value is None else check(value)


def mapping(keys: dict[str, Check], required=()) -> Check:
    """A mapping of the given keys (each checked), holding at least `required`."""

    def check(value):
        if not isinstance(value, dict):
            return f"must be a mapping, {_got(value)}"
        problems = [
            f"{key}: unknown key (known keys: {sorted(keys)})" if key not in keys else f"{key}: {problem}"
            for key, v in value.items()
            if key not in keys or (problem := keys[key](v))
        ]
        problems += [f"{key}: missing" for key in required if key not in value]
        return "; ".join(problems) or None

    return check


def either(*checks: Check) -> Check:
    def check(value):
        problems = [problem for c in checks if (problem := c(value))]
        return None if len(problems) < len(checks) else " or ".join(problems)

    return check


# ------------------------------------------------------------------------------------------------ the groups


class Group:
    """A params group: its keys' checks, the keys its stage needs (in the group or its active profile), and whether
    it has `cpu:`/`gpu:` profiles."""

    def __init__(self, keys: dict[str, Check], required=(), profiles: bool = True, extra: Callable | None = None):
        self.keys, self.required, self.profiles, self.extra = keys, tuple(required), profiles, extra

    def check(self, name: str, group, profile: str | None) -> list[str]:
        group = {} if group is None else group
        if not isinstance(group, dict):
            return [f"{name}: must be a mapping of keys, {_got(group)}"]
        own = {k: v for k, v in group.items() if not (self.profiles and k in PROFILES)}
        problems, merged = self._check_keys(name, own, group), dict(own)
        for sub in PROFILES if self.profiles else ():
            if group.get(sub) is None:
                continue
            if not isinstance(group[sub], dict):
                problems.append(f"{name}.{sub}: must be a mapping of keys, {_got(group[sub])}")
                continue
            problems += self._check_keys(f"{name}.{sub}", group[sub], group)
            if sub == profile:
                merged.update(group[sub])
        where = f"{name} or {name}.{profile}" if self.profiles and profile else name
        return problems + [f"{name}.{key}: missing (set it in {where})" for key in self.required if key not in merged]

    def _check_keys(self, name: str, keys: dict, group: dict) -> list[str]:
        """The problems of `keys` (the group's own or one profile's); `group` is the whole group, for `extra`."""
        problems = []
        for key, value in keys.items():
            check = self.keys.get(key) or (self.extra and self.extra(key, group))
            if check is None:
                close = difflib.get_close_matches(str(key), list(self.keys), n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"known keys: {sorted(self.keys)}"
                problems.append(f"{name}.{key}: unknown key ({hint})")
            elif problem := check(value):
                problems.append(f"{name}.{key}: {problem}")
        return problems


def _bench_suite(key: str, group: dict) -> Check | None:
    """bench.<suite>: the keyword arguments of triformer.bench.<suite>.run (other than dtype, device, progress); a
    suite listed in `suites` whose module does not exist yet takes any (the stage reports it missing)."""
    listed = isinstance(group.get("suites"), list) and key in group["suites"]
    if not str(key).isidentifier() or importlib.util.find_spec(f"triformer.bench.{key}") is None:
        return (
            (lambda value: None if isinstance(value, dict) else f"must be a mapping, {_got(value)}") if listed else None
        )
    accepted = set(inspect.signature(load_suite(key).run).parameters) - {"dtype", "device", "progress"}

    def check(value):
        if not isinstance(value, dict):
            return f"must be a mapping of keyword arguments of triformer.bench.{key}.run, {_got(value)}"
        unknown = sorted(set(value) - accepted)
        return (
            f"unknown arguments {unknown} of triformer.bench.{key}.run (it takes {sorted(accepted)})"
            if unknown
            else None
        )

    return check


ACTIVATION = one_of(*(a for a in ACTIVATIONS if a))
# triformer.training.TrainConfig's settings (seed comes from `common`).
LOOP = {
    "batch_size": integer(1),
    "lr": number(above=0),
    "weight_decay": number(0),
    "beta2": number(0, below=1),
    "warmup_frac": number(0, 1),
    "min_lr_frac": number(0, 1),
    "grad_clip": number(0),
    "amp": one_of("bf16", "none"),
    "log_every": integer(1),
    "eval_batch_size": integer(1),
    "checkpoint_every": integer(0),
    "max_checkpoints": integer(1),
}
# torch.compile's mode for the training steps of a model and its twin alike (training.TrainConfig.compile).
COMPILE = one_of(*training.COMPILE_MODES)
# The MLP's training (train_mlp and the ablation's model runs): the data, the model and the loop's settings.
TRAINING = {
    "dataset": one_of(*IMAGE_DATASETS),
    "hidden_size": integer(1),
    "activation": ACTIVATION,
    "train_subset": integer(0),
    "val_subset": integer(0),  # 0: all
    "epochs": integer(1),
    **LOOP,
}
TRAINING_REQUIRED = ("dataset", "hidden_size", "activation", "epochs", "batch_size", "lr")
# triformer.models.GPTConfig's fields (vocab_size comes from the data, backend from the stage).
GPT_MODEL = {
    "n_layer": integer(1),
    "n_head": integer(1),
    "n_kv_head": optional(integer(1)),
    "n_embd": integer(1),
    "block_size": integer(1),
    "dropout": number(0, below=1),
    "attn_dropout": number(0, below=1),
    "bias": boolean,
    "norm": one_of(*NORMS),
    "mlp": one_of(*MLPS),
    "mlp_hidden": optional(integer(1)),
    "rope": boolean,
    "fused_head": boolean,
    "fused_residual": boolean,
    "torch_parts": list_of(one_of(*PARTS), nonempty=False),
}
# A transformer training stage: the model on `backend`, its torch twin with `baseline`, `processes` data-parallel.
TRANSFORMER_RUN = {
    "backend": one_of("triton", "torch"),
    "baseline": boolean,
    "processes": integer(1),
    "keep_checkpoints": boolean,
    "compile": COMPILE,
}
# The ablation's GPT part: a training step of the GPT with one part at a time on torch (triformer.bench.gpt's step).
ABLATION_GPT = mapping(
    {
        **{k: v for k, v in GPT_MODEL.items() if k != "torch_parts"},
        "vocab_size": integer(1),
        "batch_size": integer(1),
        "steps": integer(1),
        "warmup": integer(0),
        "variants": list_of(one_of("triformer", *PARTS, "separate residual", "torch")),
    },
    required=("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "batch_size", "variants"),
)

GROUPS = {
    "common": Group(
        {
            "seed": integer(0),
            "device": one_of("auto", "cuda", "cpu"),
            "profile": one_of("auto", *PROFILES),
            "dtype": one_of("float32", "float16", "bfloat16"),
        },
        required=("seed", "dtype"),
    ),
    "test": Group(
        {
            "paths": list_of(text),
            "markers": text,
            "sample_every": integer(1),
            "workers": integer(1),
            "extra_args": list_of(text, nonempty=False),
        },
        required=("paths", "markers"),
    ),
    "bench": Group({"suites": list_of(text)}, required=("suites",), extra=_bench_suite),
    "ablation": Group(
        {
            **TRAINING,
            "variants": list_of(one_of("fused", "unfused", "torch")),
            "shapes": list_of(shape(3)),
            "gpt": ABLATION_GPT,
        },
        required=(*TRAINING_REQUIRED, "variants", "shapes"),
    ),
    "train_mlp": Group(
        {
            **TRAINING,
            "backend": one_of("triton", "torch"),
            "fused": boolean,
            "baseline": boolean,
            "keep_checkpoints": boolean,
            "compile": COMPILE,
        },
        required=(*TRAINING_REQUIRED, "backend", "fused"),
    ),
    "train_gpt": Group(
        {
            **LOOP,
            **GPT_MODEL,
            **TRANSFORMER_RUN,
            "dataset": one_of("shakespeare"),
            "iterations": integer(1),
            "eval_every": integer(0),
            "eval_batches": integer(0),
            "sample_tokens": integer(0),
            "temperature": number(above=0),
            "top_k": optional(integer(1)),
        },
        required=(
            "dataset",
            "n_layer",
            "n_head",
            "n_embd",
            "block_size",
            "batch_size",
            "lr",
            "iterations",
            "sample_tokens",
            "temperature",
        ),
    ),
    "train_vit": Group(
        {
            **LOOP,
            **TRANSFORMER_RUN,
            "dataset": one_of(*IMAGE_DATASETS),
            "train_subset": integer(0),
            "val_subset": integer(0),
            "epochs": integer(1),
            "patch_size": integer(1),
            "n_layer": integer(1),
            "n_head": integer(1),
            "n_embd": integer(1),
            "mlp_ratio": number(above=0),
            "dropout": number(0, below=1),
            "attn_dropout": number(0, below=1),
            "pool": one_of(*POOLS),
            "augment_shift": integer(0),  # training images moved by up to this many pixels (0: not moved)
            "augment_flip": boolean,  # training images mirrored left to right half of the time
            "fused_residual": boolean,  # ViTConfig.fused_residual
        },
        required=("dataset", "patch_size", "n_layer", "n_head", "n_embd", "epochs", "batch_size", "lr"),
    ),
    "report": Group({"notebooks": list_of(text)}, profiles=False),
    # data.<name>: the keyword arguments of triformer.data.<name>.prepare
    "data.fashion_mnist": Group({"offline_dir": either(text, list_of(text)), "download": boolean}, profiles=False),
    "data.cifar10": Group({"download": boolean}, profiles=False),
    "data.shakespeare": Group(
        {"val_fraction": number(above=0, below=1), "editions": list_of(one_of(*EDITIONS)), "texts_dir": text},
        profiles=False,
    ),
}


def _machine_problems(group, name: str, profile: str | None, device: str) -> list[str]:
    """What fits the schema but not the machine the stage runs on (`device`): compile: reduce-overhead off CUDA,
    named where the active profile takes it from."""
    if not isinstance(group, dict):
        return []
    sub = group.get(profile) if isinstance(group.get(profile), dict) else {}
    where, mode = (f"{name}.{profile}", sub["compile"]) if "compile" in sub else (name, group.get("compile", "none"))
    problem = training.compile_problem(mode, device) if mode in training.COMPILE_MODES else None
    return [f"{where}.compile: {problem}"] if problem else []


def validate(params: dict, group: str, profile: str | None = None, device: str | None = None) -> None:
    """Check params.yaml's `group` ("train_mlp", "data.shakespeare", ...) and, for a group with profiles, `common`;
    required keys are looked for in the group and its `profile` sub-group. With `device` ("cuda", "cpu"), values
    the machine cannot run (compile: reduce-overhead off CUDA) are problems too. Raises one ParamsError naming
    every problem."""
    if group not in GROUPS:
        raise ParamsError(f"no schema for the params group {group!r}: add one to experiments/schema.py")
    names = ["common", group] if GROUPS[group].profiles else [group]
    problems = []
    for name in names:
        section, value = name.split("."), params
        for part in section:
            value = value.get(part) if isinstance(value, dict) else None
        problems += GROUPS[name].check(name, value, profile)
    if device is not None and "compile" in GROUPS[group].keys:
        problems += _machine_problems(params.get(group), group, profile, device)
    if problems:
        raise ParamsError("\n".join(["params.yaml does not fit its schema:", *(f"  {p}" for p in problems)]))
