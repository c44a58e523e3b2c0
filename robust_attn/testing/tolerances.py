"""How close two attention computations in floating point must be: a tolerance from the error model.

Error model (forward error analysis; Higham 2002, "Accuracy and Stability of
Numerical Algorithms", sections 3.1 and 3.5 for sums and dot products). A logit
s = scale q.k is computed with an absolute error of order eps |s|, eps the unit
roundoff of the dtype. Softmax is shift-invariant but not scale-invariant, so
each weight p_j = exp(s_j - m) / sum_k exp(s_k - m) inherits a relative error of
order eps (1 + L), L = max |s| over the allowed logits, and so do the output
sum_j p_j v_j and every gradient, relative to their own magnitude. Hence::

    |actual - expected|_max  <=  factor * eps(dtype) * (1 + L) * max |expected|

with a constant ``factor`` that absorbs the accumulation lengths (N, D, C) and
the different summation orders of two kernels; the tests state the factor they
use and what they measured. With eps (1 + L) >= 1 the comparison says nothing
(the float result has no correct digit left: e.g. float32 logits above 1e7),
which is the honest answer; non-finite values are never accepted where the
reference is finite.
"""

from __future__ import annotations

import torch
from torch import Tensor


def relative_tolerance(dtype: torch.dtype, max_logit: float, factor: float) -> float:
    """factor * eps(dtype) * (1 + max_logit): the allowed error relative to a tensor's scale."""
    if not factor > 0:
        raise ValueError(f"factor={factor!r}: expected a positive number")
    return factor * torch.finfo(dtype).eps * (1.0 + abs(max_logit))


def assert_close_at_scale(actual: Tensor, expected: Tensor, tolerance: float,
                          name: str = "tensor", min_scale: float = 0.0) -> None:
    """max |actual - expected| <= tolerance * scale, scale = max(max |expected|, min_scale), over
    the entries where ``expected`` is finite, and ``actual`` finite there too; compared in float64.
    ``min_scale``: for a tensor that is a small part of a larger computation (a gradient much
    smaller than the others, an exact zero), whose rounding is set by that computation's scale.
    Raises AssertionError naming ``name`` with the error, the scale and the bound."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != reference "
                             f"{tuple(expected.shape)}")
    actual, expected = actual.detach().double(), expected.detach().double()
    finite = torch.isfinite(expected)
    bad = int((~torch.isfinite(actual) & finite).sum())
    if bad:
        raise AssertionError(f"{name}: {bad} non-finite value(s) where the reference is finite")
    if not finite.any():
        return
    scale = max(expected[finite].abs().max().item(), min_scale)
    error = (actual - expected)[finite].abs().max().item()
    if not error <= tolerance * scale:
        raise AssertionError(f"{name}: max |error| {error:.3g} > tolerance {tolerance:.3g} x scale "
                             f"{scale:.3g} (relative error {error / scale if scale else float('inf'):.3g})")
