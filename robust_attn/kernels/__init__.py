"""Attention kernels and the rule that picks one.

``auto`` takes the first kernel, in the order sdpa, flex, xformers, eager, that
can compute the problem exactly on its device: fused SDPA when nothing needs
more, FlexAttention for score modifiers (on CUDA, or on the CPU without
gradients), xformers on CUDA where installed, and the eager reference last.

With a sparsity pattern (robust_attn.sparse) the order is:

- on CUDA: flex (a BlockMask cached per pattern and length), then the
  structured kernels, sdpa, eager;
- elsewhere: the structured kernels block_diagonal (BlockLocal), strided
  (Strided), block_sparse (any pattern sparse at its block size), then sdpa
  (the pattern as a dense mask), flex (forward only on the CPU; after sdpa so
  that auto never stalls on a compile per sequence length: pass kernel='flex'
  to choose it), eager.

A fallback past the structured kernels (and past flex on CUDA) warns with
:class:`SparseFallbackWarning`, naming what it costs.
"""

from __future__ import annotations

import warnings

from ..problem import AttentionProblem
from .base import Kernel
from .block_diagonal import BLOCK_DIAGONAL
from .block_sparse import BLOCK_SPARSE
from .eager import EAGER
from .flex import FLEX
from .sdpa import SDPA
from .strided import STRIDED
from .xformers import XFORMERS

KERNELS: dict[str, Kernel] = {kernel.name: kernel for kernel in (
    SDPA, FLEX, XFORMERS, EAGER, BLOCK_DIAGONAL, STRIDED, BLOCK_SPARSE)}
KERNEL_CHOICES = ("auto", *KERNELS)
STRUCTURED = (BLOCK_DIAGONAL, STRIDED, BLOCK_SPARSE)

_FALLBACK_COST = {
    "flex": "FlexAttention off CUDA: compiles once per sequence length (tens of seconds on a "
            "CPU) and runs forward only",
    "sdpa": "the pattern as a dense (Nq, Nk) mask: every score is computed, no saving over "
            "dense attention, and the mask takes Nq * Nk bytes",
    "eager": "the eager reference: the whole (B, H, Nq, Nk) attention matrix is materialised",
}


class SparseFallbackWarning(UserWarning):
    """A sparsity pattern runs on a kernel that does not skip its blocked work."""


def check_kernel_name(kernel: str) -> str:
    if kernel not in KERNEL_CHOICES:
        raise ValueError(f"kernel={kernel!r} is not a kernel; choose one of {KERNEL_CHOICES}")
    return kernel


def _auto_order(problem: AttentionProblem) -> tuple[Kernel, ...]:
    if problem.pattern is None:
        return SDPA, FLEX, XFORMERS, EAGER
    if problem.q.device.type == "cuda":
        return FLEX, *STRUCTURED, SDPA, EAGER
    return *STRUCTURED, SDPA, FLEX, EAGER


def select_kernel(kernel: str, problem: AttentionProblem, dropout_p: float) -> Kernel:
    """The kernel named (checked that it can run the problem) or, for 'auto', the first that can."""
    if kernel != "auto":
        reason = KERNELS[kernel].unsupported(problem, dropout_p)
        if reason is not None:
            raise ValueError(f"kernel={kernel!r} cannot run here: {reason}")
        return KERNELS[kernel]
    reasons = {}
    for candidate in _auto_order(problem):
        reason = candidate.unsupported(problem, dropout_p)
        if reason is None:
            break
        reasons[candidate.name] = reason
    if candidate.name in _FALLBACK_COST and problem.pattern is not None and not (
            candidate is FLEX and problem.q.device.type == "cuda"):
        skipped = "; ".join(f"{name}: {reasons[name]}" for name in reasons
                            if name not in (BLOCK_DIAGONAL.name, STRIDED.name))
        warnings.warn(f"sparsity pattern {problem.pattern} falls back to kernel "
                      f"{candidate.name!r}: {_FALLBACK_COST[candidate.name]} ({skipped})",
                      SparseFallbackWarning, stacklevel=2)
    return candidate


__all__ = ["KERNELS", "KERNEL_CHOICES", "STRUCTURED", "Kernel", "SparseFallbackWarning",
           "check_kernel_name", "select_kernel"]
