"""benchmarks/monitor_overhead.py: the README's monitor-history-cost block is the committed
results' table (the numbers are measured by the benchmark, never asserted here)."""

import json
from pathlib import Path

import pytest

from .test_claims_table import readme_block

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


@pytest.fixture
def monitor_overhead(monkeypatch):
    """The benchmark's module, imported as its script imports its siblings."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import monitor_overhead

    return monitor_overhead


def test_readme_table_is_rendered_from_the_committed_results(monitor_overhead):
    committed = json.loads((BENCHMARKS / "results" / "monitor-overhead.json").read_text())
    assert [cost["samples"] for cost in committed["report_cost"]] == [10, 100, 1000]
    assert readme_block("monitor-history-cost") == monitor_overhead.readme_table(committed)
