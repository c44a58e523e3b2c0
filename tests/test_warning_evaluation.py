"""Scoring early warnings, and the committed evaluation: README table, informational codes and
default thresholds all equal recipes/results/warning_evaluation/evaluation.json."""

import json
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

import warning_evaluation  # noqa: E402
from _warning_scores import Run, persist, score  # noqa: E402

from robust_attn import HealthMonitor  # noqa: E402
from robust_attn.health.early_warnings import INFORMATIONAL, Thresholds, replay  # noqa: E402
from robust_attn.studies.stack import AttentionStack, init_stack_weights  # noqa: E402

RESULTS = ROOT / "recipes/results/warning_evaluation/evaluation.json"


def timeline(*warned_steps, every=10, samples=30):
    return [(i * every, frozenset({("x", None, None)}) if i * every in warned_steps else
             frozenset()) for i in range(samples)]


def test_score_recall_lead_and_false_alarms():
    runs = [Run("f1", True, 200, 300, 300, timeline(100, 110)),     # lead 100 steps
            Run("f2", True, 100, 300, 300, timeline(100)),          # on the failure step: late
            Run("h1", False, None, 300, 300, timeline(50, 70)),     # two onsets
            Run("h2", False, None, 300, 300, timeline())]
    result = score(runs)
    assert (result.failed, result.healthy) == (2, 2)
    assert result.recall == 0.5 and result.median_lead_steps == 100
    assert result.median_lead_before_failure == pytest.approx(0.5)
    assert result.median_lead_of_run == pytest.approx(1 / 3)
    assert result.alarms_per_1k_steps == pytest.approx(1000 * 2 / 600)
    assert result.healthy_warned == 0.5 and not result.meets_targets()


def test_persistence_needs_consecutive_firings():
    raw = timeline(10, 20, 40)
    assert [s for s, keys in persist(raw, 2) if keys] == [20]
    assert [s for s, keys in persist(raw, 3) if keys] == []
    assert persist(raw, 3, immediate=True) == raw


def test_calibration_shortcut_equals_the_monitor_replay():
    """persist(raw_timeline(...)) is how calibration scores hysteresis cheaply: it must equal
    what robust_attn.health.early_warnings.replay raises."""
    torch.manual_seed(0)
    stack = AttentionStack(2, 16, 2, residual=True)
    init_stack_weights(stack, 4.0, torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(stack.parameters(), lr=0.05)
    x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(1))
    with HealthMonitor(stack, every=1) as monitor:
        for _ in range(12):
            loss = stack(x)[-1].square().mean()
            loss.backward()
            monitor.step(loss)
            optimizer.step()
            optimizer.zero_grad()
    report = monitor.report()
    for persistence in (1, 2, 3):
        t = Thresholds(entropy_collapse=0.8, persistence=persistence, warmup_steps=3)
        expected = [(step, frozenset((w.code, w.layer, w.head) for w in warnings))
                    for step, warnings in replay(report, t, codes=["entropy_collapse"])]
        shortcut = persist(warning_evaluation.raw_timeline(report, t, "entropy_collapse"),
                           persistence)
        assert shortcut == expected
    assert any(keys for _, keys in expected)  # it fired, so the comparison says something


@pytest.fixture(scope="module")
def results():
    return json.loads(RESULTS.read_text())


def test_readme_table_is_generated_from_the_results(results):
    readme = (ROOT / "README.md").read_text()
    block = readme.split(warning_evaluation.START)[1].split(warning_evaluation.END)[0]
    assert block.strip() == warning_evaluation.render_table(results).strip()
    assert (RESULTS.parent / "evaluation.md").read_text().strip() == block.strip()


def test_informational_codes_and_default_thresholds_are_the_evaluated_ones(results):
    assert set(results["informational"]) == INFORMATIONAL
    for code, figures in results["held_out"]["scores"].items():
        if code in warning_evaluation.RULES:
            assert figures["meets_targets"] == (code not in INFORMATIONAL)
    assert asdict(Thresholds()) == results["thresholds"]
