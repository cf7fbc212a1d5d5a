"""Triton's interpreter with one language patch per launch instead of one per helper call.

Under TRITON_INTERPRET=1 a launch replaces triton.language's builtins with NumPy implementations
(`interpreter._patch_lang`: a walk over every member of triton.language, its math module and its tensor class) and
puts the originals back when the launch ends. Triton also runs that walk again at every call of a @triton.jit
helper inside the kernel, while the launch's replacement is still in place: for the CPU pipeline's GPT step the
repeated walks took a third of the interpreter's time. `install()` makes a helper call inside a launch skip the
walk when the launch's patch already covers every language module the helper's globals name (triton.language or
triton.language.core); a helper naming one it does not cover is patched as before, and that patch is undone with
the launch's. The helper runs under the same replacements either way, so results are unchanged.

Inside a launch NumPy's floating-point errors are ignored (a np.seterr(all="raise") included): masked lanes compute
log 0, 0 / 0 or exp overflows that the kernel then discards (a GPU computes them silently too), and every
cross-entropy call warned.

Nothing else changes outside a launch, when the interpreter is off, or when Triton's interpreter lacks the structure
this relies on (`GridExecutor.__call__` running a launch, `_patch_lang(fn)` returning a scope with `restore()`).
"""

from __future__ import annotations

import functools
import inspect

import numpy as np


class _LaunchPatch:
    """The language patch of one launch: the modules it covers and the scopes its end restores."""

    def __init__(self, scope, langs: frozenset):
        self.scopes, self.langs = [scope], langs

    def restore(self) -> None:
        while self.scopes:
            self.scopes.pop().restore()


# One frame per running launch (a launch may start inside another's grid function or pre-run hook): [the kernel's
# function, which the launch's own _patch_lang call names; its _LaunchPatch once made; the scopes of jit calls made
# before it (in a pre-run hook), which Triton would leave patched and the launch's end restores].
_frames: list[list] = []
_installed = False


def install() -> bool:
    """Make Triton's interpreter patch the language once per launch (see the module doc); True when installed."""
    global _installed
    if _installed:
        return True
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return False
    original_patch = getattr(interpreter, "_patch_lang", None)
    grid_executor = getattr(interpreter, "GridExecutor", None)
    if original_patch is None or grid_executor is None or list(inspect.signature(original_patch).parameters) != ["fn"]:
        return False
    languages = (tl, tl.core)

    def language_modules(fn) -> frozenset:
        return frozenset(id(v) for v in fn.__globals__.values() if any(v is lang for lang in languages))

    def patch_lang(fn):
        frame = _frames[-1] if _frames else None
        if frame is None:
            return original_patch(fn)  # a jit function called outside a launch: as Triton does
        if frame[1] is None:
            if fn is not frame[0]:  # a jit call before the launch patched (in a pre-run hook)
                scope = original_patch(fn)
                if hasattr(scope, "restore"):
                    frame[2].append(scope)
                return scope
            scope = original_patch(fn)  # the launch's own patch
            if hasattr(scope, "restore"):
                frame[1] = _LaunchPatch(scope, language_modules(fn))
                return frame[1]
            return scope
        langs = language_modules(fn)
        if not langs:  # Triton's own error: triton.language must be visible from the jit function
            return original_patch(fn)
        if not langs <= frame[1].langs:  # a helper naming a module the launch did not patch
            scope = original_patch(fn)
            if hasattr(scope, "restore"):
                frame[1].scopes.append(scope)
            frame[1].langs |= langs
        return None  # a helper call: Triton ignores the result

    run_launch = grid_executor.__call__

    @functools.wraps(run_launch)
    def launch(self, *args, **kwargs):
        _frames.append([getattr(self, "fn", None), None, []])
        try:
            with np.errstate(divide="ignore", invalid="ignore", over="ignore", under="ignore"):
                return run_launch(self, *args, **kwargs)
        finally:
            for scope in reversed(_frames.pop()[2]):
                scope.restore()

    interpreter._patch_lang = patch_lang
    grid_executor.__call__ = launch
    _installed = True
    return True
