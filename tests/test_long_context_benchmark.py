"""benchmarks/long_context.py: --quick runs end to end and writes its JSON and table (no timing
asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .test_claims_table import readme_block

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


@pytest.mark.slow
def test_quick_benchmark_writes_json_and_markdown(tmp_path):
    subprocess.run([sys.executable, str(BENCHMARKS / "long_context.py"), "--quick", "--out",
                    str(tmp_path)], check=True, capture_output=True, timeout=300)
    report = json.loads((tmp_path / "long-context-quick.json").read_text())
    assert report["time_shape"]["tokens"] == 256 and report["peak_shape"]["tokens"] == 512
    rows = report["timings"]["1"]
    variants = {row["variant"] for row in rows}
    assert {"timm", "baseline (sdpa)", "softcap (tiled)", "softcap (chunked)", "sigmoid (tiled)",
            "alibi (tiled)"} <= variants
    assert all(row["forward_s"] > 0 and row["forward_backward_ratio_timm"] > 0 for row in rows)
    assert all("forward_backward_ratio_timm qk_norm" in row for row in rows
               if row["preset"] == "sigmoid")
    assert {row["variant"] for row in report["peaks"]} == variants
    assert all(row["step_peak_mib"] > 0 for row in report["peaks"])
    table = (tmp_path / "long-context-quick.md").read_text()
    assert "| softcap (tiled) | tiled |" in table and report["machine"]["cpu"] in table


def test_readme_table_is_rendered_from_the_committed_results(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import long_context

    committed = json.loads((BENCHMARKS / "results" / "long-context-cpu.json").read_text())
    assert committed["time_shape"] == {"batch": 1, "tokens": 4096, "dim": 512, "heads": 8}
    assert readme_block("long-context") == long_context.readme_table(committed)
