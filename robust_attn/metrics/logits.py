"""Attention logit growth: the largest pre-softmax score, an early sign of instability."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._numerics import check_allowed, check_matrices


def max_attention_logit(logits: Tensor, allowed: Tensor | None = None) -> Tensor:
    """Largest allowed pre-softmax attention logit of every attention map.

    Formula::

        max_{(i, j) allowed} s_ij,      s = q k^T * scale (before softmax)

    Source: Wortsman et al. (2023), "Small-scale proxies for large-scale
    Transformer training instabilities" (arXiv:2309.14322): uncontrolled growth
    of the attention logits makes the softmax near one-hot (entropy collapse)
    and diverges training; they track the maximum attention logit.

    Args:
        logits: (..., Nq, Nk) pre-softmax scores, rows are queries.
        allowed: optional bool tensor broadcastable to ``logits``, True where a
            query may attend a key; None allows every key.

    Returns:
        (...) maxima, float32 (float64 for float64 input).

    Edge cases: masked entries are excluded; a map with nothing allowed gives -inf.
    """
    logits = check_matrices("logits", logits)
    allowed = check_allowed(allowed, logits)
    return torch.where(allowed, logits, -math.inf).amax(dim=(-2, -1))
