"""Entropy of attention rows: low entropy means attention collapsed onto few keys."""

from __future__ import annotations

import torch
from torch import Tensor

from ._numerics import check_allowed, check_matrices


def attention_entropy(
    probs: Tensor, allowed: Tensor | None = None, normalize: bool = True
) -> Tensor:
    """Shannon entropy of every attention row, optionally normalised by its maximum.

    Formula, for row i with the set K_i of allowed keys and n_i = |K_i|::

        H_i = -sum_{j in K_i} p_ij log p_ij            (0 log 0 = 0, natural log)
        normalised: H_i / log(n_i)

    Source: the Shannon entropy of attention rows as tracked by Zhai et al. (2023),
    "Stabilizing Transformer Training by Preventing Attention Entropy Collapse"
    (ICML 2023), whose "entropy collapse" is this quantity falling towards 0.

    Normalising by log(n_i), the entropy of the uniform distribution over the
    allowed keys, judges masked, causal and sparse rows fairly: uniform over the
    allowed keys gives 1, one-hot gives 0, whatever n_i is.

    Args:
        probs: (..., Nq, Nk) attention weights, rows are queries. Weights at
            disallowed positions are ignored.
        allowed: optional bool tensor broadcastable to ``probs``, True where a
            query may attend a key; None allows every key.
        normalize: divide by log(n_i).

    Returns:
        (..., Nq) entropies, float32 (float64 for float64 input).

    Edge cases: a row with n_i <= 1 (one allowed key, or fully masked) has nothing
    to collapse and reports 1.0 when normalised, 0.0 otherwise.
    """
    probs = check_matrices("probs", probs)
    allowed = check_allowed(allowed, probs)
    p = torch.where(allowed, probs, 0.0)
    entropy = -torch.special.xlogy(p, p).sum(dim=-1)
    n = allowed.sum(dim=-1)
    if normalize:
        # clamp: rows with n <= 1 are replaced below; log(1) = 0 must not divide.
        return torch.where(n > 1, entropy / n.clamp_min(2).to(p.dtype).log(), 1.0)
    return torch.where(n > 1, entropy, 0.0)
