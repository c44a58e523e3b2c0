"""`robust-attn doctor --run DIR`: a finished run's warnings with evidence, and its health curves."""

import csv
import json
import math

import pytest
import torch

from robust_attn import HealthMonitor
from robust_attn.cli import main
from robust_attn.health.early_warnings import IMMEDIATE
from robust_attn.studies.stack import AttentionStack, init_stack_weights


def write_run(directory, variant="baseline", nan_from=12, steps=16):
    """A short monitored run whose loss turns non-finite at ``nan_from`` (divergence)."""
    stack = AttentionStack(2, 16, 2, residual=True, variant=variant)
    init_stack_weights(stack, 1.0, torch.Generator().manual_seed(0))
    x = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(1))
    losses = []
    with HealthMonitor(stack, every=2) as monitor:
        for step in range(steps):
            loss = stack(x)[-1].square().mean()
            loss.backward()
            fed = loss if step < nan_from else torch.tensor(math.nan)
            monitor.step(fed)
            losses.append(fed.item())
            stack.zero_grad()
    directory.mkdir(parents=True, exist_ok=True)
    monitor.to_csv(directory / "health.csv")
    with (directory / "train.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "loss"])
        writer.writerows(enumerate(losses))
    (directory / "label.json").write_text(json.dumps({"config": {"variant": variant}}))


def test_doctor_run_prints_warnings_with_evidence_and_draws_curves(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    write_run(tmp_path / "run", variant="qk_norm")
    assert main(["doctor", "--run", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "divergence" in IMMEDIATE
    assert "divergence: first at step 12" in out and "non-finite loss" in out
    assert "evidence: steps [12, 13, 14, 15]" in out
    assert "preset qk_norm (uses qk_norm)" in out and "try softcap" in out
    assert "qk_norm bound" not in out.split("warnings (")[1]  # never suggested to a qk_norm run
    assert (tmp_path / "run/doctor.png").stat().st_size > 10_000


def test_doctor_run_healthy_run_and_own_picture_path(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    write_run(tmp_path / "run", nan_from=100)
    assert main(["doctor", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert "16 steps, 8 samples, 2 attention layers; preset baseline" in out
    assert "divergence" not in out and (tmp_path / "c.png").exists()


def error_of(argv, capsys) -> str:
    """The one line a command prints on stderr for bad input (exit status 2, no traceback)."""
    capsys.readouterr()
    assert main(argv) == 2
    printed = capsys.readouterr()
    assert printed.err.startswith("robust-attn doctor: error: ") and printed.err.count("\n") == 1
    return printed.err


def test_doctor_run_names_bad_input(tmp_path, capsys):
    assert f"--run {tmp_path / 'missing'}: no such folder" in \
        error_of(["doctor", "--run", str(tmp_path / "missing")], capsys)
    (tmp_path / "empty").mkdir()
    assert "no such health.csv" in error_of(["doctor", "--run", str(tmp_path / "empty")], capsys)
    write_run(tmp_path / "run")
    (tmp_path / "run/train.csv").write_text("step,accuracy\n0,1\n")
    assert "no 'loss' column" in error_of(["doctor", "--run", str(tmp_path / "run")], capsys)
    assert "--variant" in error_of(["doctor", "--variant", "qk_norm"], capsys)
