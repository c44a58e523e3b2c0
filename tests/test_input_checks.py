"""Issue 16, findings 1, 3 and 4: masks on another device, option values, x of another dtype.

Every preset either computes a finite result or raises naming the argument: ``attn_mask`` on
another device than x (the meta device stands in for a GPU: both are "another device"), every
numeric option over drawn values (nan, inf, huge, tiny, negative, ints), and x of another
floating dtype than the module's weights (refused, naming x and both dtypes, unless autocast
casts both for the matmul).
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from robust_attn import RobustAttention, create, list_variants

DIM, HEADS, TOKENS = 16, 2, 5
pytestmark = pytest.mark.filterwarnings("ignore::robust_attn.kernels.SparseFallbackWarning")


@pytest.mark.parametrize("preset", list_variants())
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_a_mask_on_another_device_than_x_is_refused_naming_attn_mask(preset, mask_dtype):
    module = create(preset, DIM, num_heads=HEADS)
    x = torch.randn(2, TOKENS, DIM)
    mask = torch.ones(TOKENS, TOKENS, dtype=mask_dtype, device="meta")
    with pytest.raises(ValueError, match=r"attn_mask is on meta but x is on cpu"):
        module(x, attn_mask=mask)


@pytest.mark.parametrize("preset", list_variants())
@pytest.mark.parametrize(("x_dtype", "module_dtype"), [(torch.float64, torch.float32),
                                                       (torch.float32, torch.bfloat16),
                                                       (torch.float16, torch.float32)])
def test_x_of_another_dtype_is_refused_naming_x_and_both_dtypes(preset, x_dtype, module_dtype):
    module = create(preset, DIM, num_heads=HEADS).to(module_dtype)
    x = torch.randn(2, TOKENS, DIM, dtype=x_dtype)
    with pytest.raises(TypeError, match=rf"x has dtype {x_dtype} but this module's weights are "
                                        rf"{module_dtype}"):
        module(x)


@pytest.mark.parametrize("preset", list_variants())
def test_under_autocast_x_of_another_dtype_runs(preset):
    """Autocast casts x and the weights for the matmul, so the dtypes may differ there."""
    module = create(preset, DIM, num_heads=HEADS)
    x = torch.randn(2, TOKENS, DIM, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
    assert torch.isfinite(out).all()
    with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(TypeError, match="x has dtype"):
        module(x.double())  # autocast leaves float64 alone


# Values drawn for every numeric option: specials, extremes of each dtype, ordinary values.
NUMBERS = st.one_of(
    st.sampled_from([math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-300, 1e-30, 1e-5, 1e-2, 0.5,
                     1.0, 30.0, 5e4, 65504.0, 1e5, 1e8, 3.4e38, 1e300, -1.0, -1e4, -1e5]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-10, 10),
    st.integers(-(2 ** 70), 2 ** 70),
)
# option -> extra options it needs (the sigmoid preset's qk_norm)
NUMERIC_OPTIONS = {"softcap": {}, "sigmoid": {"qk_norm": True}, "spectral_qk": {},
                   "sink_tokens": {}, "attn_drop": {}, "proj_drop": {}, "probe_queries": {},
                   "scalable_softmax": {}}


@given(option=st.sampled_from(sorted(NUMERIC_OPTIONS)), value=NUMBERS,
       dtype=st.sampled_from([torch.float32, torch.float16]))
def test_every_numeric_option_is_refused_by_name_or_gives_finite_results(option, value, dtype):
    """A value outside the option's named range raises ValueError naming the option and the
    range ("expected ..."); a value inside it gives a finite output, gradients and auxiliary
    loss in float32 and float16. softcap=inf used to give nan everywhere."""
    if option == "sink_tokens" and isinstance(value, int) and value > 4:
        value = 4  # a valid count: memory, not validity, limits it
    if option == "probe_queries" and isinstance(value, int) and value > 64:
        value = 64
    try:
        module = RobustAttention(DIM, num_heads=HEADS, **NUMERIC_OPTIONS[option],
                                 **{option: value}).to(dtype)
    except ValueError as error:
        assert str(error).startswith(f"{option}=") and "expected" in str(error)
        return
    if option == "probe_queries":
        module.probe = True
    x = torch.randn(2, TOKENS, DIM, dtype=dtype, requires_grad=True)
    out = module(x)
    (out.float().square().sum() + module.auxiliary_loss().float()).backward()
    assert torch.isfinite(out).all(), f"{option}={value!r}: non-finite output"
    assert torch.isfinite(module.auxiliary_loss()).all()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)


@pytest.mark.parametrize(("option", "value"), [("softcap", math.inf), ("softcap", 1e9),
                                               ("sigmoid", 1e300), ("spectral_qk", 1e300),
                                               ("attn_drop", math.nan), ("attn_drop", "0.1"),
                                               ("sink_tokens", 1.5)])
def test_out_of_range_values_name_the_option(option, value):
    with pytest.raises(ValueError, match=rf"^{option}=.*expected"):
        RobustAttention(DIM, num_heads=HEADS, **{option: value})
