"""Tests for robust_attn.metrics.

Every metric is checked against an explicit float64 reference written here with
plain Python loops (hypothesis draws the shapes, masks and seeds), then against
closed forms, bad inputs and the documented edge cases.
"""

from __future__ import annotations

import math

import pytest
import torch
from einops import rearrange
from hypothesis import given
from hypothesis import strategies as st

from robust_attn.metrics import (
    attention_entropy,
    attention_sparsity,
    attention_spectral_gap,
    effective_rank,
    max_attention_logit,
    sink_mass,
    sink_rate,
    sink_score,
    token_cosine_similarity,
    token_residual,
)

DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: {"rtol": 1e-4, "atol": 1e-5}, torch.float64: {"rtol": 1e-9, "atol": 1e-11}}

leading_dims = st.lists(st.integers(1, 3), max_size=2).map(tuple)
sizes = st.integers(1, 6)
dtypes = st.sampled_from(DTYPES)


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


seeds = st.integers(0, 2**32 - 1).map(generator)


# --------------------------------------------------------------------------- inputs


@st.composite
def attention(draw) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(probs, allowed): softmax over the allowed keys, junk at disallowed positions.

    The junk proves that the metrics ignore disallowed weights. ``allowed`` is
    None, a lower-right causal mask, or a random mask of shape (Nq, Nk) or full.
    """
    shape = draw(leading_dims) + (draw(sizes), draw(sizes))
    gen = draw(seeds)
    kind = draw(st.sampled_from(["none", "causal", "random", "random-full"]))
    nq, nk = shape[-2:]
    if kind == "none":
        allowed = None
    elif kind == "causal":
        allowed = torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq)
    else:
        mask_shape = shape if kind == "random-full" else (nq, nk)
        allowed = torch.rand(mask_shape, generator=gen) < draw(st.sampled_from([0.3, 0.7]))
    mask = torch.ones(shape, dtype=torch.bool) if allowed is None else allowed.expand(shape)
    logits = torch.randn(shape, generator=gen, dtype=torch.float64)
    logits = logits * draw(st.sampled_from([0.0, 1.0, 4.0]))
    logits[..., 0] += draw(st.sampled_from([0.0, 3.0]))  # sometimes a sink on key 0
    probs = logits.masked_fill(~mask, -math.inf).softmax(dim=-1).nan_to_num(0.0)
    junk = torch.rand(shape, generator=gen, dtype=torch.float64)
    return torch.where(mask, probs, junk).to(draw(dtypes)), allowed


@st.composite
def tokens(draw) -> torch.Tensor:
    """(..., N, C) tokens of random rank, some rows zeroed."""
    lead, n, c = draw(leading_dims), draw(sizes), draw(sizes)
    gen = draw(seeds)
    inner = draw(st.integers(1, 6))
    x = torch.randn(lead + (n, inner), generator=gen, dtype=torch.float64)
    x = x @ torch.randn(lead + (inner, c), generator=gen, dtype=torch.float64)
    if draw(st.booleans()):
        x = x * (torch.rand(lead + (n, 1), generator=gen) < 0.7)
    return x.to(draw(dtypes))


# ------------------------------------------------------------ explicit references


def matrices(t: torch.Tensor) -> list[list[list[float]]]:
    """One nested list (rows of Python floats) per leading index."""
    return rearrange(t.double(), "... rows cols -> (...) rows cols").tolist()


def masked_maps(t: torch.Tensor, allowed: torch.Tensor | None):
    """Pairs (matrix, mask) of nested lists, one per leading index of ``t``."""
    full = torch.ones(t.shape, dtype=torch.bool) if allowed is None else allowed.expand(t.shape)
    masks = rearrange(full, "... rows cols -> (...) rows cols").tolist()
    return zip(matrices(t), masks, strict=True)


def assert_matches(actual: torch.Tensor, expected: list[float], dtype: torch.dtype, shape) -> None:
    assert actual.dtype == dtype
    want = torch.tensor(expected, dtype=torch.float64).reshape(shape)
    torch.testing.assert_close(actual.double(), want, **TOL[dtype])


def ref_entropy_row(row: list[float], keep: list[bool], normalize: bool) -> float:
    weights = [p for p, k in zip(row, keep, strict=True) if k]
    if len(weights) <= 1:
        return 1.0 if normalize else 0.0
    h = -sum(p * math.log(p) for p in weights if p > 0)
    return h / math.log(len(weights)) if normalize else h


def dot(u: list[float], v: list[float]) -> float:
    return sum(a * b for a, b in zip(u, v, strict=True))


def ref_residual(x: list[list[float]]) -> float:
    n = len(x)
    mean = [sum(col) / n for col in zip(*x, strict=True)]
    num = sum((v - m) ** 2 for row in x for v, m in zip(row, mean, strict=True))
    den = sum(v * v for row in x for v in row)
    return math.sqrt(num / den) if den > 0 else 0.0


def ref_cosine(x: list[list[float]]) -> float:
    n = len(x)
    if n == 1:
        return 1.0
    norms = [math.sqrt(dot(r, r)) for r in x]
    total = 0.0
    for i in range(n):
        for j in range(n):
            if i != j and norms[i] > 0 and norms[j] > 0:
                total += dot(x[i], x[j]) / (norms[i] * norms[j])
    return total / (n * (n - 1))


def ref_singular_values(a: list[list[float]]) -> list[float]:
    """Descending singular values by one-sided Jacobi (Hestenes) rotations.

    Rotates pairs of vectors (the columns of A, or its rows when they are fewer)
    until all are orthogonal; their norms are then the singular values, to high
    relative accuracy even for the tiny ones.
    """
    vecs = [list(v) for v in (zip(*a, strict=True) if len(a) >= len(a[0]) else a)]
    for _ in range(100):
        rotated = False
        for i in range(len(vecs)):
            for j in range(i + 1, len(vecs)):
                u, v = vecs[i], vecs[j]
                alpha, beta, gamma = dot(u, u), dot(v, v), dot(u, v)
                if abs(gamma) <= 1e-15 * math.sqrt(alpha * beta):
                    continue
                rotated = True
                zeta = (beta - alpha) / (2 * gamma)
                t = math.copysign(1.0, zeta) / (abs(zeta) + math.sqrt(1 + zeta * zeta))
                c = 1 / math.sqrt(1 + t * t)
                vecs[i] = [c * x - c * t * y for x, y in zip(u, v, strict=True)]
                vecs[j] = [c * t * x + c * y for x, y in zip(u, v, strict=True)]
        if not rotated:
            break
    return sorted((math.sqrt(dot(v, v)) for v in vecs), reverse=True)


def ref_effective_rank(x: list[list[float]]) -> float:
    sigma = ref_singular_values(x)
    total = sum(sigma)
    if total == 0:
        return 0.0
    return math.exp(-sum(s / total * math.log(s / total) for s in sigma if s > 0))


def ref_sink_score(a: list[list[float]], keep: list[list[bool]], key: int) -> float:
    seen = [row[key] for row, k in zip(a, keep, strict=True) if k[key]]
    return sum(seen) / len(seen) if seen else 0.0


def ref_sparsity(a: list[list[float]], keep: list[list[bool]], threshold: float) -> float:
    below = entries = 0
    for row, k in zip(a, keep, strict=True):
        n = sum(k)
        entries += n
        below += sum(1 for p, ok in zip(row, k, strict=True) if ok and p < threshold / n)
    return below / entries if entries else 0.0


def ref_max_logit(s: list[list[float]], keep: list[list[bool]]) -> float:
    return max(
        (v for row, k in zip(s, keep, strict=True) for v, ok in zip(row, k, strict=True) if ok),
        default=-math.inf,
    )


# -------------------------------------------------- against the references


@given(attention(), st.booleans())
def test_entropy_matches_reference(case, normalize):
    probs, allowed = case
    expected = [
        ref_entropy_row(row, keep, normalize)
        for a, m in masked_maps(probs, allowed)
        for row, keep in zip(a, m, strict=True)
    ]
    actual = attention_entropy(probs, allowed=allowed, normalize=normalize)
    assert_matches(actual, expected, probs.dtype, probs.shape[:-1])


@given(tokens())
def test_token_residual_matches_reference(x):
    expected = [ref_residual(m) for m in matrices(x)]
    assert_matches(token_residual(x), expected, x.dtype, x.shape[:-2])


@given(tokens())
def test_token_cosine_similarity_matches_reference(x):
    expected = [ref_cosine(m) for m in matrices(x)]
    assert_matches(token_cosine_similarity(x), expected, x.dtype, x.shape[:-2])


@given(tokens())
def test_effective_rank_matches_reference(x):
    expected = [ref_effective_rank(m) for m in matrices(x)]
    assert_matches(effective_rank(x), expected, x.dtype, x.shape[:-2])


@given(attention(), st.data())
def test_sink_mass_matches_reference(case, data):
    probs, _ = case
    num_sink = data.draw(st.integers(1, probs.shape[-1]))
    expected = [sum(sum(row[:num_sink]) for row in a) / len(a) for a in matrices(probs)]
    assert_matches(sink_mass(probs, num_sink=num_sink), expected, probs.dtype, probs.shape[:-2])


@given(attention(), st.data())
def test_sink_score_matches_reference(case, data):
    probs, allowed = case
    key = data.draw(st.integers(0, probs.shape[-1] - 1))
    expected = [ref_sink_score(a, m, key) for a, m in masked_maps(probs, allowed)]
    actual = sink_score(probs, key=key, allowed=allowed)
    assert_matches(actual, expected, probs.dtype, probs.shape[:-2])


@given(attention(), st.data())
def test_sink_rate_matches_reference(case, data):
    probs, allowed = case
    key = data.draw(st.integers(0, probs.shape[-1] - 1))
    # Scores of uniform rows are rational and >= 1/6: these thresholds never tie with them.
    eps = data.draw(st.sampled_from([0.05, math.pi / 10, math.e / 5]))
    scores = [ref_sink_score(a, m, key) for a, m in masked_maps(probs, allowed)]
    expected = sum(s > eps for s in scores) / len(scores)
    actual = sink_rate(probs, key=key, eps=eps, allowed=allowed)
    assert_matches(actual, [expected], probs.dtype, ())


@given(attention(), st.sampled_from([0.1, 0.5, 0.9]))
def test_sparsity_matches_reference(case, threshold):
    probs, allowed = case
    expected = [ref_sparsity(a, m, threshold) for a, m in masked_maps(probs, allowed)]
    actual = attention_sparsity(probs, allowed=allowed, threshold=threshold)
    assert_matches(actual, expected, probs.dtype, probs.shape[:-2])


@given(attention(), seeds)
def test_max_attention_logit_matches_reference(case, gen):
    probs, allowed = case
    logits = (10 * torch.randn(probs.shape, generator=gen)).to(probs.dtype)
    expected = [ref_max_logit(s, m) for s, m in masked_maps(logits, allowed)]
    actual = max_attention_logit(logits, allowed=allowed)
    assert_matches(actual, expected, probs.dtype, probs.shape[:-2])


@given(attention())
def test_spectral_gap_matches_reference(case):
    probs, _ = case
    expected = []
    for a in matrices(probs):
        sigma = ref_singular_values(a) + [0.0]  # sigma_2 = 0 for a single row or column
        expected.append(sigma[0] - sigma[1])
    assert_matches(attention_spectral_gap(probs), expected, probs.dtype, probs.shape[:-2])


# ---------------------------------------------------------------- closed forms


def close(actual: torch.Tensor, value: float) -> None:
    torch.testing.assert_close(actual, torch.full_like(actual, value), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_uniform_attention_closed_forms(dtype):
    n = 7
    probs = torch.full((2, 3, n, n), 1 / n, dtype=dtype)
    out = probs @ torch.randn(2, 3, n, 5, generator=generator(0), dtype=dtype)
    close(attention_entropy(probs), 1.0)
    close(token_residual(out), 0.0)
    close(token_cosine_similarity(out), 1.0)
    close(attention_spectral_gap(probs), 1.0)
    close(attention_sparsity(probs), 0.0)
    close(attention_sparsity(probs, threshold=1.0), 0.0)  # 1/n is not below 1/n
    close(sink_mass(probs, num_sink=2), 2 / n)


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_hot_attention_closed_forms(dtype):
    n = 12
    probs = torch.zeros(2, n, n, dtype=dtype)
    probs[..., 0] = 1.0
    close(attention_entropy(probs), 0.0)
    close(sink_mass(probs), 1.0)
    close(sink_score(probs, key=0), 1.0)
    close(attention_sparsity(probs), (n - 1) / n)
    assert sink_rate(probs, key=0).item() == 1.0
    assert sink_rate(probs, key=1).item() == 0.0


@pytest.mark.parametrize("dtype", DTYPES)
def test_sink_rate_counts_scores_strictly_above_eps(dtype):
    probs = torch.full((3, 5, 2), 0.5, dtype=dtype)  # alpha_0 = 0.5 in every map
    assert sink_rate(probs, eps=0.5).item() == 0.0
    assert sink_rate(probs, eps=0.49).item() == 1.0
    probs[0, :, 0] = 0.2  # one map of three drops below eps
    torch.testing.assert_close(sink_rate(probs, eps=0.3), torch.tensor(2 / 3, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_uniform_causal_attention_closed_forms(dtype):
    n = 6
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    probs = causal / causal.sum(dim=-1, keepdim=True)
    probs = probs.to(dtype)
    close(attention_entropy(probs, allowed=causal), 1.0)
    log_n = torch.arange(1, n + 1, dtype=dtype).log()
    torch.testing.assert_close(attention_entropy(probs, allowed=causal, normalize=False), log_n)
    close(attention_sparsity(probs, allowed=causal), 0.0)
    # Gu et al.: alpha_k averages over the n - k queries that see key k.
    expected = [sum(1 / (t + 1) for t in range(k, n)) / (n - k) for k in range(n)]
    scores = torch.stack([sink_score(probs, key=k, allowed=causal) for k in range(n)])
    torch.testing.assert_close(scores, torch.tensor(expected, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_effective_rank_closed_forms(dtype):
    gen = generator(1)
    u, v = torch.randn(6, 1, generator=gen), torch.randn(1, 4, generator=gen)
    close(effective_rank((u @ v).to(dtype)), 1.0)
    close(effective_rank(torch.eye(5, dtype=dtype)), 5.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_spectral_gap_of_identity_is_zero(dtype):
    close(attention_spectral_gap(torch.eye(6, dtype=dtype)), 0.0)


def test_low_precision_input_reduces_in_float32():
    probs = torch.full((4, 4), 0.25, dtype=torch.bfloat16)
    assert attention_entropy(probs).dtype == torch.float32
    assert token_residual(probs).dtype == torch.float32
    assert attention_spectral_gap(probs).dtype == torch.float32


# ------------------------------------------------------------------- edge cases


@pytest.mark.parametrize("dtype", DTYPES)
def test_entropy_rows_with_at_most_one_allowed_key(dtype):
    # Row 0 is sigmoid-like (its one allowed weight is not 1): still no entropy.
    probs = torch.tensor([[0.5, 0.2, 0.0], [0.0, 0.0, 0.0], [0.5, 0.5, 0.0]], dtype=dtype)
    allowed = torch.tensor([[True, False, False], [False, False, False], [True, True, False]])
    torch.testing.assert_close(
        attention_entropy(probs, allowed=allowed), torch.tensor([1.0, 1.0, 1.0], dtype=dtype)
    )
    torch.testing.assert_close(
        attention_entropy(probs, allowed=allowed, normalize=False),
        torch.tensor([0.0, 0.0, math.log(2)], dtype=dtype),
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_token_matrices(dtype):
    x = torch.zeros(2, 4, 3, dtype=dtype)
    torch.testing.assert_close(token_residual(x), torch.zeros(2, dtype=dtype))
    torch.testing.assert_close(token_cosine_similarity(x), torch.zeros(2, dtype=dtype))
    torch.testing.assert_close(effective_rank(x), torch.zeros(2, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_single_token_conventions(dtype):
    x = torch.randn(3, 1, 4, generator=generator(2)).to(dtype)
    torch.testing.assert_close(token_residual(x), torch.zeros(3, dtype=dtype))
    torch.testing.assert_close(token_cosine_similarity(x), torch.ones(3, dtype=dtype))
    torch.testing.assert_close(effective_rank(x), torch.ones(3, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fully_masked_maps(dtype):
    probs = torch.zeros(2, 3, 4, dtype=dtype)
    nothing = torch.zeros(3, 4, dtype=torch.bool)
    torch.testing.assert_close(
        attention_entropy(probs, allowed=nothing), torch.ones(2, 3, dtype=dtype)
    )
    torch.testing.assert_close(
        attention_sparsity(probs, allowed=nothing), torch.zeros(2, dtype=dtype)
    )
    torch.testing.assert_close(
        sink_score(probs, key=1, allowed=nothing), torch.zeros(2, dtype=dtype)
    )
    assert sink_rate(probs, allowed=nothing).item() == 0.0
    assert torch.equal(
        max_attention_logit(probs, allowed=nothing), torch.full((2,), -math.inf, dtype=dtype)
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 5), (5, 1)])
def test_spectral_gap_of_a_single_row_or_column_is_its_norm(dtype, shape):
    probs = torch.rand(shape, generator=generator(3)).to(dtype)
    torch.testing.assert_close(attention_spectral_gap(probs), torch.linalg.norm(probs))


# ------------------------------------------------------------------- bad inputs

P = torch.full((2, 4, 4), 0.25)
BAD_INPUTS = {
    "probs 1-d": (lambda: attention_entropy(torch.rand(4)), ValueError, "probs"),
    "probs empty": (lambda: attention_entropy(torch.rand(3, 0)), ValueError, "probs"),
    "probs not a tensor": (lambda: attention_entropy([[1.0]]), TypeError, "probs"),
    "probs integer": (
        lambda: attention_entropy(torch.ones(2, 2, dtype=torch.long)),
        TypeError,
        "probs",
    ),
    "allowed float": (lambda: attention_entropy(P, allowed=torch.ones(4, 4)), TypeError, "allowed"),
    "allowed wrong shape": (
        lambda: attention_entropy(P, allowed=torch.ones(3, 4, dtype=torch.bool)),
        ValueError,
        "allowed",
    ),
    "allowed larger than probs": (
        lambda: attention_sparsity(P, allowed=torch.ones(5, 2, 4, 4, dtype=torch.bool)),
        ValueError,
        "allowed",
    ),
    "x 1-d": (lambda: token_residual(torch.rand(4)), ValueError, "x"),
    "x integer": (
        lambda: token_cosine_similarity(torch.ones(2, 2, dtype=torch.int32)),
        TypeError,
        "x",
    ),
    "x empty": (lambda: effective_rank(torch.rand(0, 3)), ValueError, "x"),
    "num_sink 0": (lambda: sink_mass(P, num_sink=0), ValueError, "num_sink"),
    "num_sink > Nk": (lambda: sink_mass(P, num_sink=5), ValueError, "num_sink"),
    "num_sink float": (lambda: sink_mass(P, num_sink=1.0), TypeError, "num_sink"),
    "key negative": (lambda: sink_score(P, key=-1), ValueError, "key"),
    "key >= Nk": (lambda: sink_rate(P, key=4), ValueError, "key"),
    "key bool": (lambda: sink_score(P, key=True), TypeError, "key"),
    "eps >= 1": (lambda: sink_rate(P, eps=1.0), ValueError, "eps"),
    "eps negative": (lambda: sink_rate(P, eps=-0.1), ValueError, "eps"),
    "eps string": (lambda: sink_rate(P, eps="0.3"), TypeError, "eps"),
    "threshold 0": (lambda: attention_sparsity(P, threshold=0.0), ValueError, "threshold"),
    "threshold > 1": (lambda: attention_sparsity(P, threshold=1.5), ValueError, "threshold"),
    "threshold nan": (lambda: attention_sparsity(P, threshold=math.nan), ValueError, "threshold"),
    "logits 1-d": (lambda: max_attention_logit(torch.rand(3)), ValueError, "logits"),
    "spectral probs 1-d": (lambda: attention_spectral_gap(torch.rand(3)), ValueError, "probs"),
    "sink_mass probs 1-d": (lambda: sink_mass(torch.rand(3)), ValueError, "probs"),
}


@pytest.mark.parametrize("call, error, name", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_raises_naming_the_argument(call, error, name):
    with pytest.raises(error, match=name):
        call()
