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

from ..claim import (
    BASELINE_ENTROPY_COLLAPSE,
    EITHER_STACK,
    ENTROPY,
    ENTROPY_COLLAPSE,
    OUTLIER_REMOVAL_KEEPS_RANK,
    RANK,
    RANK_COLLAPSE,
    ROBUST_KEEPS_RANK,
    Claim,
    Guarantee,
    Setting,
    witnesses_at,
)
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
    """U V for the problem's masks, broadcastable to (B, H, Nq, Dv); with a mask, a pattern or a
    block selection, solved on the call's kernel choice (without dropout)."""
    if problem.attn_mask is not None or problem.pattern is not None or problem.selection is not None:
        return call.attend(uniform_problem(problem), dropout_p=0.0).out
    if problem.causal:
        return mean_over_causal_keys(problem.v, problem.num_queries)
    return mean_over_all_keys(problem.v)


class OutlierRemoval(Mitigation):
    option = "outlier_removal"
    # Early warnings: code -> (rank among the presets suggested for it, 1 first; why it helps).
    advice_preset = 'outlier_removal'
    advice = {
        'rank_collapse': (1, 'removing the uniform part A - 11^T/N keeps tokens apart with depth '
            '(Nait Saada et al. 2025)'),
        'vanishing_gradients': (1, 'gradients vanish when tokens collapse (Noci et al. 2022)'),
    }
    claims = (
        Claim(
            "outlier_removal", "Nait Saada, Naderi & Tanner 2025, ICML (Mind the Gap)",
            "removing the attention matrix's outlier, A - 11^T / N, prevents rank collapse in "
            "depth (and in width)",
            (Guarantee(RANK, OUTLIER_REMOVAL_KEEPS_RANK, RANK_COLLAPSE),),
            note="The preset has no proj bias (as the authors' code): with nn.Linear's default "
                 "proj bias, which dominates the small (A - U) V at initialisation, a 24-layer "
                 "attention-only stack collapses like the baseline (res ~ 3e-7), and building it "
                 "so warns. Measured without the bias: guaranteed in attention-only stacks of depth "
                 "4-12 with 4-8 heads and 16-256 tokens (pre- or post-LN) for sqk 0.5-1.25; below "
                 "sqk 0.5 the logits are so small that A is nearly U and (A - U) V vanishes within "
                 "a few layers (48 of 50 draws fail at sqk 0.25); elsewhere it delays rank "
                 "collapse without preventing it. With qk_norm (the robust preset), draws that "
                 "fail: 7 of 500 with 1-2 heads and 8-16 tokens at depth 4-16 (one at depth 5), "
                 "1 of 60 at depth 24, 5 at 32, 10 at 48 (1-8 heads, 8-64 tokens). res(X) drifts "
                 "from layer to layer, and once the tokens are nearly alike, A is nearly U and "
                 "(A - U) V, quadratic in the tokens' differences, shrinks faster than the next "
                 "LayerNorm (eps 1e-5) can scale it back up, so the output vanishes (X = 0, "
                 "res 0). Not against entropy collapse.",
            witnesses=witnesses_at("outlier_removal", ENTROPY),
        ),
        Claim(
            "robust", "this library: qk_norm (Henry et al. 2020; Dehghani et al. 2023) with outlier "
                      "removal (Nait Saada, Naderi & Tanner 2025) and no proj bias",
            "bounding the logits (qk_norm) and removing the attention matrix's outlier (A - U) "
            "together avoid both entropy collapse and rank collapse",
            (Guarantee(ENTROPY, Setting(EITHER_STACK, BASELINE_ENTROPY_COLLAPSE.qk_scales,
                                        depths=(4, 48), tokens=(8, 256), heads=(1, 8),
                                        norms=("pre", "post")), ENTROPY_COLLAPSE),
             Guarantee(RANK, ROBUST_KEEPS_RANK, RANK_COLLAPSE)),
            note="Chosen by measurement: qk_norm keeps every layer's entropy (worst-layer H about "
                 "0.8-0.9 at any sqk), outlier removal keeps the tokens apart. Both bounds hold on "
                 "every draw of ROBUST_HOLDS: with residual connections over the whole range "
                 "(depth 4-48, sqk 0.25-32, 8-256 tokens, 1-8 heads, pre- or post-LN), and in "
                 "attention-only stacks of depth 4-12 with 4-8 heads and 16-256 tokens. Beyond "
                 "that without residual connections, outlier removal only delays rank collapse "
                 "(about 1 draw in 70 with 1-2 heads and 8-16 tokens up to depth 16, 1 in 6 at "
                 "depth 48; outlier_removal's note says why); the entropy bound holds everywhere.",
        ),
    )
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
