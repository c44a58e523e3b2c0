"""Attention sinks: keys (usually the first) that soak up attention whatever the query."""

from __future__ import annotations

import torch
from torch import Tensor

from ._numerics import check_allowed, check_int, check_matrices, check_real, safe_div


def sink_mass(probs: Tensor, num_sink: int = 1) -> Tensor:
    """Mean attention mass that the queries put on the first ``num_sink`` keys.

    Formula::

        mass = (1/Nq) sum_i sum_{j < num_sink} A_ij

    Args:
        probs: (..., Nq, Nk) attention weights, rows are queries.
        num_sink: number of leading keys counted as sinks, 1 <= num_sink <= Nk.

    Returns:
        (...) masses, in [0, 1] for row-stochastic ``probs``; float32 (float64
        for float64 input).
    """
    probs = check_matrices("probs", probs)
    num_sink = check_int("num_sink", num_sink, 1, probs.shape[-1])
    return probs[..., :num_sink].sum(dim=-1).mean(dim=-1)


def sink_score(probs: Tensor, key: int = 0, allowed: Tensor | None = None) -> Tensor:
    """Gu et al.'s importance score alpha_k: mean attention on ``key`` over the queries that see it.

    Formula, with Q_k the queries t allowed to attend key k::

        alpha_k = (1 / |Q_k|) sum_{t in Q_k} A_tk

    Source: Gu et al. (2025), "When Attention Sink Emerges in Language Models:
    An Empirical View" (ICLR 2025, arXiv:2410.10781). For causal
    attention over T tokens (1-indexed) they define
    alpha_h^l(k) = 1/(T - k + 1) sum_{t=k}^{T} A_{t,k}^{l,h}; their released
    code (github.com/sail-sg/Attention-Sink, ``eval_sink_open_source.py``,
    ``compute_attention_sink``) divides the column sum by T - k (0-indexed),
    the number of queries t >= k. Q_k generalises "t >= k" to any mask.

    Args:
        probs: (..., Nq, Nk) attention weights, rows are queries. Weights at
            disallowed positions are ignored.
        key: index of the key scored, 0 <= key < Nk.
        allowed: optional bool tensor broadcastable to ``probs``, True where a
            query may attend a key; None allows every key, so the mean runs
            over all Nq queries. For causal attention pass the causal mask to
            get the paper's t >= k (for key 0 both agree).

    Returns:
        (...) scores, float32 (float64 for float64 input).

    Edge cases: a key that no query may attend scores 0.
    """
    probs = check_matrices("probs", probs)
    key = check_int("key", key, 0, probs.shape[-1] - 1)
    sees_key = check_allowed(allowed, probs)[..., key]
    column = torch.where(sees_key, probs[..., key], 0.0)
    return safe_div(column.sum(dim=-1), sees_key.sum(dim=-1).to(column.dtype))


def sink_rate(
    probs: Tensor, key: int = 0, eps: float = 0.3, allowed: Tensor | None = None
) -> Tensor:
    """Gu et al.'s Sink_k^eps: the share of attention maps whose score alpha_k exceeds ``eps``.

    Formula, over the M attention maps stacked in the leading dims (layers,
    batch, heads, ...)::

        Sink_k^eps = (1/M) sum_m 1[alpha_k(A_m) > eps]

    Source: Gu et al. (2025), "When Attention Sink Emerges in Language Models:
    An Empirical View" (ICLR 2025), which averages the indicator over layers
    and heads (1/L sum_l 1/H sum_h), and their released code also over input
    samples; eps = 0.3 is the paper's threshold. alpha_k is
    :func:`sink_score`. Unlike the paper this returns a fraction, not a percentage.

    Args:
        probs: (..., Nq, Nk) attention weights; every leading index is one map.
        key: index of the key scored, 0 <= key < Nk.
        eps: score threshold, 0 <= eps < 1.
        allowed: as in :func:`sink_score`.

    Returns:
        scalar tensor in [0, 1], float32 (float64 for float64 input).
    """
    eps = check_real("eps", eps, lambda v: 0.0 <= v < 1.0, "[0, 1)")
    alpha = sink_score(probs, key=key, allowed=allowed)
    return (alpha > eps).to(alpha.dtype).mean()
