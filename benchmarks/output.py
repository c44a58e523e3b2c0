"""A benchmark's results on disk: <stem>.json (every figure) and <stem>.md (its table), side by side."""

from __future__ import annotations

import json
import os
from pathlib import Path


def load_average() -> list[float]:
    """The machine's 1, 5 and 15 minute load averages (a shared machine's timings depend on them)."""
    return [round(x, 1) for x in os.getloadavg()]


def write(out: Path, stem: str, report: dict, table: str) -> None:
    """Write ``report`` as out/<stem>.json and ``table`` as out/<stem>.md, and print the table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{stem}.md").write_text(table)
    print(table)
