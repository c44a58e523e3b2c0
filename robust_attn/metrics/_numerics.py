"""Private helpers shared by the metrics: dtype promotion and argument checks.

Every check raises with the argument's name first in the message, so callers
(and tests) can tell which argument was wrong.
"""

from __future__ import annotations

from collections.abc import Callable
from numbers import Real

import torch
from torch import Tensor


def promote(t: Tensor) -> Tensor:
    """``t`` in float32, or float64 when it already is: reductions never run in half precision."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` for ``den >= 0``, with ``x / 0 = x / tiny``: 0 wherever ``num`` is 0 too."""
    return num / den.clamp_min(torch.finfo(den.dtype).tiny)


def check_matrices(name: str, t: object) -> Tensor:
    """Return ``t``, a floating-point (..., rows, cols) tensor with rows, cols >= 1, promoted."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.dim() < 2 or t.shape[-1] == 0 or t.shape[-2] == 0:
        raise ValueError(
            f"{name} must have shape (..., rows, cols) with rows, cols >= 1, got {tuple(t.shape)}"
        )
    return promote(t)


def check_allowed(allowed: object, probs: Tensor) -> Tensor:
    """The bool mask ``allowed`` expanded to ``probs.shape``; None allows every key."""
    if allowed is None:
        return torch.ones((), dtype=torch.bool, device=probs.device).expand(probs.shape)
    if not isinstance(allowed, Tensor) or allowed.dtype != torch.bool:
        kind = allowed.dtype if isinstance(allowed, Tensor) else type(allowed).__name__
        raise TypeError(f"allowed must be a bool tensor (True = may attend), got {kind}")
    try:
        fits = torch.broadcast_shapes(allowed.shape, probs.shape) == probs.shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(
            f"allowed of shape {tuple(allowed.shape)} does not broadcast to "
            f"the attention shape {tuple(probs.shape)}"
        )
    return allowed.expand(probs.shape)


def check_int(name: str, value: object, low: int, high: int) -> int:
    """Return ``value`` if it is an int with ``low <= value <= high``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def check_real(name: str, value: object, within: Callable[[float], bool], interval: str) -> float:
    """Return ``value`` as a float if it is a real number for which ``within`` holds."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not within(float(value)):
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return float(value)
