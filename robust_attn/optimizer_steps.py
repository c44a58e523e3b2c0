"""The after-optimiser-step stage: mitigations that act on updated weights (QK-clip).

    handle = robust_attn.attach_to_optimizer(model, optimizer)   # once
    ...                                                           # train as usual
    handle.remove()

or, in a loop that owns its steps, ``robust_attn.after_optimizer_step(model)``
right after ``optimizer.step()``. Either calls
:meth:`~robust_attn.mitigations.Mitigation.after_optimizer_step` of every
mitigation of every RobustAttention in the model, under no_grad. The hook is
torch's public ``Optimizer.register_step_post_hook``.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .attention import RobustAttention


@torch.no_grad()
def after_optimizer_step(model: nn.Module) -> None:
    """Run every mitigation's after-step stage in ``model``'s RobustAttention modules."""
    for module in model.modules():
        if isinstance(module, RobustAttention):
            layers = module.layers_by_role()
            for mitigation in module.mitigations.values():
                mitigation.after_optimizer_step(layers)


def attach_to_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> RemovableHandle:
    """Run :func:`after_optimizer_step` of ``model`` after every ``optimizer.step()``; returns the
    hook's handle (``remove()`` detaches it)."""
    return optimizer.register_step_post_hook(lambda *_: after_optimizer_step(model))
