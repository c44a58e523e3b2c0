"""Trainability diagrams: beta's scale, the theory's recursion, and cells whose outcome is known."""

import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from robust_attn.claim import StackSetting
from robust_attn.studies.diagnostics import (
    Architecture,
    attention_update,
    measure_cell,
    qk_scale_for_beta,
    rem_entropy,
    theory_health,
    theory_layers,
    trainability_diagram,
)
from robust_attn.studies.stack import AttentionStack, construct_stack, init_stack_weights, layer_health

SMALL = Architecture(depth=6, dim=32, num_heads=2, tokens=16)


def test_beta_sets_the_logit_std_to_beta_sqrt_log_n():
    tokens, beta = 64, 3.0
    stack = AttentionStack(1, 256, 4)
    init_stack_weights(stack, qk_scale_for_beta(beta, tokens), torch.Generator().manual_seed(0))
    x = stack.norms[0](torch.randn(8, tokens, 256))
    attention = stack.layers[0]
    q, k, _ = attention.qkv(x).detach().reshape(8, tokens, 3, 4, 64).permute(2, 0, 3, 1, 4)
    logits = (q @ k.transpose(-1, -2)) * attention.scale
    assert logits.std().item() == pytest.approx(beta * math.sqrt(math.log(tokens)), rel=0.1)


def test_attention_update_follows_the_rem():
    assert attention_update(0.0, 1.0) == (0.0, 0.0)  # beta < beta_c = sqrt(2): output = mean
    q_att, p_att = attention_update(0.0, 2 * math.sqrt(2))  # beta = 2 beta_c: half condensed
    assert (q_att, p_att) == pytest.approx((0.5, 0.0))
    assert attention_update(0.5, 1.99) == (0.5, 0.5)  # beta_c(0.5) = 2
    assert attention_update(1.0, 100.0) == (1.0, 1.0)
    assert rem_entropy(0.0, 1.0) == pytest.approx(0.5) and rem_entropy(0.0, 2.0) == 0.0


def test_theory_without_residual_collapses_in_one_layer_below_beta_c():
    for norm in ("pre", "post"):
        assert theory_layers(1.0, 0.0, 3, norm)[0].overlap == 1.0
        frozen = theory_layers(100.0, 0.0, 3, norm, overlap=0.5)  # beta_c(0.5) = 2 << beta
        assert frozen[0].overlap == pytest.approx(0.5 / (0.5 + 0.5 * (1 - 2 / 100)))
        assert frozen[0].entropy == 0.0


@given(beta=st.floats(0.01, 500), alpha=st.floats(0, 8), overlap=st.floats(0, 1),
       norm=st.sampled_from(["pre", "post"]))
def test_theory_overlap_never_decreases_and_stays_in_range(beta, alpha, overlap, norm):
    layers = theory_layers(beta, alpha, 12, norm, overlap)
    overlaps = [overlap] + [layer.overlap for layer in layers]
    assert all(0.0 <= c <= 1.0 + 1e-12 for c in overlaps)
    assert all(b >= a - 1e-12 for a, b in zip(overlaps, overlaps[1:], strict=False))
    assert all(0.0 <= layer.entropy <= 1.0 for layer in layers)


def test_pre_ln_alpha_one_is_the_residual_stack_bit_for_bit():
    """A diagram's pre-LN cell at alpha = 1 runs AttentionStack(residual=True) itself, drawn the
    same way (construct_stack, then the theory's init_stack_weights)."""
    beta = 0.7
    health, _, _ = measure_cell("baseline", SMALL, beta, 1.0)
    setting = StackSetting(depth=6, dim=32, num_heads=2, tokens=16,
                           qk_scale=qk_scale_for_beta(beta, 16), residual=True)
    generator = torch.Generator().manual_seed(setting.seed)
    stack = construct_stack(setting, generator, probe=True)
    init_stack_weights(stack, setting.qk_scale, generator)
    x = torch.randn(setting.batch, setting.tokens, setting.dim, generator=generator)
    with torch.no_grad():
        hidden = stack(x)
    layers = [layer_health(i, attention, state)
              for i, (attention, state) in enumerate(zip(stack.layers, hidden, strict=True))]
    assert health.layers == layers and health.setting == setting


@pytest.mark.parametrize("norm", ["pre", "post"])
@pytest.mark.parametrize("beta, alpha, verdict", [
    (0.05, 0.0, "rank collapse"),     # tiny beta, attention only: uniform attention averages
    (50.0, 0.0, "entropy collapse"),  # huge beta: one-hot attention
    (50.0, 1.0, "entropy collapse"),
    (0.05, 2.0, "healthy"),           # a strong residual keeps tokens apart
])
def test_known_cells_measured_and_predicted(norm, beta, alpha, verdict):
    architecture = Architecture(depth=6, dim=32, num_heads=2, tokens=16, norm=norm)
    health, _, input_overlap = measure_cell("baseline", architecture, beta, alpha)
    assert health.verdict == verdict
    assert theory_health(beta, alpha, architecture, input_overlap).verdict == verdict


def test_diagram_shows_qk_norm_widening_the_healthy_region(tmp_path):
    betas, alphas = (0.05, 1.0, 50.0), (0.0, 2.0)
    baseline = trainability_diagram("baseline", betas, alphas, SMALL)
    qk_norm = trainability_diagram("qk_norm", betas, alphas, SMALL)
    assert baseline.cell(50.0, 2.0).verdict == "entropy collapse"
    assert qk_norm.cell(50.0, 2.0).verdict == "healthy"
    assert qk_norm.healthy_share() > baseline.healthy_share()
    assert all(cell.theory is not None for cell in baseline.cells)
    assert all(cell.theory is None and cell.agrees is None for cell in qk_norm.cells)
    report = json.loads(json.dumps(baseline.to_dict()))
    assert len(report["cells"]) == 6 and report["theory_agreement"] is not None
    assert "layers" not in report["cells"][0]
    assert len(baseline.to_dict(per_layer=True)["cells"][0]["layers"]) == SMALL.depth
    assert {(d["beta"], d["alpha"]) for d in report["disagreements"]} == \
        {(c.beta, c.alpha) for c in baseline.disagreements()}
    pytest.importorskip("matplotlib")
    from robust_attn.studies.plotting import plot_trainability_diagrams

    path = plot_trainability_diagrams([baseline, qk_norm], tmp_path / "diagram.png")
    assert path.stat().st_size > 10_000


def test_architecture_is_checked():
    with pytest.raises(ValueError, match="norm"):
        Architecture(norm="sandwich")
    with pytest.raises(ValueError, match="tokens"):
        Architecture(tokens=1)
