"""CUDA paths checked without a GPU (issue 18): the argument checks inductor and xformers apply, on
fake CUDA tensors (FakeTensorMode: shapes, strides and devices, no data) or reproduced on the CPU;
FlexAttention's compilation and BlockMasks on the CPU."""

import gc
import math
import sys
import types
import warnings
from unittest import mock

import pytest
import torch
import torch.nn.attention.flex_attention as torch_flex
from torch._subclasses.fake_tensor import FakeTensorMode

from robust_attn import RobustAttention
from robust_attn.health import probe
from robust_attn.health.monitor import map_similarity
from robust_attn.health.monitor.maps import AttentionMap
from robust_attn.kernels import KERNELS, _auto_order, flex, select_kernel, xformers
from robust_attn.kernels.eager import eager_attention
from robust_attn.mitigations.softcap import TanhSoftCap
from robust_attn.problem import AttentionProblem


def _fake_cuda_problem(head_dim=64, value_dim=None, tokens=197, dtype=torch.bfloat16, **options):
    q = torch.empty(2, 3, tokens, head_dim, device="cuda", dtype=dtype)
    v = torch.empty(2, 3, tokens, value_dim or head_dim, device="cuda", dtype=dtype)
    return AttentionProblem(q, q, v, head_dim ** -0.5, **options)


def test_flex_refuses_heads_narrower_than_16_on_cuda_and_auto_falls_back():
    """Inductor's CUDA FlexAttention raises NotImplementedError below width 16; auto must not pick it."""
    softcap = (TanhSoftCap(30.0),)
    with FakeTensorMode():
        narrow = _fake_cuda_problem(head_dim=8, score_mods=softcap)
        narrow_values = _fake_cuda_problem(head_dim=16, value_dim=12, score_mods=softcap)
        wide = _fake_cuda_problem(head_dim=16, score_mods=softcap)
        for problem in (narrow, narrow_values):
            assert "at least 16" in KERNELS["flex"].unsupported(problem, 0.0)
            assert select_kernel("auto", problem, 0.0).name == "tiled"
        assert select_kernel("auto", wide, 0.0).name == "flex"


def test_auto_never_orders_xformers_and_forcing_it_works_where_installed():
    """xformers runs only when chosen (SDPA takes every problem it takes, with the same kernel)."""
    with FakeTensorMode(), mock.patch("importlib.util.find_spec", return_value=object()):
        for options in (dict(), dict(causal=True), dict(score_mods=(TanhSoftCap(5.0),))):
            problem = _fake_cuda_problem(**options)
            assert xformers.XFORMERS not in _auto_order(problem)
            assert select_kernel("auto", problem, 0.0).name in ("sdpa", "flex")
        assert select_kernel("xformers", _fake_cuda_problem(), 0.0).name == "xformers"
        float64 = _fake_cuda_problem(dtype=torch.float64)
        assert "float64" in xformers.XFORMERS.unsupported(float64, 0.0)


# xformers 0.0.35's argument checks on sm80+, reproduced (xformers/ops/fmha/common.py
# check_lastdim_alignment_stride1, cutlass.py _minimum_gemm_alignment and _check_bias_alignment),
# with flash's and cutlass_blackwell's one width for q and v (SUPPORTS_DIFFERENT_VALUE_EMBED).
def _xformers_reasons(q, k, v, bias):
    alignment = 128 // torch.finfo(q.dtype).bits
    reasons = [] if q.shape[-1] == v.shape[-1] else ["query.shape[-1] != value.shape[-1] (flash)"]
    for name, t in (("query", q), ("key", k), ("value", v)):
        if t.shape[-1] % alignment or t.stride(-2) % alignment or t.stride(-1) > 1:
            reasons.append(f"{name} width/strides {tuple(t.shape)} {t.stride()}")
    if isinstance(bias, torch.Tensor):
        if any(bias.stride(d) % alignment for d in range(bias.dim() - 1)) or bias.stride(-1) > 1:
            reasons.append(f"attn_bias strides {bias.stride()}")
    return reasons


class _BottomRightCausal:
    """xformers' LowerTriangularFromBottomRightMask, as the fake applies it."""


def _fake_memory_efficient_attention(q, k, v, attn_bias=None, p=0.0, scale=None):
    """memory_efficient_attention on (B, N, H, D) with xformers' argument checks: a check that fails
    raises as xformers does ("No operator found")."""
    reasons = _xformers_reasons(q, k, v, attn_bias)
    if reasons:
        raise NotImplementedError(f"No operator found for memory_efficient_attention: {reasons}")
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    logits = scale * q @ k.transpose(-2, -1)
    if isinstance(attn_bias, _BottomRightCausal):
        keys, queries = k.shape[-2], q.shape[-2]
        allowed = torch.ones(queries, keys, dtype=torch.bool).tril(keys - queries)
        logits = logits.masked_fill(~allowed, -math.inf)
    elif attn_bias is not None:
        logits = logits + attn_bias
    from robust_attn.problem import SOFTMAX

    return (SOFTMAX(logits) @ v).transpose(1, 2)


@pytest.fixture
def fake_xformers():
    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = _fake_memory_efficient_attention
    ops.fmha = types.SimpleNamespace(attn_bias=types.SimpleNamespace(
        LowerTriangularFromBottomRightMask=_BottomRightCausal))
    package = types.ModuleType("xformers")
    package.ops = ops
    with mock.patch.dict(sys.modules, {"xformers": package, "xformers.ops": ops}):
        yield


@pytest.mark.parametrize("dtype, multiple", [(torch.float32, 4), (torch.bfloat16, 8), (torch.float16, 8)])
def test_aligned_bias_strides(dtype, multiple):
    for shape in ((2, 1, 197, 197), (1, 4, 1, 198), (3, 2, 5, 8)):
        bias = xformers.aligned_bias(shape, dtype, torch.device("cpu"))
        assert bias.shape == shape and bias.stride(-1) == 1
        assert all(bias.stride(d) % multiple == 0 for d in range(3)), bias.stride()


def _xformers_problem(tokens, head_dim, extra_keys=0, mask=None, causal=False, dtype=torch.float32):
    generator = torch.Generator().manual_seed(tokens + head_dim)
    q = torch.randn(2, 3, tokens, head_dim, generator=generator, dtype=dtype)
    k = torch.randn(2, 3, tokens + extra_keys, head_dim, generator=generator, dtype=dtype)
    v = torch.randn(2, 3, tokens + extra_keys, 64, generator=generator, dtype=dtype)
    if mask is not None:
        allowed = torch.rand(2, 1, tokens, tokens + extra_keys, generator=generator) < 0.7
        allowed[0, 0, 5] = False  # a query with no allowed key
        mask = allowed if mask == "bool" else \
            torch.randn(allowed.shape, generator=generator, dtype=dtype).masked_fill(~allowed, -math.inf)
    return AttentionProblem(q, k, v, head_dim ** -0.5, attn_mask=mask, causal=causal)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_xformers_inputs_pass_its_alignment_checks_at_odd_lengths_and_with_sinks(fake_xformers, dtype):
    """N = 197 with a mask, and a sink logit's shape (q, k 65 wide, N + 1 keys): the kernel pads
    and aligns so that xformers' checks pass, and computes what eager computes."""
    cases = [dict(tokens=197, head_dim=64, mask="bool"), dict(tokens=197, head_dim=64, mask="float"),
             dict(tokens=197, head_dim=64, mask="bool", causal=True),
             dict(tokens=196, head_dim=65, extra_keys=1, causal=True),
             dict(tokens=196, head_dim=65, extra_keys=1, mask="float")]
    for case in cases:
        problem = _xformers_problem(dtype=dtype, **case)
        q, k, v = (t.transpose(1, 2) for t in (problem.q, problem.k, problem.v))
        if case["head_dim"] == 65 or case.get("mask"):  # what the kernel used to pass: rejected
            naive_bias = None if problem.attn_mask is None else \
                torch.zeros(problem.attn_mask.shape, dtype=dtype)
            assert _xformers_reasons(q, k, v, naive_bias)
        atol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(xformers.xformers_attention(problem), eager_attention(problem),
                                   atol=atol, rtol=atol, msg=lambda m, c=case: f"{c}: {m}")


def test_spectral_gap_stays_on_the_device_without_a_host_sync():
    """Meta tensors have no values: any host sync (a Python branch on a tensor) would raise."""
    weights = torch.rand(2, 3, 5, 5, device="meta")
    gap = probe._spectral_gap(weights)
    assert gap.device.type == "meta" and gap.dtype == torch.float32 and gap.shape == (3,)
    assert probe._spectral_gap(torch.full((2, 3, 5, 5), math.nan)).isnan().all()
    finite = torch.softmax(torch.randn(2, 3, 5, 5), dim=-1)
    assert torch.isfinite(probe._spectral_gap(finite)).all()


def test_map_similarity_nan_on_the_maps_device_and_dtype():
    def attention_map(queries, dtype):
        weights = torch.rand(1, 2, queries, 6, device="meta", dtype=dtype)
        return AttentionMap(weights, torch.ones(weights.shape, dtype=torch.bool, device="meta"))

    for dtype in (torch.float32, torch.float64):
        similarity = map_similarity(attention_map(4, dtype), attention_map(5, dtype))
        assert similarity.device.type == "meta" and similarity.dtype == dtype


def _flex_problem(batch, tokens, heads=2, head_dim=16, **options):
    q, k, v = torch.randn(3, batch, heads, tokens, head_dim)
    return AttentionProblem(q, k, v, head_dim ** -0.5, **options)


@pytest.mark.slow
def test_flex_crosses_the_recompile_limit_without_falling_back():
    """Ten batch sizes and two lengths (torch's default recompile_limit is 8) on the dynamic-shape
    compilation flex uses off the CPU: it compiles a few times (static, then symbolic sizes) and
    never runs its unfused implementation, which materialises the attention matrix (torch warns
    through _warn_once just before it). Includes the small-N case of issue 18 (B = 2, H = 2,
    N = 24, D = 16, softcap 30) against eager."""
    softcap = (TanhSoftCap(30.0),)
    unfused = mock.Mock(wraps=torch_flex._warn_once)
    with mock.patch.object(torch_flex, "_warn_once", unfused), warnings.catch_warnings(), \
            mock.patch.object(flex, "RECOMPILE_LIMIT", 8), torch.no_grad():
        warnings.simplefilter("error", flex.FlexRecompileWarning)
        for batch, tokens in [(2, 24), (3, 24), *((b, 24) for b in range(4, 12)), (5, 40)]:
            problem = _flex_problem(batch, tokens, causal=True, score_mods=softcap)
            torch.testing.assert_close(flex.flex_attention(problem, dynamic=True),
                                       eager_attention(problem), atol=1e-5, rtol=1e-5)
    assert not unfused.called, unfused.call_args_list


@pytest.mark.slow
def test_flex_at_the_recompile_limit_warns_and_runs_the_chunked_kernel():
    """Past the limit (here 1 compiled variant, then float64), dynamo raises instead of running
    flex_attention unfused; flex warns with FlexRecompileWarning and the chunked kernel answers.
    The limit is flex's own (torch's default, 8, is the same for every compiled function)."""
    unfused = mock.Mock(wraps=torch_flex._warn_once)
    with mock.patch.object(torch_flex, "_warn_once", unfused), \
            mock.patch.object(flex, "RECOMPILE_LIMIT", 1), torch.no_grad():
        problem = _flex_problem(2, 24, causal=True)
        flex.flex_attention(problem)  # at most the one variant allowed
        problem = problem.with_(q=problem.q.double(), k=problem.k.double(), v=problem.v.double())
        with pytest.warns(flex.FlexRecompileWarning, match="chunked"):
            out = flex.flex_attention(problem)
    torch.testing.assert_close(out, eager_attention(problem))
    assert not unfused.called, unfused.call_args_list


@pytest.mark.slow
def test_flex_module_at_small_n_equals_eager():
    """Issue 18, finding 11: RobustAttention(kernel='flex', softcap=30) at N = 24 against eager."""
    module = RobustAttention(32, num_heads=2, softcap=30.0, kernel="flex").eval()
    x = torch.randn(2, 24, 32)
    with torch.no_grad():
        fused = module(x)
        module.kernel = "eager"
        torch.testing.assert_close(fused, module(x), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_dense_mask_block_mask_is_built_at_its_broadcast_sizes_once_per_mask():
    builds = mock.Mock(wraps=torch_flex.create_block_mask)
    q, k, v = torch.randn(3, 2, 4, 40, 16)
    mask = torch.rand(2, 1, 1, 40) < 0.7  # key padding: broadcast over heads and queries
    mask[0, ..., :] = False  # item 0: no key allowed, every row empty
    with mock.patch.object(torch_flex, "create_block_mask", builds), torch.no_grad():
        for _ in range(3):  # three layers or steps, each with its own view of the mask
            problem = AttentionProblem(q, k, v, 0.25, attn_mask=mask[()], causal=True)
            torch.testing.assert_close(flex.FLEX.run(problem, 0.0), eager_attention(problem),
                                       atol=1e-5, rtol=1e-5)
        assert builds.call_count == 1 and builds.call_args.args[1:3] == (2, 1)
        mask[1, 0, 0, 3] = ~mask[1, 0, 0, 3]  # changed in place: rebuilt
        problem = AttentionProblem(q, k, v, 0.25, attn_mask=mask, causal=True)
        torch.testing.assert_close(flex.FLEX.run(problem, 0.0), eager_attention(problem),
                                   atol=1e-5, rtol=1e-5)
        assert builds.call_count == 2
    key = id(mask)
    assert key in flex._dense_block_masks
    del mask, problem
    gc.collect()
    assert key not in flex._dense_block_masks  # the entry leaves with its mask


@pytest.mark.slow
def test_structural_block_mask_is_not_traced_into_an_outer_compiled_graph():
    """Under torch.compile(fullgraph=True) the causal BlockMask comes from the cache through an
    opaque op: the graph evaluates no (Nq, Nk) mask, and nothing warns (dynamo warns when it
    ignores an lru_cache)."""
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    module = RobustAttention(64, num_heads=4, kernel="flex").eval()
    compiled = torch.compile(module, backend=backend, fullgraph=True)
    tokens = 40
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            x = torch.randn(2, tokens, 64)
            out = compiled(x, is_causal=True)
            module.kernel = "eager"
            torch.testing.assert_close(out, module(x, is_causal=True), atol=1e-5, rtol=1e-5)
            module.kernel = "flex"
    assert len(graphs) == 1
    nodes = list(graphs[0].graph.nodes)
    assert any("structural_kv_blocks" in str(node.target) for node in nodes)
    for node in nodes:
        value = node.meta.get("example_value")
        if isinstance(value, torch.Tensor) and value.dtype == torch.bool:
            assert value.numel() < tokens * tokens, node.format_node()
