"""Rank collapse of token representations: do the N tokens still differ from each other?

All three metrics take tokens ``x`` of shape (..., N, C) (N tokens of C channels)
and reduce the last two dims, keeping the leading (batch, head, ...) dims.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._numerics import check_matrices, safe_div


def token_residual(x: Tensor) -> Tensor:
    """Relative distance of the tokens from their mean: 0 when all tokens are identical.

    Formula::

        res(X) = ||X - 1 mean(X)^T||_F / ||X||_F,   mean(X) = (1/N) sum_i x_i

    Source: the rank-collapse residual of Dong, Cordonnier & Loukas (2021),
    "Attention is not all you need: pure attention loses rank doubly
    exponentially with depth" (ICML 2021). They measure the residual
    X - 1 x^T in a composite l1/l-inf norm; this uses the Frobenius norm and
    the token mean as x, and divides by ||X||_F so the value is scale free.

    Args:
        x: (..., N, C) tokens.

    Returns:
        (...) residuals in [0, 1], float32 (float64 for float64 input).

    Edge cases: X == 0 gives 0; a single token (N == 1) gives 0.
    """
    x = check_matrices("x", x)
    residual = torch.linalg.matrix_norm(x - x.mean(dim=-2, keepdim=True))
    return safe_div(residual, torch.linalg.matrix_norm(x))


def token_cosine_similarity(x: Tensor) -> Tensor:
    """Mean cosine similarity over all ordered pairs of distinct tokens: 1 at full collapse.

    Formula::

        rho(X) = 1 / (N (N - 1)) sum_{i != j} <x_i, x_j> / (||x_i|| ||x_j||)

    computed in O(N C) as (||sum_i u_i||^2 - sum_i ||u_i||^2) / (N (N - 1)) with
    u_i = x_i / max(||x_i||, eps), eps the smallest normal number of the dtype.

    Source: the mean token correlation of Noci et al. (2022), "Signal
    propagation in transformers: theoretical perspectives and the role of rank
    collapse" (NeurIPS 2022).

    Args:
        x: (..., N, C) tokens.

    Returns:
        (...) similarities in [-1, 1], float32 (float64 for float64 input).

    Edge cases: N == 1 gives 1.0 (one token is trivially collapsed); a zero
    token has cosine 0 with every other token (the eps keeps it from giving NaN).
    """
    x = check_matrices("x", x)
    n = x.shape[-2]
    if n == 1:
        return x.new_ones(x.shape[:-2])
    u = F.normalize(x, dim=-1, eps=torch.finfo(x.dtype).tiny)
    all_pairs = u.sum(dim=-2).square().sum(dim=-1)
    self_pairs = u.square().sum(dim=(-2, -1))
    return (all_pairs - self_pairs) / (n * (n - 1))


def effective_rank(x: Tensor) -> Tensor:
    """Effective rank of the (N, C) token matrix: exp of the entropy of its singular values.

    Formula, with sigma_i the singular values of X (not centred)::

        p_i = sigma_i / sum_j sigma_j,    erank(X) = exp(-sum_i p_i log p_i)   (0 log 0 = 0)

    Source: Roy & Vetterli (2007), "The effective rank: a measure of effective
    dimensionality" (EUSIPCO 2007). It lies in [1, min(N, C)]: 1 for a rank-1
    matrix, min(N, C) when all singular values are equal.

    Args:
        x: (..., N, C) tokens.

    Returns:
        (...) effective ranks, float32 (float64 for float64 input).

    Edge cases: the zero matrix has no direction at all and gives 0.
    """
    x = check_matrices("x", x)
    sigma = torch.linalg.svdvals(x)
    total = sigma.sum(dim=-1)
    p = safe_div(sigma, total.unsqueeze(-1))
    entropy = -torch.special.xlogy(p, p).sum(dim=-1)
    return torch.where(total > 0, entropy.exp(), 0.0)
