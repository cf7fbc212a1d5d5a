"""The names of dame-cell/Triformer, the original triformer package, so its users switch without edits.

dame-cell/Triformer is PyPI `triformer`, versions 0.0.1–3.0.6. Its import paths are the thin modules
beside this one (`triformer.layernorm`, `.rms_norm`, `.softmax`, `.dropout`, `.cross_entropy`, `.mlp`,
`.forward_mlp`); its argument names (`TritonSoftmax(is_causal=)`, `TritonCrossEntropyLoss(pad_token_id=)`,
`TritonLinear(use_relu=)`, `TritonDropout.apply(x, dropout_prob=)`) are accepted by the current classes through
`renamed_arguments`.
"""

from __future__ import annotations

import functools
import inspect

ORIGINAL = "dame-cell/Triformer's name"


def renamed_arguments(**renames):
    """Decorate a function (a class's __init__) so that it also takes old argument names.

    renames maps each old name to the current name, or to (current name, convert) where convert(old value) is the
    current value. The signature shown stays the current one. An old name passed together with its current name
    (by keyword or by position) raises TypeError naming both.
    """
    targets = {old: new if isinstance(new, tuple) else (new, None) for old, new in renames.items()}

    def decorate(fn):
        signature = inspect.signature(fn)
        owner = fn.__qualname__.removesuffix(".__init__")

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            olds = [old for old in targets if old in kwargs]
            if olds:
                current = {name: value for name, value in kwargs.items() if name not in targets}
                given = signature.bind_partial(*args, **current).arguments
                for old in olds:
                    new, convert = targets[old]
                    if new in given:
                        raise TypeError(
                            f"{owner}: {old}= ({ORIGINAL}) and {new}= are the same argument; pass only {new}="
                        )
                    value = kwargs.pop(old)
                    kwargs[new] = convert(value) if convert else value
            return fn(*args, **kwargs)

        return wrapper

    return decorate


def relu_or_none(use_relu) -> str | None:
    """dame-cell/Triformer's TritonLinear(use_relu=) flag as the current activation argument."""
    return "relu" if use_relu else None
