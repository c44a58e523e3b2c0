"""How the benchmarks measure: a clock, peak memory, one timed step, interleaved rounds.

Used by sparse.py and speed.py, so that every table is measured the same way:

- time: ``time.perf_counter``; on CUDA after ``torch.cuda.synchronize``, so a
  reading waits for the kernels it times;
- peak memory above a step's start, MiB: on the CPU the process's resident
  memory (Linux: VmHWM after resetting it through /proc/self/clear_refs, with
  glibc's mmap threshold fixed at 64 KiB so that freed tensors leave the process
  at once and a later step's peak is its own; that costs page faults on every
  large allocation, so speed.py times without it and takes peaks in separate
  processes); on CUDA ``torch.cuda.max_memory_allocated`` above
  ``memory_allocated`` at the start;
- rounds: one untimed warm-up of every case, then ``repeats`` rounds in which
  every case runs once, each round in a rotated order (A B C, B C A, C A B, ...),
  so drift of a shared machine hits every case alike; results are medians.
"""

from __future__ import annotations

import ctypes
import re
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


class Clock:
    """Seconds since :meth:`start`, synchronising CUDA first when the device is a GPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def start(self) -> None:
        self.began = self._now()

    def elapsed(self) -> float:
        return self._now() - self.began


class PeakMemory:
    """Resident memory of this process above a starting point, MiB (Linux /proc; None elsewhere)."""

    def __init__(self):
        self.works = Path("/proc/self/clear_refs").exists()
        if self.works:
            try:  # glibc: give every freed allocation above 64 KiB back to the OS at once
                ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 1 << 16)
            except OSError:
                pass

    @staticmethod
    def _status(field: str) -> float:
        text = Path("/proc/self/status").read_text()
        return int(re.search(rf"{field}:\s+(\d+)", text).group(1)) / 1024

    def start(self) -> None:
        if self.works:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            self.base = self._status("VmRSS")

    def peak(self) -> float | None:
        return self._status("VmHWM") - self.base if self.works else None


class CudaPeakMemory:
    """CUDA memory allocated by tensors above a starting point, MiB."""

    def start(self) -> None:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated()

    def peak(self) -> float:
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - self.base) / 2 ** 20


def peak_memory(device: torch.device) -> PeakMemory | CudaPeakMemory:
    return CudaPeakMemory() if device.type == "cuda" else PeakMemory()


def training_step(forward: Callable[[], torch.Tensor], grad: torch.Tensor, clock: Clock,
                  memory: PeakMemory | CudaPeakMemory | None = None) -> dict:
    """Forward, then backward of ``grad``: the time to the output and of the whole step (s), and
    with ``memory`` the peak memory of the forward and of the step (MiB). The caller clears the
    gradients."""
    if memory is not None:
        memory.start()
    clock.start()
    out = forward()
    result = {"forward_s": clock.elapsed()}
    if memory is not None:
        result["forward_peak_mib"] = memory.peak()
    out.backward(grad)
    result["forward_backward_s"] = clock.elapsed()
    if memory is not None:
        result["step_peak_mib"] = memory.peak()
    return result


def inference_step(forward: Callable[[], torch.Tensor], clock: Clock) -> dict:
    """A forward under ``torch.inference_mode``: its time (s)."""
    clock.start()
    with torch.inference_mode():
        forward()
    return {"forward_s": clock.elapsed()}


def interleaved(names: Sequence[str], repeats: int, run: Callable[[str], dict],
                warmup: bool = True, limits: dict[str, int] | None = None) -> dict[str, list[dict]]:
    """``run(name)`` for every name: once untimed (``warmup``), then ``repeats`` rounds of every
    name once, in an order rotated by one each round; a name in ``limits`` runs only in that
    many rounds (the first). Returns each name's timed results."""
    if warmup:
        for name in names:
            run(name)
    runs = {name: [] for name in names}
    limits = limits or {}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in [*names[shift:], *names[:shift]]:
            if round_ < limits.get(name, repeats):
                runs[name].append(run(name))
    return runs


def median(runs: Sequence[dict], key: str) -> float | None:
    """The median of ``key`` over the runs that have it (None when none has)."""
    values = [run[key] for run in runs if run.get(key) is not None]
    return statistics.median(values) if values else None
