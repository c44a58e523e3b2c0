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

import math

import torch
from torch import Tensor


def relative_tolerance(dtype: torch.dtype, max_logit: float, factor: float) -> float:
    """factor * eps(dtype) * (1 + max_logit): the allowed error relative to a tensor's scale."""
    if not factor > 0:
        raise ValueError(f"factor={factor!r}: expected a positive number")
    return factor * torch.finfo(dtype).eps * (1.0 + abs(max_logit))


def error_at_scale(actual: Tensor, expected: Tensor, min_scale: float = 0.0) -> float:
    """max |actual - expected| / scale, scale = max(max |expected|, min_scale), over the entries
    where ``expected`` is finite, in float64: the error relative to the tensor's scale (0 where
    nothing is finite or both are exactly zero; inf where ``actual`` is not finite there, or where
    the scale is 0 and they differ). Shapes must match (AssertionError otherwise)."""
    if actual.shape != expected.shape:
        raise AssertionError(f"shape {tuple(actual.shape)} != reference {tuple(expected.shape)}")
    actual, expected = actual.detach().double(), expected.detach().double()
    finite = torch.isfinite(expected)
    if not finite.any():
        return 0.0
    if not torch.isfinite(actual[finite]).all():
        return math.inf
    error = (actual - expected)[finite].abs().max().item()
    scale = max(expected[finite].abs().max().item(), min_scale)
    return error / scale if scale else (0.0 if error == 0 else math.inf)


def assert_close_at_scale(actual: Tensor, expected: Tensor, tolerance: float,
                          name: str = "tensor", min_scale: float = 0.0) -> None:
    """max |actual - expected| <= tolerance * scale, scale = max(max |expected|, min_scale), over
    the entries where ``expected`` is finite, and ``actual`` finite there too (:func:`error_at_scale`).
    ``min_scale``: for a tensor that is a small part of a larger computation (a gradient much
    smaller than the others, an exact zero), whose rounding is set by that computation's scale.
    Raises AssertionError naming ``name`` with the error, the scale and the bound."""
    if actual.shape != expected.shape:
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != reference "
                             f"{tuple(expected.shape)}")
    finite = torch.isfinite(expected)
    bad = int((~torch.isfinite(actual) & finite).sum())
    if bad:
        raise AssertionError(f"{name}: {bad} non-finite value(s) where the reference is finite")
    relative = error_at_scale(actual, expected, min_scale)
    if not relative <= tolerance:
        scale = max(expected[finite].abs().max().item(), min_scale)
        raise AssertionError(f"{name}: max |error| {relative * scale:.3g} > tolerance {tolerance:.3g} "
                             f"x scale {scale:.3g} (relative error {relative:.3g})")


def gradient_errors(actual: dict[str, Tensor | None], expected: dict[str, Tensor | None],
                    resolution: float, term_scales: dict[str, float] | None = None
                    ) -> dict[str, float]:
    """Per name, :func:`error_at_scale` of each gradient, at least at ``resolution`` times the
    largest expected gradient's scale: gradients that vanish in exact arithmetic are sums of
    cancelling terms whose rounding is set by those terms. ``term_scales`` gives, per name, a
    bound on those terms where the caller can compute one (the scale is then at least that): a
    sum's rounding error is at most about eps times the sum of its terms' magnitudes (Higham 2002,
    section 4.2), however small the sum. None gradients are left out; both dicts must have the
    same names with a gradient (AssertionError otherwise)."""
    actual = {name: g for name, g in actual.items() if g is not None}
    expected = {name: g for name, g in expected.items() if g is not None}
    if actual.keys() != expected.keys():
        raise AssertionError(f"gradients of {sorted(actual)} != reference's {sorted(expected)}")
    largest = max((g.detach().abs().max().item() for g in expected.values() if g.numel()),
                  default=0.0)
    term_scales = term_scales or {}
    return {name: error_at_scale(actual[name], g, max(resolution * largest,
                                                      term_scales.get(name, 0.0)))
            for name, g in expected.items()}


def assert_gradients_close(actual: dict[str, Tensor | None], expected: dict[str, Tensor | None],
                           tolerance: float, resolution: float,
                           term_scales: dict[str, float] | None = None) -> None:
    """Every gradient within ``tolerance`` of the reference's at its scale, or at ``resolution``
    times the largest reference gradient's, or at its ``term_scales`` entry
    (:func:`gradient_errors`); AssertionError naming the worst gradient."""
    errors = gradient_errors(actual, expected, resolution, term_scales)
    worst = max(errors, key=errors.get, default=None)
    if worst is not None and not errors[worst] <= tolerance:
        raise AssertionError(f"grad of {worst}: relative error {errors[worst]:.3g} > tolerance "
                             f"{tolerance:.3g} (at the gradient's scale, or {resolution:g} x the "
                             f"largest gradient's)")


def max_abs_logit(health) -> float:
    """The largest |finite allowed logit| an :class:`robust_attn.health.probe.AttentionHealth` saw (its
    ``max_logit`` per head; 0 if none is finite): the L of the error model."""
    finite = health.max_logit[torch.isfinite(health.max_logit)]
    return finite.abs().max().item() if finite.numel() else 0.0


def largest_mask_value(mask: Tensor | None) -> float:
    """The largest |finite entry| of an additive float mask (0 for None or a bool mask): it is part
    of the logits, so of L for gradients (finfo.min fills make it 3.4e38: a row left with only such
    keys, e.g. by causal or a sparsity pattern, has uniform weights and gradients with no correct
    digit)."""
    if mask is None or mask.dtype == torch.bool:
        return 0.0
    finite = mask[torch.isfinite(mask)]
    return finite.abs().max().item() if finite.numel() else 0.0
