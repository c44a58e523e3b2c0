"""The input x of a converted HF attention module, for its attention function's AttentionCall.

transformers does not pass the module's input (``hidden_states``, (B, N, C)) to
the attention function, but RobustAttention's stages and records read it as
``call.x``: the monitor's input statistics, mitigations' health. convert
registers on each converted module a forward pre-hook that pushes the input on
a context variable and a forward hook (``always_call``: also when the forward
raises) that pops it; the attention function, called inside that forward, reads
the innermost entry for its module. Nothing is stored on the module, and a
context variable is per thread and asyncio task (as ``health_probe``'s switch).
"""

from __future__ import annotations

from contextvars import ContextVar

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

_INPUTS: ContextVar[tuple[tuple[int, Tensor | None], ...]] = ContextVar("robust_attn_hf_inputs",
                                                                        default=())


def _push(module: nn.Module, args: tuple, kwargs: dict) -> None:
    x = kwargs.get("hidden_states", args[0] if args else None)
    _INPUTS.set(_INPUTS.get() + ((id(module), x),))


def _pop(module: nn.Module, args: tuple, kwargs: dict, output) -> None:
    _INPUTS.set(_INPUTS.get()[:-1])


def watch_input(module: nn.Module) -> tuple[RemovableHandle, RemovableHandle]:
    """Register the two hooks on ``module``; their handles (remove both to stop watching)."""
    return (module.register_forward_pre_hook(_push, with_kwargs=True),
            module.register_forward_hook(_pop, with_kwargs=True, always_call=True))


def module_input(module: nn.Module) -> Tensor | None:
    """``module``'s input in the forward running now, or None (not watched, or outside it)."""
    for key, x in reversed(_INPUTS.get()):
        if key == id(module):
            return x
    return None
