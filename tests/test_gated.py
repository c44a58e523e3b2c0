"""Gated attention against the eager matrix form (float64) and against timm's gated Attention."""

import math

import pytest
import torch
from einops import rearrange, repeat
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from robust_attn import RobustAttention, create
from robust_attn.testing import strategies as ras

from .float64_reference import (
    assert_same_forward_and_backward,
    float64_mask,
    forward_backward,
    scores_and_allowed,
)

MODES = st.sampled_from(["elementwise", "headwise"])


def _module(shape, **options):
    return RobustAttention(shape.dim, num_heads=shape.heads, qkv_bias=True, **options).double()


def _softmax_attention(module, x, attn_mask, causal):
    """(B, H, N, D): softmax(scale q k^T, masked) v; rows with nothing allowed are zero."""
    q, k, v = rearrange(module.qkv(x), "b n (t h d) -> t b h n d", t=3, h=module.num_heads)
    scores, allowed = scores_and_allowed(module.scale, q, k, attn_mask, causal)
    weights = torch.softmax(scores.masked_fill(~allowed, -math.inf), dim=-1).nan_to_num(0.0)
    return weights @ v


def reference(module, x, attn_mask=None, causal=False):
    """proj(Y * sigmoid(x W_g + b_g)); a headwise gate is repeated over its head's channels."""
    gated = module.mitigations["gated"]
    gate = torch.sigmoid(x @ gated.gate.weight.T + gated.gate.bias)
    if gated.mode == "headwise":
        gate = repeat(gate, "b n h -> b n (h d)", d=module.head_dim)
    y = rearrange(_softmax_attention(module, x, attn_mask, causal), "b h n d -> b n (h d)")
    return module.proj(y * gate)


@given(shape=ras.attention_shapes(), mode=MODES, causal=st.booleans(), data=st.data())
def test_equals_the_eager_matrix_form_forward_and_backward(shape, mode, causal, data):
    module = _module(shape, gated=mode)
    attn_mask = float64_mask(data.draw(ras.attention_masks(shape), label="attn_mask"))
    x = torch.randn(shape.batch, shape.tokens, shape.dim, dtype=torch.float64)

    expected = forward_backward(module, lambda x: reference(module, x, attn_mask, causal), x)
    actual = forward_backward(module, lambda x: module(x, attn_mask, causal), x)
    assert_same_forward_and_backward(actual, expected)


def test_elementwise_equals_timms_gated_attention():
    timm_layers = pytest.importorskip("timm.layers")
    timm_attention = timm_layers.Attention(48, num_heads=4, qkv_bias=True, gated=True,
                                           norm_layer=nn.LayerNorm)
    ours = RobustAttention(48, num_heads=4, qkv_bias=True, gated=True)
    state = {name.replace("gate.", "mitigations.gated.gate.", 1) if name.startswith("gate.")
             else name: value for name, value in timm_attention.state_dict().items()}
    ours.load_state_dict(state, strict=True)
    x = torch.randn(2, 11, 48)
    torch.testing.assert_close(ours(x), timm_attention(x), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours(x, is_causal=True), timm_attention(x, is_causal=True),
                               atol=1e-6, rtol=1e-6)


@given(shape=ras.attention_shapes(), mode=MODES, seed=ras.seeds)
def test_permuting_tokens_permutes_the_output(shape, mode, seed):
    module = _module(shape, gated=mode)
    x = torch.randn(shape.batch, shape.tokens, shape.dim, dtype=torch.float64)
    permutation = torch.randperm(shape.tokens, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(module(x[:, permutation]), module(x)[:, permutation],
                               atol=1e-12, rtol=1e-12)


@given(shape=ras.attention_shapes(max_tokens=12), mode=MODES, causal=st.booleans(), data=st.data())
def test_blocked_keys_do_not_reach_the_query(shape, mode, causal, data):
    """Changing token j's input changes query i's output only where i may attend j (or i = j)."""
    module = _module(shape, gated=mode)
    attn_mask = data.draw(ras.attention_masks(shape, kinds=("bool",)))
    x = torch.randn(shape.batch, shape.tokens, shape.dim, dtype=torch.float64)
    j = data.draw(st.integers(0, shape.tokens - 1), label="perturbed token")
    perturbed = x.clone()
    perturbed[:, j] += 1.0
    allowed = torch.ones(shape.batch, shape.heads, shape.tokens, shape.tokens, dtype=torch.bool)
    allowed = allowed & attn_mask if attn_mask is not None else allowed
    allowed = allowed & torch.ones(shape.tokens, shape.tokens, dtype=torch.bool).tril() \
        if causal else allowed
    unreached = ~allowed[..., j].any(dim=1)  # (B, N): no head of query i may attend j
    unreached[:, j] = False
    change = (module(perturbed, attn_mask, causal) - module(x, attn_mask, causal)).abs()
    assert (change[unreached] == 0).all()


def test_state_dict_round_trips_and_names_the_gate_like_timm():
    source = RobustAttention(32, num_heads=4, qkv_bias=True, gated="headwise")
    target = RobustAttention(32, num_heads=4, qkv_bias=True, gated="headwise")
    assert {name for name in source.state_dict() if "gated" in name} \
        == {"mitigations.gated.gate.weight", "mitigations.gated.gate.bias"}
    assert source.mitigations["gated"].gate.weight.shape == (4, 32)
    target.load_state_dict(source.state_dict(), strict=True)
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(target(x), source(x))


@pytest.mark.parametrize("mode", ["elementwise", "headwise"])
def test_health_reports_the_mean_gate_per_head(mode):
    module = RobustAttention(32, num_heads=4, gated=mode, probe=True)
    x = torch.randn(3, 5, 32)
    module(x)
    gate = torch.sigmoid(module.mitigations["gated"].gate(x))
    expected = rearrange(gate, "b n (h d) -> h (b n d)", h=4).mean(dim=-1)
    torch.testing.assert_close(module.health.extras["gated.mean"], expected.detach())


def test_the_gate_follows_corrections_of_the_attention_output_in_any_option_order():
    """gated + outlier_removal is (A - U) V * gate whichever option comes first."""
    x = torch.randn(2, 6, 32)
    first = RobustAttention(32, num_heads=4, gated="headwise", outlier_removal=True)
    second = RobustAttention(32, num_heads=4, outlier_removal=True, gated="headwise")
    second.load_state_dict(first.state_dict())
    gate = repeat(torch.sigmoid(first.mitigations["gated"].gate(x)), "b n h -> b n (h d)", d=8)
    q, k, v = rearrange(first.qkv(x), "b n (t h d) -> t b h n d", t=3, h=4)
    corrected = torch.softmax(first.scale * q @ k.transpose(-2, -1), dim=-1) @ v \
        - v.mean(dim=-2, keepdim=True)
    expected = first.proj(rearrange(corrected, "b h n d -> b n (h d)") * gate)
    torch.testing.assert_close(first(x), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(second(x), expected, atol=1e-6, rtol=1e-6)


def test_gated_preset_and_combinations():
    assert create("gated", dim=32, num_heads=4).mitigations["gated"].mode == "elementwise"
    for options in ({"sink_logit": True}, {"sink_tokens": 2}, {"sigmoid": True},
                    {"softcap": 30.0}):
        module = create("gated", dim=32, num_heads=4, **options)
        assert torch.isfinite(module(torch.randn(2, 5, 32), is_causal=True)).all()


@pytest.mark.parametrize("value", ["channelwise", 1, "Headwise"])
def test_bad_option_values_raise_naming_the_option(value):
    with pytest.raises(ValueError, match="^gated="):
        RobustAttention(32, num_heads=4, gated=value)
