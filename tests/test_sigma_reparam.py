"""sigma_reparam: W_hat = gamma W / sigma(W) on qkv and proj (Zhai et al. 2023)."""

import copy
import io
import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from robust_attn import RobustAttention, create, metrics
from robust_attn.attention import load_upgrading
from robust_attn.mitigations import SigmaReparamLinear, fold_sigma_reparam, sigma_reparametrize
from robust_attn.mitigations.sigma_reparam import attention_entropy_lower_bound, top_singular_vectors
from robust_attn.testing import strategies as ras

features = st.integers(1, 40)


def _spectral_norm(weight):
    return torch.linalg.matrix_norm(weight.detach().double(), ord=2)


def _close(a, b, rtol=1e-5, atol=1e-6):
    return torch.allclose(a, b, rtol=rtol, atol=atol)


@given(features, features, st.booleans())
def test_preserve_starts_with_w_hat_equal_to_w_and_true_with_unit_spectral_norm(n_in, n_out, bias):
    preserved = SigmaReparamLinear(n_in, n_out, bias, preserve=True)
    assert _close(preserved.effective_weight(), preserved.weight)
    fresh = SigmaReparamLinear(n_in, n_out, bias)
    assert fresh.gamma.item() == 1.0
    assert _close(_spectral_norm(fresh.effective_weight()), torch.tensor(1.0, dtype=torch.float64))


THOROUGH = os.environ.get("ROBUST_ATTN_PROFILE") == "thorough"


def _assert_top_singular_pair(weight, sigma_rtol, alignment):
    """top_singular_vectors against the SVD: sigma = u^T W v within ``sigma_rtol`` of the top
    singular value; where it is apart from the second (by 1 %: else the vectors are not unique),
    u and v aligned with the SVD's to |cos| >= ``alignment``."""
    u, v = top_singular_vectors(weight)
    left, values, right = torch.linalg.svd(weight.double(), full_matrices=False)
    sigma = (u.double() @ weight.double() @ v.double()).item()
    assert math.isclose(sigma, values[0].item(), rel_tol=sigma_rtol)
    for vector in (u, v):
        assert math.isclose(vector.norm().item(), 1.0, rel_tol=1e-6)
    if len(values) == 1 or values[1] < 0.99 * values[0]:
        assert abs(u.double() @ left[:, 0]) >= alignment
        assert abs(v.double() @ right[0]) >= alignment


@given(features, features, st.integers(0, 2**16))
def test_the_warm_start_finds_the_svds_top_singular_pair(n_in, n_out, seed):
    """min(m, n) + 1 Lanczos steps span the whole space: the SVD's pair up to float32 rounding."""
    torch.manual_seed(seed)
    _assert_top_singular_pair(nn.Linear(n_in, n_out).weight.detach(), 1e-5, 1 - 1e-4)


@pytest.mark.parametrize("shape", [(1152, 384), (384, 384)]
                         + ([(2304, 768), (768, 768)] if THOROUGH else []))
def test_the_warm_start_finds_the_svds_top_singular_pair_at_vit_widths(shape):
    """ViT-S (always) and ViT-B (thorough profile) qkv and proj at nn.Linear's draw, whose top
    singular values lie within 2 % of each other: the Lanczos steps still give sigma to 1e-5
    and the vectors to |cos| >= 0.999 (plain power iteration left sigma 1e-3 low there)."""
    torch.manual_seed(0)
    _assert_top_singular_pair(nn.Linear(shape[1], shape[0]).weight.detach(), 1e-5, 0.999)


def test_the_warm_start_is_deterministic_and_leaves_the_global_rng_alone():
    weight = torch.randn(48, 32)
    state = torch.get_rng_state()
    first, second = top_singular_vectors(weight), top_singular_vectors(weight)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_preserve_is_exact_whatever_u_and_v():
    """gamma = u^T W v for the u, v in the buffers, so W_hat = W needs no exact singular pair."""
    layer = SigmaReparamLinear(16, 24, preserve=True)
    with torch.no_grad():
        layer.u.copy_(F.normalize(torch.randn(24), dim=0))
        layer.v.copy_(F.normalize(torch.randn(16), dim=0))
        layer.gamma.fill_(layer.sigma())
    assert _close(layer.effective_weight(), layer.weight)


@given(ras.attention_shapes(), st.booleans())
def test_preserve_computes_what_the_baseline_computes(shape, qkv_bias):
    torch.manual_seed(0)
    baseline = RobustAttention(shape.dim, shape.heads, qkv_bias=qkv_bias)
    torch.manual_seed(0)  # the same draw: SigmaReparamLinear initialises as nn.Linear does
    preserved = RobustAttention(shape.dim, shape.heads, qkv_bias=qkv_bias, sigma_reparam="preserve")
    x = torch.randn(shape.batch, shape.tokens, shape.dim)
    assert _close(preserved(x), baseline(x), atol=1e-5)

    loaded = RobustAttention(shape.dim, shape.heads, qkv_bias=qkv_bias, sigma_reparam="preserve")
    assert load_upgrading(loaded, baseline.state_dict()) == {"": ["sigma_reparam"]}
    assert _close(loaded(x), baseline(x), atol=1e-5)


@given(features, features, st.floats(1e-2, 1e2), st.booleans())
def test_output_does_not_change_when_the_weight_is_rescaled(n_in, n_out, factor, training):
    layer = SigmaReparamLinear(n_in, n_out).train(training)
    rescaled = copy.deepcopy(layer)
    with torch.no_grad():
        rescaled.weight.mul_(factor)
    x = torch.randn(3, n_in)
    assert _close(rescaled(x), layer(x), rtol=1e-4, atol=1e-5)


def _matrix_with_spectral_gap(n_out, n_in):
    """U diag(s) V^T with s_1 = 2 and the other singular values at most 0.6."""
    left = torch.linalg.qr(torch.randn(n_out, n_out))[0]
    right = torch.linalg.qr(torch.randn(n_in, n_in))[0]
    values = torch.rand(min(n_in, n_out)) * 0.6
    values[0] = 2.0
    return left[:, :values.numel()] @ torch.diag(values) @ right[:, :values.numel()].T


@given(features, features)
def test_sigma_reaches_the_spectral_norm_after_a_few_training_forwards(n_in, n_out):
    layer = SigmaReparamLinear(n_in, n_out)
    with torch.no_grad():  # a new weight: u, v were warm-started from the old one
        layer.weight.copy_(_matrix_with_spectral_gap(n_out, n_in))
    for _ in range(5):
        layer(torch.randn(2, n_in))
    reference = _spectral_norm(layer.weight)
    assert abs(layer.sigma().double() - reference) <= 0.01 * reference


def test_eval_forward_leaves_u_and_v_untouched_and_training_forward_updates_them():
    layer = SigmaReparamLinear(12, 7)
    with torch.no_grad():
        layer.weight.copy_(_matrix_with_spectral_gap(7, 12))
    before = layer.u.clone(), layer.v.clone()
    layer.eval()(torch.randn(4, 12))
    assert torch.equal(layer.u, before[0]) and torch.equal(layer.v, before[1])
    layer.train()(torch.randn(4, 12))
    assert not torch.equal(layer.u, before[0]) and not torch.equal(layer.v, before[1])


def test_power_iteration_and_sigma_run_in_float32_under_autocast():
    layer = _trained(SigmaReparamLinear(32, 24)).train()
    reference = copy.deepcopy(layer)
    x = torch.randn(4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
        sigma = layer.sigma()
    reference(x)
    assert torch.equal(layer.u, reference.u) and torch.equal(layer.v, reference.v)
    assert sigma.dtype == torch.float32 and torch.equal(sigma, reference.sigma())


@pytest.mark.parametrize("modes", [(True, True), (False, True), (True, False)])
def test_two_forwards_then_one_backward(modes):
    attention = create("sigma_reparam", 16, num_heads=2)
    x = torch.randn(2, 5, 16)
    outputs = [attention.train(mode)(x) for mode in modes]
    sum(out.square().sum() for out in outputs).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in attention.parameters())


def _trained(layer, steps=3):
    """``layer`` after a few training forwards on a moved weight, so u and v are not exact."""
    with torch.no_grad():
        layer.weight.add_(0.5 * torch.randn_like(layer.weight) / math.sqrt(layer.in_features))
    for _ in range(steps):
        layer(torch.randn(2, layer.in_features))
    return layer.eval()


@given(features, features, st.booleans())
def test_fold_computes_what_the_layer_computes_in_eval(n_in, n_out, bias):
    layer = _trained(SigmaReparamLinear(n_in, n_out, bias))
    folded = layer.fold()
    x = torch.randn(3, n_in)
    assert type(folded) is nn.Linear
    assert _close(folded(x), layer(x), atol=1e-5)


@given(ras.attention_shapes())
def test_fold_sigma_reparam_leaves_plain_linears_and_the_same_function(shape):
    attention = create("sigma_reparam", shape.dim, num_heads=shape.heads)
    for layer in (attention.qkv, attention.proj):
        _trained(layer)
    attention.eval()
    x = torch.randn(shape.batch, shape.tokens, shape.dim)
    expected = attention(x)
    assert fold_sigma_reparam(attention) is attention
    assert type(attention.qkv) is nn.Linear and type(attention.proj) is nn.Linear
    assert _close(attention(x), expected, atol=1e-5)


def test_gradients_reach_gamma_and_the_weight_through_sigma():
    layer = _trained(SigmaReparamLinear(9, 6))
    with torch.no_grad():
        layer.gamma.fill_(1.7)
    x = torch.randn(4, 9)
    layer(x).sin().sum().backward()
    # Expected, with G = dLoss/dW_hat and u, v constants:
    #   dW = (gamma / sigma) G - gamma <G, W> / sigma^2 u v^T,   dgamma = <G, W> / sigma
    w_hat = layer.effective_weight().detach().requires_grad_()
    F.linear(x, w_hat, layer.bias).sin().sum().backward()
    grad_w_hat, w, sigma = w_hat.grad, layer.weight.detach(), layer.sigma().detach()
    inner = (grad_w_hat * w).sum()
    expected_w = 1.7 / sigma * grad_w_hat - 1.7 * inner / sigma**2 * torch.outer(layer.u, layer.v)
    assert _close(layer.weight.grad, expected_w, rtol=1e-4, atol=1e-5)
    assert _close(layer.gamma.grad, inner / sigma, rtol=1e-4, atol=1e-5)


def test_state_dict_round_trips():
    torch.manual_seed(0)
    trained = create("sigma_reparam", 24, num_heads=3)
    for layer in (trained.qkv, trained.proj):
        _trained(layer)
    torch.manual_seed(1)
    restored = create("sigma_reparam", 24, num_heads=3)
    restored.load_state_dict(trained.state_dict(), strict=True)
    assert {"qkv.gamma", "qkv.u", "qkv.v", "proj.gamma"} <= set(trained.state_dict())
    x = torch.randn(2, 6, 24)
    for mode in (False, True):
        assert torch.equal(restored.train(mode)(x), trained.train(mode)(x))


def test_deepcopy_and_pickle_give_independent_working_modules():
    original = create("sigma_reparam", 16, num_heads=2, probe=True)
    x = torch.randn(2, 5, 16)
    original(x)
    with torch.no_grad():  # health is a snapshot: later parameter updates do not change it
        original.qkv.gamma.fill_(5.0)
    assert original.health.extras["sigma_reparam.qkv.gamma"] == 1.0
    with torch.no_grad():
        original.qkv.gamma.fill_(1.0)
    duplicate = copy.deepcopy(original)
    assert torch.equal(duplicate(x), original(x))
    with torch.no_grad():
        duplicate.qkv.gamma.fill_(3.0)
    for module in (duplicate, original):
        module(x)
    assert duplicate.health.extras["sigma_reparam.qkv.gamma"] == 3.0
    assert original.health.extras["sigma_reparam.qkv.gamma"] == 1.0

    buffer = io.BytesIO()
    torch.save(original, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer, weights_only=False)(x), original(x))


def test_sigma_reparametrize_converts_every_linear_and_keeps_the_function():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8))
    attention = nn.MultiheadAttention(8, 2, batch_first=True)
    x = torch.randn(2, 5, 8)
    expected = model(x), attention(x, x, x)[0]
    weights = [layer.weight for layer in model[::2]]

    assert sigma_reparametrize(model) is model
    sigma_reparametrize(attention)
    assert all(type(layer) is SigmaReparamLinear for layer in model[::2])
    assert [layer.weight for layer in model[::2]] == weights  # shared, not copied
    assert type(attention.out_proj) is not SigmaReparamLinear  # its parent reads .weight
    assert _close(model(x), expected[0], atol=1e-5)
    assert _close(attention(x, x, x)[0], expected[1], atol=1e-5)
    fresh = sigma_reparametrize(nn.Linear(4, 3), preserve=False)
    assert type(fresh) is SigmaReparamLinear and fresh.gamma.item() == 1.0


@pytest.mark.parametrize("value", ["yes", "Preserve", 1, 0.5, [True]])
def test_bad_option_values_name_the_option(value):
    with pytest.raises(ValueError, match="sigma_reparam"):
        RobustAttention(16, 2, sigma_reparam=value)


@pytest.mark.parametrize("value", [None, False])
def test_false_and_none_turn_it_off(value):
    assert type(RobustAttention(16, 2, sigma_reparam=value).qkv) is nn.Linear


@given(st.integers(2, 64), st.floats(0.0, 20.0))
def test_entropy_bound_is_the_entropy_of_its_extremal_row(keys, logit_scale):
    # Logits with one entry a above the others' -a / (T - 1), with norm logit_scale:
    # the row that Theorem 3.1 says attains the bound.
    high = logit_scale * math.sqrt((keys - 1) / keys)
    logits = torch.full((keys,), -high / (keys - 1), dtype=torch.float64)
    logits[0] = high
    entropy = metrics.attention_entropy(logits.softmax(-1)[None])
    bound = attention_entropy_lower_bound(torch.tensor(logit_scale, dtype=torch.float64), keys)
    assert torch.allclose(bound, entropy, atol=1e-9)


@given(ras.attention_shapes(), st.booleans(), st.floats(0.02, 1.0), ras.seeds)
def test_attention_entropy_stays_above_the_reported_bound(shape, qkv_bias, input_scale, seed):
    torch.manual_seed(seed)
    attention = create("sigma_reparam", shape.dim, num_heads=shape.heads, qkv_bias=qkv_bias,
                       probe=True)
    attention(input_scale * torch.randn(shape.batch, shape.tokens, shape.dim))
    bound = attention.health.extras["sigma_reparam.entropy_bound"]
    assert (attention.health.min_entropy >= bound - 1e-5).all()


@pytest.mark.parametrize("amplitude", [1.0, 3.0, 5.0, 8.0])
def test_entropy_bound_is_nearly_attained_by_aligned_rank_one_tokens(amplitude):
    """x_j = c_j e with c = (1, -1/(T-1), ...) and W_q, W_k = e^T: row 0 is the extremal row of
    Theorem 3.1 with norm sqrt((T-1)/T) times the bound's s, so the bound is almost attained."""
    dim, tokens = 16, 64
    attention = create("sigma_reparam", dim, num_heads=1, probe=True)
    direction = torch.eye(dim)[0]
    with torch.no_grad():
        attention.qkv.weight.zero_()
        attention.qkv.weight[0] = attention.qkv.weight[dim] = direction
        attention.qkv.weight[2 * dim:] = 0.5 * torch.eye(dim)
    attention.mitigations["sigma_reparam"].reset_from_weights(attention.layers_by_role())
    coefficients = torch.full((tokens,), -1.0 / (tokens - 1))
    coefficients[0] = 1.0
    amplitudes = torch.tensor([amplitude, amplitude / 10])  # the bound is the weaker sequence's
    attention.eval()(amplitudes[:, None, None] * coefficients[None, :, None] * direction)
    bound = attention.health.extras["sigma_reparam.entropy_bound"]
    assert bound <= attention.health.min_entropy.item() <= bound + 0.01


def test_entropy_bound_counts_the_query_bias():
    """A large query bias with tiny inputs sharpens attention; the bound must see it."""
    attention = create("sigma_reparam", 16, num_heads=2, qkv_bias=True, probe=True)
    with torch.no_grad():
        attention.qkv.bias[:16].normal_(0.0, 1e4)
    attention(1e-3 * torch.randn(2, 16, 16))
    bound = attention.health.extras["sigma_reparam.entropy_bound"]
    assert attention.health.min_entropy.min() < 0.5
    assert (attention.health.min_entropy >= bound).all()


def test_entropy_bound_is_informative_for_small_inputs():
    attention = create("sigma_reparam", 32, num_heads=4, probe=True)
    attention(0.1 * torch.randn(2, 16, 32))
    bound = attention.health.extras["sigma_reparam.entropy_bound"]
    assert 0.5 < bound <= attention.health.min_entropy.min()


def test_prevents_the_entropy_collapse_that_large_qk_weights_cause_in_the_baseline():
    """The claims table's point (docs/collapse-setting.md): W_q, W_k scaled by 16 collapse the
    baseline's entropy."""
    x = F.layer_norm(torch.randn(2, 64, 128), (128,))
    health = {}
    for variant in ("baseline", "sigma_reparam"):
        torch.manual_seed(0)
        attention = create(variant, 128, num_heads=4, probe=True)
        with torch.no_grad():
            attention.qkv.weight[:256].mul_(16)  # the q and k rows
        if variant == "sigma_reparam":
            attention.mitigations["sigma_reparam"].reset_from_weights(attention.layers_by_role())
        attention(x)
        health[variant] = attention.health
    assert health["baseline"].min_entropy.max() < 0.1
    assert health["sigma_reparam"].min_entropy.min() > 0.9


def test_a_checkpoint_with_the_former_0_dim_gamma_loads_strictly():
    trained = create("sigma_reparam", 16, num_heads=2)
    with torch.no_grad():
        trained.qkv.gamma.fill_(1.5)
    old = {key: value.reshape(()) if key.endswith("gamma") else value
           for key, value in trained.state_dict().items()}
    restored = create("sigma_reparam", 16, num_heads=2)
    restored.load_state_dict(old)
    assert restored.qkv.gamma.shape == (1,) and restored.qkv.gamma.item() == 1.5
    x = torch.randn(2, 5, 16)
    assert torch.equal(restored.eval()(x), trained.eval()(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_the_fused_effective_weight_equals_autograd_through_the_einsum_form(dtype):
    """_SpectrallyScaled (one node, fewer passes over W) against gamma W / (u^T W v) written out:
    the same W_hat and the same gradients of W and gamma (u, v constants)."""
    torch.manual_seed(0)
    layer = SigmaReparamLinear(7, 12).to(dtype)
    with torch.no_grad():
        layer.gamma.fill_(1.7)
    grad = torch.randn(12, 7).to(dtype)
    fused = layer.effective_weight()
    fused_grads = torch.autograd.grad(fused, (layer.weight, layer.gamma), grad)
    sigma = torch.einsum("o,oi,i->", layer.u, layer.weight.float(), layer.v)
    written = layer.weight * (layer.gamma.float() / sigma).to(dtype)
    written_grads = torch.autograd.grad(written, (layer.weight, layer.gamma), grad)
    tolerance = {"atol": 1e-2, "rtol": 1e-2} if dtype == torch.bfloat16 else {"atol": 1e-6,
                                                                              "rtol": 1e-5}
    torch.testing.assert_close(fused, written, **tolerance)
    for got, want in zip(fused_grads, written_grads, strict=True):
        torch.testing.assert_close(got, want, **tolerance)
