"""PyTorch's fused scaled_dot_product_attention: timm's fused path, softmax attention only.

A sparsity pattern is applied as a dense bool (Nq, Nk) mask: exact, but it
computes every score, so auto uses it for a pattern only where no structured
sparse kernel applies, and warns (robust_attn.kernels).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..problem import AttentionProblem
from .base import Kernel


def _restricted(mask: Tensor | None, allowed: Tensor) -> Tensor:
    """One SDPA mask from a user mask and a bool mask of allowed pairs (causal, pattern)."""
    if mask is None:
        return allowed
    if mask.dtype == torch.bool:
        return mask & allowed
    return mask.masked_fill(~allowed, -math.inf)


def sdpa_attention(problem: AttentionProblem, dropout_p: float = 0.0) -> Tensor:
    mask, is_causal = problem.attn_mask, problem.causal
    if problem.pattern is not None:
        mask = _restricted(mask, problem.pattern_allowed())
    if is_causal and (mask is not None or problem.num_queries != problem.num_keys):
        # SDPA's is_causal is aligned top-left and excludes attn_mask: build the mask instead.
        mask, is_causal = _restricted(mask, problem.causal_allowed()), False
    return F.scaled_dot_product_attention(
        problem.q, problem.k, problem.v,
        attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=problem.scale,
    )


def _unsupported(problem: AttentionProblem, dropout_p: float) -> str | None:
    if problem.score_mods:
        return "SDPA cannot apply score modifiers (softcap, ...): use kernel='flex' or 'eager'"
    if not problem.is_softmax:
        return "SDPA computes softmax attention only: use kernel='eager'"
    return None


SDPA = Kernel("sdpa", sdpa_attention, _unsupported)
