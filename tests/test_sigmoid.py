"""Sigmoid attention against the eager matrix form sigmoid(scale q k^T + b) V, in float64."""

import math
import pickle

import pytest
import torch
from einops import rearrange
from hypothesis import given
from hypothesis import strategies as st

from robust_attn import RobustAttention, create
from robust_attn.call import AttentionCall
from robust_attn.kernels import select_kernel
from robust_attn.kernels.eager import attention_weights
from robust_attn.mitigations.sigmoid import SigmoidWeights
from robust_attn.problem import AttentionProblem
from robust_attn.testing import strategies as ras

from .test_chunked_kernel import LargestNewTensor
from .float64_reference import (
    assert_same_forward_and_backward,
    float64_mask,
    forward_backward,
    scores_and_allowed,
)

BIASES = st.sampled_from([True, -2.5])


def _module(shape, bias=True, **options):
    return RobustAttention(shape.dim, num_heads=shape.heads, qkv_bias=True, sigmoid=bias,
                           **options).double()


def _heads(module, x):
    """q, k (after the module's q_norm, k_norm) and v, (B, H, N, D) each."""
    q, k, v = rearrange(module.qkv(x), "b n (t h d) -> t b h n d", t=3, h=module.num_heads)
    return module.q_norm(q), module.k_norm(k), v


def reference_weights(module, x, attn_mask=None, causal=False):
    """(B, H, N, N): sigmoid(scale q k^T + mask + b) where allowed, 0 where blocked; the default
    b = -log(n_i), n_i the keys row i may see (at least 1)."""
    q, k, _ = _heads(module, x)
    scores, allowed = scores_and_allowed(module.scale, q, k, attn_mask, causal)
    bias = module.mitigations["sigmoid"].bias
    if bias is None:
        bias = -allowed.expand_as(scores).sum(-1, keepdim=True).clamp(min=1).double().log()
    return torch.where(allowed, torch.sigmoid(scores + bias), 0.0), allowed


def reference(module, x, attn_mask=None, causal=False):
    weights, _ = reference_weights(module, x, attn_mask, causal)
    out = weights @ _heads(module, x)[2]
    return module.proj(rearrange(out, "b h n d -> b n (h d)"))


@given(shape=ras.attention_shapes(), bias=BIASES, qk_norm=st.booleans(), causal=st.booleans(),
       data=st.data())
def test_equals_the_eager_matrix_form_forward_and_backward(shape, bias, qk_norm, causal, data):
    module = _module(shape, bias, qk_norm=qk_norm)
    attn_mask = float64_mask(data.draw(ras.attention_masks(shape), label="attn_mask"))
    x = torch.randn(shape.batch, shape.tokens, shape.dim, dtype=torch.float64)

    expected = forward_backward(module, lambda x: reference(module, x, attn_mask, causal), x)
    actual = forward_backward(module, lambda x: module(x, attn_mask, causal), x)
    assert_same_forward_and_backward(actual, expected)
    assert all(torch.isfinite(grad).all() for grad in actual[2].values())


@given(shape=ras.attention_shapes(), bias=BIASES, causal=st.booleans(), data=st.data())
def test_blocked_keys_get_zero_weight_and_empty_rows_output_zero(shape, bias, causal, data):
    module = _module(shape, bias)
    attn_mask = float64_mask(data.draw(ras.attention_masks(shape), label="attn_mask"))
    x = torch.randn(shape.batch, shape.tokens, shape.dim, dtype=torch.float64)
    q, k, v = _heads(module, x)
    sigmoid = module.mitigations["sigmoid"]
    problem = sigmoid.extend_keys(
        AttentionProblem(q, k, v, module.scale, attn_mask, causal, normalizer=sigmoid.normalizer()),
        AttentionCall(x, attn_mask, causal, None, "auto", 0.0))
    with torch.no_grad():
        weights = attention_weights(problem)
        expected, allowed = reference_weights(module, x, attn_mask, causal)
        out = select_kernel("auto", problem, 0.0).run(problem, 0.0)
    torch.testing.assert_close(weights, expected, atol=1e-12, rtol=1e-12)
    assert (weights[~allowed.expand_as(weights)] == 0).all()
    empty = ~allowed.expand_as(weights).any(dim=-1)
    assert (out[empty] == 0).all()


@pytest.mark.parametrize("num_keys", [1, 7, 64])
def test_the_default_bias_makes_every_weight_one_over_n_plus_one_for_equal_scores(num_keys):
    """sigmoid(0 - log N) = 1 / (N + 1): about uniform attention, as the paper intends."""
    q = torch.zeros(1, 2, 3, 4, dtype=torch.float64)
    k, v = torch.randn(2, 1, 2, num_keys, 4, dtype=torch.float64)
    problem = AttentionProblem(q, k, v, 0.5, normalizer=SigmoidWeights())
    weights = attention_weights(problem)
    torch.testing.assert_close(weights, torch.full_like(weights, 1 / (num_keys + 1)))


@pytest.mark.parametrize("bias", [True, -2.5])
@pytest.mark.parametrize("kernel", ["eager", "tiled", "chunked"])
def test_a_causal_rows_output_does_not_depend_on_later_tokens(bias, kernel):
    """The first rows of a causal forward equal the forward of the sequence cut after them: b_i
    counts the keys row i sees, not the call's (the length leak of b = -log(Nk))."""
    module = RobustAttention(16, num_heads=2, sigmoid=bias, kernel=kernel).double()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    full = module(x, is_causal=True)
    for length in (1, 4, 8):
        torch.testing.assert_close(module(x[:, :length], is_causal=True), full[:, :length],
                                   atol=1e-12, rtol=0)


def test_the_default_bias_counts_a_rows_allowed_keys():
    """Key padding: each row's n_i is its unpadded keys; without a mask or causality, Nk."""
    module = RobustAttention(16, num_heads=2, sigmoid=True).double()
    x = torch.randn(1, 6, 16, dtype=torch.float64)
    padded = torch.tensor([True] * 4 + [False] * 2).view(1, 1, 1, 6)
    torch.testing.assert_close(module(x, padded)[:, :4], module(x[:, :4])[:, :4],
                               atol=1e-12, rtol=0)


def test_block_topk_keys_count_whatever_the_option_order():
    """n_i counts the call's mask and causality: block_topk's selection (its own mask, added in
    the same problem stage) counts in neither option order."""
    torch.manual_seed(0)
    first = RobustAttention(16, num_heads=2, sigmoid=True, block_topk=(2, 1)).double()
    second = RobustAttention(16, num_heads=2, block_topk=(2, 1), sigmoid=True).double()
    second.load_state_dict(first.state_dict())
    x = torch.randn(2, 8, 16, dtype=torch.float64)
    for causal in (False, True):
        torch.testing.assert_close(first(x, is_causal=causal), second(x, is_causal=causal),
                                   atol=1e-12, rtol=0)


def test_the_tiled_kernel_runs_it_and_fused_kernels_refuse():
    module = RobustAttention(32, num_heads=4, sigmoid=True)
    x = torch.randn(2, 5, 32)
    q, k, v = _heads(module, x)
    problem = AttentionProblem(q, k, v, module.scale, normalizer=SigmoidWeights())
    assert select_kernel("auto", problem, 0.0).name == "tiled"
    with torch.no_grad():
        assert select_kernel("auto", problem, 0.0).name == "tiled"
    assert select_kernel("auto", problem, 0.1).name == "chunked"  # dropout
    for kernel in ("sdpa", "flex", "xformers"):
        forced = RobustAttention(32, num_heads=4, sigmoid=True, kernel=kernel)
        with pytest.raises(ValueError, match=f"kernel='{kernel}' cannot run here"):
            forced(x)


@given(shape=ras.attention_shapes(), bias=BIASES, seed=ras.seeds)
def test_permuting_tokens_permutes_the_output(shape, bias, seed):
    module = _module(shape, bias)
    x = torch.randn(shape.batch, shape.tokens, shape.dim, dtype=torch.float64)
    permutation = torch.randperm(shape.tokens, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(module(x[:, permutation]), module(x)[:, permutation],
                               atol=1e-12, rtol=1e-12)


def test_state_dict_round_trips_and_the_module_pickles():
    source = create("sigmoid", dim=32, num_heads=4)
    target = create("sigmoid", dim=32, num_heads=4)
    target.load_state_dict(source.state_dict(), strict=True)
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(target(x, is_causal=True), source(x, is_causal=True))
    copy = pickle.loads(pickle.dumps(source))
    torch.testing.assert_close(copy(x, is_causal=True), source(x, is_causal=True))
    assert pickle.loads(pickle.dumps(SigmoidWeights(-3.0))) == SigmoidWeights(-3.0)


def test_sigmoid_preset_turns_qk_norm_on():
    module = create("sigmoid", dim=32, num_heads=4)
    assert isinstance(module.q_norm, torch.nn.LayerNorm)
    assert isinstance(module.k_norm, torch.nn.LayerNorm)
    assert module.mitigations["sigmoid"].bias is None


@pytest.mark.parametrize("option, value", [("sink_logit", True), ("sink_tokens", 1),
                                           ("outlier_removal", True), ("softcap", 30.0)])
def test_options_that_assume_softmax_conflict(option, value):
    with pytest.raises(ValueError, match=f"'{option}' and 'sigmoid' conflict"):
        RobustAttention(32, num_heads=4, sigmoid=True, **{option: value})


def test_combines_with_the_gate():
    module = create("sigmoid", dim=32, num_heads=4, gated="headwise")
    assert torch.isfinite(module(torch.randn(2, 5, 32), is_causal=True)).all()


@pytest.mark.parametrize("value", ["yes", math.nan, math.inf, "-1"])
def test_bad_option_values_raise_naming_the_option(value):
    with pytest.raises(ValueError, match="^sigmoid="):
        RobustAttention(32, num_heads=4, sigmoid=value)


@pytest.mark.parametrize("padding", [False, True])
def test_a_long_causal_sequence_never_holds_an_n_by_n_tensor(padding):
    """Counting each row's keys (causality, a key-padding mask) and the tiled kernel keep every
    tensor of a causal module's forward and backward below N x N / 4 elements per head (the
    counts once took an (N, N) matrix: 18x timm's peak at N = 16384)."""
    tokens = 1024  # tiles of 256 x 256: a sixteenth of N x N
    module = RobustAttention(32, num_heads=1, sigmoid=True)
    x = torch.randn(1, tokens, 32, requires_grad=True)
    mask = torch.ones(1, 1, 1, tokens, dtype=torch.bool) if padding else None
    if padding:
        mask[..., -5:] = False
    with LargestNewTensor() as largest:
        module(x, attn_mask=mask, is_causal=True).square().sum().backward()
    assert largest.numel < tokens * tokens // 4, largest.operation
