"""benchmarks/dense_overhead.py: --quick runs end to end and writes its JSON and table, each cell a
median of per-round ratios taken from its own runs (no timing asserted)."""

import json
import subprocess
import sys
from pathlib import Path

from .test_claims_table import readme_block

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
PRESETS = ["timm (control)", "baseline", "qk_norm", "sigma_reparam", "gated", "outlier_removal",
           "spectral_qk", "sink"]


def test_quick_benchmark_writes_json_and_markdown(tmp_path):
    subprocess.run([sys.executable, str(BENCHMARKS / "dense_overhead.py"), "--quick", "--out",
                    str(tmp_path)], check=True, capture_output=True, timeout=300)
    report = json.loads((tmp_path / "dense-overhead-quick.json").read_text())
    assert report["machine"]["threads"] == 1 and report["repeats"] == 3
    rows = {row["preset"]: row for row in report["rows"]}
    assert list(rows) == PRESETS
    assert rows["qk_norm"]["equivalent"] == "timm qk_norm"
    assert rows["outlier_removal"]["equivalent"] == "timm proj_bias=False"
    assert rows["sigma_reparam"]["inference_module"] == "sigma_reparam folded"
    assert rows["sink"]["target"] == 1.05 and rows["baseline"]["target"] == 1.02
    for row in rows.values():
        cells = [row[f"{mode}_{check}"] for mode in ("train", "inference") for check in ("on", "off")]
        assert all(cell > 0 for cell in cells)
        if row["target"] is None:
            assert row["preset"] == "timm (control)" and row["met"] is None
            continue
        assert row["met"] == (row["train_on"] <= row["target"] and
                              row["inference_on"] <= row["target"])
    table = (tmp_path / "dense-overhead-quick.md").read_text()
    assert "| sink | timm |" in table and report["machine"]["cpu"] in table


def test_readme_table_is_rendered_from_the_committed_results(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import dense_overhead

    committed = json.loads((BENCHMARKS / "results" / "dense-overhead.json").read_text())
    assert committed["shape"] == {"batch": 8, "tokens": 197, "dim": 384, "heads": 6}
    assert readme_block("dense-overhead") == dense_overhead.markdown(committed)
