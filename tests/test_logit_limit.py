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
from torch import nn

import robust_attn.logit_limit as logit_limit_module
from robust_attn import create
from robust_attn.logit_limit import (
    FLOAT16_LOGIT_LIMIT,
    LOGIT_LIMIT,
    logit_limit,
    overflow_refusal,
    refuse_unless_within,
    row_norm_bounds,
)
from robust_attn.mitigations.sigma_reparam import SigmaReparamLinear
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


def _largest_norms(q, k):
    return [t.double().norm(dim=-1).max().item() for t in (q, k)]


@pytest.mark.parametrize("norm", ["identity", "layer", "rms", "layer_no_affine", "sigma_reparam"])
@pytest.mark.parametrize("bias", [False, True])
@given(shape=ras.attention_shapes(max_tokens=8), seed=ras.seeds)
def test_the_cheap_row_norm_bounds_bound_the_norms_of_q_and_k(norm, bias, shape, seed):
    """row_norm_bounds (from x and the weights, sigma_reparam's effective ones included, or from
    a norm layer's parameters) is at least the float64 largest row norm of q and k, whatever the
    weights (drawn large and signed)."""
    torch.manual_seed(seed)
    width, head = shape.dim, shape.head_dim
    qkv = nn.Linear(width, 3 * width, bias=bias)
    if norm == "sigma_reparam":
        qkv, norm = SigmaReparamLinear(width, 3 * width, bias=bias), "identity"
    layers = {"identity": nn.Identity, "layer": lambda: nn.LayerNorm(head),
              "rms": lambda: nn.RMSNorm(head),
              "layer_no_affine": lambda: nn.LayerNorm(head, elementwise_affine=False)}
    q_norm, k_norm = layers[norm](), layers[norm]()
    with torch.no_grad():
        for parameter in [*qkv.parameters(), *q_norm.parameters(), *k_norm.parameters()]:
            parameter.normal_(std=3.0)
    x = torch.randn(shape.batch, shape.tokens, width) * 10
    q, k, _ = qkv(x).unflatten(-1, (3, shape.heads, head)).unbind(-3)
    q, k = q_norm(q), k_norm(k)
    bounds = row_norm_bounds(x, qkv, q_norm, k_norm, width, head)
    for bound, largest in zip(bounds, _largest_norms(q, k), strict=True):
        assert bound >= largest * (1 - 1e-6)


def test_no_cheap_bound_for_layers_it_cannot_read():
    class Scaled(nn.LayerNorm):
        def forward(self, x):
            return 1e6 * super().forward(x)

    x = torch.randn(2, 3, 8)
    assert row_norm_bounds(x, nn.Linear(8, 24), Scaled(4), Scaled(4), 8, 4) is None
    assert row_norm_bounds(x, nn.Sequential(nn.Linear(8, 24)), nn.Identity(), nn.Identity(), 8,
                           4) is None


@pytest.mark.parametrize("variant", ["baseline", "qk_norm"])
def test_within_the_cheap_bound_the_exact_one_is_skipped(monkeypatch, variant):
    """On the CPU in float32 the cheap bound decides alone where it is within half the limit;
    in float16, or past it, the exact bound is computed (and refuses as before)."""
    module = create(variant, 8, num_heads=2)
    x = torch.randn(2, 5, 8)
    calls = []
    original = logit_limit_module.logit_bound
    monkeypatch.setattr(logit_limit_module, "logit_bound",
                        lambda *args: calls.append(1) or original(*args))
    module(x)
    assert calls == []
    module.to(torch.float16)(x.half())
    assert len(calls) == 1
    if variant == "baseline":
        with pytest.raises(RuntimeError, match=OVERFLOW):
            module.float()(x * 1e20)
        assert len(calls) == 2


@pytest.mark.parametrize("variant, layer", [("baseline", "qkv"), ("qk_norm", "q_norm")])
def test_the_remembered_weight_norms_follow_in_place_changes(variant, layer):
    """Inference reads the qkv weight's block norms (qk_norm: the norm's largest weight) once; a
    change in place (an optimizer step, a load) is seen at the next call: here a weight scaled
    up until the logits overflow, then a fresh parameter in its place."""
    module = create(variant, 8, num_heads=2).eval()
    x = torch.randn(2, 5, 8)
    module(x)
    weight = getattr(module, layer).weight
    with torch.no_grad():
        weight.mul_(1e10)
    with pytest.raises(RuntimeError, match=OVERFLOW):
        module(x)
    getattr(module, layer).weight = nn.Parameter(weight.detach() * 1e-10)
    module(x)


def test_a_module_built_under_inference_mode_is_checked_too():
    """Its parameters are inference tensors, without the version counter the remembered norms
    key on: computed at every call instead, and still refusing."""
    with torch.inference_mode():
        module = create("baseline", 8, num_heads=2)
        module(torch.randn(2, 5, 8))
        with pytest.raises(RuntimeError, match=OVERFLOW):
            module(torch.randn(2, 5, 8) * 1e20)
