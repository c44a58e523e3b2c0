"""Sparsity of attention: how many allowed weights are negligible next to uniform attention."""

from __future__ import annotations

from torch import Tensor

from ._numerics import check_allowed, check_matrices, check_real, safe_div


def attention_sparsity(
    probs: Tensor, allowed: Tensor | None = None, threshold: float = 0.1
) -> Tensor:
    """Share of the allowed attention weights below ``threshold`` times their row's uniform weight.

    Formula, for row i with the set K_i of allowed keys and n_i = |K_i|::

        sparsity = #{(i, j) : j in K_i, p_ij < threshold / n_i} / sum_i n_i

    i.e. the fraction, over all allowed (query, key) entries, of weights below
    ``threshold`` times 1/n_i, the weight uniform attention would give.

    Why relative: an absolute cut-off is not comparable across lengths and
    masks. With a fixed cut-off of 1e-3, uniform attention over 4096 keys
    (every weight 2.4e-4) would count as fully "sparse", and the same head would
    look sparser on long rows than on short causal rows. Measuring against 1/n_i
    makes uniform attention 0 at any length and a one-hot row (n_i - 1) / n_i.

    Args:
        probs: (..., Nq, Nk) attention weights, rows are queries. Weights at
            disallowed positions are ignored.
        allowed: optional bool tensor broadcastable to ``probs``, True where a
            query may attend a key; None allows every key.
        threshold: fraction of the uniform weight below which a weight counts
            as negligible, 0 < threshold <= 1.

    Returns:
        (...) sparsities in [0, 1], float32 (float64 for float64 input).

    Edge cases: a map with no allowed entry has nothing sparse and gives 0;
    fully masked rows add no entries.
    """
    probs = check_matrices("probs", probs)
    allowed = check_allowed(allowed, probs)
    threshold = check_real("threshold", threshold, lambda v: 0.0 < v <= 1.0, "(0, 1]")
    n = allowed.sum(dim=-1, keepdim=True).to(probs.dtype)
    negligible = allowed & (probs < threshold / n)
    count = negligible.sum(dim=(-2, -1)).to(probs.dtype)
    return safe_div(count, n.sum(dim=(-2, -1)))
