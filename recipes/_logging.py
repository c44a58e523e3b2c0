"""Recipe output: CSV files (and TensorBoard when installed), a progress bar, markdown tables."""

from __future__ import annotations

import csv
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path


class MetricsLog:
    """Appends rows to ``<out>/<name>.csv`` and, when the ``tensorboard`` package is
    installed, scalars to ``<out>/tensorboard``.

    A file's columns are its existing header, or else the first row's keys; rows
    of one file must have those keys. Appending lets a resumed run continue its files.
    """

    def __init__(self, out: Path, tensorboard: bool = True):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self._files: dict[str, tuple] = {}
        self._writer = _tensorboard_writer(out / "tensorboard") if tensorboard else None

    def write(self, name: str, row: Mapping[str, object]) -> None:
        if name not in self._files:
            path = self.out / f"{name}.csv"
            header = read_header(path)
            handle = path.open("a", newline="")
            writer = csv.DictWriter(handle, fieldnames=header or list(row))
            if not header:
                writer.writeheader()
            self._files[name] = (handle, writer)
        handle, writer = self._files[name]
        writer.writerow(row)
        handle.flush()

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """TensorBoard scalars (nothing without tensorboard)."""
        if self._writer is not None:
            for tag, value in values.items():
                self._writer.add_scalar(tag, value, step)

    def close(self) -> None:
        for handle, _ in self._files.values():
            handle.close()
        if self._writer is not None:
            self._writer.close()


def _tensorboard_writer(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch's writer needs the tensorboard package
        return None
    return SummaryWriter(str(path))


def read_header(path: Path) -> list[str]:
    """The column names of a CSV file; empty when it does not exist or is empty."""
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        return next(csv.reader(handle), [])


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


class _PlainProgress:
    """A progress report by prints, every ``every`` steps, when tqdm is not installed."""

    def __init__(self, total: int, initial: int, desc: str, every: int = 10):
        self.n, self.total, self.desc, self.every = initial, total, desc, every
        self.start = time.perf_counter()
        self.postfix = ""

    def update(self, count: int = 1) -> None:
        self.n += count
        if self.n % self.every == 0 or self.n == self.total:
            rate = self.n / max(time.perf_counter() - self.start, 1e-9)
            print(f"{self.desc} {self.n}/{self.total} ({rate:.1f} it/s) {self.postfix}",
                  file=sys.stderr)

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def close(self) -> None:
        pass


def progress(total: int, initial: int = 0, desc: str = "", enabled: bool = True):
    """A tqdm bar when tqdm is installed (it comes with timm), else periodic prints."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _PlainProgress(total, initial, desc)
    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
