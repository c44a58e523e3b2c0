"""Every kernel that runs here equals the eager reference; auto picks a kernel that can run."""

import dataclasses
from unittest import mock

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from robust_attn import RobustAttention
from robust_attn.kernels import KERNELS, select_kernel
from robust_attn.kernels.eager import eager_attention
from robust_attn.kernels.sdpa import _fused_widths
from robust_attn.mitigations.softcap import TanhSoftCap
from robust_attn.problem import AttentionProblem
from robust_attn.testing import strategies as ras

from .conftest import requires_cuda

PREPENDED_KEYS = st.integers(0, 2)
SAME_WIDTH = st.just(0)


@st.composite
def problems(draw, max_tokens=33, extra_keys=PREPENDED_KEYS, value_widths=SAME_WIDTH,
             dtype=torch.float32):
    """Problems with masks of every kind, causal or not, and ``extra_keys`` prepended keys
    (Nk = Nq + extra, at least 1; negative: fewer keys than queries); v is ``value_widths``
    channels wider than q and k (negative: narrower, at least 1)."""
    shape = draw(ras.attention_shapes(max_tokens=max_tokens))
    num_keys = max(1, shape.tokens + draw(extra_keys))
    value_width = max(1, shape.head_dim + draw(value_widths))
    generator = torch.Generator().manual_seed(draw(ras.seeds))

    def heads(n, width=shape.head_dim):
        return torch.randn(shape.batch, shape.heads, n, width, generator=generator, dtype=dtype)

    mask = draw(ras.attention_masks(shape, num_keys=num_keys))
    return AttentionProblem(
        heads(shape.tokens), heads(num_keys), heads(num_keys, value_width),
        scale=shape.head_dim ** -0.5, attn_mask=mask.to(dtype) if mask is not None and
        mask.is_floating_point() else mask, causal=draw(st.booleans()),
    )


def _with_grad(problem):
    return problem.with_(**{name: getattr(problem, name).clone().requires_grad_()
                            for name in ("q", "k", "v")})


def _forward_backward(kernel, problem):
    problem = _with_grad(problem)
    out = kernel(problem, 0.0)
    out.backward(torch.cos(out.detach()))
    return out, problem.q.grad, problem.k.grad, problem.v.grad


@given(problems(value_widths=st.integers(-2, 2)))
def test_sdpa_equals_eager_forward_and_backward(problem):
    """Also with prepended keys under causal attention (zero query rows in front) and v of
    another width than q and k (zero channels)."""
    expected = _forward_backward(eager_attention, problem)
    actual = _forward_backward(KERNELS["sdpa"].run, problem)
    for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected, strict=True):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@given(problems())
def test_blocked_rows_are_zero_and_gradients_finite(problem):
    out, *grads = _forward_backward(eager_attention, problem)
    empty = ~(eager_logits_allowed(problem)).any(dim=-1)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    assert (out.masked_select(empty.unsqueeze(-1)) == 0).all()


def eager_logits_allowed(problem):
    from robust_attn.kernels.eager import attention_logits

    return attention_logits(problem) > -torch.inf


FLEX_CASES = {
    "causal": dict(causal=True),
    "softcap and float mask with an empty row": dict(score_mods=(TanhSoftCap(2.0),), mask="float"),
    "prepended keys, causal, bool mask": dict(causal=True, extra_keys=2, mask="bool"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", FLEX_CASES)
def test_flex_equals_eager_forward(case):
    options = dict(FLEX_CASES[case])
    batch, heads, tokens, head_dim = 2, 3, 40, 16
    num_keys = tokens + options.pop("extra_keys", 0)
    q = torch.randn(batch, heads, tokens, head_dim)
    k, v = torch.randn(2, batch, heads, num_keys, head_dim)
    mask_kind = options.pop("mask", None)
    mask = None
    if mask_kind:
        allowed = torch.rand(batch, 1, tokens, num_keys) < 0.6
        allowed[0, 0, 3] = False  # a query with no allowed key
        mask = allowed if mask_kind == "bool" else \
            torch.randn(allowed.shape).masked_fill(~allowed, -torch.inf)
    problem = AttentionProblem(q, k, v, head_dim ** -0.5, attn_mask=mask, **options)
    with torch.no_grad():
        torch.testing.assert_close(KERNELS["flex"].run(problem, 0.0), eager_attention(problem),
                                   atol=1e-5, rtol=1e-5)


def _problem(requires_grad=False, **options):
    q = torch.randn(1, 2, 5, 8, requires_grad=requires_grad)
    return AttentionProblem(q, q, q, 8 ** -0.5, **options)


def test_auto_prefers_sdpa_then_tiled_then_chunked_on_cpu():
    """Never flex on the CPU (forward only, a compile per length), never eager (materialises);
    chunked where tiled refuses (dropout)."""
    softcap = (TanhSoftCap(5.0),)
    assert select_kernel("auto", _problem(), 0.0).name == "sdpa"
    assert select_kernel("auto", _problem(requires_grad=True), 0.1).name == "sdpa"
    for requires_grad, dropout_p in ((True, 0.0), (False, 0.0), (False, 0.1)):
        problem = _problem(requires_grad=requires_grad, score_mods=softcap)
        with torch.set_grad_enabled(requires_grad):
            expected = "chunked" if dropout_p > 0.0 else "tiled"
            assert select_kernel("auto", problem, dropout_p).name == expected
    float64 = _problem(score_mods=softcap)
    float64 = float64.with_(q=float64.q.double(), k=float64.k.double(), v=float64.v.double())
    assert select_kernel("auto", float64, 0.0).name == "tiled"


def test_eager_runs_only_when_chosen():
    problem = _problem(requires_grad=True, score_mods=(TanhSoftCap(5.0),))
    assert select_kernel("eager", problem, 0.0).name == "eager"
    module = RobustAttention(32, num_heads=4, softcap=5.0)
    module.fused_attn = False
    run = mock.Mock(wraps=eager_attention)
    with mock.patch.dict(KERNELS, eager=dataclasses.replace(KERNELS["eager"], run=run)):
        module(torch.randn(1, 5, 32))
    run.assert_called_once()


@pytest.mark.parametrize("kernel, needs", [("flex", "forward only"), ("xformers", "xformers"),
                                           ("sdpa", "score modifiers")])
def test_forcing_a_kernel_that_cannot_run_names_it(kernel, needs):
    problem = _problem(requires_grad=True, score_mods=(TanhSoftCap(5.0),))
    with pytest.raises(ValueError, match=f"kernel='{kernel}'.*{needs}"):
        select_kernel(kernel, problem, 0.0)


def test_unfused_module_uses_eager_and_matches_fused():
    module = RobustAttention(32, num_heads=4)
    x = torch.randn(2, 9, 32)
    fused = module(x, is_causal=True)
    module.fused_attn = False
    torch.testing.assert_close(module(x, is_causal=True), fused, atol=1e-6, rtol=1e-6)


def cuda_masks(batch, tokens, num_keys, generator):
    """A bool mask (rand < 0.7) and a float one, each with all-False rows: one row of item 0, and
    every row of item 1's first three queries (rand < 0.7 over 100+ keys never blocks a row)."""
    allowed = torch.rand(batch, 1, tokens, num_keys, generator=generator) < 0.7
    allowed[0, 0, tokens // 2] = False
    allowed[-1, 0, :3] = False
    bias = torch.randn(allowed.shape, generator=generator).masked_fill(~allowed, -torch.inf)
    return allowed, bias


def check_kernel_with_empty_rows(kernel, dtype, tokens, device):
    """``kernel`` in ``dtype`` against eager in float32, forward and backward, with and without
    masks (bool and float, with all-False rows) and causal; empty rows give zeros and every
    gradient is finite."""
    generator = torch.Generator().manual_seed(tokens)
    q, k, v = torch.randn(3, 2, 4, tokens, 64, generator=generator)
    allowed, bias = cuda_masks(2, tokens, tokens, generator)
    tolerance = 2e-3 if dtype == torch.float32 else 3e-2
    for options in (dict(), dict(causal=True), dict(attn_mask=allowed), dict(attn_mask=bias),
                    dict(attn_mask=allowed, causal=True)):
        mask = options.get("attn_mask")
        if mask is not None:
            options["attn_mask"] = mask.to(device, dtype if mask.is_floating_point() else None)
        problem = AttentionProblem(*(t.to(device, dtype) for t in (q, k, v)), 64 ** -0.5, **options)
        actual = _forward_backward(KERNELS[kernel].run, problem)
        reference = problem.with_(q=problem.q.float(), k=problem.k.float(), v=problem.v.float())
        if mask is not None and mask.is_floating_point():
            reference = reference.with_(attn_mask=reference.attn_mask.float())
        expected = _forward_backward(eager_attention, reference)
        for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected, strict=True):
            assert torch.isfinite(a).all(), f"{kernel} {tuple(options)}: {name} not finite"
            torch.testing.assert_close(a.float(), e, atol=tolerance, rtol=tolerance,
                                       msg=lambda m, n=name, o=tuple(options): f"{n} {o}: {m}")
        if mask is not None:
            empty = ~eager_logits_allowed(problem).any(dim=-1)
            assert empty.any() and (actual[0].masked_select(empty.unsqueeze(-1)) == 0).all()


def test_empty_rows_check_on_cpu_sdpa():
    """The CUDA test's check, run here on SDPA's CPU kernels (so it is known to work)."""
    check_kernel_with_empty_rows("sdpa", torch.float32, 24, "cpu")


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["sdpa", "flex", "xformers"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [24, 197])
def test_cuda_kernels_equal_eager_forward_and_backward(kernel, dtype, tokens):
    """Empty rows give zeros and finite gradients on every CUDA kernel (SDPA's flash,
    memory-efficient and cuDNN backends, FlexAttention, xformers)."""
    pytest.importorskip("xformers") if kernel == "xformers" else None
    check_kernel_with_empty_rows(kernel, dtype, tokens, "cuda")


def test_weights_without_blocked_keys_take_the_fused_softmax_and_equal_the_guarded_one():
    """eager's attention_weights skips Softmax's empty-row guard when nothing can block a key;
    both give the same weights, and a mask brings the guard back (an empty row gives zeros)."""
    from robust_attn.kernels.eager import attention_logits, attention_weights
    from robust_attn.problem import SOFTMAX

    q, k, v = (torch.randn(2, 3, 7, 5, dtype=torch.float64) * 4 for _ in range(3))
    problem = AttentionProblem(q, k, v, 5 ** -0.5, score_mods=(TanhSoftCap(3.0),))
    assert not problem.may_block_keys
    torch.testing.assert_close(attention_weights(problem), SOFTMAX(attention_logits(problem)))
    mask = torch.ones(7, 7, dtype=torch.bool)
    mask[2] = False
    masked = problem.with_(attn_mask=mask)
    assert masked.may_block_keys
    assert attention_weights(masked)[:, :, 2].abs().sum() == 0


def test_sdpa_pads_only_the_narrower_tensors():
    """A sink logit's q and k are one channel wider than v: v alone gets a zero channel; q and k
    go to SDPA as they are (F.pad would copy them for nothing)."""
    q, k = torch.randn(2, 3, 5, 9), torch.randn(2, 3, 7, 9)
    v = torch.randn(2, 3, 7, 8)
    padded_q, padded_k, padded_v = _fused_widths(q, k, v)
    assert padded_q is q and padded_k is k
    torch.testing.assert_close(padded_v, torch.cat([v, v.new_zeros(2, 3, 7, 1)], dim=-1),
                               rtol=0, atol=0)
