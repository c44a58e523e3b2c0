"""Every preset, fuzzed: shapes, masks of every accepted form, causal, layouts and input scales.

Each case either returns finite outputs and gradients equal to the eager reference (the same
module with ``kernel='eager'``) within float32's error model
(:mod:`robust_attn.testing.tolerances`), or raises an error naming the argument at fault:
ValueError or TypeError for a bad argument, the logit limit's RuntimeError for an x whose
logits overflow (:mod:`robust_attn.logit_limit`).
"""

from copy import deepcopy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from robust_attn import create, list_variants
from robust_attn.testing import strategies as ras
from robust_attn.testing.tolerances import (
    assert_close_at_scale,
    assert_gradients_close,
    largest_mask_value,
    max_abs_logit,
    relative_tolerance,
)

from .float64_reference import forward_backward, forward_backward_with_scales

VARIANTS = list_variants()
# The error model's constant (tolerances.py) for float32 kernels against eager. Measured worst
# err / (eps (1 + L) scale), 30-40 examples per preset at input scales 0.1-10: 1.3 for outputs,
# 22 for gradients (outlier_removal; 14 sigma_reparam, 10 qk_norm, <= 6 for the others).
TOLERANCE_FACTOR = 64.0
# A gradient is compared at least at this fraction of the largest gradient's scale: gradients that
# vanish in exact arithmetic (qk_norm's k bias, by softmax's shift invariance) are sums of
# cancelling terms whose rounding is set by those terms (1e-3 needed a factor of 144). Where the
# terms can be bounded (float64_reference.forward_backward_with_scales), at least at their scale:
# outlier_removal at N = 1 (one key: (A - U) V = 0, so qkv.weight's exact gradient is 0; SDPA's
# backward returned a residue of 103 eps (1 + L) at this resolution, 0.0 of its terms) and gated
# at D = 1 (q, k gradients are single sums of signed Jacobian terms; worst 10.4 -> 6.0 over 300
# drawn N = 31 cases; the thorough profile's failure was 133 at the resolution).
GRADIENT_RESOLUTION = 1e-2
# block_sparse's kernel runs only on sequences long enough to be sparse at its block size.
tokens = st.one_of(st.integers(1, 33), st.integers(190, 260))


@st.composite
def cases(draw, scales, variant):
    """(shape, x, attn_mask, is_causal, seed): x in any layout, masks of any form, rows with no allowed
    key included (not with finfo.min fills, whose empty rows are uniform by design)."""
    shape = draw(ras.attention_shapes(tokens=tokens, variant=variant))
    x = draw(ras.token_inputs(shape, scales=scales))
    fill = draw(st.sampled_from(ras.MASK_FILLS))
    mask = draw(ras.attention_masks(shape, fills=(fill,), allow_empty_rows=fill == "-inf",
                                    contiguous=None))
    return shape, x, mask, draw(st.booleans()), draw(ras.seeds)


def _run_twins(variant, shape, x, mask, is_causal, seed):
    """forward_backward of the preset on its own kernel and of its eager twin (same weights)."""
    torch.manual_seed(seed)
    module = create(variant, shape.dim, num_heads=shape.heads)
    reference = deepcopy(module)
    reference.kernel, reference.probe = "eager", True

    def forward(m):
        return lambda inputs: m(inputs, attn_mask=mask, is_causal=is_causal)

    expected, scales = forward_backward_with_scales(reference, forward(reference), x)
    return forward_backward(module, forward(module), x), expected, reference.health, scales


def _assert_equal_to_eager(actual, expected, health, mask, scales):
    """Output at its scale, with L the largest allowed row maximum (what the weights depend on);
    each gradient at its scale (or at GRADIENT_RESOLUTION times the largest gradient's), with L
    bounding every allowed logit, mask values included. Where terms cancel, at least at their
    scale (``scales``: float64_reference.forward_backward_with_scales)."""
    (out, dx, grads), (out_ref, dx_ref, grads_ref) = actual, expected
    max_logit = max_abs_logit(health)
    assert_close_at_scale(out, out_ref, relative_tolerance(torch.float32, max_logit,
                                                           TOLERANCE_FACTOR), "output",
                          min_scale=scales.get("output", 0.0))
    tolerance = relative_tolerance(torch.float32, max_logit + largest_mask_value(mask),
                                   TOLERANCE_FACTOR)
    assert_gradients_close({"x": dx, **grads}, {"x": dx_ref, **grads_ref}, tolerance,
                           GRADIENT_RESOLUTION, scales)


@pytest.mark.parametrize("variant", VARIANTS)
@given(data=st.data())
def test_every_case_is_finite_and_equals_eager(variant, data):
    case = data.draw(cases(ras.input_scales(-1, 1), variant))
    actual, expected, health, scales = _run_twins(variant, *case)
    assert torch.isfinite(expected[0]).all(), "the eager reference's output is not finite"
    _assert_equal_to_eager(actual, expected, health, case[2], scales)


@pytest.mark.parametrize("variant", VARIANTS)
@given(data=st.data())
def test_any_input_scale_is_finite_and_equals_eager_or_raises_naming_x(variant, data):
    """Inputs scaled by 1e-30 to 1e30: where float32 cannot hold the logits (or qk_norm's squares),
    the logit limit's RuntimeError naming x (robust_attn.logit_limit: torch._assert_async raises
    RuntimeError, not ValueError, so that the check needs no host synchronisation); elsewhere a
    finite output equal to eager's at its scale, and finite gradients (compared with eager at
    moderate scales above: here LayerNorm's conditioning |q| / std(q) joins the error model, e.g.
    6e-5 relative for qk_norm at x ~ 1e3). Tiny inputs give uniform attention."""
    case = data.draw(cases(ras.input_scales(-30, 30), variant))
    try:
        actual, expected, health, scales = _run_twins(variant, *case)
    except RuntimeError as error:
        if not str(error).startswith("x: "):
            raise
        return
    assert torch.isfinite(actual[0]).all(), "non-finite output returned without an error"
    assert all(torch.isfinite(g).all() for g in (actual[1], *actual[2].values()) if g is not None), \
        "non-finite gradient returned without an error"
    assert_close_at_scale(actual[0], expected[0], relative_tolerance(
        torch.float32, max_abs_logit(health), TOLERANCE_FACTOR), "output",
        min_scale=scales.get("output", 0.0))


@st.composite
def any_mask_shapes(draw):
    return tuple(draw(st.lists(st.integers(1, 5), min_size=0, max_size=5)))


@pytest.mark.parametrize("variant", VARIANTS)
@given(data=st.data(), mask_shape=any_mask_shapes(),
       dtype=st.sampled_from([torch.bool, torch.float32, torch.int64]))
def test_a_mask_either_broadcasts_and_works_or_is_refused_naming_attn_mask(variant, data,
                                                                          mask_shape, dtype):
    shape = data.draw(ras.attention_shapes(max_tokens=5, variant=variant))
    module = create(variant, shape.dim, num_heads=shape.heads)
    mask = torch.ones(mask_shape, dtype=dtype)
    target = (shape.batch, shape.heads, shape.tokens, shape.tokens)
    try:
        broadcasts = len(mask_shape) <= 4 and torch.broadcast_shapes(mask_shape, target) == target
    except RuntimeError:
        broadcasts = False
    x = torch.randn(shape.batch, shape.tokens, shape.dim)
    if broadcasts and dtype != torch.int64:
        assert torch.isfinite(module(x, attn_mask=mask)).all()
    else:
        with pytest.raises((ValueError, TypeError), match="attn_mask"):
            module(x, attn_mask=mask)
