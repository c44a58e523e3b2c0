"""Sink tokens and sink logits against the eager matrix form, in float64, on every kernel."""

import math

import pytest
import torch
from einops import rearrange
from hypothesis import given
from hypothesis import strategies as st

import robust_attn
from robust_attn import RobustAttention, create
from robust_attn.call import AttentionCall
from robust_attn.kernels import select_kernel
from robust_attn.kernels.eager import attention_weights
from robust_attn.kernels.sdpa_sink import sink_attention
from robust_attn.mitigations.sinks import PRESERVING_SINK_LOGIT
from robust_attn.problem import AttentionProblem
from robust_attn.testing import strategies as ras

from .float64_reference import (
    assert_same_forward_and_backward,
    float64_mask,
    forward_backward,
    scores_and_allowed,
)
from .test_chunked_kernel import LargestNewTensor

SINK_OPTIONS = st.sampled_from([
    {"sink_tokens": 1}, {"sink_tokens": 3}, {"sink_logit": True}, {"sink_logit": "off_by_one"},
    {"sink_tokens": 2, "sink_logit": True}, {"sink_logit": True, "qk_norm": True},
    {"sink_logit": True, "softcap": 3.0}, {"sink_tokens": 2, "sink_logit": True, "softcap": 3.0},
])


def _module(shape, kernel="auto", **options):
    module = RobustAttention(shape.dim, num_heads=shape.heads, qkv_bias=True, kernel=kernel,
                             **options).double()
    with torch.no_grad():
        for name, parameter in module.mitigations.named_parameters():
            parameter.normal_(std=2.0 if name.endswith("logit") else 1.0)  # make the sinks matter
    return module


def _capped(module, scores):
    """cap * tanh(scores / cap) with the module's softcap, if it has one."""
    if "softcap" not in module.mitigations:
        return scores
    cap = module.mitigations["softcap"].cap
    return cap * torch.tanh(scores / cap)


def _masked_scores(module, q, k, attn_mask, causal):
    """softcap(scale * q k^T), the user's mask and the causal triangle; -inf where blocked."""
    scores, allowed = scores_and_allowed(module.scale, q, k, None, causal)
    scores = _capped(module, scores)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        allowed = allowed & attn_mask
    elif attn_mask is not None:
        scores = scores + attn_mask
    return scores.masked_fill(~allowed, -math.inf)


def _heads(module, x):
    """q, k (after the module's q_norm, k_norm) and v, (B, H, N, D) each."""
    q, k, v = rearrange(module.qkv(x), "b n (t h d) -> t b h n d", t=3, h=module.num_heads)
    return module.q_norm(q), module.k_norm(k), v


def reference(module, x, attn_mask=None, causal=False):
    """Output and (B, H, N, extra + N) weights: softmax over [sink columns, masked token scores],
    every column soft-capped when the module has softcap (the sink logit too)."""
    q, k, v = _heads(module, x)
    columns, values = [_masked_scores(module, q, k, attn_mask, causal)], [v]
    sinks = module.mitigations
    if "sink_tokens" in sinks:
        columns.insert(0, _capped(module, module.scale * q @ sinks["sink_tokens"].key.mT))
        values.insert(0, sinks["sink_tokens"].value.expand(v.shape[0], -1, -1, -1))
    if "sink_logit" in sinks:
        logit = sinks["sink_logit"].logit.view(1, -1, 1, 1).expand(*q.shape[:-1], 1)
        columns.insert(0, _capped(module, logit))
        values.insert(0, torch.zeros_like(v[:, :, :1]))
    weights = torch.softmax(torch.cat(columns, dim=-1), dim=-1)
    out = weights @ torch.cat(values, dim=-2)
    return module.proj(rearrange(out, "b h n d -> b n (h d)")), weights


def _kernels(options):
    """The kernels that can run ``options``: SDPA has no score modifier, so not with softcap
    (forcing it is refused: test_sdpa_is_refused_with_a_score_modifier)."""
    return ["auto", "eager"] + ([] if "softcap" in options else ["sdpa"])


@given(shape=ras.attention_shapes(), options=SINK_OPTIONS, causal=st.booleans(), data=st.data())
def test_equals_the_eager_matrix_form_forward_and_backward(shape, options, causal, data):
    kernel = data.draw(st.sampled_from(_kernels(options)), label="kernel")
    module = _module(shape, kernel=kernel, **options)
    attn_mask = float64_mask(data.draw(ras.attention_masks(shape), label="attn_mask"))
    x = torch.randn(shape.batch, shape.tokens, shape.dim, dtype=torch.float64)

    expected = forward_backward(module, lambda x: reference(module, x, attn_mask, causal)[0], x)
    actual = forward_backward(module, lambda x: module(x, attn_mask, causal), x)
    assert_same_forward_and_backward(actual, expected)


def test_sdpa_is_refused_with_a_score_modifier():
    module = _module(ras.AttentionShape(1, 3, 1, 4), kernel="sdpa", sink_logit=True, softcap=3.0)
    with pytest.raises(ValueError, match="sdpa"):
        module(torch.randn(1, 3, 4, dtype=torch.float64))


@given(shape=ras.attention_shapes(), causal=st.booleans(), data=st.data())
def test_sink_logit_minus_inf_is_no_sink(shape, causal, data):
    sink = _module(shape, sink_logit=True)
    baseline = RobustAttention(shape.dim, num_heads=shape.heads, qkv_bias=True).double()
    baseline.load_state_dict(sink.state_dict(), strict=False)
    with torch.no_grad():
        sink.mitigations["sink_logit"].logit.fill_(-math.inf)
    attn_mask = float64_mask(data.draw(ras.attention_masks(shape, allow_empty_rows=False)))
    x = torch.randn(shape.batch, shape.tokens, shape.dim, dtype=torch.float64)
    torch.testing.assert_close(sink(x, attn_mask, causal), baseline(x, attn_mask, causal),
                               atol=1e-12, rtol=1e-12)


def test_preserving_init_leaves_a_pretrained_module_unchanged_in_float32():
    pretrained = RobustAttention(64, num_heads=4)
    converted = RobustAttention(64, num_heads=4, sink_logit="preserve")
    converted.load_state_dict(pretrained.state_dict(), strict=False)
    assert (converted.mitigations["sink_logit"].logit == PRESERVING_SINK_LOGIT).all()
    x = torch.randn(2, 50, 64)
    for causal in (False, True):
        torch.testing.assert_close(converted(x, is_causal=causal), pretrained(x, is_causal=causal),
                                   rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_every_kernel_gives_the_same_output():
    """sdpa, eager and (forward only, one compile) flex, with both sinks, causal and a bool mask."""
    torch.manual_seed(1)
    module = RobustAttention(64, num_heads=4, sink_tokens=2, sink_logit=True)
    with torch.no_grad():
        module.mitigations["sink_logit"].logit.normal_(std=2.0)
    x = torch.randn(2, 40, 64)
    attn_mask = torch.rand(2, 1, 40, 40) < 0.6
    attn_mask[0, 0, 3] = False  # a query whose own keys are all blocked: it sees only the sinks
    outputs = {}
    with torch.no_grad():
        for kernel in ("sdpa", "eager", "flex"):
            module.kernel = kernel
            outputs[kernel] = module(x, attn_mask=attn_mask, is_causal=True)
    for kernel in ("sdpa", "flex"):
        torch.testing.assert_close(outputs[kernel], outputs["eager"], atol=1e-5, rtol=1e-5,
                                   msg=lambda m, kernel=kernel: f"{kernel}: {m}")


def _extended_problem(module, x, attn_mask=None, causal=False):
    q, k, v = _heads(module, x)
    problem = AttentionProblem(q, k, v, module.scale, attn_mask, causal,
                               score_mods=tuple(filter(None, (m.score_mod()
                                                              for m in module.mitigations.values()))))
    for mitigation in module.mitigations.values():
        problem = mitigation.extend_keys(problem, AttentionCall(x))
    return problem


@given(shape=ras.attention_shapes(), options=SINK_OPTIONS, causal=st.booleans(), data=st.data())
def test_rows_sum_to_one_and_blocked_keys_get_zero_weight(shape, options, causal, data):
    module = _module(shape, **options)
    attn_mask = float64_mask(data.draw(ras.attention_masks(shape)))
    x = torch.randn(shape.batch, shape.tokens, shape.dim, dtype=torch.float64)
    with torch.no_grad():
        weights = attention_weights(_extended_problem(module, x, attn_mask, causal))
        expected = reference(module, x, attn_mask, causal)[1]
        blocked = _masked_scores(module, *_heads(module, x)[:2], attn_mask, causal) == -math.inf
    torch.testing.assert_close(weights, expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones_like(weights[..., 0]))
    token_weights = weights[..., weights.shape[-1] - shape.tokens:]
    assert (token_weights[blocked.expand_as(token_weights)] == 0).all()


@given(shape=ras.attention_shapes(), options=SINK_OPTIONS, seed=ras.seeds)
def test_permuting_tokens_permutes_the_output(shape, options, seed):
    module = _module(shape, **options)
    x = torch.randn(shape.batch, shape.tokens, shape.dim, dtype=torch.float64)
    permutation = torch.randperm(shape.tokens, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(module(x[:, permutation]), module(x)[:, permutation],
                               atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("options, keys", [
    ({"sink_tokens": 2}, {"mitigations.sink_tokens.key", "mitigations.sink_tokens.value"}),
    ({"sink_logit": True}, {"mitigations.sink_logit.logit"}),
    ({"sink_logit": "preserve"}, {"mitigations.sink_logit.logit"}),
    ({"sink_logit": "off_by_one"}, set()),
])
def test_state_dict_round_trips(options, keys):
    shape = ras.AttentionShape(batch=2, tokens=9, heads=4, head_dim=8)
    source, target = _module(shape, **options), _module(shape, **options)
    plain = RobustAttention(32, num_heads=4, qkv_bias=True)
    assert set(source.state_dict()) - set(plain.state_dict()) == keys
    target.load_state_dict(source.state_dict(), strict=True)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    torch.testing.assert_close(target(x, is_causal=True), source(x, is_causal=True))


def test_health_reports_the_sink_logit_and_the_probe_its_mass():
    shape = ras.AttentionShape(batch=2, tokens=12, heads=3, head_dim=8)
    module = _module(shape, sink_logit=True)
    module.probe = True
    x = torch.randn(2, 12, 24, dtype=torch.float64)
    module(x, is_causal=True)
    logit = module.mitigations["sink_logit"].logit
    torch.testing.assert_close(module.health.extras["sink_logit.logit"], logit.detach().float())
    sink_weight = reference(module, x, causal=True)[1][..., 0]
    torch.testing.assert_close(module.health.sink_mass.double(),
                               sink_weight.mean(dim=(0, 2)).detach(), atol=1e-6, rtol=1e-6)


def test_sink_tokens_health_reports_key_and_value_norms():
    module = RobustAttention(32, num_heads=4, sink_tokens=3, probe=True)
    module(torch.randn(1, 5, 32))
    value = module.mitigations["sink_tokens"].value
    torch.testing.assert_close(module.health.extras["sink_tokens.value_norm"],
                               value.detach().norm(dim=-1).mean(dim=-1))
    assert module.health.extras["sink_tokens.key_norm"].shape == (4,)


def test_the_sink_logit_adds_a_channel_and_a_key_but_no_mask():
    module = RobustAttention(32, num_heads=4, sink_logit=True)
    x = torch.randn(3, 6, 32)
    given = _extended_problem(module, x)
    assert given.sink_logits is module.mitigations["sink_logit"].logit and given.q.shape[-1] == 8
    problem = given.with_sink_as_key()
    assert problem.attn_mask is None and problem.sink_logits is None
    assert problem.q.shape == (3, 4, 6, 9) and problem.k.shape == (3, 4, 7, 9)
    assert problem.v.shape == (3, 4, 7, 8)
    user_mask = torch.rand(6, 6) < 0.5
    assert torch.equal(_extended_problem(module, x, user_mask).with_sink_as_key().attn_mask[:, 1:],
                       user_mask)


@pytest.mark.parametrize("causal", [False, True])
def test_training_a_sink_on_sdpa_never_allocates_the_attention_matrix(causal):
    """2048 tokens: the (1, 2, 2048, 2049) matrix has 8.4 M elements; SDPA's math fallback (taken
    with a mask that needs gradients, as a sink logit in a mask column once was) creates it."""
    module = create("sink", dim=64, num_heads=2)
    x = torch.randn(1, 2048, 64, requires_grad=True)
    assert select_kernel("auto", _extended_problem(module, x, causal=causal), 0.0).name == "sdpa"
    with LargestNewTensor() as largest:
        module(x, is_causal=causal).square().sum().backward()
    assert largest.numel < 2048 * 2048 / 4, largest.operation
    assert (module.mitigations["sink_logit"].logit.grad != 0).all()


@given(shape=ras.attention_shapes(), causal=st.booleans(),
       options=st.sampled_from([{"gated": "headwise"}, {"outlier_removal": True},
                                {"sink_tokens": 2, "outlier_removal": True}]), data=st.data())
def test_with_output_transforms_every_kernel_equals_eager(shape, causal, options, data):
    """Gates and outlier removal after the sink (outlier removal spreads U over the sink key too)."""
    eager = _module(shape, kernel="eager", sink_logit=True, **options)
    attn_mask = float64_mask(data.draw(ras.attention_masks(shape), label="attn_mask"))
    x = torch.randn(shape.batch, shape.tokens, shape.dim, dtype=torch.float64)
    expected = forward_backward(eager, lambda x: eager(x, attn_mask, causal), x)
    for kernel in ("auto", "sdpa"):
        fused = _module(shape, kernel=kernel, sink_logit=True, **options)
        fused.load_state_dict(eager.state_dict())
        actual = forward_backward(fused, lambda x, fused=fused: fused(x, attn_mask, causal), x)
        assert_same_forward_and_backward(actual, expected)


def test_the_sink_logit_learns_through_sdpa():
    module = RobustAttention(32, num_heads=4, sink_logit=True, kernel="sdpa")
    module(torch.randn(2, 6, 32), is_causal=True).square().sum().backward()
    assert (module.mitigations["sink_logit"].logit.grad != 0).all()


def test_sink_preset_and_combinations():
    assert create("sink", dim=32, num_heads=4).mitigations["sink_logit"].learned
    for options in ({"gated": "headwise"}, {"outlier_removal": True}, {"softcap": 30.0},
                    {"sink_tokens": 2}):
        module = create("sink", dim=32, num_heads=4, **options)
        assert torch.isfinite(module(torch.randn(2, 5, 32), is_causal=True)).all()


@pytest.mark.parametrize("option, value", [
    ("sink_tokens", -1), ("sink_tokens", True), ("sink_tokens", 1.5), ("sink_tokens", "2"),
    ("sink_logit", "on"), ("sink_logit", 0.5), ("sink_logit", 1),
])
def test_bad_option_values_raise_naming_the_option(option, value):
    with pytest.raises(ValueError, match=f"^{option}="):
        RobustAttention(32, num_heads=4, **{option: value})


@pytest.mark.parametrize("option, value", [("sink_tokens", 1), ("sink_logit", True)])
def test_sinks_conflict_with_sigmoid_attention(option, value):
    with pytest.raises(ValueError, match=f"'{option}' and 'sigmoid' conflict"):
        RobustAttention(32, num_heads=4, sigmoid=True, **{option: value})


@pytest.mark.parametrize("options", [{"sink_logit": True}, {"sink_tokens": 2},
                                     {"sink_tokens": 1, "sink_logit": True}])
@pytest.mark.parametrize("mask_shape", [(), (1,), (3, 1), (1, 1, 3, 1)])
def test_a_mask_broadcast_over_the_keys_gets_its_sink_columns(options, mask_shape):
    """A mask whose key dimension is 1 (0-D, per query) broadcasts over the keys; the sinks'
    allowed columns are added after expanding it (padding the size-1 dimension gave a mask of 2
    columns for 3 keys: found by the thorough profile, sink preset, 0-D bool mask, N = 2)."""
    shape = ras.AttentionShape(2, 3, 2, 4)
    module = _module(shape, **options)
    x = torch.randn(shape.batch, shape.tokens, shape.dim, dtype=torch.float64)
    for mask in (torch.ones(mask_shape, dtype=torch.bool),
                 torch.zeros(mask_shape, dtype=torch.float64)):
        full = mask.expand(shape.tokens, shape.tokens) if mask.dim() < 3 else \
            mask.expand(1, 1, shape.tokens, shape.tokens)
        torch.testing.assert_close(module(x, attn_mask=mask), module(x, attn_mask=full.clone()),
                                   rtol=1e-12, atol=1e-12)


def _with_sink_column(q, k, v, sink, scale, causal):
    """Softmax over [s_h, scale q k^T (causal: -inf above the diagonal)], the sink's value zero."""
    scores = scale * q @ k.mT
    if causal:
        above = torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1)
        scores = scores.masked_fill(above, -math.inf)
    column = sink.view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    return torch.softmax(torch.cat([column, scores], dim=-1), dim=-1)[..., 1:] @ v


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("sink_values", [(-1.5, 0.0, 2.0), (-math.inf, 0.0, 40.0)])
def test_sink_by_lse_equals_a_softmax_with_the_sink_column_in_float64(causal, sink_values):
    """sdpa_sink: out * sigmoid(lse - s_h) and its gradients (through the flash backward with the
    extended lse, and the sink's own formula) against the matrix form with the sink as a column."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 5, dtype=torch.float64, requires_grad=True) for _ in range(3))
    sink = torch.tensor(sink_values, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 3, 7, 5, dtype=torch.float64)
    inputs = (q, k, v, sink)
    actual = sink_attention(q, k, v, sink, 0.4, causal)
    expected = _with_sink_column(q, k, v, sink, 0.4, causal)
    torch.testing.assert_close(actual, expected, atol=1e-12, rtol=1e-12)
    for got, want in zip(torch.autograd.grad(actual, inputs, grad),
                         torch.autograd.grad(expected, inputs, grad), strict=True):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    assert torch.autograd.gradcheck(
        lambda q, k, v, sink: sink_attention(q, k, v, sink, 0.4, causal),
        (q[:1, :, :4], k[:1, :, :4], v[:1, :, :4], torch.randn(3, dtype=torch.float64,
                                                                requires_grad=True)))


def _kernel_of(module, *args, **kwargs) -> str:
    with robust_attn.recording(module) as records:
        module(*args, **kwargs)
    return records[0][1].attended.kernel


@pytest.mark.parametrize("causal", [False, True])
def test_the_sink_logit_runs_on_sdpa_sink_where_it_can_and_as_a_key_elsewhere(causal):
    """Plain sink preset on the CPU: the sdpa_sink kernel (the rows' log-sum-exp), watched or not
    (the probe and observers read the problem with the sink as its key); a mask, dropout or the
    eager kernel: the sink key. The same output and gradients (float64)."""
    shape = ras.AttentionShape(2, 6, 3, 4)
    x = torch.randn(2, 6, 12, dtype=torch.float64)
    routed = _module(shape, sink_logit=True)
    expected = forward_backward(routed, lambda x: reference(routed, x, None, causal)[0], x)
    probed = _module(shape, sink_logit=True, probe=True)
    for module, kernel in ((routed, "sdpa_sink"), (probed, "sdpa_sink"),
                           (_module(shape, kernel="eager", sink_logit=True), "eager")):
        module.load_state_dict(routed.state_dict())
        assert _kernel_of(module, x, is_causal=causal) == kernel
        assert_same_forward_and_backward(
            forward_backward(module, lambda x, module=module: module(x, is_causal=causal), x),
            expected)
    assert probed.health is not None
    assert _kernel_of(routed, x, torch.ones(6, 6, dtype=torch.bool)) == "sdpa"
    routed.train()
    routed.attn_drop.p = 0.1
    assert _kernel_of(routed, x) == "sdpa"
