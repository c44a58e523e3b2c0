"""Soak: 2,000 training steps of a small attention model with the probe and HealthMonitor on;
resident memory and step time over the run.

    python benchmarks/soak.py [--steps 2000] [--quick] [--out benchmarks/results]

A four-block residual attention stack (width 64, 4 heads, 64 tokens, batch 8, the
sigma_reparam preset, whose health has the most readings), AdamW, the global probe on and a
HealthMonitor sampling every 10 steps. After a warm-up (the first 10 % of the steps) the
resident set size (RSS, /proc/self/statm) must stay within 5 % of its value at the end of the
warm-up, and the median step time of the last 10 % of the steps within 10 % of the median of
the 10 % after the warm-up (a leak of monitor history, kept maps or autograd graphs would grow
both). The monitor's own history grows by design (a reading per layer and head every 10
steps), which the 5 % must absorb. Writes soak.json and soak.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from machine import machine
from output import load_average, progress, write
from torch import nn

import robust_attn

MEMORY_LIMIT = 0.05  # RSS growth after warm-up
TIME_LIMIT = 0.10  # step-time growth, last 10 % against the 10 % after warm-up


def rss_mib() -> float:
    """The resident set size of this process, MiB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = robust_attn.create("sigma_reparam", dim, num_heads=heads)

    def forward(self, x):
        return x + self.attn(self.norm(x))


def run(steps: int) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(*(Block(64, 4) for _ in range(4)))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    monitor = robust_attn.HealthMonitor(model, every=10)
    generator = torch.Generator().manual_seed(1)
    target = torch.randn(8, 64, 64, generator=generator)
    warmup = max(1, steps // 10)
    times, memory = [], []
    with robust_attn.health_probe():
        for step in progress(range(steps), "soak steps"):
            x = torch.randn(8, 64, 64, generator=generator)
            start = time.perf_counter()
            loss = (model(x) - target).square().mean()
            loss.backward()
            monitor.step(loss.detach())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
            if step % 50 == 0 or step == steps - 1:
                memory.append((step, rss_mib()))
    after = [mib for step, mib in memory if step >= warmup]
    base = next(mib for step, mib in memory if step >= warmup)
    window = max(1, steps // 10)
    early = statistics.median(times[warmup:warmup + window])
    late = statistics.median(times[-window:])
    report = {
        "steps": steps, "warmup_steps": warmup, "model": "4 x (LayerNorm + sigma_reparam "
        "attention, residual), width 64, 4 heads, 64 tokens, batch 8",
        "rss_mib": memory, "rss_after_warmup_mib": base, "rss_max_after_warmup_mib": max(after),
        "rss_growth": max(after) / base - 1, "rss_limit": MEMORY_LIMIT,
        "step_s_early_median": early, "step_s_late_median": late,
        "step_time_growth": late / early - 1, "step_time_limit": TIME_LIMIT,
        "warnings": len(monitor.warnings()),
        "machine": machine(), "load_average": load_average(),
    }
    report["memory_ok"] = report["rss_growth"] <= MEMORY_LIMIT
    report["time_ok"] = report["step_time_growth"] <= TIME_LIMIT
    monitor.close()
    return report


def markdown(report: dict) -> str:
    return (f"# Soak: {report['steps']} training steps, probe and HealthMonitor on\n\n"
            f"{report['model']}; warm-up {report['warmup_steps']} steps.\n\n"
            f"| quantity | value | limit | ok |\n|---|---|---|---|\n"
            f"| RSS after warm-up | {report['rss_after_warmup_mib']:.1f} MiB | | |\n"
            f"| RSS growth after warm-up (max) | {report['rss_growth']:+.2%} | "
            f"{report['rss_limit']:.0%} | {report['memory_ok']} |\n"
            f"| step time, median of the 10 % after warm-up | "
            f"{report['step_s_early_median'] * 1e3:.2f} ms | | |\n"
            f"| step time, median of the last 10 % | {report['step_s_late_median'] * 1e3:.2f} ms "
            f"| | |\n"
            f"| step-time growth | {report['step_time_growth']:+.2%} | "
            f"{report['step_time_limit']:.0%} | {report['time_ok']} |\n\n"
            f"Machine: {report['machine'].get('cpu', '')}, load {report['load_average']}.\n")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--quick", action="store_true", help="200 steps (a smoke run)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = run(200 if args.quick else args.steps)
    write(args.out, "soak-quick" if args.quick else "soak", report, markdown(report))
    return report


if __name__ == "__main__":
    main()
