"""Every early warning fires on a case that has its problem and stays silent on a healthy one.

Most cases are monitor reports built by hand, so each rule is tested at its threshold; the
collapse rules are also run end to end on deep attention stacks at initialisation
(robust_attn.studies.stack), baseline collapsing beside the variant that cures it under the same draw.
"""

import copy
import math
import statistics
from dataclasses import replace

import pytest
import torch
from torch import nn

from robust_attn import HealthMonitor, RobustAttention, list_variants
from robust_attn.health import early_warnings
from robust_attn.health.early_warnings import (
    GENERAL_ADVICE,
    RULES,
    EarlyWarnings,
    Thresholds,
    check,
    replay,
    slope,
    suggestions,
)
from robust_attn.health.monitor import LayerSeries, MonitorReport
from robust_attn.health.warning_history import RunningMedian, robust_edge
from robust_attn.studies.stack import AttentionStack, init_stack_weights

from . import early_warnings_reference

HEALTHY = {"entropy": 0.8, "min_entropy": 0.6, "sink_mass": 0.05, "max_logit": 5.0,
           "head_cosine": 0.3, "head_residual": 0.8, "input_residual": 0.9, "input_cosine": 0.1,
           "branch_gain": 0.5, "map_similarity": 0.1, "grad_norm": 1.0, "nonfinite": 0.0}
HEAD_VALUED = ("entropy", "min_entropy", "sink_mass", "max_logit", "head_cosine", "head_residual")


# The rules' mechanics are tested at fixed thresholds, with no warm-up or hysteresis; the
# calibrated defaults are checked against the evaluation (tests/test_warning_evaluation.py).
AT = Thresholds(entropy_collapse=0.1, entropy_fall_rate=1e-3, entropy_fall_min=0.05,
                trend_samples=5, logit_bound=100.0, rank_residual=0.01, rank_cosine=0.99,
                sink_share=0.5, loss_band=6.0, vanishing_ratio=1e-3, exploding_factor=100.0,
                redundant_similarity=0.95, lazy_gain=1e-3, warmup_steps=0, persistence=1)


def report(samples=6, every=10, layers=3, heads=2, losses=None, **overrides):
    """A healthy report: ``samples`` sampled steps of ``layers`` layers, ``heads`` heads each.

    overrides: metric -> function (layer, head or None, sample index) -> value, replacing the
    healthy value where it returns something other than None.
    """
    result = MonitorReport(every, steps=[i * every for i in range(samples)],
                           losses=losses if losses is not None else
                           [2.0 - 0.001 * i for i in range(samples * every)])
    for layer in range(layers):
        series = LayerSeries(f"blocks.{layer}.attn", heads)
        for metric, healthy in HEALTHY.items():
            override = overrides.get(metric, lambda *args: None)

            def value(head, sample, override=override, healthy=healthy, layer=layer):
                replaced = override(layer, head, sample)
                return healthy if replaced is None else replaced

            getattr(series, metric).extend(
                [[value(h, s) for h in range(heads)] for s in range(samples)]
                if metric in HEAD_VALUED else [value(None, s) for s in range(samples)])
        result.layers.append(series)
    return result


def codes(found):
    return {warning.code for warning in found}


def at(layer, value, head=None, from_sample=0):
    """An override: ``value`` in one layer (and head), from one sample on."""
    return lambda lay, h, s: value if lay == layer and (head is None or h == head) \
        and s >= from_sample else None


def noisy_losses(steps, seed=0, level=2.0, noise=0.02):
    generator = torch.Generator().manual_seed(seed)
    trend = torch.linspace(level, level / 2, steps)
    return (trend + noise * torch.randn(steps, generator=generator)).tolist()


# code -> (report that has the problem, healthy report that must stay silent)
CASES = {
    "entropy_collapse": (report(entropy=at(1, 0.05, head=1)), report(entropy=at(1, 0.15, 1))),
    "entropy_falling": (report(entropy=lambda layer, h, s: 0.8 - 0.02 * s * 10 if layer == 2 else None),
                        report(entropy=lambda layer, h, s: 0.8 - 0.0005 * s * 10)),
    "logit_growth": (report(max_logit=lambda layer, h, s: 10.0 * 2 ** s if layer == 0 else None),
                     report(max_logit=lambda layer, h, s: 10.0 + s)),
    "rank_collapse": (report(input_residual=at(2, 0.005, from_sample=5)),
                      report(input_residual=at(2, 0.02))),
    "attention_sink": (report(sink_mass=lambda layer, h, s: 0.6 if (layer, h) != (0, 0) else None),
                       report(sink_mass=lambda layer, h, s: 0.6 if layer == 0 else None)),
    "loss_spike": (report(losses=noisy_losses(60)[:55] + [5.0] + noisy_losses(60)[56:]),
                   report(losses=noisy_losses(60))),
    "loss_oscillation": (report(losses=noisy_losses(40)[:20] + [1.0, 1.5] * 10),
                         report(losses=noisy_losses(40, noise=0.05))),
    "divergence": (report(losses=[2.0] * 30 + [math.nan] + [None] * 29),
                   report(losses=[2.0] * 30 + [None] * 30)),
    "vanishing_gradients": (report(grad_norm=at(0, 1e-4)), report(grad_norm=at(0, 1e-2))),
    "exploding_gradients": (report(grad_norm=at(1, 500.0, from_sample=5)),
                            report(grad_norm=at(1, 50.0, from_sample=5))),
    "redundant_layer": (report(map_similarity=at(2, 0.99)), report(map_similarity=at(2, 0.9))),
    "lazy_layer": (report(branch_gain=at(1, 1e-4)), report(branch_gain=at(1, 1e-2))),
}


def test_every_rule_has_cases_and_presets_that_exist():
    assert set(CASES) == set(RULES) == set(GENERAL_ADVICE)
    for presets, advice in ((suggestions(code), GENERAL_ADVICE[code]) for code in RULES):
        assert presets and set(presets) <= set(list_variants()) and advice


@pytest.mark.parametrize("code", sorted(CASES))
def test_warning_fires_on_the_problem(code):
    found = [w for w in check(CASES[code][0], AT) if w.code == code]
    assert found, f"{code} did not fire"
    for warning in found:
        assert warning.mitigations == tuple(suggestions(code)) and warning.message
        assert warning.evidence["steps"] and len(warning.evidence["steps"]) == \
            len(warning.evidence["values"])
        assert warning.to_dict()["code"] == code


@pytest.mark.parametrize("code", sorted(CASES))
def test_warning_stays_silent_when_healthy(code):
    assert code not in codes(check(CASES[code][1], AT))


def test_healthy_report_raises_nothing():
    assert check(report(), AT) == []


def test_warnings_name_the_layer_and_head():
    (warning,) = check(CASES["entropy_collapse"][0], AT)
    assert (warning.layer, warning.head) == ("blocks.1.attn", 1)
    assert warning.evidence["values"][-1] == 0.05


def test_explicit_sinks_are_not_sinks():
    sinking = copy.deepcopy(CASES["attention_sink"][0])
    for series in sinking.layers:
        series.explicit_sink = True
    assert "attention_sink" not in codes(check(sinking, AT))


def test_thresholds_are_respected():
    case = report(entropy=at(1, 0.15, head=1))
    assert "entropy_collapse" in codes(check(case, replace(AT, entropy_collapse=0.2)))


def test_slope_and_robust_edge():
    assert slope([0, 10, 20], [1.0, 0.5, 0.0]) == pytest.approx(-0.05)
    assert slope([0, 10], [1.0, 0.5]) is None
    assert math.isnan(robust_edge([], 2.0)) and math.isnan(robust_edge([math.nan], 2.0))
    assert robust_edge([1.0], 2.0) == pytest.approx(1.0 + 2.0 * 1e-3)
    # [2, 4, 3]: median 3, MAD 1; [4, 3, nan]: lower median 3, MAD 0 (floor 1e-3 * 3)
    assert robust_edge([2.0, 4.0, 3.0], 2.0) == pytest.approx(3.0 + 2.0 * 1.4826)
    assert robust_edge([4.0, 3.0, math.nan], 2.0) == pytest.approx(3.0 + 2.0 * 3e-3)


@pytest.mark.parametrize(("field", "value"), [("trend_samples", 0), ("evidence_samples", 0),
                                              ("loss_window", 2.5), ("persistence", True),
                                              ("warmup_steps", -1)])
def test_counts_in_the_thresholds_are_checked_naming_the_field(field, value):
    """A count of 0 would read as 'the whole history' in a slice ([-0:]), not as none."""
    with pytest.raises(ValueError, match=f"{field}="):
        replace(Thresholds(), **{field: value})


def test_running_median_is_the_median():
    generator = torch.Generator().manual_seed(0)
    running, seen = RunningMedian(), []
    assert running.median() is None
    for value in torch.randint(0, 20, (200,), generator=generator).double().tolist():
        running.push(value)
        seen.append(value)
        assert running.median() == statistics.median(seen) and len(running) == len(seen)


def random_report(generator, samples, every, layers, heads, rare=0.05):
    """A report of random health series and losses, with nan, inf, spikes, falls and sinks in
    places: every rule fires somewhere on some draws. Each series starts finite."""
    def draw(low, high, shape=()):
        value = low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)
        odd = torch.rand(shape, generator=generator)
        value = torch.where(odd < rare, torch.nan, value)
        return torch.where((odd > rare) & (odd < 2 * rare), torch.inf, value).tolist()

    steps = [i * every for i in range(samples)]
    losses = [None if u < 0.1 else loss for u, loss in
              zip(torch.rand(samples * every, generator=generator).tolist(),
                  draw(1.0, 3.0, (samples * every,)), strict=True)]
    losses[0] = 2.0
    result = MonitorReport(every, steps, losses)
    ranges = {"entropy": (0.0, 1.0), "min_entropy": (0.0, 1.0), "sink_mass": (0.0, 0.6),
              "max_logit": (0.0, 30.0), "head_cosine": (0.0, 1.0), "head_residual": (0.0, 1.0),
              "input_residual": (0.0, 0.05), "input_cosine": (0.95, 1.0),
              "branch_gain": (0.0, 0.01), "map_similarity": (0.8, 1.0), "grad_norm": (0.0, 30.0),
              "nonfinite": (0.0, 1.0)}
    for layer in range(layers):
        series = LayerSeries(f"layers.{layer}", heads, explicit_sink=layer == 1)
        for metric, (low, high) in ranges.items():
            values = draw(low, high, (samples, heads) if metric in HEAD_VALUED else (samples,))
            values[0] = [low] * heads if metric in HEAD_VALUED else low
            getattr(series, metric).extend(values)
        result.layers.append(series)
    return result


def random_thresholds(generator):
    integer = lambda low, high: int(torch.randint(low, high + 1, (), generator=generator))  # noqa: E731
    return replace(Thresholds(), entropy_collapse=0.1, entropy_fall_rate=1e-3,
                   entropy_fall_min=0.05, trend_samples=integer(3, 8), logit_bound=25.0,
                   sink_share=0.3, loss_window=integer(3, 12), loss_min_history=integer(1, 5),
                   loss_band=1.0, oscillation_window=integer(3, 6), oscillation_flips=0.5,
                   oscillation_amplitude=0.05, exploding_factor=2.0, vanishing_ratio=0.05,
                   evidence_samples=integer(1, 6), warmup_steps=integer(0, 30),
                   persistence=integer(1, 3))


def incremental_equals_from_scratch(seed):
    """EarlyWarnings fed one sample (and its losses) at a time raises, after every sample and at
    the end, exactly what the rules computed from scratch over the whole report raise (the
    definitions as first written: tests/early_warnings_reference.py); returns the codes raised."""
    generator = torch.Generator().manual_seed(seed)
    t = random_thresholds(generator)
    full = random_report(generator, samples=int(torch.randint(1, 30, (), generator=generator)),
                         every=int(torch.randint(1, 4, (), generator=generator)), layers=3, heads=2)
    incremental, fired = EarlyWarnings(t), set()
    for samples in range(1, len(full.steps) + 1):
        incremental.update(full, samples)
        expected = early_warnings_reference.check(full.truncated(samples), t, in_use={"qk_norm"})
        assert incremental.warnings(in_use={"qk_norm"}) == expected
        fired |= {warning.code for warning in expected}
    incremental.update(full)
    assert incremental.warnings() == early_warnings_reference.check(full, t) == check(full, t)
    return fired


def test_incremental_warnings_equal_the_from_scratch_rules():
    fired = set().union(*(incremental_equals_from_scratch(seed) for seed in range(16)))
    assert fired == set(RULES)  # the draws exercise every rule, not only silence


def test_warm_up_ignores_early_samples_but_not_divergence():
    falling = CASES["entropy_falling"][0]
    assert "entropy_falling" in codes(check(falling, AT))
    assert "entropy_falling" not in codes(check(falling, replace(AT, warmup_steps=30)))
    diverged = CASES["divergence"][0]
    assert "divergence" in codes(check(diverged, replace(AT, warmup_steps=1000, persistence=3)))


def test_hysteresis_needs_the_same_head_on_consecutive_samples():
    last_only = report(entropy=at(1, 0.05, head=1, from_sample=5))
    last_two = report(entropy=at(1, 0.05, head=1, from_sample=4))
    other_head = report(entropy=lambda lay, h, s: 0.05 if lay == 1 and h == s % 2 and s >= 4
                        else None)
    level = replace(AT, entropy_fall_min=10.0)  # only the level rule here
    assert codes(check(last_only, level)) == {"entropy_collapse"}
    assert check(last_only, replace(level, persistence=2)) == []
    assert codes(check(last_two, replace(level, persistence=2))) == {"entropy_collapse"}
    assert check(other_head, replace(level, persistence=2)) == []
    steps = [step for step, warnings in replay(last_two, replace(level, persistence=2))
             if warnings]
    assert steps == [50]


def test_informational_codes_say_so(monkeypatch):
    monkeypatch.setattr(early_warnings, "INFORMATIONAL", frozenset({"entropy_collapse"}))
    (warning,) = check(CASES["entropy_collapse"][0], AT)
    assert warning.informational and "informational" in str(warning)
    trusted = next(w for w in check(CASES["logit_growth"][0], AT) if w.code == "logit_growth")
    assert not trusted.informational and "informational" not in str(trusted)


@pytest.mark.parametrize("code", sorted(CASES))
def test_suggestions_never_name_a_preset_in_use(code):
    for preset in suggestions(code):
        found = [w for w in check(CASES[code][0], AT, in_use={preset}) if w.code == code]
        assert found
        for warning in found:
            assert preset not in warning.mitigations
            assert suggestions(code)[preset] not in warning.advice  # nor its reason
            assert set(warning.mitigations) == set(suggestions(code)) - {preset}


def test_a_qk_norm_model_is_never_told_to_use_qk_norm():
    model = stack("qk_norm", 16.0, False)
    x = X.clone()
    x[0, 3, 5] = math.nan  # divergence, whose suggestions start with qk_norm
    with HealthMonitor(model, every=1, thresholds=AT) as monitor:
        loss = model(x)[-1].square().mean()
        loss.backward()
        monitor.step(loss)
        warnings = monitor.warnings()
    assert "divergence" in codes(warnings) and "qk_norm" in monitor.in_use
    assert all("qk_norm" not in w.mitigations and "qk_norm" not in w.advice for w in warnings)


# End to end: deep attention stacks at initialisation (robust_attn.studies.stack), one monitored step each.

def monitored_step(model, x):
    with HealthMonitor(model, every=1, thresholds=AT) as monitor:
        loss = model(x)[-1].square().mean()
        loss.backward()
        monitor.step(loss)
        return codes(monitor.warnings())


def stack(variant, qk_scale, residual, depth=12):
    model = AttentionStack(depth, 64, 4, residual=residual, variant=variant)
    init_stack_weights(model, qk_scale, torch.Generator().manual_seed(0))
    return model


X = torch.randn(2, 32, 64, generator=torch.Generator().manual_seed(1))


def test_entropy_collapse_and_logit_growth_fire_on_baseline_not_on_qk_norm():
    baseline = monitored_step(stack("baseline", 16.0, True), X)
    assert {"entropy_collapse", "logit_growth"} <= baseline
    assert not {"entropy_collapse", "logit_growth"} & monitored_step(stack("qk_norm", 16.0, True), X)


def test_rank_collapse_fires_on_baseline_not_on_outlier_removal():
    assert "rank_collapse" in monitored_step(stack("baseline", 1.0, False), X)
    assert "rank_collapse" not in monitored_step(stack("outlier_removal", 1.0, False), X)
    assert "rank_collapse" not in monitored_step(stack("baseline", 1.0, True), X)


class TwoBranches(nn.Module):
    """Two attention modules reading the same tokens: identical copies, or independent draws."""

    def __init__(self, same: bool, gain: float = 1.0):
        super().__init__()
        self.first = RobustAttention(32, num_heads=2)
        self.second = copy.deepcopy(self.first) if same else RobustAttention(32, num_heads=2)
        with torch.no_grad():
            self.first.qkv.weight.mul_(4.0)  # peaked maps, far from uniform
            self.second.qkv.weight.copy_(self.first.qkv.weight if same else
                                         4.0 * self.second.qkv.weight)
            self.second.proj.weight.mul_(gain)
            self.second.proj.bias.mul_(gain)

    def forward(self, x):
        return [self.first(x) + self.second(x)]


def test_redundant_layer_fires_on_repeated_maps_only():
    x = torch.randn(2, 16, 32)
    assert "redundant_layer" in monitored_step(TwoBranches(same=True), x)
    assert "redundant_layer" not in monitored_step(TwoBranches(same=False), x)


def test_lazy_layer_fires_on_a_branch_that_adds_nothing():
    x = torch.randn(2, 16, 32)
    assert "lazy_layer" in monitored_step(TwoBranches(same=False, gain=1e-5), x)
    assert "lazy_layer" not in monitored_step(TwoBranches(same=False), x)


def test_divergence_fires_on_non_finite_activations():
    model = TwoBranches(same=False)
    x = torch.randn(2, 16, 32)
    assert "divergence" not in monitored_step(model, x)
    x[0, 3, 5] = math.inf
    assert "divergence" in monitored_step(model, x)
