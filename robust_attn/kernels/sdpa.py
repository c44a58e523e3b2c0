"""PyTorch's fused scaled_dot_product_attention: timm's fused path, softmax attention only."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..problem import AttentionProblem
from .base import Kernel


def _with_causal(mask: Tensor | None, causal: Tensor) -> Tensor:
    """One SDPA mask from a user mask and the lower-right causal mask (SDPA takes one or the other)."""
    if mask is None:
        return causal
    if mask.dtype == torch.bool:
        return mask & causal
    return mask.masked_fill(~causal, -math.inf)


def sdpa_attention(problem: AttentionProblem, dropout_p: float = 0.0) -> Tensor:
    mask, is_causal = problem.attn_mask, problem.causal
    if is_causal and (mask is not None or problem.num_queries != problem.num_keys):
        # SDPA's is_causal is aligned top-left and excludes attn_mask: build the mask instead.
        mask, is_causal = _with_causal(mask, problem.causal_allowed()), False
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
