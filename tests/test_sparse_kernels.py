"""Every sparse path equals the dense masked eager reference, forward and gradients; auto picks a
structured kernel where one applies and warns, naming the cost, where none does."""

import dataclasses
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from robust_attn.kernels import KERNELS, SparseFallbackWarning, select_kernel
from robust_attn.kernels import flex as flex_kernel
from robust_attn.kernels.block_sparse import (
    _candidate_blocks,
    _global_keys,
    _is_global,
    _keys_used,
    block_sparse_attention,
    block_sparse_plan,
)
from robust_attn.kernels.eager import attention_logits, eager_attention
from robust_attn.mitigations.softcap import TanhSoftCap
from robust_attn.problem import AttentionProblem
from robust_attn.sparse import (
    AxialColumns,
    AxialRows,
    BlockLocal,
    Causal,
    Fixed,
    GlobalTokens,
    GridWindow,
    Pattern,
    RandomBlocks,
    SlidingWindow,
    Strided,
)
from robust_attn.sparse.pattern import structural_mask_mod
from robust_attn.testing import strategies as ras

from .conftest import requires_cuda

sizes = st.integers(1, 20)


def maybe_causal(patterns):
    """The pattern, or the pattern & Causal()."""
    return st.tuples(patterns, st.booleans()).map(lambda p: p[0] & Causal() if p[1] else p[0])


@st.composite
def grid_patterns(draw, num_tokens):
    """A 2D pattern whose grid and prefix cover exactly ``num_tokens`` tokens."""
    prefix = draw(st.integers(0, min(3, num_tokens - 1)))
    cells = num_tokens - prefix
    height = draw(st.sampled_from([d for d in range(1, cells + 1) if cells % d == 0]))
    grid = (height, cells // height)
    return draw(st.sampled_from([GridWindow(grid, draw(st.integers(1, 3)), prefix=prefix),
                                 AxialRows(grid, prefix=prefix),
                                 AxialColumns(grid, prefix=prefix)]))


def any_patterns(num_tokens):
    """Every kind of pattern, and up to three of them combined with & and |."""
    leaves = st.one_of(
        st.builds(SlidingWindow, sizes, st.booleans()), st.builds(Strided, st.integers(1, 9)),
        st.builds(BlockLocal, sizes), st.builds(GlobalTokens, st.integers(1, 4)),
        st.integers(1, 12).flatmap(lambda b: st.builds(Fixed, st.just(b), st.integers(1, b))),
        st.builds(RandomBlocks, st.integers(1, 8), st.integers(1, 3), ras.seeds),
        st.just(Causal()), grid_patterns(num_tokens),
    )
    return st.recursive(leaves, lambda parts: st.tuples(parts, parts, st.booleans()).map(
        lambda p: p[0] | p[1] if p[2] else p[0] & p[1]), max_leaves=3)


@st.composite
def sparse_problems(draw, patterns, max_tokens=48, prepended=0, masks=False):
    """Problems with a pattern (drawn for the length), causal or not, ``prepended`` extra keys."""
    shape = draw(ras.attention_shapes(max_tokens=max_tokens))
    num_keys = shape.tokens + draw(st.integers(0, prepended))
    generator = torch.Generator().manual_seed(draw(ras.seeds))

    def heads(n):
        return torch.randn(shape.batch, shape.heads, n, shape.head_dim, generator=generator)

    return AttentionProblem(
        heads(shape.tokens), heads(num_keys), heads(num_keys), scale=shape.head_dim ** -0.5,
        attn_mask=draw(ras.attention_masks(shape, num_keys=num_keys)) if masks else None,
        causal=draw(st.booleans()), pattern=draw(patterns(shape.tokens)),
    )


def forward_backward(run, problem):
    problem = problem.with_(**{name: getattr(problem, name).clone().requires_grad_()
                               for name in ("q", "k", "v")})
    out = run(problem, 0.0)
    out.backward(torch.cos(out.detach()))
    return out, problem.q.grad, problem.k.grad, problem.v.grad


def assert_equals_eager(run, problem):
    expected = forward_backward(eager_attention, problem)
    actual = forward_backward(run, problem)
    for name, a, e in zip(("out", "dq", "dk", "dv"), actual, expected, strict=True):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@given(sparse_problems(lambda n: maybe_causal(st.builds(BlockLocal, sizes))))
def test_block_diagonal_equals_eager(problem):
    assert KERNELS["block_diagonal"].unsupported(problem, 0.0) is None
    assert_equals_eager(KERNELS["block_diagonal"].run, problem)


@given(sparse_problems(lambda n: maybe_causal(st.builds(Strided, sizes))))
def test_strided_equals_eager(problem):
    assert KERNELS["strided"].unsupported(problem, 0.0) is None
    assert_equals_eager(KERNELS["strided"].run, problem)


@given(sparse_problems(any_patterns, prepended=2), st.sampled_from([2, 4, 8, 16]))
def test_block_sparse_equals_eager(problem, block):
    assert_equals_eager(lambda p, d: block_sparse_attention(p, d, block=block), problem)


@given(st.integers(1, 48).flatmap(lambda n: st.tuples(st.just(n), any_patterns(n))))
def test_key_ranges_hold_every_allowed_key_but_the_global_ones(case):
    """Pattern.key_ranges bounds what the block-sparse kernel evaluates: a range that missed an
    allowed key would drop it from the layout."""
    num_tokens, pattern = case
    rows = torch.arange(num_tokens)
    ranges = pattern.key_ranges(num_tokens, rows)
    if ranges is None:
        return
    keys = rows[None, :, None]
    inside = ((keys >= ranges[:, None, :, 0]) & (keys < ranges[:, None, :, 1])).any(dim=2)
    is_global = torch.zeros(num_tokens, dtype=torch.bool)
    is_global[list(pattern.global_keys(num_tokens))] = True
    assert not (pattern.dense(num_tokens) & ~is_global & ~inside).any()


@given(sparse_problems(any_patterns, prepended=2), st.sampled_from([2, 4, 8, 16]),
       st.sampled_from([1, 2]))
def test_keys_used_from_the_key_ranges_equal_those_from_every_pair(problem, key_block, ratio):
    """The keys each query block uses, and which queries attend a non-global key, as evaluating
    the pattern on all Nq x Nk pairs gives them (query blocks of ``ratio`` key blocks)."""
    pattern, causal, block = problem.pattern, problem.causal, key_block * ratio
    num_queries, num_keys = problem.num_queries, problem.num_keys
    mask_mod = structural_mask_mod(pattern, causal, num_queries, num_keys)
    is_global = _is_global(_global_keys(pattern, num_queries, num_keys), num_keys, key_block,
                           torch.device("cpu"))
    candidates = _candidate_blocks(pattern, causal, num_queries, num_keys, block, key_block,
                                   torch.device("cpu"))
    used, attends = _keys_used(mask_mod, candidates, num_queries, num_keys, is_global, block,
                               key_block)

    query_blocks, key_blocks = candidates.shape
    rows = torch.arange(query_blocks * block).clamp_max(num_queries - 1)
    keys = torch.arange(key_blocks * key_block)
    allowed = (mask_mod(torch.tensor(0), torch.tensor(0), rows[:, None], keys.clamp_max(num_keys - 1)[None])
               & ~is_global & (keys < num_keys))
    assert torch.equal(used, allowed.view(query_blocks, block, -1).any(dim=1))
    assert torch.equal(attends, allowed.any(dim=1)[:num_queries])


@given(sparse_problems(any_patterns, prepended=2, masks=True))
def test_sdpa_with_the_pattern_as_a_dense_mask_equals_eager(problem):
    assert_equals_eager(KERNELS["sdpa"].run, problem)


def _empty_rows_problem():
    q, k, v = torch.randn(3, 2, 3, 12, 8)
    # Queries 4.. may only attend keys 0 and 1 in their own block of 4: none.
    return AttentionProblem(q, k, v, 8 ** -0.5, pattern=GlobalTokens(2) & BlockLocal(4))


@pytest.mark.parametrize("run", [eager_attention, KERNELS["sdpa"].run,
                                 lambda p, d: block_sparse_attention(p, d, block=4)],
                         ids=["eager", "sdpa", "block_sparse"])
def test_query_with_no_key_gives_zeros_and_finite_gradients(run):
    problem = _empty_rows_problem()
    empty = ~(attention_logits(problem) > -torch.inf).any(dim=-1)
    assert empty[0, 0].tolist() == [False] * 4 + [True] * 8
    out, *grads = forward_backward(run, problem)
    assert (out[empty] == 0).all() and torch.isfinite(out).all()
    assert all(torch.isfinite(g).all() for g in grads)
    assert_equals_eager(run, problem)


def _problem(pattern, tokens=256, requires_grad=True, **options):
    q = torch.randn(1, 2, tokens, 16, requires_grad=requires_grad)
    return AttentionProblem(q, q, q, 0.25, pattern=pattern, **options)


@pytest.mark.parametrize("pattern, kernel", [
    (BlockLocal(32), "block_diagonal"),
    (BlockLocal(32) & Causal(), "block_diagonal"),
    (Strided(8), "strided"),
    (SlidingWindow(16, causal=True), "block_sparse"),
    (SlidingWindow(16) | GlobalTokens(2) | RandomBlocks(16, 2), "block_sparse"),
    (Fixed(32, 4) & Causal(), "block_sparse"),
    (GridWindow((16, 16), 2), "block_sparse"),
    (AxialRows((15, 17), prefix=1), "block_sparse"),
])
def test_auto_picks_the_structured_kernel_on_the_cpu(pattern, kernel):
    with warnings.catch_warnings():
        warnings.simplefilter("error", SparseFallbackWarning)
        assert select_kernel("auto", _problem(pattern), 0.0).name == kernel
        assert select_kernel("auto", _problem(pattern), 0.1).name == kernel  # dropout too


def test_auto_without_a_pattern_is_unchanged():
    assert select_kernel("auto", _problem(None), 0.0).name == "sdpa"


@pytest.mark.parametrize("requires_grad, options, kernel, cost", [
    (True, {}, "sdpa", "every score is computed"),
    (False, {}, "sdpa", "every score is computed"),
    (False, dict(score_mods=(TanhSoftCap(5.0),)), "tiled", "tile by tile"),
    (True, dict(score_mods=(TanhSoftCap(5.0),)), "tiled", "tile by tile"),
])
def test_a_pattern_no_structured_kernel_runs_falls_back_with_a_warning(requires_grad, options,
                                                                        kernel, cost):
    problem = _problem(AxialColumns((16, 16)), requires_grad=requires_grad, **options)
    with pytest.warns(SparseFallbackWarning, match=f"'{kernel}': .*{cost}.*block_sparse: "):
        assert select_kernel("auto", problem, 0.0).name == kernel


@pytest.mark.parametrize("options, reason", [
    (dict(attn_mask=torch.ones(256, 256, dtype=torch.bool)), "no attn_mask"),
    (dict(score_mods=(TanhSoftCap(5.0),)), "no score modifiers"),
    (dict(normalizer=torch.sigmoid), "softmax attention only"),
])
def test_structured_kernels_refuse_what_they_cannot_honour(options, reason):
    problem = _problem(BlockLocal(32), **options)
    for name in ("block_diagonal", "strided", "block_sparse"):
        with pytest.raises(ValueError, match=f"kernel='{name}'.*{reason}"):
            select_kernel(name, problem, 0.0)


@pytest.mark.parametrize("kernel, pattern, needs", [
    ("block_diagonal", Strided(4), "BlockLocal"),
    ("strided", BlockLocal(4), "Strided"),
    ("xformers", BlockLocal(4), "xformers"),
    ("block_diagonal", None, "no sparsity pattern"),
])
def test_forcing_a_kernel_that_cannot_run_the_pattern_names_it(kernel, pattern, needs):
    with pytest.raises(ValueError, match=f"kernel='{kernel}'.*{needs}"):
        select_kernel(kernel, _problem(pattern), 0.0)


def test_structured_kernels_need_tokens_as_keys():
    q = torch.randn(1, 1, 8, 4)
    problem = AttentionProblem(q, torch.randn(1, 1, 9, 4), torch.randn(1, 1, 9, 4), 0.5,
                               pattern=BlockLocal(2))
    assert "Nk == Nq" in KERNELS["block_diagonal"].unsupported(problem, 0.0)
    assert_equals_eager(lambda p, d: block_sparse_attention(p, d, block=2), problem)


def test_block_sparse_plan_is_cached_per_length_and_skips_blocked_work():
    pattern = SlidingWindow(8) | GlobalTokens(2)
    cpu = torch.device("cpu")
    plan = block_sparse_plan(pattern, False, 512, 512, cpu, 16)
    assert block_sparse_plan(pattern, False, 512, 512, cpu, 16) is plan
    longer = block_sparse_plan(pattern, False, 600, 600, cpu, 16)
    assert longer is not plan and longer.order.shape == (600,)
    # Every query block attends the 2 global keys and its band, keys b * 16 - 7 .. b * 16 + 22
    # (the window's 7 keys on each side of the block); the 2 global queries attend all 512 keys
    # besides: 6.6% of the dense scores.
    assert plan.share == (32 * 16 * (2 + 30) + 2 * 512) / 512**2
    # The layout is Python ints, so torch.compile and torch.export take it as a constant.
    layout = plan.layout
    assert layout.global_keys == (0, 1) and layout.light_blocks == tuple(range(32))
    assert (layout.band_start, layout.band) == (-7, 30)
    assert layout.heavy_rows == (0, 1) and layout.num_key_blocks == 0


@pytest.mark.parametrize("causal", [False, True])
def test_global_queries_in_a_light_block_equal_eager(causal):
    """Longformer's global queries attend every key as heavy rows while their block stays light
    (band and global keys): outputs and gradients as the eager reference, with prepended keys."""
    torch.manual_seed(0)
    q = torch.randn(1, 2, 203, 8, dtype=torch.float64)
    k, v = torch.randn(2, 1, 2, 205, 8, dtype=torch.float64)
    pattern = SlidingWindow(10) | GlobalTokens(3)
    problem = AttentionProblem(q, k, v, 8 ** -0.5, causal=causal, pattern=pattern,
                               prepended_keys=2)
    layout = block_sparse_plan(pattern, causal, 203, 205, torch.device("cpu"), 16).layout
    # Causal global queries see only earlier keys, all in their band: no heavy row then.
    assert layout.heavy_rows == (() if causal else (0, 1, 2)) and 0 in layout.light_blocks
    assert_equals_eager(lambda p, d: block_sparse_attention(p, d, block=16), problem)


@dataclasses.dataclass(frozen=True)
class _RowsAttendAll(Pattern):
    """Queries start .. stop - 1 attend every key (a heavy block amid light ones)."""

    start: int
    stop: int

    def mask_mod(self, num_tokens):
        start, stop = self.start, self.stop
        return lambda b, h, q_idx, kv_idx: (q_idx >= start) & (q_idx < stop) & (kv_idx >= 0)


@pytest.mark.parametrize("causal", [False, True])
def test_light_blocks_around_a_heavy_one_equal_eager(causal):
    """Light blocks that are not consecutive gather their queries and bands (no view), around
    a heavy block in the middle; with the key parts merged and, for values of another head dim,
    concatenated for one SDPA call."""
    torch.manual_seed(0)
    pattern = SlidingWindow(5) | GlobalTokens(2) | RandomBlocks(8, 2, seed=1) | _RowsAttendAll(40, 48)
    layout = block_sparse_plan(pattern, causal, 93, 94, torch.device("cpu"), 8).layout
    light = layout.light_blocks
    assert 5 not in light and light[0] < 5 < light[-1]  # not consecutive
    assert layout.band and layout.num_key_blocks and layout.global_keys
    for value_dim in (8, 6):  # 8: merged by the log-sum-exp; 6: one call on concatenated keys
        q = torch.randn(1, 2, 93, 8, dtype=torch.float64)
        k = torch.randn(1, 2, 94, 8, dtype=torch.float64)
        v = torch.randn(1, 2, 94, value_dim, dtype=torch.float64)
        problem = AttentionProblem(q, k, v, 8 ** -0.5, causal=causal, pattern=pattern,
                                   prepended_keys=1)
        assert_equals_eager(lambda p, d: block_sparse_attention(p, d, block=8), problem)


def test_flex_block_mask_is_cached_per_pattern_and_length_and_rebuilt_for_a_new_length():
    pattern = SlidingWindow(8) | GlobalTokens(2)
    masks = [flex_kernel._block_mask(_problem(pattern, tokens)) for tokens in (256, 256, 384)]
    assert masks[0] is masks[1] and masks[2] is not masks[0]
    assert masks[2].seq_lengths == (384, 384)
    assert flex_kernel._block_mask(_problem(Strided(8), 256)) is not masks[0]


@pytest.mark.slow
def test_flex_with_a_pattern_and_prepended_key_equals_eager_forward():
    q = torch.randn(2, 3, 100, 16)
    k, v = torch.randn(2, 2, 3, 101, 16)
    pattern = SlidingWindow(10, causal=True) | GlobalTokens(2) | RandomBlocks(16, 2, seed=3)
    problem = AttentionProblem(q, k, v, 0.25, causal=True, pattern=pattern)
    with torch.no_grad():
        torch.testing.assert_close(KERNELS["flex"].run(problem, 0.0), eager_attention(problem),
                                   atol=1e-5, rtol=1e-5)


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["flex", "block_diagonal", "strided", "block_sparse"])
def test_cuda_sparse_kernels_equal_eager_forward_and_backward(kernel):
    pattern = {"block_diagonal": BlockLocal(64) & Causal(), "strided": Strided(8)}.get(
        kernel, SlidingWindow(40) | GlobalTokens(2) | RandomBlocks(64, 2, seed=1))
    q, k, v = torch.randn(3, 2, 4, 1000, 64, device="cuda")
    problem = AttentionProblem(q, k, v, 64 ** -0.5, pattern=pattern)
    assert select_kernel("auto", problem, 0.0).name == "flex"  # FlexAttention first on CUDA
    expected = forward_backward(eager_attention, problem)
    actual = forward_backward(KERNELS[kernel].run, problem)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, atol=2e-3, rtol=2e-3)
