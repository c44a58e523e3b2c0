"""Sparse attention against dense SDPA: forward and forward+backward time and peak memory.

    .venv/bin/python benchmarks/sparse.py            # N in 1024..16384, heads 8, head dim 64 (~8 min)
    .venv/bin/python benchmarks/sparse.py --quick    # small smoke run (seconds)

Every pattern is sized to a density of about 1/16 at N = 8192 (``unit`` = 512
keys per query there) and keeps its parameters at other N, so a local pattern's
density falls as 1/N. Each runs on the kernel ``auto`` picks for a training step
on this machine (see robust_attn.kernels), against dense SDPA (no mask) on the
same q, k, v.

Method: batch 1, float32, one training step = forward, then backward of a fixed
random output gradient. Forward time is the time to the output in that step.
Set-up (the block-sparse plan, built once per pattern and length and cached) is
timed apart. Density: the share of allowed pairs over ``DENSITY_ROWS`` evenly
spaced query rows (every row up to that many). One untimed warm-up step of
every pattern at the first N, then at each N ``repeats`` rounds in which every
pattern runs once, in rotating order; the table gives the median over rounds,
and ratios are taken within this run.
Peak memory: resident memory reached during the step above the resident memory
before it (Linux: VmHWM after resetting it through /proc/self/clear_refs, with
glibc's mmap threshold fixed at 64 KiB so that freed tensors leave the process).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from robust_attn.kernels import SparseFallbackWarning, select_kernel
from robust_attn.problem import AttentionProblem
from robust_attn.sparse import (
    BlockLocal,
    Causal,
    Fixed,
    GlobalTokens,
    GridWindow,
    Pattern,
    RandomBlocks,
    SlidingWindow,
    Strided,
)

DENSITY_ROWS = 1024


@dataclass(frozen=True)
class Config:
    sizes: tuple[int, ...]
    repeats: dict[int, int]
    heads: int
    head_dim: int
    unit: int  # keys per query at density 1/16 of the reference length


FULL = Config(sizes=(1024, 4096, 8192, 16384), repeats={1024: 5, 4096: 3, 8192: 3, 16384: 1},
              heads=8, head_dim=64, unit=512)
QUICK = Config(sizes=(256, 512), repeats={256: 1, 512: 1}, heads=2, head_dim=16, unit=32)


def patterns(unit: int, num_tokens: int) -> dict[str, Pattern | None]:
    """Dense (None) and every pattern, each about ``unit`` keys per query."""
    width = unit // 8
    return {
        "dense": None,
        "local": SlidingWindow(unit // 2),
        "local_causal": SlidingWindow(unit, causal=True),
        "block_local": BlockLocal(unit),
        "strided": Strided(16),
        "strided_causal": Strided(16) & Causal(),
        "fixed": Fixed(unit // 2, summary=max(1, unit // 64)),
        "longformer": SlidingWindow(unit * 15 // 32) | GlobalTokens(unit // 32),
        "bigbird": (SlidingWindow(unit * 5 // 16) | GlobalTokens(unit // 16)
                    | RandomBlocks(unit // 8, count=2, seed=0)),
        "grid_window": GridWindow((num_tokens // width, width), round((math.sqrt(unit) + 1) / 2)),
    }


def machine() -> dict[str, object]:
    cpu = platform.processor()
    try:
        cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1)
    except (OSError, AttributeError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__}


class PeakMemory:
    """Resident memory above a starting point, MiB (Linux /proc; None elsewhere)."""

    def __init__(self):
        self.works = Path("/proc/self/clear_refs").exists()
        if self.works:
            try:  # glibc: give every freed allocation above 64 KiB back to the OS at once
                ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD
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


def step(problem: AttentionProblem, kernel, grad: torch.Tensor, memory: PeakMemory) -> dict:
    """One training step: timings (s) and peaks (MiB) of the forward and of the whole step."""
    memory.start()
    start = time.perf_counter()
    out = kernel.run(problem, 0.0)
    forward = time.perf_counter() - start
    forward_peak = memory.peak()
    out.backward(grad)
    total = time.perf_counter() - start
    for t in (problem.q, problem.k, problem.v):
        t.grad = None
    return {"forward_s": forward, "forward_backward_s": total,
            "forward_peak_mib": forward_peak, "step_peak_mib": memory.peak()}


def density(pattern: Pattern | None, num_tokens: int) -> float:
    if pattern is None:
        return 1.0
    rows = torch.linspace(0, num_tokens - 1, min(num_tokens, DENSITY_ROWS)).round().long()
    return pattern.allowed(rows, torch.arange(num_tokens), num_tokens).float().mean().item()


def prepare(name: str, pattern: Pattern | None, num_tokens: int, config: Config) -> dict:
    """q, k, v, the kernel auto picks (and how long choosing it and a first call take)."""
    generator = torch.Generator().manual_seed(num_tokens)
    q, k, v = (torch.randn(1, config.heads, num_tokens, config.head_dim, generator=generator)
               .requires_grad_() for _ in range(3))
    problem = AttentionProblem(q, k, v, config.head_dim ** -0.5, pattern=pattern)
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SparseFallbackWarning)
        kernel = select_kernel("auto", problem, 0.0)
    return {
        "name": name, "problem": problem, "kernel": kernel, "setup_s": time.perf_counter() - start,
        "grad": torch.randn(q.shape, generator=generator),
        "fallback": [str(w.message) for w in caught],
        "density": density(pattern, num_tokens),
    }


def measure(config: Config) -> list[dict]:
    memory = PeakMemory()
    rows = []
    for index, num_tokens in enumerate(config.sizes):
        cases = [prepare(name, pattern, num_tokens, config)
                 for name, pattern in patterns(config.unit, num_tokens).items()]
        runs = {case["name"]: [] for case in cases}
        if index == 0:  # first calls of every kernel, untimed
            for case in cases:
                step(case["problem"], case["kernel"], case["grad"], memory)
        for round_ in range(config.repeats[num_tokens]):
            shift = round_ % len(cases)
            for case in cases[shift:] + cases[:shift]:
                runs[case["name"]].append(step(case["problem"], case["kernel"], case["grad"],
                                               memory))
                print(f"N={num_tokens} round {round_} {case['name']}: "
                      f"{runs[case['name']][-1]['forward_backward_s']:.3f} s", file=sys.stderr)
        rows += [summarise(case, runs[case["name"]], runs["dense"], num_tokens) for case in cases]
    return rows


def _median(runs: list[dict], key: str) -> float | None:
    values = [run[key] for run in runs if run[key] is not None]
    return statistics.median(values) if values else None


def summarise(case: dict, runs: list[dict], dense: list[dict], num_tokens: int) -> dict:
    row = {"N": num_tokens, "pattern": case["name"],
           "definition": "dense" if case["problem"].pattern is None else str(case["problem"].pattern),
           "kernel": case["kernel"].name, "density": case["density"], "repeats": len(runs),
           "setup_s": case["setup_s"], "fallback_warning": case["fallback"]}
    for key in ("forward_s", "forward_backward_s", "forward_peak_mib", "step_peak_mib"):
        row[key] = _median(runs, key)
    for key in ("forward_s", "forward_backward_s"):
        row[f"speedup_{key[:-2]}"] = _median(dense, key) / row[key]
    return row


def targets(rows: list[dict], sizes: tuple[int, ...]) -> dict:
    """The issue's CPU targets, judged on this run (growth over the sizes from the second on:
    the first is too small for resident memory to show the tensors)."""
    by = {(row["N"], row["pattern"]): row for row in rows}
    speed = {row["pattern"]: row["speedup_forward_backward"] for row in rows
             if row["N"] == 8192 and row["pattern"] != "dense"
             and 1 / 24 <= row["density"] <= 1 / 10}
    growth = {}
    for name in ("local", "strided", "dense"):
        peaks = [(n, by[(n, name)]["step_peak_mib"]) for n in sizes[1:]]
        growth[name] = {  # peak ratio per doubling of N: 2 when linear, 4 when quadratic
            f"{small}->{large}": (large_peak / small_peak) ** (1 / math.log2(large / small))
            for (small, small_peak), (large, large_peak) in zip(peaks, peaks[1:], strict=False)
            if small_peak and large_peak}
    return {
        "forward_backward_speedup_at_8192_density_about_1_16": speed,
        "speedup_target_4x_met": {name: value >= 4 for name, value in speed.items()},
        "peak_memory_growth_per_doubling": growth,
        "memory_linear_met": {name: all(ratio < 2.6 for ratio in ratios.values())
                              for name, ratios in growth.items() if name != "dense" and ratios},
    }


def markdown(report: dict) -> str:
    m, c = report["machine"], report["config"]
    lines = [
        "# Sparse attention vs dense SDPA (CPU)", "",
        f"`{report['command']}` on {m['cpu']} ({m['cores']} cores, {m['torch_threads']} torch "
        f"threads), {m['platform']}, torch {m['torch']}, python {m['python']}; load average "
        f"{report['load_average_before']} before, {report['load_average_after']} after "
        f"(shared machine). {report['wall_s']:.0f} s.", "",
        f"Batch 1, {c['heads']} heads, head dim {c['head_dim']}, float32; median of "
        f"{c['repeats']} interleaved rounds per N; ratios against dense SDPA in the same rounds. "
        "Forward: time to the output within the training step. Peak: resident memory above "
        "the step's start (MiB). Set-up: choosing the kernel, incl. the block-sparse plan "
        "(once per pattern and length).", "",
        "| N | pattern | kernel | density | forward ms | fwd+bwd ms | fwd speed-up "
        "| fwd+bwd speed-up | peak MiB (fwd / step) | set-up s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["results"]:
        peaks = "/".join("-" if p is None else f"{p:.0f}"
                         for p in (row["forward_peak_mib"], row["step_peak_mib"]))
        kernel = row["kernel"] + (" (fallback)" if row["fallback_warning"] else "")
        lines.append(
            f"| {row['N']} | {row['pattern']} | {kernel} | {row['density']:.4f} "
            f"| {row['forward_s'] * 1e3:.0f} | {row['forward_backward_s'] * 1e3:.0f} "
            f"| {row['speedup_forward']:.1f}x | {row['speedup_forward_backward']:.1f}x "
            f"| {peaks} | {row['setup_s']:.2f} |")
    lines += ["", "Patterns:", ""]
    seen = set()
    for row in report["results"]:
        if row["pattern"] not in seen:
            seen.add(row["pattern"])
            lines.append(f"- `{row['pattern']}` (at N = {row['N']}): `{row['definition']}`")
    goals = report["targets"]
    lines += ["", "Targets (N = 8192, density about 1/16: forward+backward >= 4x dense SDPA; "
              "peak memory linear in N for local and strided):", ""]
    for name, value in goals["forward_backward_speedup_at_8192_density_about_1_16"].items():
        met = "met" if goals["speedup_target_4x_met"][name] else "missed"
        lines.append(f"- {name}: {value:.1f}x, {met}")
    for name, ratios in goals["peak_memory_growth_per_doubling"].items():
        if not ratios:
            continue
        verdict = "" if name == "dense" else \
            f", {'met' if goals['memory_linear_met'][name] else 'missed'}"
        growth = ", ".join(f"{key}: x{value:.2f}" for key, value in ratios.items())
        lines.append(f"- peak memory of {name} per doubling of N: {growth}{verdict}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    config = QUICK if args.quick else FULL
    torch.manual_seed(0)
    load_before = os.getloadavg()
    start = time.perf_counter()
    rows = measure(config)
    report = {
        "command": "python benchmarks/sparse.py" + (" --quick" if args.quick else ""),
        "machine": machine(),
        "config": {"sizes": config.sizes, "repeats": config.repeats, "heads": config.heads,
                   "head_dim": config.head_dim, "batch": 1, "dtype": "float32",
                   "unit": config.unit},
        "load_average_before": [round(x, 1) for x in load_before],
        "load_average_after": [round(x, 1) for x in os.getloadavg()],
        "wall_s": time.perf_counter() - start,
        "results": rows,
        "targets": targets(rows, config.sizes),
    }
    stem = "sparse-cpu-quick" if args.quick else "sparse-cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))
    return report


if __name__ == "__main__":
    main()
