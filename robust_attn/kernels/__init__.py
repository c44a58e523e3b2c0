"""Attention kernels and the rule that picks one.

``auto`` takes the first kernel, in the order sdpa, flex, xformers, eager, that
can compute the problem exactly on its device: fused SDPA when nothing needs
more, FlexAttention for score modifiers (on CUDA, or on the CPU without
gradients), xformers on CUDA where installed, and the eager reference last.
"""

from __future__ import annotations

from ..problem import AttentionProblem
from .base import Kernel
from .eager import EAGER
from .flex import FLEX
from .sdpa import SDPA
from .xformers import XFORMERS

KERNELS: dict[str, Kernel] = {kernel.name: kernel for kernel in (SDPA, FLEX, XFORMERS, EAGER)}
KERNEL_CHOICES = ("auto", *KERNELS)


def check_kernel_name(kernel: str) -> str:
    if kernel not in KERNEL_CHOICES:
        raise ValueError(f"kernel={kernel!r} is not a kernel; choose one of {KERNEL_CHOICES}")
    return kernel


def select_kernel(kernel: str, problem: AttentionProblem, dropout_p: float) -> Kernel:
    """The kernel named (checked that it can run the problem) or, for 'auto', the first that can."""
    if kernel != "auto":
        reason = KERNELS[kernel].unsupported(problem, dropout_p)
        if reason is not None:
            raise ValueError(f"kernel={kernel!r} cannot run here: {reason}")
        return KERNELS[kernel]
    return next(k for k in KERNELS.values() if k.unsupported(problem, dropout_p) is None)


__all__ = ["KERNELS", "KERNEL_CHOICES", "Kernel", "check_kernel_name", "select_kernel"]
