"""A benchmark's results on disk: <stem>.json (every figure) and <stem>.md (its table), side by side;
and its progress bar while it runs."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable
from pathlib import Path

from tqdm import tqdm


def load_average() -> list[float]:
    """The machine's 1, 5 and 15 minute load averages (a shared machine's timings depend on them)."""
    return [round(x, 1) for x in os.getloadavg()]


def progress(iterable: Iterable, desc: str) -> Iterable:
    """``iterable`` with a progress bar on stderr (the tables go to stdout). No bar when stderr is
    not a terminal (logs, tests) or when ROBUST_ATTN_QUIET is set (``robust-attn bench --quiet``)."""
    quiet = bool(os.environ.get("ROBUST_ATTN_QUIET"))
    return tqdm(iterable, desc=desc, file=sys.stderr, leave=False,
                dynamic_ncols=True, disable=True if quiet else None)


def write(out: Path, stem: str, report: dict, table: str) -> None:
    """Write ``report`` as out/<stem>.json and ``table`` as out/<stem>.md, and print the table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{stem}.md").write_text(table)
    print(table)
