"""Whether hooks watch a module: the fused paths that do a module's work without calling it, or that write into
its output, step aside for them."""

from __future__ import annotations

from torch import nn


def hooked_globally() -> bool:
    """Whether a forward or backward hook (pre or post) is registered for every module
    (nn.modules.module.register_module_*)."""
    registry = nn.modules.module
    return bool(
        registry._global_forward_hooks
        or registry._global_forward_pre_hooks
        or registry._global_backward_hooks
        or registry._global_backward_pre_hooks
    )


def hooked_itself(module: nn.Module) -> bool:
    """Whether a forward or backward hook (pre or post) is registered on the module itself."""
    return bool(
        module._forward_hooks or module._forward_pre_hooks or module._backward_hooks or module._backward_pre_hooks
    )


def hooked(module: nn.Module) -> bool:
    """Whether a hook watches the module: its own or one for every module."""
    return hooked_itself(module) or hooked_globally()


def replaced_forward(module: nn.Module) -> bool:
    """Whether the instance carries a forward of its own (module.forward = ...), not its class's."""
    return "forward" in module.__dict__
