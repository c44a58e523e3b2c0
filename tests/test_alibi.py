"""ALiBi against the paper's slopes and bias, a float64 matrix form, sinks and every CPU kernel."""

import copy
import math
import pickle

import pytest
import torch
from einops import rearrange
from hypothesis import given
from hypothesis import strategies as st

from robust_attn import RobustAttention, create
from robust_attn.call import AttentionCall
from robust_attn.kernels.chunked import chunked_attention
from robust_attn.kernels.eager import attention_logits, eager_attention, scaled_scores
from robust_attn.mitigations import MITIGATIONS
from robust_attn.mitigations.alibi import Alibi, AlibiBias, alibi_slopes
from robust_attn.mitigations.softcap import TanhSoftCap
from robust_attn.problem import SOFTMAX, AttentionProblem
from robust_attn.testing import strategies as ras

from .float64_reference import (
    assert_same_forward_and_backward,
    float64_mask,
    forward_backward,
    scores_and_allowed,
    with_sink_columns,
)
from .test_kernels import problems


def official_slopes(n):
    """The authors' recipe (get_slopes, fairseq/models/transformer.py of
    ofirpress/attention_with_linear_biases), restated: a geometric sequence from 2^(-8/n) with
    ratio 2^(-8/n) when n is a power of 2, else the closest power of 2's sequence followed by
    every other element of twice its length's, starting with the first."""
    if math.log2(n).is_integer():
        start = 2 ** (-8 / n)
        return [start * start ** i for i in range(n)]
    power = 2 ** math.floor(math.log2(n))
    return official_slopes(power) + official_slopes(2 * power)[0::2][:n - power]


def _module(shape, kernel="auto", **options):
    return RobustAttention(shape.dim, num_heads=shape.heads, qkv_bias=True, kernel=kernel,
                           **options).double()


def _heads(module, x):
    q, k, v = rearrange(module.qkv(x), "b n (t h d) -> t b h n d", t=3, h=module.num_heads)
    return module.q_norm(q), module.k_norm(k), v


def distance_bias(slopes, num_queries, num_keys=None):
    """-m_h |i - j| (H, Nq, Nk) in float64, queries aligned to the last Nq of Nk positions."""
    num_keys = num_keys or num_queries
    rows = torch.arange(num_queries, dtype=torch.float64) + num_keys - num_queries
    distance = (rows[:, None] - torch.arange(num_keys, dtype=torch.float64)[None, :]).abs()
    return -torch.tensor(slopes, dtype=torch.float64).view(-1, 1, 1) * distance


def reference(module, x, attn_mask=None, causal=False):
    """Output and weights of softmax (or sigmoid, b_i = -log n_i) over [sink columns,
    softcap(scale q k^T) + bias + mask], with no bias on the sink columns."""
    q, k, v = _heads(module, x)
    scores, allowed = scores_and_allowed(module.scale, q, k, None, causal)
    cap = module.mitigations["softcap"].cap if "softcap" in module.mitigations else None
    if cap is not None:
        scores = cap * torch.tanh(scores / cap)
    scores = scores + distance_bias(module.mitigations["alibi"].slopes, x.shape[1])
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        allowed = allowed & attn_mask
    elif attn_mask is not None:
        scores = scores + attn_mask
    logits, values = with_sink_columns(module, q, v, scores.masked_fill(~allowed, -math.inf))
    if "sigmoid" in module.mitigations:  # b_i = -log(keys row i may attend: mask and causality)
        counted = allowed if attn_mask is None or attn_mask.dtype == torch.bool \
            else allowed & (attn_mask > -math.inf)
        count = counted.sum(dim=-1, keepdim=True).clamp(min=1).to(logits.dtype)
        weights = torch.sigmoid(logits - count.log())
    else:
        weights = SOFTMAX(logits)  # a row with no allowed key: zeros
    out = weights @ values
    return module.proj(rearrange(out, "b h n d -> b n (h d)")), weights


def _extended_problem(module, x, attn_mask=None, causal=False):
    """The problem the module's kernel solves (sinks prepended, the sink logit as its key), as
    the module builds it."""
    q, k, v = _heads(module, x)
    problem = AttentionProblem(q, k, v, module.scale, attn_mask, causal,
                               score_mods=module._score_mods())
    for mitigation in module.mitigations.values():
        problem = mitigation.extend_keys(problem, AttentionCall(x))
    return problem.with_sink_as_key()


# -- the slopes -------------------------------------------------------------------------------

@pytest.mark.parametrize("heads", range(1, 65))
def test_slopes_are_the_authors_recipe(heads):
    slopes = alibi_slopes(heads)
    assert len(slopes) == heads and all(0 < m < 1 for m in slopes)
    for ours, theirs in zip(slopes, official_slopes(heads), strict=True):
        assert ours == pytest.approx(theirs, rel=1e-14, abs=0)


def test_slopes_as_the_paper_states_them():
    """Section 3: 8 heads, 1/2, 1/4, .., 1/256; 16 heads interleave those with their geometric
    means (start 1/sqrt(2)); 6 heads: 4 heads' slopes, then every other of 8 heads'."""
    assert alibi_slopes(8) == tuple(2.0 ** -(h + 1) for h in range(8))
    assert alibi_slopes(16)[1::2] == alibi_slopes(8)
    assert alibi_slopes(16)[0] == pytest.approx(2 ** -0.5, rel=1e-15)
    assert alibi_slopes(6) == (2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3)
    assert alibi_slopes(1) == (2 ** -8,)
    for bad in (0, -1, 1.0, True):
        with pytest.raises(ValueError, match="num_heads"):
            alibi_slopes(bad)


# -- the option -------------------------------------------------------------------------------

def test_option_values_and_refusals():
    assert create("alibi", 32, num_heads=4).mitigations["alibi"].slopes == alibi_slopes(4)
    for off in (None, False):
        assert "alibi" not in RobustAttention(32, num_heads=4, alibi=off).mitigations
    custom = RobustAttention(32, num_heads=2, alibi=[0.5, 0]).mitigations["alibi"]
    assert custom.slopes == (0.5, 0.0) and isinstance(custom.slopes[1], float)
    for bad in ((0.5,), (0.5, 0.25, 0.1), (0.5, -0.1), (0.5, math.nan), (0.5, math.inf),
                (0.5, True), (0.5, "1"), "paper", 0.5, 1, {0.5, 0.25}):
        with pytest.raises(ValueError, match="alibi="):
            RobustAttention(32, num_heads=2, alibi=bad)


def test_no_parameters_and_the_baseline_state_dict():
    baseline = RobustAttention(32, num_heads=4)
    module = create("alibi", 32, num_heads=4)
    assert not list(module.mitigations.parameters()) and not list(module.mitigations.buffers())
    assert set(module.state_dict()) == set(baseline.state_dict())
    module.load_state_dict(baseline.state_dict(), strict=True)


def test_saved_value_and_checkpoints_record_the_slopes():
    paper = create("alibi", 32, num_heads=4)
    spelled_out = RobustAttention(32, num_heads=4, alibi=alibi_slopes(4))
    custom = RobustAttention(32, num_heads=4, alibi=(1.0, 0.5, 0.25, 0.0))
    assert paper.saved_options()["alibi"] is True
    assert spelled_out.saved_options()["alibi"] is True
    assert custom.saved_options()["alibi"] == (1.0, 0.5, 0.25, 0.0)
    spelled_out.load_state_dict(paper.state_dict())  # the same slopes, however given
    with pytest.raises(RuntimeError, match="alibi: checkpoint"):
        paper.load_state_dict(custom.state_dict())
    restored = pickle.loads(pickle.dumps(custom))
    assert restored.mitigations["alibi"].slopes == custom.mitigations["alibi"].slopes
    assert copy.deepcopy(paper).mitigations["alibi"].score_mod() == AlibiBias(alibi_slopes(4))


def test_registered_with_its_preset_and_facts():
    assert MITIGATIONS["alibi"] is Alibi and AlibiBias.positional is True
    module = create("alibi", 32, num_heads=4)
    assert not module.mitigations["alibi"].keeps_function(RobustAttention(32, num_heads=4))
    assert not module.mitigations["alibi"].timm_expressible(module)
    assert "the paper's" in repr(module)


# -- the bias ---------------------------------------------------------------------------------

def _bias(problem):
    """The masked logits minus scale q k^T: the bias the kernels add (-inf where blocked)."""
    return attention_logits(problem) - scaled_scores(problem)


@given(heads=st.integers(1, 12), tokens=st.integers(1, 40), seed=ras.seeds)
def test_causal_bias_is_the_papers(heads, tokens, seed):
    """Causal: -m_h (i - j) for j <= i (Press et al. 2022, eq. in section 3), blocked above."""
    generator = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(3, 1, heads, tokens, 4, generator=generator, dtype=torch.float64)
    bias = _bias(AttentionProblem(q, k, v, 0.5, causal=True,
                                  score_mods=(AlibiBias(alibi_slopes(heads)),)))[0]
    i, j = torch.meshgrid(torch.arange(tokens), torch.arange(tokens), indexing="ij")
    slopes = torch.tensor(alibi_slopes(heads), dtype=torch.float64).view(-1, 1, 1)
    below = (j <= i).expand_as(bias)
    torch.testing.assert_close(bias[below], (-slopes * (i - j))[below], atol=1e-12, rtol=0)
    assert (bias[~below] == -math.inf).all()


@given(problem=problems(extra_keys=st.integers(-3, 3), dtype=torch.float64),
       data=st.data())
def test_bias_is_minus_slope_times_distance_aligned_lower_right(problem, data):
    """Non-causal: -m_h |i - j| on every allowed key; with Nq != Nk, query i is at position
    i + Nk - Nq (problem.py's alignment), also with keys prepended (no bias on them)."""
    heads = problem.q.shape[1]
    slopes = tuple(data.draw(st.lists(st.floats(0, 4), min_size=heads, max_size=heads)))
    prepended = data.draw(st.integers(0, min(2, problem.num_keys - 1)))
    problem = problem.with_(score_mods=(AlibiBias(slopes),), prepended_keys=prepended)
    bias = _bias(problem.with_(attn_mask=None, causal=False))
    expected = distance_bias(slopes, problem.num_queries, problem.num_keys - prepended)
    torch.testing.assert_close(bias[..., prepended:], expected.expand_as(bias[..., prepended:]),
                               atol=1e-12, rtol=0)
    assert (bias[..., :prepended] == 0).all()


@pytest.mark.parametrize("causal", [False, True])
def test_sink_keys_are_unbiased_and_each_query_unbiased_on_its_own_key(causal):
    """sink_logit and sink_tokens=2 prepend 3 position-free keys: the score modifier sees token
    positions (query 0's own key at kernel index 3), gives the sinks no bias, and the module
    equals the float64 matrix form."""
    shape = ras.AttentionShape(batch=2, tokens=9, heads=3, head_dim=4)
    module = _module(shape, sink_logit=True, sink_tokens=2, alibi=(2.0, 0.5, 0.125))
    with torch.no_grad():
        for parameter in module.mitigations.parameters():
            parameter.normal_()
    x = torch.randn(2, 9, shape.dim, dtype=torch.float64)
    with torch.no_grad():
        problem = _extended_problem(module, x, causal=causal)
        assert problem.prepended_keys == 3 and problem.num_keys == 12
        bias = _bias(problem)
        assert (bias[..., :3] == 0).all()  # every query, on every sink key
        assert (bias[:, :, 0, 3] == 0).all()  # query 0 on its own key
        tokens = bias[..., 3:]
        expected = distance_bias((2.0, 0.5, 0.125), 9).expand_as(tokens)
        if causal:
            expected = expected.masked_fill(~torch.ones(9, 9, dtype=torch.bool).tril(), -math.inf)
        torch.testing.assert_close(tokens, expected, atol=1e-12, rtol=0)
        torch.testing.assert_close(module(x, is_causal=causal), reference(module, x, None, causal)[0],
                                   atol=1e-12, rtol=1e-12)


def test_per_head_slopes_reach_their_heads_and_zero_slopes_are_the_baseline():
    x = torch.randn(2, 7, 24, dtype=torch.float64)
    zero = RobustAttention(24, num_heads=3, alibi=(0.0, 0.0, 0.0)).double()
    baseline = RobustAttention(24, num_heads=3).double()
    baseline.load_state_dict(zero.state_dict())
    torch.testing.assert_close(zero(x), baseline(x), atol=1e-14, rtol=0)
    problem = AttentionProblem(*torch.zeros(3, 1, 3, 5, 2, dtype=torch.float64), 1.0,
                               score_mods=(AlibiBias((3.0, 0.0, 0.25)),))
    torch.testing.assert_close(_bias(problem)[0, :, 0, 4], torch.tensor([-12.0, 0.0, -1.0],
                                                                         dtype=torch.float64))


OPTIONS = st.sampled_from([
    {"alibi": True}, {"alibi": "custom"}, {"alibi": True, "qk_norm": True},
    {"alibi": True, "softcap": 3.0}, {"softcap": 3.0, "alibi": True},
    {"alibi": True, "sink_logit": True}, {"alibi": True, "sink_tokens": 2, "sink_logit": True},
    {"alibi": True, "sigmoid": True},
])


@given(shape=ras.attention_shapes(), options=OPTIONS, causal=st.booleans(), data=st.data())
def test_equals_the_float64_matrix_form_forward_and_backward(shape, options, causal, data):
    """Every CPU kernel that runs it (auto: chunked; eager), with masks of every kind."""
    if options["alibi"] == "custom":
        slopes = data.draw(st.lists(st.floats(0, 4), min_size=shape.heads, max_size=shape.heads))
        options = {**options, "alibi": tuple(slopes)}
    kernel = data.draw(st.sampled_from(["auto", "eager"]), label="kernel")
    module = _module(shape, kernel=kernel, **options)
    with torch.no_grad():
        for name, parameter in module.mitigations.named_parameters():
            if "sink" in name:
                parameter.normal_()
    attn_mask = float64_mask(data.draw(ras.attention_masks(shape), label="attn_mask"))
    x = torch.randn(shape.batch, shape.tokens, shape.dim, dtype=torch.float64)
    expected = forward_backward(module, lambda x: reference(module, x, attn_mask, causal)[0], x)
    actual = forward_backward(module, lambda x: module(x, attn_mask, causal), x)
    assert_same_forward_and_backward(actual, expected)


def test_option_order_does_not_change_the_function():
    """ALiBi's bias comes after softcap's cap (score_order), whichever option is named first."""
    torch.manual_seed(3)
    first = RobustAttention(32, num_heads=4, softcap=2.0, alibi=True).double()
    second = RobustAttention(32, num_heads=4, alibi=True, softcap=2.0).double()
    second.load_state_dict(first.state_dict())
    assert [type(m) for m in first._score_mods()] == [TanhSoftCap, AlibiBias]
    assert [type(m) for m in second._score_mods()] == [TanhSoftCap, AlibiBias]
    x = torch.randn(2, 30, 32, dtype=torch.float64)
    torch.testing.assert_close(first(x), second(x), atol=0, rtol=0)


@given(shape=ras.attention_shapes(max_tokens=24), seed=ras.seeds)
def test_reversing_the_tokens_reverses_the_output(shape, seed):
    """The symmetric bias depends on |i - j| only: a reflection of the sequence commutes with it
    (not with a one-sided bias such as the authors' m_h j)."""
    module = _module(shape, alibi=True)
    x = torch.randn(shape.batch, shape.tokens, shape.dim, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(module(x.flip(1)), module(x).flip(1), atol=1e-12, rtol=1e-12)


# -- kernels ----------------------------------------------------------------------------------

@given(problem=problems(extra_keys=st.integers(-2, 2)), rows=st.integers(1, 5), data=st.data())
def test_chunked_blocks_equal_eager_forward_and_backward(problem, rows, data):
    """float32, blocks of 1-5 query rows, recomputed in the backward pass, causal prefixes."""
    heads = problem.q.shape[1]
    slopes = tuple(data.draw(st.lists(st.floats(0, 2), min_size=heads, max_size=heads)))
    problem = problem.with_(score_mods=(AlibiBias(slopes),))

    def run(kernel):
        leaves = {name: getattr(problem, name).clone().requires_grad_() for name in "qkv"}
        out = kernel(problem.with_(**leaves))
        out.backward(torch.cos(out.detach()))
        return out, *(leaves[name].grad for name in "qkv")

    expected = run(eager_attention)
    actual = run(lambda p: chunked_attention(p, block_rows=rows, recompute=True))
    for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected, strict=True):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_auto_runs_the_tiled_kernel_on_the_cpu_and_sdpa_is_refused():
    from robust_attn.kernels import select_kernel

    module = create("alibi", 32, num_heads=4)
    x = torch.randn(1, 6, 32)
    assert select_kernel("auto", _extended_problem(module, x), 0.0).name == "tiled"
    module.kernel = "sdpa"
    with pytest.raises(ValueError, match="sdpa"):
        module(x)


@pytest.mark.slow
def test_flex_equals_eager():
    """FlexAttention (forward only, one CPU compile) with both sinks, causal and a bool mask."""
    torch.manual_seed(1)
    module = RobustAttention(64, num_heads=4, alibi=(1.0, 0.25, 0.0625, 0.0), sink_tokens=2,
                             sink_logit=True)
    x = torch.randn(2, 40, 64)
    attn_mask = torch.rand(2, 1, 40, 40) < 0.6
    attn_mask[0, 0, 3] = False  # a query whose own keys are all blocked: it sees only the sinks
    outputs = {}
    with torch.no_grad():
        for kernel in ("eager", "flex"):
            module.kernel = kernel
            outputs[kernel] = module(x, attn_mask=attn_mask, is_causal=True)
    torch.testing.assert_close(outputs["flex"], outputs["eager"], atol=1e-5, rtol=1e-5)


def test_probe_measures_the_biased_weights():
    module = RobustAttention(24, num_heads=3, alibi=(4.0, 1.0, 0.0), probe=True).double()
    x = torch.randn(1, 10, 24, dtype=torch.float64)
    module(x)
    weights = reference(module, x)[1]
    entropy = -(weights * weights.clamp_min(1e-300).log()).sum(-1) / math.log(10)
    torch.testing.assert_close(module.health.entropy.double(), entropy.mean(dim=(0, 2)),
                               atol=1e-5, rtol=1e-5)
    assert module.health.entropy[0] < module.health.entropy[2]  # the steepest head is the most local
