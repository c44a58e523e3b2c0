"""Spectral gap of the attention matrix, the driver of rank collapse in width."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._numerics import check_matrices


def attention_spectral_gap(probs: Tensor) -> Tensor:
    """Gap between the two largest singular values of every attention matrix.

    Formula, with sigma_1 >= sigma_2 >= ... the singular values of A::

        gap(A) = sigma_1(A) - sigma_2(A)

    Source: Naderi, Nait Saada & Tanner (2024; ICML 2025 as Nait Saada,
    Naderi & Tanner), "Mind the Gap: a Spectral Analysis of Rank Collapse and
    Signal Propagation in Attention Layers" (arXiv:2410.07799). Using random
    matrix theory on softmax attention at initialisation, they show a spectral
    gap between the two largest singular values of the attention matrix: a
    row-stochastic A has an outlier sigma_1 ~ 1 (singular vectors along the
    all-ones vector) while the bulk shrinks as the context length grows. The
    gap causes rank collapse in width and worsens rank collapse in depth and
    vanishing/exploding gradients; removing the outlier (A - 1 1^T / N) closes
    it. A large gap is bad; 0 means no direction dominates (e.g. the identity).

    Args:
        probs: (..., Nq, Nk) attention weights, rows are queries.

    Returns:
        (...) gaps, float32 (float64 for float64 input); singular values come
        from ``torch.linalg.svdvals`` in that dtype.

    Edge cases: a matrix with a single row or column has one singular value
    and gap = sigma_1.
    """
    sigma = torch.linalg.svdvals(check_matrices("probs", probs))
    sigma = F.pad(sigma, (0, 1))  # sigma_2 = 0 when there is only sigma_1
    return sigma[..., 0] - sigma[..., 1]
