"""Outlier removal against the eager matrix form (A - U) V, in float64, with every kind of mask."""

import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from robust_attn import DefeatedMitigationWarning, RobustAttention, create
from robust_attn.call import AttentionCall
from robust_attn.kernels import select_kernel
from robust_attn.mitigations.outlier_removal import uniform_attention_output
from robust_attn.problem import AttentionProblem
from robust_attn.testing import strategies as ras

from .float64_reference import float64_mask


@st.composite
def problems(draw):
    """Float64 problems with masks of every kind (empty rows included), causal or not, and
    Nk = Nq - 2 .. Nq + 2 keys (fewer keys than queries leaves causal rows with no key)."""
    shape = draw(ras.attention_shapes())
    num_keys = max(1, shape.tokens + draw(st.integers(-2, 2)))
    generator = torch.Generator().manual_seed(draw(ras.seeds))

    def heads(n):
        return torch.randn(shape.batch, shape.heads, n, shape.head_dim, generator=generator,
                           dtype=torch.float64)

    mask = float64_mask(draw(ras.attention_masks(shape, num_keys=num_keys)))
    return AttentionProblem(heads(shape.tokens), heads(num_keys), heads(num_keys),
                            scale=shape.head_dim ** -0.5, attn_mask=mask,
                            causal=draw(st.booleans()))


def allowed_keys(problem):
    """Bool (B', H', Nq, Nk): the user's mask and the lower-right causal mask, independently."""
    allowed = torch.ones(problem.num_queries, problem.num_keys, dtype=torch.bool)
    mask = problem.attn_mask
    if mask is not None:
        allowed = allowed & (mask if mask.dtype == torch.bool else mask > -math.inf)
    if problem.causal:
        offset = problem.num_keys - problem.num_queries
        allowed = allowed & torch.ones_like(allowed).tril(diagonal=offset)
    return allowed


def reference(problem):
    """(A - U) V with A the masked softmax and U uniform over each row's allowed keys."""
    allowed = allowed_keys(problem)
    scores = problem.scale * problem.q @ problem.k.transpose(-2, -1)
    if problem.attn_mask is not None and problem.attn_mask.is_floating_point():
        scores = scores + problem.attn_mask
    scores = scores.masked_fill(~allowed, -math.inf)
    softmax = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    allowed = allowed.to(problem.v.dtype)
    uniform = allowed / allowed.sum(dim=-1, keepdim=True).clamp(min=1)
    return (softmax - uniform) @ problem.v


def outlier_removed(problem, kernel="auto"):
    """What the module computes on the fused path: kernel(q, k, v) - U V."""
    out = select_kernel(kernel, problem, 0.0).run(problem, 0.0)
    return out - uniform_attention_output(problem, AttentionCall(None, kernel=kernel))


def _with_grad(problem):
    return problem.with_(q=problem.q.clone().requires_grad_(),
                         k=problem.k.clone().requires_grad_(),
                         v=problem.v.clone().requires_grad_())


def _forward_backward(compute, problem):
    problem = _with_grad(problem)
    out = compute(problem)
    out.backward(torch.cos(out.detach()))
    return out, problem.q.grad, problem.k.grad, problem.v.grad


@given(problems(), st.sampled_from(["auto", "eager"]))
def test_equals_the_eager_matrix_form_forward_and_backward(problem, kernel):
    expected = _forward_backward(reference, problem)
    actual = _forward_backward(lambda p: outlier_removed(p, kernel), problem)
    for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected, strict=True):
        torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-10,
                                   msg=lambda m, name=name: f"{name}: {m}")
    empty = ~allowed_keys(problem).any(dim=-1)
    assert (actual[0].masked_select(empty.unsqueeze(-1)) == 0).all()
    assert all(torch.isfinite(grad).all() for grad in actual[1:])


@given(problems())
def test_effective_matrix_rows_sum_to_zero_and_blocked_keys_get_zero_weight(problem):
    """With the identity as values, the output is the effective matrix A - U itself."""
    batch, heads, num_keys = problem.v.shape[0], problem.v.shape[1], problem.num_keys
    identity = torch.eye(num_keys, dtype=torch.float64).expand(batch, heads, -1, -1)
    matrix = outlier_removed(problem.with_(v=identity))
    torch.testing.assert_close(matrix.sum(dim=-1), torch.zeros_like(matrix[..., 0]),
                               atol=1e-12, rtol=0)
    assert (matrix[~allowed_keys(problem).expand_as(matrix)] == 0).all()


@given(problems())
def test_constant_values_give_zero(problem):
    value = torch.randn(problem.v.shape[-1], dtype=torch.float64)
    out = outlier_removed(problem.with_(v=value.expand_as(problem.v)))
    torch.testing.assert_close(out, torch.zeros_like(out), atol=1e-12, rtol=0)


@given(shape=ras.attention_shapes(), seed=ras.seeds, causal=st.booleans())
def test_module_equals_reference_and_permutes_with_its_tokens(shape, seed, causal):
    module = RobustAttention(shape.dim, num_heads=shape.heads, outlier_removal=True).double()
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape.batch, shape.tokens, shape.dim, generator=generator,
                    dtype=torch.float64)
    q, k, v = rearrange(module.qkv(x), "b n (t h d) -> t b h n d", t=3, h=shape.heads)
    heads = reference(AttentionProblem(q, k, v, module.scale, causal=causal))
    expected = module.proj(rearrange(heads, "b h n d -> b n (h d)"))
    torch.testing.assert_close(module(x, is_causal=causal), expected, atol=1e-10, rtol=1e-10)
    if not causal:
        permutation = torch.randperm(shape.tokens, generator=generator)
        torch.testing.assert_close(module(x[:, permutation]), module(x)[:, permutation],
                                   atol=1e-12, rtol=1e-12)


def test_sinks_are_keys_the_uniform_attention_spreads_over():
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    attn_mask = torch.rand(2, 1, 9, 9) < 0.5
    with_sinks = dict(sink_logit=True, sink_tokens=1)
    plain = RobustAttention(32, num_heads=4, **with_sinks).double()
    removed = RobustAttention(32, num_heads=4, outlier_removal=True, **with_sinks).double()
    removed.load_state_dict(plain.state_dict(), strict=True)
    _, _, v = rearrange(plain.qkv(x), "b n (t h d) -> t b h n d", t=3, h=4)
    sink_values = torch.cat([torch.zeros(4, 1, 8, dtype=torch.float64),
                             plain.mitigations["sink_tokens"].value], dim=1)
    values = torch.cat([sink_values.expand(2, -1, -1, -1), v], dim=-2)
    allowed = nn.functional.pad(attn_mask & torch.ones(9, 9, dtype=torch.bool).tril(), (2, 0),
                                value=True)
    uniform = (allowed.double() / allowed.sum(dim=-1, keepdim=True)) @ values
    correction = rearrange(uniform, "b h n d -> b n (h d)") @ plain.proj.weight.T
    torch.testing.assert_close(removed(x, attn_mask, is_causal=True),
                               plain(x, attn_mask, is_causal=True) - correction,
                               atol=1e-10, rtol=1e-10)


def _token_residual(x):
    """res(X) = ||X - 1 mean(X)|| / ||X|| per batch item (0: every token identical)."""
    centred = x - x.mean(dim=-2, keepdim=True)
    return centred.flatten(1).norm(dim=-1) / x.flatten(1).norm(dim=-1)


def test_outlier_removal_prevents_the_rank_collapse_the_baseline_shows():
    """The claims table's stack (docs/collapse-setting.md): 24 attention-only layers (LayerNorm
    before each), width 128, 4 heads, 64 tokens, no proj bias, at initialisation. The baseline
    collapses (res ~ 1e-7); outlier removal does not. (With proj's bias, the small (A - U) V
    at initialisation lets the bias dominate and every token collapses onto it instead.)"""
    torch.manual_seed(0)
    depth, width = 24, 128
    baseline = [RobustAttention(width, num_heads=4, proj_bias=False) for _ in range(depth)]
    removed = [RobustAttention(width, num_heads=4, proj_bias=False, outlier_removal=True)
               for _ in range(depth)]
    for ours, theirs in zip(removed, baseline, strict=True):
        ours.load_state_dict(theirs.state_dict(), strict=True)
    norm = nn.LayerNorm(width)
    x = torch.randn(2, 64, width)
    residuals = {}
    with torch.no_grad():
        for name, stack in (("baseline", baseline), ("outlier_removal", removed)):
            tokens = x
            for layer in stack:
                tokens = layer(norm(tokens))
            residuals[name] = _token_residual(tokens)
    assert (residuals["baseline"] < 1e-4).all(), residuals
    assert (residuals["outlier_removal"] > 0.5).all(), residuals


def test_the_preset_as_users_build_it_keeps_its_claim_and_a_proj_bias_defeats_it():
    """create("outlier_removal", dim=96, num_heads=4), nothing else: 24 attention-only pre-LN
    layers keep res > 0.3 at initialisation; with nn.Linear's default proj bias the same stack
    collapses in rank (the bias, the same for every token, dominates), and building it warns."""
    def final_residual(**options):
        torch.manual_seed(0)
        layers = [create("outlier_removal", dim=96, num_heads=4, **options) for _ in range(24)]
        tokens = torch.randn(2, 48, 96)
        with torch.no_grad():
            for layer in layers:
                tokens = layer(F.layer_norm(tokens, (96,)))
        return _token_residual(tokens)

    assert (final_residual() > 0.3).all()
    with pytest.warns(DefeatedMitigationWarning, match="proj_bias"):
        assert (final_residual(proj_bias=True) < 0.01).all()


def test_outlier_removal_preset_has_no_parameters_and_loads_a_plain_state_dict():
    plain = RobustAttention(32, num_heads=4, qkv_bias=True, proj_bias=False)
    module = create("outlier_removal", dim=32, num_heads=4, qkv_bias=True)
    module.load_state_dict(plain.state_dict(), strict=True)
    assert set(module.state_dict()) == set(plain.state_dict())


def test_combinations_work_and_sigmoid_conflicts():
    for options in ({"gated": "headwise"}, {"sink_logit": True}, {"softcap": 30.0}):
        module = create("outlier_removal", dim=32, num_heads=4, **options)
        assert torch.isfinite(module(torch.randn(2, 5, 32), is_causal=True)).all()
    with pytest.raises(ValueError, match="'outlier_removal' and 'sigmoid' conflict"):
        create("outlier_removal", dim=32, num_heads=4, sigmoid=True)
    with pytest.raises(ValueError, match="^outlier_removal="):
        create("outlier_removal", dim=32, num_heads=4, outlier_removal="yes")


def test_a_sparsity_pattern_restricts_the_uniform_attention_too():
    sparse = pytest.importorskip("robust_attn.sparse")
    q, k, v = torch.randn(3, 2, 3, 16, 8, dtype=torch.float64)
    problem = AttentionProblem(q, k, v, 8 ** -0.5, pattern=sparse.BlockLocal(4))
    dense = problem.with_(pattern=None, attn_mask=problem.pattern_allowed())
    expected = _forward_backward(reference, dense)
    actual = _forward_backward(outlier_removed, problem)
    for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected, strict=True):
        torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-10,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("variant", ["outlier_removal", "robust"])
def test_presets_without_proj_bias_exchange_state_dicts_with_timm(variant):
    """The presets build no proj bias; their state dicts are a timm Attention's built the same way
    (proj_bias=False, and qk_norm for robust), both ways, strictly."""
    layers = pytest.importorskip("timm.layers")
    ours = create(variant, dim=32, num_heads=4)
    theirs = layers.Attention(32, num_heads=4, proj_bias=False, qk_norm=variant == "robust",
                              norm_layer=nn.LayerNorm)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    ours.load_state_dict(theirs.state_dict(), strict=True)
