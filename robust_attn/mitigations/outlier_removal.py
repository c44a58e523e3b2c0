"""Outlier removal: subtract the uniform attention, removing the attention matrix's outlier.

    out = (A - U) V = kernel(q, k, v) - U V,    U_ij = 1[j allowed for i] / #allowed(i)

Nait Saada, Naderi and Tanner (2025), "Mind the Gap: a Spectral Analysis of Rank
Collapse and Signal Propagation in Attention Layers" (ICML 2025): a softmax
attention matrix A is row-stochastic (A 1 = 1), and at initialisation its top
singular value, along 1, stands apart from the rest (a spectral gap), so A acts
almost as the rank-one averaging (1/N) 1 1^T and maps every token towards the
same mean: rank collapse in width, compounded with depth. They remove the
outlier with A - (1/N) 1 1^T. With a causal mask
or any other mask we subtract, row by row, the uniform distribution over that
row's allowed keys (our generalisation: it keeps every row summing to zero), so
a row with no allowed key stays zero. Prepended keys (sinks) are keys like any
other: U spreads over them too.

U V is computed without materialising U:

    no mask        the mean of v over the keys
    causal only    cumulative sums of v over the keys divided by the counts (sums
                   in float32 or wider; lower-right aligned like the causal mask)
    any mask or    the module's kernel choice (``AttentionCall.attend``) on the same
    sparsity       problem with zero queries, the mask reduced to allowed / blocked
    pattern        and no score modifiers: softmax of equal scores is uniform over the
                   allowed keys (SDPA never materialises it; a pattern keeps its
                   structured kernel)

``outlier_removal=True``. It addresses rank collapse, not entropy collapse (with W_q, W_k
scaled up, A still concentrates: docs/collapse-setting.md).

A proj bias defeats it at initialisation: (A - U) V is small there (A is close
to U), so the bias, the same vector added to every token, dominates the output
and the tokens converge to it over depth (measured: a 24-layer attention-only
pre-LN stack ends at res(X) ~ 3e-7 with nn.Linear's default bias, 0.95 without
it). The authors' code uses bias-free projections; the ``outlier_removal`` preset
sets ``proj_bias=False``, and building it with a proj bias warns
(:class:`DefeatedMitigationWarning`).
"""

from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..config import AttentionConfig
from ..problem import SOFTMAX, AttentionProblem
from .base import DefeatedMitigationWarning, Mitigation

if TYPE_CHECKING:
    from ..call import Attended, AttentionCall


def mean_over_all_keys(v: Tensor) -> Tensor:
    """(B, H, 1, Dv): every query's uniform attention over all keys."""
    return v.mean(dim=-2, keepdim=True)


def mean_over_causal_keys(v: Tensor, num_queries: int) -> Tensor:
    """(B, H, Nq, Dv): query i's mean over keys j <= i + (Nk - Nq); 0 where it has none."""
    num_keys = v.shape[-2]
    last_key = torch.arange(num_queries, device=v.device) + (num_keys - num_queries)
    counts = (last_key + 1).clamp(min=0)
    sums = v.cumsum(dim=-2, dtype=torch.promote_types(v.dtype, torch.float32))
    sums = sums.index_select(-2, last_key.clamp(min=0))
    means = sums * (counts > 0).unsqueeze(-1) / counts.clamp(min=1).unsqueeze(-1)
    return means.to(v.dtype)


def uniform_problem(problem: AttentionProblem) -> AttentionProblem:
    """The problem whose softmax attention is each query's uniform attention over its allowed
    keys: zero queries, the mask reduced to allowed / blocked, no score modifiers."""
    mask = problem.attn_mask
    allowed = mask > -math.inf if mask is not None and mask.is_floating_point() else mask
    return problem.with_(q=torch.zeros_like(problem.q), attn_mask=allowed, score_mods=(),
                         normalizer=SOFTMAX)


def uniform_attention_output(problem: AttentionProblem, call: AttentionCall) -> Tensor:
    """U V for the problem's masks, broadcastable to (B, H, Nq, Dv); with a mask or a pattern,
    solved on the call's kernel choice (without dropout)."""
    if problem.attn_mask is not None or problem.pattern is not None:
        return call.attend(uniform_problem(problem), dropout_p=0.0).out
    if problem.causal:
        return mean_over_causal_keys(problem.v, problem.num_queries)
    return mean_over_all_keys(problem.v)


class OutlierRemoval(Mitigation):
    option = "outlier_removal"
    presets = {
        # No proj bias, as in the authors' bias-free projections: (A - U) V is small at
        # initialisation, and a bias added to every token would dominate it and make the tokens
        # alike (rank collapse).
        "outlier_removal": {"outlier_removal": True, "proj_bias": False},
        # Both failures at once, chosen by measurement (docs/collapse-setting.md): qk_norm bounds
        # the logits (no entropy collapse), outlier removal keeps the tokens apart (no rank
        # collapse).
        "robust": {"qk_norm": True, "outlier_removal": True, "proj_bias": False},
    }
    conflicts = {"sigmoid": "outlier removal subtracts the uniform row from a row-stochastic "
                            "attention matrix; sigmoid attention rows do not sum to one"}

    def __init__(self, config: AttentionConfig):  # no parameters
        super().__init__()
        if config.proj_bias:
            warnings.warn(
                "outlier_removal with proj_bias=True: at initialisation (A - U) V is small and "
                "the proj bias, added to every token, dominates it, so deep stacks still "
                "collapse in rank; pass proj_bias=False (the outlier_removal preset does)",
                DefeatedMitigationWarning, stacklevel=4)

    def transform_output(self, attended: Attended, call: AttentionCall) -> Tensor:
        return attended.out - uniform_attention_output(attended.problem, call)
