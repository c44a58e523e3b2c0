"""Each pattern's mask_mod equals its definition, written out pair by pair; & and | compose."""

import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from robust_attn.sparse import (
    AllOf,
    AnyOf,
    AxialColumns,
    AxialRows,
    BlockLocal,
    Causal,
    Fixed,
    GlobalTokens,
    GridWindow,
    RandomBlocks,
    SlidingWindow,
    Strided,
    split_causal,
)

tokens = st.integers(1, 48)
sizes = st.integers(1, 12)


def by_definition(rule, n):
    """The (n, n) bool mask of rule(i, j), pair by pair."""
    return torch.tensor([[bool(rule(i, j)) for j in range(n)] for i in range(n)]).reshape(n, n)


@given(tokens, sizes, st.booleans())
def test_sliding_window(n, window, causal):
    rule = (lambda i, j: 0 <= i - j < window) if causal else (lambda i, j: abs(i - j) < window)
    assert torch.equal(SlidingWindow(window, causal).dense(n), by_definition(rule, n))


@given(tokens, sizes)
def test_strided(n, stride):
    assert torch.equal(Strided(stride).dense(n), by_definition(lambda i, j: (i - j) % stride == 0, n))


@given(tokens, sizes)
def test_block_local(n, block):
    assert torch.equal(BlockLocal(block).dense(n), by_definition(lambda i, j: i // block == j // block, n))


@given(tokens, sizes, st.data())
def test_fixed(n, block, data):
    summary = data.draw(st.integers(1, block))
    rule = lambda i, j: i // block == j // block or j % block >= block - summary  # noqa: E731
    assert torch.equal(Fixed(block, summary).dense(n), by_definition(rule, n))


@given(tokens, sizes)
def test_global_tokens(n, count):
    assert torch.equal(GlobalTokens(count).dense(n), by_definition(lambda i, j: i < count or j < count, n))


@given(st.integers(1, 6), st.integers(1, 6), st.integers(0, 3), st.integers(1, 4))
def test_grid_patterns(height, width, prefix, window):
    n = prefix + height * width

    def on_grid(rule):
        def full(i, j):
            if i < prefix or j < prefix:
                return True
            (yi, xi), (yj, xj) = divmod(i - prefix, width), divmod(j - prefix, width)
            return rule(yi, xi, yj, xj)
        return full

    grid = (height, width)
    expected = {
        GridWindow(grid, window, prefix=prefix):
            on_grid(lambda yi, xi, yj, xj: abs(yi - yj) < window and abs(xi - xj) < window),
        AxialRows(grid, prefix=prefix): on_grid(lambda yi, xi, yj, xj: yi == yj),
        AxialColumns(grid, prefix=prefix): on_grid(lambda yi, xi, yj, xj: xi == xj),
    }
    for pattern, rule in expected.items():
        assert torch.equal(pattern.dense(n), by_definition(rule, n)), pattern


@given(tokens, sizes, st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_random_blocks_draw_at_most_count_blocks_per_query_block(n, block, count, seed):
    pattern = RandomBlocks(block, count, seed)
    allowed = pattern.dense(n)
    blocks = -(-n // block)
    padded = torch.zeros(n, blocks * block, dtype=torch.bool)
    padded[:, :n] = allowed
    per_row = padded.view(n, blocks, block).any(dim=2)  # (query, key block)
    first_of_block = torch.arange(n) // block * block
    assert torch.equal(per_row, per_row[first_of_block]), "a block's queries see the same blocks"
    counts = per_row.sum(dim=1)
    assert ((counts >= 1) & (counts <= count)).all()
    whole = (allowed == per_row.repeat_interleave(block, dim=1)[:, :n])
    assert whole.all(), "key blocks are taken whole"
    assert torch.equal(pattern.dense(n), allowed), "same seed, same blocks"


def test_random_blocks_depend_on_the_seed_and_agree_on_int32_indices():
    first, second = RandomBlocks(4, 2, seed=0), RandomBlocks(4, 2, seed=1)
    assert not torch.equal(first.dense(256), second.dense(256))
    index = torch.arange(256, dtype=torch.int32)  # FlexAttention's index dtype
    zero = torch.zeros((), dtype=torch.int32)
    as_int32 = first.mask_mod(256)(zero, zero, index[:, None], index[None])
    assert torch.equal(as_int32, first.dense(256))


@given(tokens, st.sampled_from([SlidingWindow(3), Strided(4), GlobalTokens(2), Fixed(6, 2)]),
       st.sampled_from([BlockLocal(5), SlidingWindow(7, causal=True), Causal()]))
def test_and_or_combine_elementwise(n, a, b):
    assert torch.equal((a & b).dense(n), a.dense(n) & b.dense(n))
    assert torch.equal((a | b).dense(n), a.dense(n) | b.dense(n))


def test_combinations_flatten_and_are_values():
    a, b, c = SlidingWindow(3), GlobalTokens(1), Strided(2)
    assert (a | b) | c == AnyOf((a, b, c)) == a | (b | c)
    assert (a & b) & c == AllOf((a, b, c))
    assert hash(a | b) == hash(SlidingWindow(3) | GlobalTokens(1))
    assert split_causal(BlockLocal(4) & Causal()) == (BlockLocal(4), True)
    assert split_causal(a & b & Causal()) == (a & b, True)
    assert split_causal(a | Causal()) == (a | Causal(), False)


def test_density_is_the_share_of_allowed_pairs():
    assert BlockLocal(4).density(16) == 0.25
    assert Causal().density(4) == 10 / 16
    assert (SlidingWindow(5) | GlobalTokens(2)).density(40) == \
        pytest.approx((SlidingWindow(5) | GlobalTokens(2)).dense(40).float().mean().item())


def test_prepended_keys_stay_visible_and_the_pattern_shifts():
    pattern = BlockLocal(2)
    allowed = pattern.allowed(torch.arange(4), torch.arange(6), num_queries=4, num_keys=6)
    assert allowed[:, :2].all()
    assert torch.equal(allowed[:, 2:], pattern.dense(4))


@pytest.mark.parametrize("build, argument", [
    (lambda: SlidingWindow(0), "window=0"),
    (lambda: SlidingWindow(-3, causal=True), "window=-3"),
    (lambda: Strided(0), "stride=0"),
    (lambda: Strided(2.5), "stride=2.5"),
    (lambda: BlockLocal(True), "block=True"),
    (lambda: Fixed(8, 9), "summary=9 does not fit in block=8"),
    (lambda: Fixed(0, 1), "block=0"),
    (lambda: GlobalTokens(0), "count=0"),
    (lambda: RandomBlocks(4, 0), "count=0"),
    (lambda: RandomBlocks(4, 1, seed=-1), "seed=-1"),
    (lambda: GridWindow((4, 4), 0), "window=0"),
    (lambda: AxialRows((4,), prefix=1), "grid="),
    (lambda: AxialRows((4, 4), prefix=-1), "prefix=-1"),
    (lambda: GridWindow((3, 3), 2, prefix=1).mask_mod(9), r"grid=\(3, 3\) with prefix=1 covers 10"),
    (lambda: SlidingWindow(2).dense(0), "num_tokens=0"),
])
def test_bad_arguments_raise_value_error_naming_them(build, argument):
    with pytest.raises(ValueError, match=argument):
        build()


def test_combining_with_something_else_is_a_type_error():
    with pytest.raises(TypeError, match="another pattern"):
        SlidingWindow(2) | torch.ones(3, 3, dtype=torch.bool)


def test_png_per_pattern(tmp_path):
    pytest.importorskip("matplotlib")
    from robust_attn.sparse.plot import save_pattern_png

    path = save_pattern_png(SlidingWindow(3) | GlobalTokens(1), 24, tmp_path / "a" / "window.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plotting_without_matplotlib_names_the_extra(monkeypatch):
    from robust_attn.sparse import plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"robust-attn\[plot\]"):
        plot.pattern_figure(Strided(2), 8)


@given(st.integers(1, 40), st.integers(1, 12))
def test_the_papers_window_conventions(n, size):
    """Longformer's window size w: w / 2 keys on each side plus the query's own; Child et al.'s
    local pattern: the query and the l keys before it (A_i = {max(0, i - l), ..., i})."""
    longformer = SlidingWindow.longformer(2 * size).dense(n)
    assert torch.equal(longformer, by_definition(lambda i, j: abs(i - j) <= size, n))
    child = SlidingWindow.child_local(size).dense(n)
    assert torch.equal(child, by_definition(lambda i, j: max(0, i - size) <= j <= i, n))
    # ours: 2 window - 1 keys for a query whose whole window lies inside the sequence
    assert int(SlidingWindow(size).dense(4 * size)[2 * size].sum()) == 2 * size - 1


@pytest.mark.parametrize(("build", "value", "name"), [
    (SlidingWindow.longformer, 3, "window_size"), (SlidingWindow.longformer, 0, "window_size"),
    (SlidingWindow.child_local, -1, "lookback"), (SlidingWindow.child_local, True, "lookback")])
def test_the_papers_window_conventions_refuse_bad_sizes_by_name(build, value, name):
    with pytest.raises(ValueError, match=f"^{name}="):
        build(value)
