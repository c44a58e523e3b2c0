"""benchmarks/setup_costs.py: --quick runs end to end (no timing asserted), and the README's
setup-costs block is the committed results' table."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .test_claims_table import readme_block

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


@pytest.fixture
def setup_costs(monkeypatch):
    """The benchmark's module, imported as its script imports its siblings."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import setup_costs

    return setup_costs


@pytest.mark.slow
def test_quick_benchmark_writes_json_and_markdown(tmp_path):
    subprocess.run([sys.executable, str(BENCHMARKS / "setup_costs.py"), "--quick", "--out", str(tmp_path)],
                   check=True, capture_output=True, timeout=300)
    report = json.loads((tmp_path / "setup-costs-quick.json").read_text())
    assert {"machine", "config", "import", "plan", "sigma_reparam", "targets"} <= set(report)
    assert report["import"]["heavy_modules_loaded"] == []
    assert 0 < report["import"]["robust_attn_above_torch_s"] < report["import"]["import_s"]
    assert {row["N"] for row in report["plan"]} == set(report["config"]["sizes"])
    assert {"local", "longformer", "grid_window"} <= {row["pattern"] for row in report["plan"]}
    assert all(0 < row["share"] <= 0.5 and row["total_s"] > 0 for row in report["plan"])
    assert set(report["targets"]) == {"import_s", "plan_s_at_16384", "sigma_reparam_s"}
    assert not report["targets"]["plan_s_at_16384"]["judged"]
    table = (tmp_path / "setup-costs-quick.md").read_text()
    assert "| set-up cost | measured (median) | on one thread | target | |" in table
    assert report["machine"]["cpu"] in table


def test_readme_table_is_rendered_from_the_committed_results(setup_costs):
    committed = json.loads((BENCHMARKS / "results" / "setup-costs.json").read_text())
    assert committed["config"]["sizes"] == list(setup_costs.FULL["sizes"])
    assert readme_block("setup-costs") == setup_costs.readme_table(committed)
