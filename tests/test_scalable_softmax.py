"""Scalable-Softmax against the paper's formula, softmax(s log(n) z), written out in float64."""

import math
import pickle
from dataclasses import replace

import pytest
import torch
from einops import rearrange
from hypothesis import given
from hypothesis import strategies as st

from robust_attn import RobustAttention, create
from robust_attn.call import AttentionCall
from robust_attn.kernels.eager import attention_weights
from robust_attn.mitigations.scalable_softmax import PAPER_SCALE, ScalableSoftmax
from robust_attn.problem import AttentionProblem, allowed_key_counts
from robust_attn.testing import strategies as ras

from .float64_reference import assert_same_forward_and_backward, float64_mask, forward_backward
from .test_compile import Scenario, _inputs, assert_compiled_equals_eager

INITIAL_SCALES = st.sampled_from([True, 1.0, 0.43, -0.3])
KERNELS = ("auto", "eager")


def _module(shape, initial=True, **options):
    module = RobustAttention(shape.dim, num_heads=shape.heads, qkv_bias=True,
                             scalable_softmax=initial, **options).double()
    with torch.no_grad():  # a distinct s per head, so that a head mix-up shows
        module.mitigations["scalable_softmax"].scale.add_(
            0.1 * torch.arange(shape.heads, dtype=torch.float64))
    return module


def _heads(module, x):
    """q, k (after the module's q_norm, k_norm) and v, (B, H, N, D) each."""
    q, k, v = rearrange(module.qkv(x), "b n (t h d) -> t b h n d", t=3, h=module.num_heads)
    return module.q_norm(q), module.k_norm(k), v


def reference_weights(module, x, attn_mask=None, causal=False):
    """(B, H, N, N): the paper's softmax(s_h log(n_i) z_ij) over the allowed keys of each row,
    z = scale q k^T; n_i the row's allowed keys (True, or > -inf, and causal); a float mask's
    values added after the scaling; rows without an allowed key all zero."""
    q, k, _ = _heads(module, x)
    logits = module.scale * q @ k.transpose(-2, -1)
    allowed = torch.ones_like(logits, dtype=torch.bool)
    bias = torch.zeros_like(logits)
    if attn_mask is not None:
        allowed = allowed & (attn_mask if attn_mask.dtype == torch.bool else attn_mask > -math.inf)
        if attn_mask.is_floating_point():
            bias = bias + attn_mask.masked_fill(attn_mask == -math.inf, 0.0)
    if causal:
        allowed = allowed & torch.ones(logits.shape[-2:], dtype=torch.bool).tril()
    n = allowed.sum(dim=-1, keepdim=True).double()
    s = module.mitigations["scalable_softmax"].scale.view(1, -1, 1, 1)
    scores = (s * torch.log(n.clamp(min=1)) * logits + bias).masked_fill(~allowed, -math.inf)
    weights = torch.softmax(scores, dim=-1)
    return torch.where(allowed.any(dim=-1, keepdim=True), weights, 0.0)


def reference(module, x, attn_mask=None, causal=False):
    out = reference_weights(module, x, attn_mask, causal) @ _heads(module, x)[2]
    return module.proj(rearrange(out, "b h n d -> b n (h d)"))


@pytest.mark.parametrize("kernel", KERNELS)
@given(shape=ras.attention_shapes(), initial=INITIAL_SCALES, qk_norm=st.booleans(),
       causal=st.booleans(), data=st.data())
def test_equals_the_papers_formula_forward_and_backward(kernel, shape, initial, qk_norm, causal,
                                                        data):
    """Output, input gradient and every parameter's gradient (s included) equal the float64
    formula, with bool and float masks of every broadcast shape."""
    module = _module(shape, initial, qk_norm=qk_norm, kernel=kernel)
    attn_mask = float64_mask(data.draw(ras.attention_masks(shape), label="attn_mask"))
    x = torch.randn(shape.batch, shape.tokens, shape.dim, dtype=torch.float64)

    expected = forward_backward(module, lambda x: reference(module, x, attn_mask, causal), x)
    actual = forward_backward(module, lambda x: module(x, attn_mask, causal), x)
    assert_same_forward_and_backward(actual, expected)
    assert "mitigations.scalable_softmax.scale" in actual[2]
    assert all(torch.isfinite(grad).all() for grad in actual[2].values())


@pytest.mark.parametrize("kernel", KERNELS)
@given(shape=ras.attention_shapes(), causal=st.booleans(), data=st.data())
def test_a_finite_fill_counts_as_allowed(kernel, shape, causal, data):
    """A float mask filled with finfo.min (Hugging Face's masks) adds a finite value: its keys
    count in n, and the output is the formula's (forward only: rows made of the fill alone are
    uniform, and the fused kernels' gradients there differ from autograd's for every preset)."""
    module = _module(shape, kernel=kernel)
    attn_mask = float64_mask(data.draw(ras.attention_masks(shape, kinds=("float",),
                                                           fills=("finfo.min",)),
                                       label="attn_mask"))
    x = torch.randn(shape.batch, shape.tokens, shape.dim, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(module(x, attn_mask, causal),
                                   reference(module, x, attn_mask, causal),
                                   atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kernel", KERNELS)
def test_with_a_sink_logit_n_counts_the_tokens_keys_only(kernel):
    """softmax([s_sink, s log(n) z_1, .., s log(n) z_n]): the sink logit, prepended after this
    stage, is neither counted in n nor scaled."""
    torch.manual_seed(1)
    module = RobustAttention(16, num_heads=2, scalable_softmax=1.0, sink_logit=True,
                             kernel=kernel).double()
    with torch.no_grad():
        module.mitigations["sink_logit"].logit.copy_(torch.tensor([0.5, -1.0]))
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    q, k, v = _heads(module, x)
    n = torch.arange(1, 7, dtype=torch.float64).view(1, 1, 6, 1)  # causal: query i sees i + 1
    scores = (torch.log(n) * module.scale * q @ k.transpose(-2, -1)).masked_fill(
        ~torch.ones(6, 6, dtype=torch.bool).tril(), -math.inf)
    sink = module.mitigations["sink_logit"].logit.view(1, 2, 1, 1).expand(2, 2, 6, 1)
    weights = torch.softmax(torch.cat([sink, scores], dim=-1), dim=-1)[..., 1:]
    expected = module.proj(rearrange(weights @ v, "b h n d -> b n (h d)"))
    torch.testing.assert_close(module(x, is_causal=True), expected, atol=1e-12, rtol=1e-12)


def test_the_key_counts():
    assert allowed_key_counts(4, 4, None, False, torch.device("cpu")) is None
    counts = {
        "causal": allowed_key_counts(4, 4, None, True, torch.device("cpu")),
        "causal, more keys": allowed_key_counts(3, 5, None, True, torch.device("cpu")),
        "causal, fewer keys": allowed_key_counts(5, 3, None, True, torch.device("cpu")),
    }
    assert counts["causal"].flatten().tolist() == [1, 2, 3, 4]
    assert counts["causal, more keys"].flatten().tolist() == [3, 4, 5]  # lower-right aligned
    assert counts["causal, fewer keys"].flatten().tolist() == [0, 0, 1, 2, 3]
    mask = torch.tensor([[True, False, True], [False, False, False], [True, True, True]])
    assert allowed_key_counts(3, 3, mask[None, None], False, torch.device("cpu")).flatten(
        ).tolist() == [2, 0, 3]
    assert allowed_key_counts(3, 3, mask[None, None], True, torch.device("cpu")).flatten(
        ).tolist() == [1, 0, 3]
    floats = torch.zeros(3, 3).masked_fill(~mask, -math.inf)
    floats[0, 1] = torch.finfo().min  # a finite value: an additive bias, so allowed
    assert allowed_key_counts(3, 3, floats[None, None], False, torch.device("cpu")).flatten(
        ).tolist() == [3, 0, 3]


@pytest.mark.parametrize("queries, keys", [(6, 6), (4, 7), (7, 4)])
def test_causal_key_padding_counts_by_prefix_sums_as_the_dense_mask_does(queries, keys):
    """A (B, 1, 1, Nk) padding mask under causality, counted without a (Nq, Nk) matrix, equals
    the count over the materialised mask."""
    padding = torch.rand(3, 1, 1, keys, generator=torch.Generator().manual_seed(keys)) > 0.4
    dense = padding.expand(3, 1, queries, keys)
    cpu = torch.device("cpu")
    torch.testing.assert_close(allowed_key_counts(queries, keys, padding, True, cpu),
                               allowed_key_counts(queries, keys, dense, True, cpu))
    column = torch.tensor([True, False, True]).view(1, 1, 3, 1)  # broadcast over the keys
    assert allowed_key_counts(3, 5, column, False, torch.device("cpu")).flatten().tolist() == [
        5, 0, 5]
    per_head = torch.ones(2, 3, 1, 4, dtype=torch.bool)
    per_head[1, 2, 0, :3] = False
    counts = allowed_key_counts(1, 4, per_head, False, torch.device("cpu"))
    assert counts.shape == (2, 3, 1, 1) and counts[1, 2].item() == 1 and counts[0, 0].item() == 4


def test_a_row_with_one_key_gets_log_one_and_returns_that_keys_value():
    """Causal query 0 sees one key: log 1 = 0 zeroes its q, and its output is v_0 as in softmax."""
    module = create("scalable_softmax", 16, num_heads=2).double()
    x = torch.randn(1, 5, 16, dtype=torch.float64)
    q, k, v = _heads(module, x)
    call = AttentionCall(x, is_causal=True)
    scaled, same_k = module.mitigations["scalable_softmax"].transform_qk(q, k, call)
    assert same_k is k
    assert (scaled[:, :, 0] == 0).all() and (scaled[:, :, 1:] != 0).any()
    out = module(x, is_causal=True)
    expected = module.proj(rearrange(v[:, :, :1], "b h n d -> b n (h d)"))
    torch.testing.assert_close(out[:, :1], expected)


@given(shape=ras.attention_shapes(), causal=st.booleans(), data=st.data())
def test_rows_without_an_allowed_key_output_zero_with_finite_gradients(shape, causal, data):
    module = _module(shape)
    attn_mask = data.draw(ras.attention_masks(shape, kinds=("bool",)), label="attn_mask")
    x = torch.randn(shape.batch, shape.tokens, shape.dim, dtype=torch.float64, requires_grad=True)
    out = module(x, attn_mask, causal)
    out.square().sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    scale = module.mitigations["scalable_softmax"].scale
    assert torch.isfinite(scale.grad).all()


@pytest.mark.parametrize("tokens", [10, 100, 1000, 10000])
def test_the_papers_figure_1_the_top_weight_stays_near_one(tokens):
    """Figure 1's input: -2 everywhere but one +3, s = 0.43. Softmax's top weight falls towards 0
    as n grows (0.015 at n = 10^4); SSMax's stays near 1 (1 / (1 + (n - 1) n^(-5 s)))."""
    z = torch.full((1, 1, 1, tokens), -2.0, dtype=torch.float64)
    z[..., -1] = 3.0
    q = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    k = z.transpose(-2, -1)  # D = 1: q . k_j = z_j
    v = torch.zeros(1, 1, tokens, 1, dtype=torch.float64)
    mitigation = ScalableSoftmax.from_option(0.43, _config(heads=1))
    scaled_q, _ = mitigation.transform_qk(q, k, AttentionCall(None))
    softmax_top = attention_weights(AttentionProblem(q, k, v, 1.0))[..., -1].item()
    ssmax_top = attention_weights(AttentionProblem(scaled_q, k, v, 1.0))[..., -1].item()
    assert ssmax_top == pytest.approx(1 / (1 + (tokens - 1) * tokens ** (-5 * 0.43)), rel=1e-12)
    assert ssmax_top > 0.93
    assert softmax_top == pytest.approx(1 / (1 + (tokens - 1) * math.exp(-5)), rel=1e-12)


def _config(heads: int):
    return RobustAttention(4 * heads, num_heads=heads, dtype=torch.float64).config


def test_options_and_the_initial_scale():
    assert PAPER_SCALE == pytest.approx(1 / (sum(math.log(n) for n in range(1, 1025)) / 1024))
    assert PAPER_SCALE == pytest.approx(0.1685, abs=1e-4)
    module = create("scalable_softmax", 32, num_heads=4)
    scale = module.mitigations["scalable_softmax"].scale
    assert isinstance(scale, torch.nn.Parameter) and scale.shape == (4,)
    assert (scale == PAPER_SCALE).all()
    module = RobustAttention(32, num_heads=4, scalable_softmax=2)
    assert (module.mitigations["scalable_softmax"].scale == 2.0).all()
    assert len(RobustAttention(32, num_heads=4, scalable_softmax=False).mitigations) == 0


@pytest.mark.parametrize("value", ["yes", math.nan, math.inf, 101.0, -1e5, [1.0]])
def test_bad_option_values_raise_naming_the_option(value):
    with pytest.raises(ValueError, match="^scalable_softmax="):
        RobustAttention(32, num_heads=4, scalable_softmax=value)


def test_sigmoid_conflicts():
    with pytest.raises(ValueError, match="'scalable_softmax' and 'sigmoid' conflict"):
        RobustAttention(32, num_heads=4, scalable_softmax=True, sigmoid=True)


def test_health_reports_s_and_the_mean_multiplier():
    module = create("scalable_softmax", 16, num_heads=2, probe=True)
    with torch.no_grad():
        module.mitigations["scalable_softmax"].scale.copy_(torch.tensor([1.0, 0.5]))
    module(torch.randn(2, 6, 16))
    extras = module.health.extras
    torch.testing.assert_close(extras["scalable_softmax.scale"], torch.tensor([1.0, 0.5]))
    torch.testing.assert_close(extras["scalable_softmax.multiplier"],
                               torch.tensor([1.0, 0.5]) * math.log(6))
    module(torch.randn(2, 6, 16), is_causal=True)  # mean of log(i + 1), i = 0..5
    mean_log = sum(math.log(n) for n in range(1, 7)) / 6
    torch.testing.assert_close(module.health.extras["scalable_softmax.multiplier"],
                               torch.tensor([1.0, 0.5]) * mean_log)


def test_the_multiplier_sharpens_only_beyond_e_to_the_one_over_s_keys():
    """At the initial s, s log n < 1 (softer logits than softmax's) below e^(1 / s) = 378.3 keys
    (the geometric mean of 1..1024, about 1024 / e)."""
    mitigation = create("scalable_softmax", 16, num_heads=2).mitigations["scalable_softmax"]
    for tokens, sharper in ((64, False), (378, False), (379, True), (4096, True)):
        q = k = torch.ones(1, 2, tokens, 8)
        scaled, _ = mitigation.transform_qk(q, k, AttentionCall(None))
        assert bool((scaled > 1).all()) is sharper, tokens


def test_a_low_precision_q_keeps_its_dtype():
    """The float32 s must not promote a bfloat16 q (under autocast the kernels need one dtype)."""
    module = create("scalable_softmax", 16, num_heads=2)
    q = k = torch.randn(1, 2, 5, 8, dtype=torch.bfloat16)
    mask = torch.rand(1, 1, 5, 5) > 0.3
    scaled, _ = module.mitigations["scalable_softmax"].transform_qk(
        q, k, AttentionCall(None, attn_mask=mask, is_causal=True))
    assert scaled.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(torch.randn(2, 5, 16), attn_mask=mask, is_causal=True)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_state_dict_round_trips_reset_restores_s_and_the_module_pickles():
    source = create("scalable_softmax", dim=32, num_heads=4)
    with torch.no_grad():
        source.mitigations["scalable_softmax"].scale.mul_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert "mitigations.scalable_softmax.scale" in source.state_dict()
    target = create("scalable_softmax", dim=32, num_heads=4)
    target.load_state_dict(source.state_dict(), strict=True)
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(target(x, is_causal=True), source(x, is_causal=True))
    copy = pickle.loads(pickle.dumps(source))
    torch.testing.assert_close(copy(x, is_causal=True), source(x, is_causal=True))
    source.reset_parameters()
    assert (source.mitigations["scalable_softmax"].scale == PAPER_SCALE).all()


@pytest.mark.parametrize("mask", ["float", "bool"])
def test_compiles_without_a_graph_break_with_a_mask_and_causal(mask):
    torch._dynamo.reset()
    x, inputs = _inputs(Scenario(mask=mask, is_causal=True))
    assert_compiled_equals_eager(create("scalable_softmax", 32, 4), x, **inputs)


def test_with_s_1_it_collapses_in_entropy_where_the_baseline_does_not():
    """The claim's note: s = 1 multiplies the logits by log 64 = 4.2 at 64 tokens, which collapses
    a stack at sqk 4 that keeps its entropy as the baseline (and at the initial s = 0.168)."""
    from robust_attn.claim import ENTROPY_COLLAPSE, StackSetting
    from robust_attn.studies.stack import measure_stack

    point = StackSetting(variant="baseline", depth=8, dim=64, num_heads=4, tokens=64, batch=1,
                         qk_scale=4.0, residual=True, seed=0)
    baseline = measure_stack(point, kernel="eager").worst_entropy
    paper = measure_stack(replace(point, variant="scalable_softmax"), kernel="eager").worst_entropy
    s_one = measure_stack(replace(point, variant="scalable_softmax"), kernel="eager",
                          scalable_softmax=1.0).worst_entropy
    assert baseline >= ENTROPY_COLLAPSE and paper >= ENTROPY_COLLAPSE
    assert s_one < ENTROPY_COLLAPSE, (baseline, paper, s_one)


@pytest.mark.parametrize("causal", [False, True])
def test_compiled_with_dynamic_shapes_one_graph_serves_every_length(causal):
    """log n is computed on tensors: the length stays symbolic (math.log of the key count made
    dynamo compile one graph per length, hitting its recompile limit)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    module = create("scalable_softmax", 16, num_heads=2)
    counter = CompileCounter()
    compiled = torch.compile(module, fullgraph=True, dynamic=True, backend=counter)
    generator = torch.Generator().manual_seed(0)
    for tokens in (2, 3, 5, 9, 17, 33, 100):
        x = torch.randn(1, tokens, 16, generator=generator)
        torch.testing.assert_close(compiled(x, is_causal=causal), module(x, is_causal=causal))
    assert counter.frame_count == 1
    torch._dynamo.reset()


@pytest.mark.parametrize("restriction", [{"sparsity": "strided"}, {"block_topk": (2, 1)}])
def test_n_counts_the_keys_before_a_pattern_or_block_topk_restricts_them(restriction):
    """The documented deviation (module docstring): n is the row's keys under the mask and
    causality; the keys a sparsity pattern or block_topk's selection leave out still count."""
    import robust_attn

    if "sparsity" in restriction:
        restriction = {"sparsity": robust_attn.sparse.Strided(stride=3)}
    module = create("scalable_softmax", 16, num_heads=2, probe=True, **restriction)
    module(torch.randn(2, 8, 16))
    torch.testing.assert_close(module.health.extras["scalable_softmax.multiplier"],
                               torch.full((2,), PAPER_SCALE * math.log(8)))
