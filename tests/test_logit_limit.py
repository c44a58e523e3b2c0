"""The logit limit (robust_attn.logit_limit): a finite x whose logits overflow is refused, naming x.

The refusal is checked against an independent float64 Cauchy-Schwarz bound computed from the
weights, and the cases that motivated it are kept: at x ~ 1e20 SDPA returned finite zeros for
the attention (the output was the proj bias) and the other kernels nan; qk_norm's LayerNorm
returned nan from a finite q.
"""

import math
import re
from contextlib import nullcontext

import pytest
import torch
from hypothesis import given

from robust_attn import create
from robust_attn.logit_limit import (
    FLOAT16_LOGIT_LIMIT,
    LOGIT_LIMIT,
    logit_limit,
    overflow_refusal,
    refuse_unless_within,
)
from robust_attn.testing import strategies as ras

OVERFLOW = r"^x: the attention logits are too large"
# Around the limit, the module's bound (float32 norms of q, k rounded to the module's dtype) and
# the float64 one differ by rounding: no claim inside this relative band, 16 eps(dtype) wide.
BAND_EPS = 16


def _float64_logit_bound(module, x):
    """scale * max_i ||q_i|| * max_j ||k_j|| in float64 from the weights (baseline: q, k = x W^T)."""
    q, k, _ = (x.double() @ module.qkv.weight.double().T).chunk(3, dim=-1)
    heads = module.num_heads
    norms = [t.unflatten(-1, (heads, -1)).norm(dim=-1).max().item() for t in (q, k)]
    return module.scale * norms[0] * norms[1]


def _refused(module, x, context=None):
    try:
        with context or nullcontext():
            module(x)
    except RuntimeError as error:
        assert re.match(OVERFLOW, str(error)), error
        return True
    return False


@pytest.mark.parametrize("ratio", [0.5, 0.9, 1.1, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@given(shape=ras.attention_shapes(max_tokens=8), seed=ras.seeds)
def test_refused_exactly_where_the_float64_bound_exceeds_the_limit(dtype, ratio, shape, seed):
    """x scaled so that the float64 bound is ``ratio`` times the limit (up to the rounding of x)."""
    torch.manual_seed(seed)
    module = create("baseline", shape.dim, num_heads=shape.heads).to(dtype)
    x = torch.randn(shape.batch, shape.tokens, shape.dim).to(dtype)
    limit = logit_limit(dtype)
    x = (x.double() * math.sqrt(ratio * limit / _float64_logit_bound(module, x))).to(dtype)
    actual_ratio = _float64_logit_bound(module, x) / limit
    if abs(actual_ratio - 1) > BAND_EPS * torch.finfo(dtype).eps:
        assert _refused(module, x) == (actual_ratio > 1), f"bound / limit = {actual_ratio:.6g}"


def test_float16_logits_have_the_float16_limit_under_autocast_too():
    torch.manual_seed(0)
    module = create("baseline", 16, num_heads=2)
    x = torch.randn(2, 5, 16)
    x = x * math.sqrt(4 * FLOAT16_LOGIT_LIMIT / _float64_logit_bound(module, x))
    assert not _refused(module, x)
    assert not _refused(module, x, torch.autocast("cpu", dtype=torch.bfloat16))
    assert _refused(module, x, torch.autocast("cpu", dtype=torch.float16))
    assert _refused(module.to(torch.float16), x.to(torch.float16))
    assert FLOAT16_LOGIT_LIMIT < torch.finfo(torch.float16).max < LOGIT_LIMIT


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_an_overflowing_x_is_refused_on_every_kernel_instead_of_zeros_or_nan(kernel):
    module = create("baseline", 8, num_heads=2, kernel=kernel)
    with pytest.raises(RuntimeError, match=OVERFLOW):
        module(torch.randn(2, 5, 8) * 1e20)


def test_qk_norm_takes_large_inputs_and_refuses_those_whose_squares_overflow():
    module = create("qk_norm", 8, num_heads=2)
    x = torch.randn(2, 5, 8)
    assert torch.isfinite(module(x * 1e15)).all()
    with pytest.raises(RuntimeError, match=r"^x: q or k is too large for qk_norm"):
        module(x * 1e20)


@pytest.mark.parametrize("variant", ["baseline", "qk_norm"])
@pytest.mark.parametrize("bad", [torch.nan, torch.inf])
def test_a_non_finite_x_passes_even_when_large(variant, bad):
    """Non-finite inputs go through to the probe and the guard, whatever the other values."""
    module = create(variant, 8, num_heads=2, probe=True)
    x = torch.randn(2, 5, 8) * 1e20
    x[0, 1, 2] = bad
    module(x)
    assert module.health.nonfinite["q"] > 0


def test_an_empty_sequence_passes():
    assert create("baseline", 8, num_heads=2)(torch.randn(2, 0, 8)).shape == (2, 0, 8)


def test_the_check_compiles_without_graph_breaks_and_still_refuses():
    module = create("qk_norm", 8, num_heads=2)
    compiled = torch.compile(module, fullgraph=True, backend="eager")
    x = torch.randn(2, 5, 8)
    torch.testing.assert_close(compiled(x), module(x))
    with pytest.raises(RuntimeError, match=r"^x: q or k is too large for qk_norm"):
        compiled(x * 1e20)


def test_on_the_cpu_the_finiteness_of_x_is_computed_only_when_the_limit_is_exceeded():
    """The bound is read first on the CPU (no synchronisation to save there): x is not touched
    while within; past the limit a finite x is refused and a non-finite one passes, as in the
    asynchronous check."""
    untouchable = object()  # all_finite would fail on it
    refuse_unless_within(torch.tensor(False), untouchable, "x: refused")
    with pytest.raises(RuntimeError, match="^x: refused"):
        refuse_unless_within(torch.tensor(True), torch.ones(3), "x: refused")
    refuse_unless_within(torch.tensor(True), torch.tensor([1.0, math.inf]), "x: refused")
    with pytest.raises(AttributeError):  # elsewhere the asynchronous check computes it every call
        refuse_unless_within(torch.tensor(False, device="meta"), untouchable, "x: refused")


@pytest.mark.parametrize("variant", ["baseline", "qk_norm"])
def test_overflow_refusal_off_skips_both_checks_inside_the_block_only(variant):
    module = create(variant, 8, num_heads=2)
    x = torch.randn(2, 5, 8) * 1e20
    with overflow_refusal(False):
        module(x)  # not refused (its output is whatever the kernel makes of it)
        with overflow_refusal(True), pytest.raises(RuntimeError, match="^x: "):
            module(x)
    with pytest.raises(RuntimeError, match="^x: "):
        module(x)


def test_overflow_refusal_takes_a_bool_only():
    with pytest.raises(TypeError, match="^enabled must be True or False, got 0"):
        with overflow_refusal(0):
            pass


def test_overflow_refusal_off_is_followed_under_compile():
    module = create("baseline", 8, num_heads=2)
    compiled = torch.compile(module, fullgraph=True, backend="eager")
    x = torch.randn(2, 5, 8) * 1e20
    with overflow_refusal(False):
        compiled(x)
    with pytest.raises(RuntimeError, match=OVERFLOW):
        compiled(x)
