"""Cost of the health probe: a training step (forward + backward) of a ViT-S-sized attention stack
with the probe on (default sampling) against the probe off, interleaved in one process.

    python benchmarks/probe_overhead.py [--quick] [--out benchmarks/results]

Writes probe-overhead.json and probe-overhead.md (median step times, their ratio, the machine).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from machine import machine
from output import progress, write

from robust_attn import set_probe_enabled
from robust_attn.studies.stack import AttentionStack


def step_seconds(stack: AttentionStack, x: torch.Tensor, probe: bool) -> float:
    set_probe_enabled(probe)
    start = time.perf_counter()
    stack(x)[-1].square().mean().backward()
    seconds = time.perf_counter() - start
    set_probe_enabled(False)
    return seconds


def run(quick: bool) -> dict:
    # ViT-S/16 at 224: 197 tokens, width 384, 6 heads; attention blocks with residuals.
    depth, batch = (2, 4) if quick else (12, 32)
    repeats, warmup = (3, 1) if quick else (10, 2)
    torch.manual_seed(0)
    stack = AttentionStack(depth, 384, 6, residual=True)
    x = torch.randn(batch, 197, 384)
    times = {False: [], True: []}
    for index in progress(range(warmup + repeats), "probe off/on"):
        for probe in (False, True):  # interleaved: A B A B ...
            seconds = step_seconds(stack, x, probe)
            if index >= warmup:
                times[probe].append(seconds)
    off, on = statistics.median(times[False]), statistics.median(times[True])
    return {"benchmark": "probe overhead", "shape": {"depth": depth, "batch": batch, "tokens": 197,
            "dim": 384, "heads": 6}, "repeats": repeats, "probe_off_s": off, "probe_on_s": on,
            "ratio": on / off, "machine": machine()}


def markdown(result: dict) -> str:
    shape = result["shape"]
    return "\n".join([
        f"Probe overhead, training step of {shape['depth']} attention blocks at ViT-S shape "
        f"(B={shape['batch']}, N=197, C=384, H=6), median of {result['repeats']} interleaved "
        f"repeats, {result['machine']['device']}, {result['machine']['threads']} threads, "
        f"torch {result['machine']['torch']}:",
        "",
        "| probe | step (s) | ratio to off |",
        "|---|---|---|",
        f"| off | {result['probe_off_s']:.3f} | 1.000 |",
        f"| on (default sampling, 256 queries) | {result['probe_on_s']:.3f} | "
        f"{result['ratio']:.3f} |",
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results",
                        help="folder for probe-overhead.json and .md (default: benchmarks/results)")
    args = parser.parse_args()
    result = run(args.quick)
    write(args.out, "probe-overhead", result, markdown(result))


if __name__ == "__main__":
    main()
