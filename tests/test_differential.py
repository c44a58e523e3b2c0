"""Differential attention against the paper's formula (float64) and against timm's DiffAttention."""

import math

import pytest
import torch
from einops import rearrange
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from robust_attn import RobustAttention, create
from robust_attn.claim import ENTROPY, RANK
from robust_attn.mitigations.differential import lambda_init_at, layer_of_lambda_init
from robust_attn.studies.claims import CLAIMS
from robust_attn.testing import strategies as ras

from .float64_reference import (
    assert_same_forward_and_backward,
    float64_mask,
    forward_backward,
    scores_and_allowed,
)

EVEN_HEAD_WIDTHS = (2, 4, 8, 12)
KERNELS = st.sampled_from(["auto", "eager", "chunked"])
LAYERS = st.integers(1, 30)

# timm's DiffAttention state dict -> RobustAttention's (every other key is the same: qkv.weight,
# qkv.bias, proj.weight, proj.bias, norm.weight with scale_norm).
TIMM_TO_OURS = {
    "lambda_q1": "mitigations.differential.lambda_q1",
    "lambda_k1": "mitigations.differential.lambda_k1",
    "lambda_q2": "mitigations.differential.lambda_q2",
    "lambda_k2": "mitigations.differential.lambda_k2",
    "sub_norm.weight": "mitigations.differential.sub_norm.weight",
}


def from_timm(state):
    return {TIMM_TO_OURS.get(name, name): value for name, value in state.items()}


@torch.no_grad()
def randomise_lambda_and_gain(module, generator=None):
    """Lambda vectors far from their N(0, 0.1^2) init (so lambda differs from lambda_init) and a
    sub-norm gain other than ones, in ``module``'s own parameters (ours or timm's)."""
    names = ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2", "sub_norm.weight")
    parameters = dict(module.named_parameters())
    prefix = "mitigations.differential." if isinstance(module, RobustAttention) else ""
    for name in names:
        parameter = parameters[prefix + name]
        parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5
                        + (1.0 if name == "sub_norm.weight" else 0.0))


def _module(shape, layer, **options):
    module = RobustAttention(shape.dim, num_heads=shape.heads, qkv_bias=True,
                             differential=layer, **options).double()
    randomise_lambda_and_gain(module)
    return module


def reference(module, x, attn_mask=None, causal=False, cap=None):
    """The paper's DiffAttn (Ye et al. 2024) per head, written out in float64:
    (softmax(q1 k1^T / sqrt(d)) - lambda softmax(q2 k2^T / sqrt(d))) v, d = D / 2, then the
    per-head RMSNorm with its gain and (1 - lambda_init), heads merged, proj. Rows with no
    allowed key give zeros. ``cap``: soft-capping of each map's logits."""
    parameters = dict(module.named_parameters())

    def p(name):
        return parameters[f"mitigations.differential.{name}"]

    layer = module.mitigations["differential"].layer
    q, k, v = rearrange(module.qkv(x), "b n (t h d) -> t b h n d", t=3, h=module.num_heads)
    d = module.head_dim // 2
    maps = []
    for half in (slice(0, d), slice(d, 2 * d)):
        scores, allowed = scores_and_allowed(1 / math.sqrt(d), q[..., half], k[..., half],
                                             attn_mask, causal)
        if cap is not None:  # on the logits, before the mask is added
            logits = q[..., half] @ k[..., half].transpose(-2, -1) / math.sqrt(d)
            scores = scores - logits + cap * torch.tanh(logits / cap)
        maps.append(torch.softmax(scores.masked_fill(~allowed, -math.inf), dim=-1).nan_to_num(0.0))
    lambda_init = 0.8 - 0.6 * math.exp(-0.3 * (layer - 1))
    lam = (torch.exp((p("lambda_q1") * p("lambda_k1")).sum())
           - torch.exp((p("lambda_q2") * p("lambda_k2")).sum()) + lambda_init)
    heads = (maps[0] - lam * maps[1]) @ v
    normed = heads / torch.sqrt(heads.pow(2).mean(dim=-1, keepdim=True) + 1e-5) * p("sub_norm.weight")
    return module.proj(rearrange(normed * (1 - lambda_init), "b h n d -> b n (h d)"))


@given(shape=ras.attention_shapes(head_dims=EVEN_HEAD_WIDTHS), layer=LAYERS, kernel=KERNELS,
       causal=st.booleans(), data=st.data())
def test_equals_the_papers_formula_forward_and_backward(shape, layer, kernel, causal, data):
    """Every parameter's gradient too (the lambda vectors and the sub-norm gain included); masks of
    every shape, rows with no allowed key, causal; on the fused, chunked and eager kernels."""
    module = _module(shape, layer, kernel=kernel)
    attn_mask = float64_mask(data.draw(ras.attention_masks(shape), label="attn_mask"))
    x = torch.randn(shape.batch, shape.tokens, shape.dim, dtype=torch.float64)

    expected = forward_backward(module, lambda x: reference(module, x, attn_mask, causal), x)
    actual = forward_backward(module, lambda x: module(x, attn_mask, causal), x)
    assert_same_forward_and_backward(actual, expected)
    assert all(g is not None and torch.isfinite(g).all() for g in actual[2].values())


@given(shape=ras.attention_shapes(head_dims=EVEN_HEAD_WIDTHS), causal=st.booleans(), data=st.data())
def test_softcap_caps_each_maps_logits(shape, causal, data):
    module = _module(shape, 3, softcap=0.7)
    attn_mask = float64_mask(data.draw(ras.attention_masks(shape), label="attn_mask"))
    x = torch.randn(shape.batch, shape.tokens, shape.dim, dtype=torch.float64) * 3
    expected = forward_backward(module, lambda x: reference(module, x, attn_mask, causal, 0.7), x)
    actual = forward_backward(module, lambda x: module(x, attn_mask, causal), x)
    assert_same_forward_and_backward(actual, expected)


def _timm_pair(dim, num_heads, depth, generator, **timm_options):
    """A timm DiffAttention with random weights (lambda vectors and gain randomised too) and the
    RobustAttention its state dict loads into, strictly, through TIMM_TO_OURS."""
    timm_layers = pytest.importorskip("timm.layers")
    theirs = timm_layers.DiffAttention(dim, num_heads=num_heads, qkv_bias=True, depth=depth,
                                       **timm_options)
    randomise_lambda_and_gain(theirs, generator)
    scale_norm = timm_options.get("scale_norm", False)
    ours = RobustAttention(dim, num_heads=num_heads, qkv_bias=True, differential=depth + 1,
                           scale_norm=scale_norm, proj_bias=timm_options.get("proj_bias", True),
                           norm_layer=timm_layers.RmsNorm if scale_norm else None)
    ours.load_state_dict(from_timm(theirs.state_dict()), strict=True)
    return theirs, ours


def _grads(module, names=None):
    return {(names or {}).get(name, name): p.grad for name, p in module.named_parameters()}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize(("dim", "num_heads", "depth", "timm_options"), [
    (48, 4, 0, {}),
    (64, 2, 5, {}),
    (32, 4, 11, {"scale_norm": True}),
    (24, 3, 2, {"proj_bias": False}),
])
def test_equals_timms_diff_attention_with_its_weights(fused, dim, num_heads, depth, timm_options):
    """timm's DiffAttention(dim, num_heads, depth=d) is RobustAttention(dim, num_heads,
    differential=d + 1): its state dict maps onto ours by TIMM_TO_OURS (the layout needs no
    permutation), and both compute the same outputs and gradients, with masks and causal."""
    generator = torch.Generator().manual_seed(depth)
    theirs, ours = _timm_pair(dim, num_heads, depth, generator, **timm_options)
    theirs.fused_attn = fused
    ours.fused_attn = fused
    assert ours.head_dim == 2 * theirs.head_dim and ours.num_heads == theirs.num_heads
    assert ours.mitigations["differential"].lambda_init == pytest.approx(theirs.lambda_init,
                                                                        abs=1e-15)
    x = torch.randn(2, 11, dim, generator=generator)
    mask = torch.rand(2, 1, 11, 11, generator=generator) < 0.6
    mask[..., 0] = True  # timm returns nan for a row with no allowed key
    for kwargs in ({}, {"is_causal": True}, {"attn_mask": mask},
                   {"attn_mask": torch.randn(2, 1, 11, 11, generator=generator)}):
        # (No per-head mask: timm's unfused path broadcasts a mask over its 2 H half-heads, its
        # fused path over H heads; ours over the H differential heads, the same for both maps.)
        outputs = []
        for module in (theirs, ours):
            module.zero_grad(set_to_none=True)
            xi = x.clone().requires_grad_()
            out = module(xi, **kwargs)
            out.backward(torch.cos(out.detach()))
            outputs.append((out, xi.grad))
        (out_t, dx_t), (out_o, dx_o) = outputs
        close_in_float32(out_o, out_t, "output")
        close_in_float32(dx_o, dx_t, "dx")
        grads_t = _grads(theirs, TIMM_TO_OURS)
        for name, grad in _grads(ours).items():
            close_in_float32(grad, grads_t[name], f"grad of {name}")


def close_in_float32(actual, expected, what):
    """Equal within float32 rounding at the tensor's scale: 1e-4 of its largest entry (gradients
    are sums of many cancelling terms: the lambda vectors' over every output entry, through the
    per-head RMSNorm's backward). A wrong layout differs at the scale itself."""
    torch.testing.assert_close(actual, expected, rtol=0.0,
                               atol=1e-4 * max(expected.abs().max().item(), 1e-3),
                               msg=lambda m: f"{what}: {m}")


def test_timm_layout_parameter_shapes_and_names():
    timm_layers = pytest.importorskip("timm.layers")
    theirs = timm_layers.DiffAttention(64, num_heads=4)
    ours = RobustAttention(64, num_heads=4, differential=True)
    theirs_state = {TIMM_TO_OURS.get(k, k): v.shape for k, v in theirs.state_dict().items()}
    assert {k: v.shape for k, v in ours.state_dict().items()} == theirs_state
    assert ours.mitigations["differential"].lambda_q1.shape == (8,)  # D / 2 = timm's head_dim
    assert ours.mitigations["differential"].sub_norm.weight.shape == (16,)  # D


def test_option_values_and_lambda_init():
    assert create("differential", 32, num_heads=4).mitigations["differential"].lambda_init \
        == pytest.approx(0.2)
    for layer in (1, 2, 7, 40):
        module = RobustAttention(32, num_heads=4, differential=layer)
        expected = 0.8 - 0.6 * math.exp(-0.3 * (layer - 1))
        assert module.mitigations["differential"].lambda_init == pytest.approx(expected, abs=1e-15)
        assert module.saved_options()["differential"] == layer
    assert RobustAttention(32, num_heads=4, differential=True).saved_options()["differential"] == 1
    assert "differential" not in RobustAttention(32, num_heads=4, differential=False).mitigations
    for bad in (0, -1, 1.5, "deep", 2.0):
        with pytest.raises(ValueError, match="differential="):
            RobustAttention(32, num_heads=4, differential=bad)
    with pytest.raises(ValueError, match="differential needs a head width that is a multiple of 2, got 3"):
        RobustAttention(12, num_heads=4, differential=True)


def test_layer_of_a_timm_lambda_init():
    """A timm DiffAttention keeps lambda_init, not its depth: the layer index is recovered."""
    timm_layers = pytest.importorskip("timm.layers")
    for depth in range(0, 48):
        theirs = timm_layers.DiffAttention(16, num_heads=2, depth=depth, device="meta")
        assert layer_of_lambda_init(theirs.lambda_init) == depth + 1
        assert lambda_init_at(depth + 1) == theirs.lambda_init
    for bad in (0.1, 0.5, 0.8):
        with pytest.raises(ValueError, match="lambda_init="):
            layer_of_lambda_init(bad)


@pytest.mark.parametrize(("other", "value", "why"), [
    ("sigmoid", True, "softmax"),
    ("sink_logit", True, "attend to nothing"),
    ("sink_tokens", 2, "attend to nothing"),
    ("outlier_removal", True, "row-stochastic"),
    ("rope", True, "RoPE"),
])
def test_conflicts_name_both_options_and_why(other, value, why):
    with pytest.raises(ValueError, match=f"options 'differential' and '{other}' conflict: .*{why}"):
        RobustAttention(32, num_heads=4, differential=True, proj_bias=False, **{other: value})


@pytest.mark.parametrize("options", [
    {"qk_norm": True}, {"softcap": 30.0}, {"gated": "elementwise"}, {"sigma_reparam": True},
    {"spectral_qk": True},
])
def test_combines_with_the_others(options):
    module = RobustAttention(32, num_heads=4, differential=2, **options)
    x = torch.randn(2, 9, 32, requires_grad=True)
    out = module(x, is_causal=True)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()


def test_a_sparsity_pattern_applies_to_both_maps():
    from robust_attn.sparse import SlidingWindow

    module = RobustAttention(32, num_heads=4, differential=2, sparsity=SlidingWindow(2),
                             kernel="eager").double()
    window = torch.ones(9, 9, dtype=torch.bool).tril(1).triu(-1)  # |i - j| < 2
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    torch.testing.assert_close(module(x), reference(module, x, window), atol=1e-12, rtol=1e-12)


def test_kernels_agree_in_float32():
    torch.manual_seed(1)
    shape = ras.AttentionShape(batch=2, tokens=13, heads=3, head_dim=8)
    eager = _module(shape, 4, kernel="eager").float()
    mask = torch.rand(2, 3, 13, 13) < 0.5
    mask[:, :, 4] = False  # a query with no allowed key: zero, forward and backward
    x = torch.randn(2, 13, shape.dim)
    expected = forward_backward(eager, lambda x: eager(x, mask, True), x)
    assert torch.isfinite(expected[0]).all()
    for kernel in ("auto", "sdpa", "chunked"):
        module = _module(shape, 4, kernel=kernel).float()
        module.load_state_dict(eager.state_dict())
        actual = forward_backward(module, lambda x, m=module: m(x, mask, True), x)
        torch.testing.assert_close(actual[0], expected[0], atol=1e-5, rtol=1e-5)
        for name, grad in expected[2].items():
            torch.testing.assert_close(actual[2][name], grad, atol=1e-5, rtol=1e-5)


def test_a_query_with_no_allowed_key_outputs_the_proj_bias_only():
    module = RobustAttention(16, num_heads=2, differential=True)
    mask = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    mask[..., 2, :] = False
    x = torch.randn(1, 5, 16, requires_grad=True)
    out = module(x, attn_mask=mask)
    torch.testing.assert_close(out[0, 2], module.proj.bias.detach().expand(16))
    out.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_state_dict_round_trips_and_the_layer_is_recorded():
    source = RobustAttention(32, num_heads=4, differential=3)
    randomise_lambda_and_gain(source)
    target = RobustAttention(32, num_heads=4, differential=3)
    target.load_state_dict(source.state_dict(), strict=True)
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(target(x), source(x))
    other_layer = RobustAttention(32, num_heads=4, differential=4)
    with pytest.raises(RuntimeError, match="differential: checkpoint 3, this module 4"):
        other_layer.load_state_dict(source.state_dict())
    other_layer.load_state_dict(dict(source.state_dict()))  # on purpose: drops the record


def test_reset_parameters_redraws_the_lambda_vectors():
    module = RobustAttention(32, num_heads=4, differential=True)
    randomise_lambda_and_gain(module)
    module.reset_parameters()
    mitigation = module.mitigations["differential"]
    assert torch.equal(mitigation.sub_norm.weight, torch.ones(8))
    assert mitigation.lambda_q1.abs().max() < 0.5  # N(0, 0.1^2) draws


def test_probe_measures_the_first_map_and_reports_lambda():
    module = RobustAttention(32, num_heads=4, differential=2, probe=True)
    randomise_lambda_and_gain(module)
    x = torch.randn(1, 6, 32)
    module(x)
    mitigation = module.mitigations["differential"]
    torch.testing.assert_close(module.health.extras["differential.lambda"],
                               mitigation.lambda_full().detach().expand(4))
    assert module.health.extras["differential.lambda"].is_contiguous()
    q, k, _ = rearrange(module.qkv(x), "b n (t h d) -> t b h n d", t=3, h=4).detach()
    first_map_logits = q[..., :4] @ k[..., :4].transpose(-2, -1) / 2.0  # 1 / sqrt(D / 2)
    torch.testing.assert_close(module.health.max_logit, first_map_logits.amax(dim=(0, 2, 3)))


def test_claim_is_neither_with_witnesses():
    claim = CLAIMS["differential"]
    assert claim.addresses == "neither"
    assert set(claim.witnesses) == {ENTROPY, RANK}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_module_stays_in_its_dtype(dtype):
    module = RobustAttention(32, num_heads=4, differential=2, dtype=dtype)
    x = torch.randn(2, 7, 32, dtype=dtype)
    out = module(x)
    assert out.dtype == dtype and torch.isfinite(out).all()
    reference_module = RobustAttention(32, num_heads=4, differential=2)
    reference_module.load_state_dict({k: v.float() for k, v in module.state_dict().items()})
    torch.testing.assert_close(out.float(), reference_module(x.float()), atol=0.05, rtol=0.05)


def test_scale_norm_defaults_to_layernorm_not_timms_rmsnorm():
    """scale_norm builds RobustAttention's norm_layer (LayerNorm unless given): a timm
    DiffAttention's scale_norm is RmsNorm, so converting one passes norm_layer (or moves it)."""
    module = RobustAttention(32, num_heads=4, differential=True, scale_norm=True)
    assert isinstance(module.norm, nn.LayerNorm)
