"""Attention kernels and the rule that picks one.

``auto`` takes the first kernel that can compute the problem exactly on its
device:

- on CUDA: sdpa, flex, tiled, chunked: fused SDPA when nothing needs more,
  FlexAttention for score modifiers (head widths of at least 16: one compiled,
  fused kernel beats tiles of eager ops), tiled where flex refuses, chunked for
  the rest;
- elsewhere: sdpa, tiled, chunked. FlexAttention is not tried on the CPU: it runs
  forward only there and compiles once per sequence length (tens of seconds);
  pass kernel='flex' to choose it.

xformers runs only when chosen (kernel='xformers'): SDPA accepts every problem
it accepts, and runs the same CUTLASS kernel for them (its memory-efficient
backend), so it would never be reached (:mod:`robust_attn.kernels.xformers`).

The tiled kernel (:mod:`robust_attn.kernels.tiled`) computes what SDPA cannot
(score modifiers, sigmoid attention) in FlashAttention-style tiles of query rows
x keys, so no tile's memory depends on the sequence length. The chunked kernel
(:mod:`robust_attn.kernels.chunked`) computes it in blocks of query rows over all
keys and takes what tiled refuses (attention dropout, gradients to a float mask or
to a score modifier's tensor, torch.compile tracing). The eager
kernel, which materialises it, is the reference every kernel is tested
against, and runs only when chosen (kernel='eager', or timm's
``fused_attn = False``).

With a sparsity pattern (robust_attn.sparse) the order is:

- on CUDA: flex (a BlockMask cached per pattern and length), then the
  structured kernels, sdpa, tiled, chunked;
- elsewhere: the structured kernels block_diagonal (BlockLocal), strided
  (Strided), block_sparse (any pattern sparse at its block size), then sdpa
  (the pattern as a dense mask), tiled (the pattern as a mask per tile),
  chunked (the pattern as a dense mask per block of query rows). As without a
  pattern, flex is not tried on the CPU.

A fallback past the structured kernels (and past flex on CUDA) warns with
:class:`SparseFallbackWarning`, naming what it costs.

With a per-call block selection (``problem.selection``: block_topk), ``auto`` runs the
selected-blocks kernel (:mod:`robust_attn.kernels.selected_blocks`: only the selected key
blocks are computed) when it can: softmax without score modifiers, mask or pattern, and no
log-sum-exp asked for. Otherwise the selection becomes a bool mask (B H Nq Nk, built once)
and the order above applies to that problem.
"""

from __future__ import annotations

import warnings

import torch

from .._compat import graph_warning
from ..problem import AttentionProblem
from ..sparse.pattern import describe
from .base import Kernel, KernelOutput
from .block_diagonal import BLOCK_DIAGONAL
from .block_sparse import BLOCK_SPARSE
from .chunked import CHUNKED
from .eager import EAGER
from .flex import FLEX
from .sdpa import SDPA
from .sdpa_sink import SDPA_SINK
from .selected_blocks import SELECTED_BLOCKS
from .strided import STRIDED
from .tiled import TILED
from .xformers import XFORMERS

KERNELS: dict[str, Kernel] = {kernel.name: kernel for kernel in (
    SDPA, FLEX, XFORMERS, TILED, CHUNKED, EAGER, BLOCK_DIAGONAL, STRIDED, BLOCK_SPARSE,
    SELECTED_BLOCKS, SDPA_SINK)}
KERNEL_CHOICES = ("auto", *KERNELS)
STRUCTURED = (BLOCK_DIAGONAL, STRIDED, BLOCK_SPARSE)

_FALLBACK_COST = {
    "flex": "FlexAttention off CUDA: compiles once per sequence length (tens of seconds on a "
            "CPU) and runs forward only",
    "sdpa": "the pattern as a dense (Nq, Nk) mask: every score is computed, no saving over "
            "dense attention, and the mask takes Nq * Nk bytes",
    "tiled": "the tiled kernel: every score is computed, tile by tile, with the pattern as a "
             "mask per tile",
    "chunked": "the chunked kernel: every score is computed, block of query rows by block, "
               "with the pattern as a dense mask",
}


class SparseFallbackWarning(UserWarning):
    """A sparsity pattern runs on a kernel that does not skip its blocked work."""


_fallback_warning_in_graph = graph_warning("robust_attn::sparse_fallback_warning", SparseFallbackWarning)


def _warn_fallback(message: str) -> None:
    """Warn with SparseFallbackWarning, attributed (as before) to select_kernel's caller; in code
    dynamo traces (torch.compile, fullgraph=True included; strict export) through an op in
    the graph, so a compiled module warns at every call, as eager mode does
    (robust_attn._compat.graph_warning)."""
    if torch.compiler.is_dynamo_compiling():
        _fallback_warning_in_graph(message)
    else:
        warnings.warn(message, SparseFallbackWarning, stacklevel=3)


def check_kernel_name(kernel: str) -> str:
    if kernel not in KERNEL_CHOICES:
        raise ValueError(f"kernel={kernel!r} is not a kernel; choose one of {KERNEL_CHOICES}")
    return kernel


def _auto_order(problem: AttentionProblem) -> tuple[Kernel, ...]:
    if problem.pattern is None:
        return (SDPA, FLEX, TILED, CHUNKED) if problem.q.device.type == "cuda" else (SDPA, TILED, CHUNKED)
    if problem.q.device.type == "cuda":
        return FLEX, *STRUCTURED, SDPA, TILED, CHUNKED
    return *STRUCTURED, SDPA, TILED, CHUNKED


def select_kernel(kernel: str, problem: AttentionProblem, dropout_p: float,
                  lse: bool = False) -> Kernel:
    """The kernel named (checked that it can run the problem, and give each row's log-sum-exp
    when ``lse``) or, for 'auto', the first that can."""
    if kernel != "auto":
        reason = KERNELS[kernel].unsupported(problem, dropout_p, lse)
        if reason is not None:
            raise ValueError(f"kernel={kernel!r} cannot run here: {reason}")
        return KERNELS[kernel]
    reasons = {}
    for candidate in _auto_order(problem):
        reason = candidate.unsupported(problem, dropout_p, lse)
        if reason is None:
            break
        reasons[candidate.name] = reason
    if candidate.name in _FALLBACK_COST and problem.pattern is not None and not (
            candidate is FLEX and problem.q.device.type == "cuda"):
        skipped = "; ".join(f"{name}: {reasons[name]}" for name in reasons
                            if name not in (BLOCK_DIAGONAL.name, STRIDED.name))
        _warn_fallback(f"sparsity pattern {describe(problem.pattern)} falls back to kernel "
                       f"{candidate.name!r}: {_FALLBACK_COST[candidate.name]} ({skipped})")
    return candidate


def solve(kernel: str, problem: AttentionProblem, dropout_p: float = 0.0,
          lse: bool = False) -> tuple[str, KernelOutput]:
    """Select the kernel (as :func:`select_kernel`) and solve: (the kernel's name, its output).
    A problem without query rows needs no kernel: ("none", an empty output)."""
    if problem.num_queries == 0:
        return "none", EAGER.solve(problem, dropout_p, lse)
    # The kernels that run a problem's own parts (sink logits, a block selection) first, where
    # the choice allows them; then those parts folded in once, for every kernel below.
    for special, part, choices in ((SDPA_SINK, problem.sink_logits, ("auto", "sdpa", SDPA_SINK.name)),
                                   (SELECTED_BLOCKS, problem.selection,
                                    ("auto", SELECTED_BLOCKS.name))):
        if part is None or kernel not in choices:
            continue
        reason = special.unsupported(problem, dropout_p, lse)
        if reason is None:
            return special.name, special.solve(problem, dropout_p, lse)
        if kernel == special.name:
            raise ValueError(f"kernel={kernel!r} cannot run here: {reason}")
    problem = EAGER.sees(problem)  # sink as a key, selection as a mask: once, for every kernel
    chosen = select_kernel(kernel, problem, dropout_p, lse)
    return chosen.name, chosen.solve(problem, dropout_p, lse)


__all__ = ["KERNELS", "KERNEL_CHOICES", "STRUCTURED", "Kernel", "KernelOutput",
           "SparseFallbackWarning", "check_kernel_name", "select_kernel", "solve"]
