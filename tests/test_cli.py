"""robust-attn doctor end to end on a small built-in stack, and the verdicts it prints."""

import json

import pytest

from robust_attn.claim import StackSetting
from robust_attn.cli import main
from robust_attn.studies.stack import measure_stack


def test_doctor_prints_tables_and_writes_report_and_picture(tmp_path, capsys):
    assert main(["doctor", "--builtin", "--variants", "baseline", "qk_norm", "--scales", "1", "16",
                 "--depth", "6", "--width", "32", "--heads", "2", "--tokens", "16",
                 "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "Per layer, baseline, attention only" in printed and "verdict" in printed
    report = json.loads((tmp_path / "doctor.json").read_text())
    assert {(r["setting"]["variant"], r["setting"]["qk_scale"], r["setting"]["residual"])
            for r in report} == {(v, s, r) for v in ("baseline", "qk_norm") for s in (1.0, 16.0)
                                 for r in (False, True)}
    assert all(len(r["layers"]) == 6 for r in report)
    assert (tmp_path / "stack_health.png").stat().st_size > 10_000


def test_doctor_rejects_unknown_variant(capsys):
    with pytest.raises(SystemExit):
        main(["doctor", "--variants", "nope"])
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("qk_scale, residual, verdict", [
    (1.0, False, "rank collapse"),      # plain softmax, attention only, sqk = 1 (near uniform)
    (16.0, True, "entropy collapse"),   # sqk = 16: logits of std ~ 85, one-hot attention
    (16.0, False, "both"),              # ... and without residual connections, alike tokens too
    (1.0, True, "healthy"),             # residual connections keep the tokens apart
])
def test_baseline_stack_shows_the_two_failure_modes(qk_scale, residual, verdict):
    assert measure_stack(StackSetting(qk_scale=qk_scale, residual=residual)).verdict == verdict


def test_qk_norm_cures_entropy_collapse_but_not_rank_collapse():
    entropy = measure_stack(StackSetting(variant="qk_norm", qk_scale=16.0))
    baseline = measure_stack(StackSetting(variant="baseline", qk_scale=16.0))
    assert baseline.worst_entropy < 0.1 < entropy.worst_entropy
    assert entropy.verdict == "rank collapse"
