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
    kernel_rows = report["kernel_rows"]
    assert {(row["variant"], row["setting"], row["causal"]) for row in kernel_rows} == {
        (variant, setting, causal) for causal in (False, True) for setting in ("(64, 2)", "(512, 2)")
        for variant in ("dense SDPA", "selection as a dense mask + SDPA",
                        "selection as a per-call layout (selected_blocks kernel)")}
    assert all(row["step_s"] > 0 for row in kernel_rows)
    assert "| (64, 2) | False | selection as a per-call layout (selected_blocks kernel) |" in table
