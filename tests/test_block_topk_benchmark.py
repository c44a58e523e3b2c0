"""benchmarks/block_topk.py: --quick runs end to end and writes its JSON and table (no timing
asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


@pytest.mark.slow
def test_quick_benchmark_writes_json_and_markdown(tmp_path):
    subprocess.run([sys.executable, str(BENCHMARKS / "block_topk.py"), "--quick", "--out",
                    str(tmp_path)], check=True, capture_output=True, timeout=300)
    report = json.loads((tmp_path / "block-topk-quick.json").read_text())
    assert report["shape"]["tokens"] == 512 and report["machine"]["threads"] == 1
    rows = report["rows"]
    assert {(row["variant"], row["causal"]) for row in rows} == {
        (variant, causal) for causal in (False, True)
        for variant in ("dense (SDPA, no mask)", "block_topk=(64, 2)", "block_topk=(512, 2)")}
    assert all(row["step_s"] > 0 and row["ratio_to_dense"] > 0 for row in rows)
    assert all((row["selection_s"] is None) == row["variant"].startswith("dense") for row in rows)
    table = (tmp_path / "block-topk-quick.md").read_text()
    assert "| block_topk=(64, 2) | True |" in table and report["machine"]["cpu"] in table
