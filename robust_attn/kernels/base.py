"""What a kernel is: a function of an AttentionProblem, and the reason it cannot run one."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from ..problem import AttentionProblem


@dataclass(frozen=True)
class Kernel:
    """An attention kernel.

    run(problem, dropout_p) -> (B, H, Nq, Dv).
    unsupported(problem, dropout_p) -> None when the kernel can compute the
    problem exactly on its device, else the reason it cannot (shown to users).
    """

    name: str
    run: Callable[[AttentionProblem, float], Tensor]
    unsupported: Callable[[AttentionProblem, float], str | None]
