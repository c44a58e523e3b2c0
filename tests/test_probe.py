"""The health probe: measures what the kernel computed, changes nothing, and switches off."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from robust_attn import RobustAttention, create, health_probe, list_variants, metrics, set_probe_enabled
from robust_attn.testing import strategies as ras


def _grads(module, x, **kwargs):
    module.zero_grad()
    x = x.clone().requires_grad_()
    out = module(x, **kwargs)
    out.backward(torch.sin(out.detach()))
    return out.detach(), x.grad, [p.grad.clone() for p in module.parameters()]


@given(shape=ras.attention_shapes(), variant=st.sampled_from(["baseline", "qk_norm", "softcap"]),
       is_causal=st.booleans(), dropout=st.sampled_from([0.0, 0.3]))
def test_outputs_and_gradients_are_bit_identical_with_probe_on_or_off(shape, variant, is_causal,
                                                                       dropout):
    module = create(variant, shape.dim, num_heads=shape.heads, attn_drop=dropout)
    x = torch.randn(shape.batch, shape.tokens, shape.dim)
    runs = []
    for probe in (False, True):
        module.probe = probe
        torch.manual_seed(1)  # the same dropout draw both times: the probe must not use the RNG
        runs.append(_grads(module, x, is_causal=is_causal))
    (out_off, dx_off, grads_off), (out_on, dx_on, grads_on) = runs
    assert torch.equal(out_off, out_on) and torch.equal(dx_off, dx_on)
    assert all(torch.equal(a, b) for a, b in zip(grads_off, grads_on, strict=True))
    assert module.health is not None


def _reference_weights(module, x, attn_mask=None, is_causal=False):
    """The attention matrix computed independently: float64, timm's unfused formula."""
    q, k, _ = module.qkv(x).double().reshape(x.shape[0], x.shape[1], 3, module.num_heads, -1) \
        .permute(2, 0, 3, 1, 4)
    scores = (q * module.scale) @ k.transpose(-2, -1)
    n = x.shape[1]
    if is_causal:
        scores = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), -torch.inf)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, -torch.inf)
    return scores, scores.softmax(dim=-1)


@given(shape=ras.attention_shapes(max_tokens=20), is_causal=st.booleans())
def test_health_equals_metrics_of_the_full_attention_matrix(shape, is_causal):
    module = RobustAttention(shape.dim, num_heads=shape.heads, probe=True, probe_spectral=True)
    x = torch.randn(shape.batch, shape.tokens, shape.dim)
    with torch.no_grad():
        module(x, is_causal=is_causal)
    scores, weights = _reference_weights(module, x, is_causal=is_causal)
    allowed = scores > -torch.inf
    health = module.health
    assert health.sampled_queries == shape.batch * shape.tokens  # small enough: every row
    expected_entropy = metrics.attention_entropy(weights, allowed).mean(dim=(0, 2))
    torch.testing.assert_close(health.entropy.double(), expected_entropy, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(health.max_logit.double(), scores.amax(dim=(0, 2, 3)),
                               atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(health.sink_mass.double(), weights[..., 0].mean(dim=(0, 2)),
                               atol=1e-5, rtol=1e-5)
    singular = torch.nn.functional.pad(torch.linalg.svdvals(weights), (0, 1))  # sigma_2 = 0 if N = 1
    torch.testing.assert_close(health.spectral_gap.double(),
                               (singular[..., 0] - singular[..., 1]).mean(dim=0),
                               atol=1e-4, rtol=1e-4)
    assert health.empty_queries == 0


def test_probe_samples_at_most_probe_queries_rows():
    module = RobustAttention(16, num_heads=2, probe=True, probe_queries=32, probe_spectral=True)
    with torch.no_grad():
        module(torch.randn(4, 100, 16))
    assert module.health.sampled_queries == 32
    assert module.health.spectral_gap is None  # only defined when every row is sampled
    module(torch.randn(4, 10, 16))
    assert module.health.sampled_queries == 30  # three whole sequences of 10 rows


def test_empty_rows_are_counted():
    module = RobustAttention(16, num_heads=2, probe=True)
    mask = torch.ones(5, 5, dtype=torch.bool)
    mask[1] = False
    out = module(torch.randn(1, 5, 16), attn_mask=mask)
    assert module.health.empty_queries == 2  # one row, two heads
    assert torch.isfinite(out).all()


def test_nonfinite_inputs_are_counted_not_hidden():
    module = RobustAttention(16, num_heads=2, probe=True, probe_spectral=True)
    x = torch.randn(1, 5, 16)
    x[0, 2, 0] = torch.nan
    module(x)
    assert module.health.nonfinite["q"] > 0 and module.health.nonfinite["output"] > 0
    assert module.health.spectral_gap.isnan().all()  # reported as unknown, not made up
    assert module.health.entropy.isnan().all()  # a nan row is not a healthy, uniform row


def test_global_and_module_switches():
    module, forced_off = RobustAttention(16, num_heads=2), RobustAttention(16, num_heads=2,
                                                                           probe=False)
    x = torch.randn(1, 5, 16)
    module(x)
    assert module.health is None
    with health_probe():
        module(x)
        forced_off(x)
    assert module.health is not None and forced_off.health is None
    set_probe_enabled(True)
    module.health = None
    module(x)
    assert module.health is not None


def test_to_dict_gives_plain_numbers():
    module = RobustAttention(16, num_heads=2, probe=True)
    module(torch.randn(1, 5, 16))
    report = module.health.to_dict()
    assert isinstance(report["entropy"], list) and isinstance(report["entropy"][0], float)
    assert isinstance(report["nonfinite"]["q"], int)


@pytest.mark.parametrize("bad", [0, -3])
def test_probe_queries_must_be_positive(bad):
    with pytest.raises(ValueError, match="probe_queries"):
        RobustAttention(16, num_heads=2, probe_queries=bad)


@pytest.mark.parametrize("variant", list_variants())
@pytest.mark.parametrize("bad", [torch.nan, torch.inf, -torch.inf])
def test_every_preset_counts_a_non_finite_input_and_does_not_crash(variant, bad):
    module = create(variant, 8, num_heads=2, probe=True)
    x = torch.randn(2, 6, 8)
    x[1, 3, 2] = bad
    with torch.no_grad():
        module(x)
    counts = module.health.nonfinite
    assert counts["q"] > 0 and counts["k"] > 0 and counts["v"] > 0 and counts["output"] > 0
