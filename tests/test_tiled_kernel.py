"""The tiled kernel equals the eager reference tile by tile (outputs, log-sum-exp, gradients), skips
the tiles causal attention blocks, and never holds the attention matrix."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from robust_attn import RobustAttention
from robust_attn.kernels import KERNELS, select_kernel
from robust_attn.kernels.eager import eager_attention_with_lse
from robust_attn.kernels.tiled import TILE_KEYS, TILE_ROWS, _tiles, tiled_attention, tiled_attention_with_lse
from robust_attn.mitigations.alibi import AlibiBias, alibi_slopes
from robust_attn.mitigations.sigmoid import SigmoidWeights
from robust_attn.mitigations.softcap import TanhSoftCap
from robust_attn.problem import AttentionProblem
from robust_attn.sparse import GlobalTokens, SlidingWindow

from .test_chunked_kernel import LargestNewTensor, LearnedDistancePenalty
from .test_kernels import problems

TILE_SIZES = st.integers(1, 6)


@st.composite
def tiled_cases(draw):
    """A float64 problem (masks of every kind, causal, more or fewer keys than queries, prepended
    keys for ALiBi), with softcap, ALiBi or no modifier, softmax or sigmoid (its default bias
    -log Nk or a fixed one), and tiles of 1 to 6 rows x 1 to 6 keys."""
    problem = draw(problems(extra_keys=st.integers(-2, 3), dtype=torch.float64))
    heads = problem.q.shape[1]
    mods = draw(st.sampled_from(["none", "softcap", "alibi", "both"]))
    score_mods = {"none": (), "softcap": (TanhSoftCap(2.0),),
                  "alibi": (AlibiBias(alibi_slopes(heads)),),
                  "both": (TanhSoftCap(3.0), AlibiBias(alibi_slopes(heads)))}[mods]
    prepended = draw(st.integers(0, max(0, problem.num_keys - problem.num_queries)))
    normalizer = draw(st.sampled_from([problem.normalizer, SigmoidWeights(), SigmoidWeights(0.5)]))
    problem = problem.with_(score_mods=score_mods, normalizer=normalizer,
                            prepended_keys=prepended)
    return problem, draw(TILE_SIZES), draw(TILE_SIZES)


def _forward_backward(kernel, problem: AttentionProblem):
    """kernel(problem) -> (out, lse), then the gradients of <out, cos(out)> by q, k and v."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (problem.q, problem.k, problem.v))
    out, lse = kernel(problem.with_(q=q, k=k, v=v))
    grads = torch.autograd.grad(out, (q, k, v), torch.cos(out.detach()))
    return out, lse, *grads


def _assert_equal_to_eager(problem, **tiles):
    expected = _forward_backward(eager_attention_with_lse, problem)
    actual = _forward_backward(lambda p: tiled_attention_with_lse(p, **tiles), problem)
    for name, a, e in zip(("out", "lse", "dq", "dk", "dv"), actual, expected, strict=True):
        if name == "lse":
            if not problem.is_softmax:
                continue
            a, e = a.float(), e.float()  # the contract's lse is float32 (eager's is)
        assert torch.isfinite(a).all() or name == "lse", name
        torch.testing.assert_close(a, e, atol=1e-10 if name != "lse" else 1e-6,
                                   rtol=1e-10 if name != "lse" else 1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")


@given(tiled_cases())
def test_equals_eager_forward_lse_and_backward(case):
    problem, tile_rows, tile_keys = case
    _assert_equal_to_eager(problem, tile_rows=tile_rows, tile_keys=tile_keys)


@pytest.mark.parametrize("pattern", [SlidingWindow(3, causal=True), GlobalTokens(2),
                                     SlidingWindow(2) | GlobalTokens(1)], ids=str)
@pytest.mark.parametrize("normalizer", ["softmax", "sigmoid"])
def test_a_sparsity_pattern_is_masked_per_tile(pattern, normalizer):
    """The pattern's mask for the tile's own rows and keys, aligned as the problem's (prepended keys
    visible to every query)."""
    q, k, v = (torch.randn(2, 2, n, 4, dtype=torch.float64) for n in (11, 13, 13))
    problem = AttentionProblem(q, k, v, 0.5, causal=True, pattern=pattern, prepended_keys=2,
                               score_mods=(TanhSoftCap(2.0),),
                               **({} if normalizer == "softmax" else
                                  {"normalizer": SigmoidWeights()}))
    _assert_equal_to_eager(problem, tile_rows=3, tile_keys=4)


def test_empty_rows_give_zeros_minus_infinite_lse_and_zero_gradients():
    """Rows with no allowed key, in a tile with allowed rows and in a tile of their own; with the
    causal offset Nk < Nq, the first rows see no key at all (no key tile is computed for them)."""
    q, k, v = (torch.randn(1, 2, n, 4, dtype=torch.float64) for n in (9, 6, 6))
    mask = torch.rand(1, 1, 9, 6) < 0.7
    mask[..., 4, :] = False
    problem = AttentionProblem(q, k, v, 0.5, causal=True, attn_mask=mask,
                               score_mods=(TanhSoftCap(2.0),))
    out, lse, dq, dk, dv = _forward_backward(
        lambda p: tiled_attention_with_lse(p, tile_rows=2, tile_keys=2), problem)
    empty = ~(mask & problem.causal_allowed()).any(dim=-1).expand(1, 2, 9)
    assert empty[0, 0, :3].all() and empty[0, 0, 4]
    assert (out[empty] == 0).all() and torch.isneginf(lse[empty]).all()
    assert (dq[empty] == 0).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
    _assert_equal_to_eager(problem, tile_rows=2, tile_keys=2)


def test_far_keys_flushed_to_zero_weight_still_equal_eager():
    """ALiBi's steepest slope over 300 keys puts far keys hundreds below the row's max: the tiled
    kernel gives them weight 0 (below exp's slow path), eager exp(-300); the outputs agree."""
    q, k, v = (torch.randn(1, 1, 300, 4) for _ in range(3))
    problem = AttentionProblem(q, k, v, 0.5, causal=True, score_mods=(AlibiBias((2.0,)),))
    _assert_close_float32(tiled_attention_with_lse(problem, tile_rows=64, tile_keys=64),
                          eager_attention_with_lse(problem))


def _assert_close_float32(actual, expected):
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a.float(), e.float(), atol=1e-5, rtol=1e-5)


def test_causal_attention_skips_the_tiles_above_the_diagonal():
    """64 queries and keys in 8 x 8 tiles: 36 of the 64 tiles are computed, 8 masked (the
    diagonal); with 4 prepended keys (Nk - Nq = 4) every row tile sees 4 more keys."""
    q = torch.randn(1, 1, 64, 2)
    causal = AttentionProblem(q, q, q, 1.0, causal=True)
    tiles = _tiles(causal, 8, 8)
    assert sum(len(rows.keys) for rows in tiles) == 36
    assert sum(straddles for rows in tiles for *_, straddles in rows.keys) == 8
    k = torch.randn(1, 1, 68, 2)
    offset = _tiles(causal.with_(k=k, v=k), 8, 8)
    assert [rows.keys[-1][1] for rows in offset] == [12 + 8 * i for i in range(7)] + [68]
    full = _tiles(causal.with_(causal=False), 8, 8)
    assert sum(len(rows.keys) for rows in full) == 64
    assert not any(straddles for rows in full for *_, straddles in rows.keys)


@pytest.mark.parametrize("options", [dict(causal=True, score_mods=(TanhSoftCap(5.0),)),
                                     dict(normalizer=SigmoidWeights())])
def test_a_long_sequence_never_holds_the_attention_matrix(options):
    """Forward and backward of 256 tokens in 32 x 64 tiles: no tensor larger than q (B H N D)."""
    q, k, v = (torch.randn(1, 2, 256, 32, requires_grad=True) for _ in range(3))
    problem = AttentionProblem(q, k, v, 32 ** -0.5, **options)
    assert select_kernel("auto", problem, 0.0).name == "tiled"
    with LargestNewTensor() as largest:
        tiled_attention(problem, tile_rows=32, tile_keys=64).square().sum().backward()
    assert largest.numel <= q.numel(), largest.operation


def test_auto_order_and_what_it_refuses():
    """On the CPU: sdpa, then tiled, then chunked (dropout; a score modifier's learned tensor)."""
    q, k, v = torch.randn(3, 1, 2, 8, 4)
    softcap = AttentionProblem(q, k, v, 0.5, score_mods=(TanhSoftCap(5.0),))
    assert select_kernel("auto", softcap.with_(score_mods=()), 0.0).name == "sdpa"
    assert select_kernel("auto", softcap, 0.0).name == "tiled"
    assert select_kernel("auto", softcap, 0.0, lse=True).name == "tiled"
    assert select_kernel("auto", softcap, 0.1).name == "chunked"
    assert "dropout" in KERNELS["tiled"].unsupported(softcap, 0.1)
    learned = softcap.with_(score_mods=(LearnedDistancePenalty(2, torch.float32),))
    assert "needs gradients" in KERNELS["tiled"].unsupported(learned, 0.0)
    assert select_kernel("auto", learned, 0.0).name == "chunked"
    float_mask = softcap.with_(attn_mask=torch.zeros(8, 8, requires_grad=True))
    assert select_kernel("auto", float_mask, 0.0).name == "chunked"
    other = softcap.with_(normalizer=lambda scores: torch.relu(scores))
    assert "elementwise" in KERNELS["tiled"].unsupported(other, 0.0)
    with pytest.raises(ValueError, match="kernel='tiled' cannot run here: dropout"):
        select_kernel("tiled", softcap, 0.1)


def test_bad_tile_sizes_raise_naming_the_argument():
    q = torch.randn(1, 1, 4, 2)
    for name in ("tile_rows", "tile_keys"):
        for bad in (0, -1, 1.5, True):
            with pytest.raises(ValueError, match=f"^{name}="):
                tiled_attention(AttentionProblem(q, q, q, 1.0), **{name: bad})


def test_one_tile_is_the_eager_kernel():
    """A ViT's 197 tokens fit one tile: the eager kernel's graph (its softmax), no recomputation."""
    assert TILE_ROWS >= 197 and TILE_KEYS >= 197
    q, k, v = (torch.randn(2, 3, 197, 8, requires_grad=True) for _ in range(3))
    problem = AttentionProblem(q, k, v, 0.3, score_mods=(TanhSoftCap(5.0),))
    assert "Tiled" not in tiled_attention(problem).grad_fn.name()
    assert "Tiled" in tiled_attention(problem, tile_rows=100).grad_fn.name()


@pytest.mark.parametrize("options", [dict(softcap=5.0), dict(sigmoid=True, qk_norm=True),
                                     dict(alibi=True, sink_tokens=1)], ids=str)
def test_modules_train_through_the_tiled_kernel_on_long_sequences(options):
    """300 tokens (two tiles of rows and of keys) in a module: auto's kernel, equal to eager."""
    x = torch.randn(1, 300, 32, requires_grad=True)
    module = RobustAttention(32, num_heads=2, **options)
    reference = RobustAttention(32, num_heads=2, kernel="eager", **options)
    reference.load_state_dict(module.state_dict())
    records = []
    module.register_observer(lambda _, record: records.append(record.attended.kernel))
    outputs = [attention(x, is_causal=True) for attention in (module, reference)]
    grads = [torch.autograd.grad(out.square().sum(), x)[0] for out in outputs]
    assert records == ["tiled"]
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-4, rtol=1e-4)
