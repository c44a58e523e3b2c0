"""Re-render every generated block of README.md from the committed results files.

    python tools/render_readme.py

Each block sits between ``<!-- name: start -->`` and ``<!-- name: end -->`` and is what a
function of its benchmark makes of its JSON; the tests compare every block with that rendering
(tests/test_*_benchmark.py, test_claims_table.py, test_monitor_overhead.py, test_setup_costs.py),
so after a benchmark rewrites its results, this script brings the README along.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
sys.path[:0] = [str(BENCHMARKS), str(ROOT)]

import claims_table  # noqa: E402
import dense_overhead  # noqa: E402
import long_context  # noqa: E402
import monitor_overhead  # noqa: E402
import setup_costs  # noqa: E402
import sparse  # noqa: E402
from benchmarks.speed_report import readme_table as speed_table  # noqa: E402

RESULTS = BENCHMARKS / "results"
# block name -> (results file, renderer)
BLOCKS = {
    "claims-table": ("claims.json", claims_table.claims_markdown),
    "presets-by-failure": ("claims.json", claims_table.addresses_markdown),
    "dense-overhead": ("dense-overhead.json", dense_overhead.markdown),
    "long-context": ("long-context-cpu.json", long_context.readme_table),
    "monitor-history-cost": ("monitor-overhead.json", monitor_overhead.readme_table),
    "setup-costs": ("setup-costs.json", setup_costs.readme_table),
    "sparse-table": ("sparse-cpu-max8192.json", sparse.readme_table),
    "speed-table": ("speed-cpu.json", speed_table),
}


def render(readme: str) -> str:
    for name, (results, renderer) in BLOCKS.items():
        text = renderer(json.loads((RESULTS / results).read_text()))
        pattern = re.compile(rf"(<!-- {name}: start -->\n).*?(<!-- {name}: end -->)", re.S)
        if not pattern.search(readme):
            raise SystemExit(f"README.md lacks the {name} markers")
        readme = pattern.sub(lambda m: m.group(1) + text + m.group(2), readme)
    return readme


def main() -> None:
    path = ROOT / "README.md"
    path.write_text(render(path.read_text()))


if __name__ == "__main__":
    main()
