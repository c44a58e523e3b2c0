"""Cost of the HealthMonitor: training steps of a ViT-S with the monitor at default sampling against
none, interleaved in one process.

    python benchmarks/monitor_overhead.py [--quick] [--batch 4] [--cycles 12] [--threads N]
                                          [--out benchmarks/results]

The model is timm's vit_small_patch16_224 (random init) converted to the baseline variant
(robust_attn.convert); without timm, a 12-block attention stack at ViT-S shape. A training step is
forward, backward and AdamW. Each cycle times, back to back, one bare step (no monitor), one
sampled step (a HealthMonitor is attached, which arms its step 0: probes, hooks, readings, the
host transfer) and one unsampled step (the monitor's next step, after which it is closed); cycles
alternate the order (bare first / bare last), so drift of a shared machine hits all three alike.
With medians B, S and U of the three, the monitor at sampling period ``every`` costs per step

    ratio = (S + (every - 1) U) / (every B)

(one sampled step in every ``every``); S / B is the worst case, every=1.

Then the cost of ``HealthMonitor.report()`` as the history grows: a 12-layer attention stack at
ViT-S's head count, monitored at every step, its report taken (median of repeated calls) after 10
and after 1000 samples, beside a deep copy of the same history (what report() did before it
shared the series); and the early warnings the writers get after each sample: an
``EarlyWarnings`` that has read the earlier samples reading the new one and raising (what the
monitor does per sample), beside ``check()`` of the whole report from scratch. Writes
monitor-overhead.json and monitor-overhead.md (the machine included).
"""

from __future__ import annotations

import argparse
import copy
import gc
import inspect
import statistics
import time
from pathlib import Path

import torch
from machine import machine
from output import progress, write

from robust_attn import HealthMonitor
from robust_attn.health.early_warnings import EarlyWarnings, check
from robust_attn.studies.stack import AttentionStack

DEFAULT_EVERY = inspect.signature(HealthMonitor).parameters["every"].default


def vit_small(quick: bool) -> tuple[torch.nn.Module, str]:
    """timm's ViT-S/16 converted to the baseline, or an attention stack at its shape."""
    try:
        import timm

        from robust_attn import convert
    except ImportError:
        from robust_attn.studies.stack import AttentionStack

        return AttentionStack(2 if quick else 12, 384, 6, residual=True), "attention stack"
    sizes = {"depth": 2, "img_size": 64} if quick else {}  # quick: 17 tokens, not 197
    model = timm.create_model("vit_small_patch16_224", pretrained=False, **sizes)
    return convert(model, "baseline")[0], "timm vit_small_patch16_224 converted (baseline)"


def inputs_for(model: torch.nn.Module, batch: int, quick: bool) -> torch.Tensor:
    if hasattr(model, "patch_embed"):
        return torch.randn(batch, 3, *model.patch_embed.img_size)
    return torch.randn(batch, 17 if quick else 197, 384)


def loss_of(output) -> torch.Tensor:
    output = output[-1] if isinstance(output, list) else output
    return output.float().square().mean()


def train_step(model, optimizer, x, monitor: HealthMonitor | None) -> None:
    loss = loss_of(model(x))
    loss.backward()
    if monitor is not None:
        monitor.step(loss)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def cycle(model, optimizer, x, bare_first: bool) -> dict[str, float]:
    """Seconds of one bare, one sampled and one unsampled step, timed back to back."""
    times = {}
    monitor = None

    def sampled():
        nonlocal monitor
        monitor = HealthMonitor(model, every=2)  # step 0 sampled, step 1 not
        train_step(model, optimizer, x, monitor)

    def unsampled():
        train_step(model, optimizer, x, monitor)
        monitor.close()

    def bare():
        train_step(model, optimizer, x, None)

    if bare_first:
        times["bare"] = timed(bare)
    times["sampled"] = timed(sampled)
    times["unsampled"] = timed(unsampled)
    if not bare_first:
        times["bare"] = timed(bare)
    return times


def run(quick: bool, batch: int, cycles: int, every: int) -> dict:
    torch.manual_seed(0)
    model, description = vit_small(quick)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = inputs_for(model, 2 if quick else batch, quick)
    cycle(model, optimizer, x, True)  # warm-up: allocator, AdamW state, first hooks
    measured = [cycle(model, optimizer, x, index % 2 == 0)
                for index in progress(range(cycles), "monitor cycles")]
    times = {kind: [m[kind] for m in measured] for kind in ("bare", "sampled", "unsampled")}
    bare, sampled, unsampled = (statistics.median(times[kind])
                                for kind in ("bare", "sampled", "unsampled"))
    return {"benchmark": "monitor overhead", "model": description, "batch": x.shape[0],
            "cycles": cycles, "every": every, "bare_s": bare, "sampled_s": sampled,
            "unsampled_s": unsampled, "ratio": (sampled + (every - 1) * unsampled) / (every * bare),
            "sampled_ratio": sampled / bare, "unsampled_ratio": unsampled / bare,
            "times": times, "machine": machine()}


def median_seconds(function, repeats: int) -> float:
    return statistics.median(timed(function) for _ in range(repeats))


def new_sample_seconds(report, thresholds, repeats: int) -> float:
    """Median seconds for an EarlyWarnings that has read all but the last sample of ``report`` to
    read that one and raise its warnings (each repeat on a copy; the copy is not timed)."""
    before = EarlyWarnings(thresholds)
    before.update(report, len(report.steps) - 1)
    times = []
    for _ in range(repeats):
        warnings = copy.deepcopy(before)
        gc.collect()  # not the copy's garbage: a running monitor makes none
        times.append(timed(lambda w=warnings: (w.update(report), w.warnings())))
    return statistics.median(times)


def report_cost(samples: tuple[int, ...], depth: int, repeats: int = 51) -> list[dict]:
    """Median seconds of HealthMonitor.report(), and of a deep copy of its history, after each
    number of samples (every=1: one sample per step) of a small ``depth``-layer stack; and of the
    warnings after the last sample, incrementally and from scratch (11 repeats)."""
    torch.manual_seed(0)
    stack = AttentionStack(depth, 48, 6, residual=True)
    x = torch.randn(1, 8, 48)
    costs = []
    with HealthMonitor(stack, every=1) as monitor:
        for count in progress(samples, "report() cost"):
            while len(monitor.report().steps) < count:
                loss = loss_of(stack(x))
                loss.backward()
                monitor.step(loss)
                stack.zero_grad(set_to_none=True)
            history = monitor._report  # the monitor's own series: what a deep copy would copy
            report = monitor.report()
            costs.append({"samples": count, "report_s": median_seconds(monitor.report, repeats),
                          "deepcopy_s": median_seconds(lambda h=history: copy.deepcopy(h),
                                                       repeats),
                          "new_sample_warnings_s": new_sample_seconds(report, monitor.thresholds,
                                                                      11),
                          "check_s": median_seconds(lambda r=report: check(r, monitor.thresholds),
                                                    11)})
    return costs


def markdown(result: dict) -> str:
    m = result["machine"]
    return "\n".join([
        f"HealthMonitor overhead, training steps (forward, backward, AdamW) of {result['model']}, "
        f"batch {result['batch']}: medians of {result['cycles']} interleaved cycles in one "
        f"process, {m['device']}, {m['threads']} threads, torch {m['torch']}:",
        "",
        "| step | median (s) | ratio to bare |",
        "|---|---|---|",
        f"| bare (no monitor) | {result['bare_s']:.3f} | 1.000 |",
        f"| monitored, sampled | {result['sampled_s']:.3f} | {result['sampled_ratio']:.3f} |",
        f"| monitored, not sampled | {result['unsampled_s']:.3f} | "
        f"{result['unsampled_ratio']:.3f} |",
        f"| **default sampling, every={result['every']}**: (S + {result['every'] - 1} U) / "
        f"({result['every']} B) | | **{result['ratio']:.3f}** |",
        "",
        f"HealthMonitor.report() as the history grows: a {result['report_depth']}-layer attention "
        "stack, 6 heads, sampled at every step; medians of 51 calls (the warnings: of 11); "
        "the monitor's writers get the incremental warnings after each sample:",
        "",
        readme_table(result),
    ])


def readme_table(result: dict) -> str:
    """The history-cost table (README block ``monitor-history-cost``, rendered from the JSON)."""
    return "\n".join([
        "| samples | report() (ms) | deep copy of the history (ms) | warnings of the new sample, "
        "incremental (ms) | check() from scratch (ms) |",
        "|---|---|---|---|---|",
        *(f"| {c['samples']} | {1e3 * c['report_s']:.3f} | {1e3 * c['deepcopy_s']:.2f} | "
          f"{1e3 * c['new_sample_warnings_s']:.3f} | {1e3 * c['check_s']:.2f} |"
          for c in result["report_cost"]),
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--cycles", type=int, default=12)
    parser.add_argument("--every", type=int, default=DEFAULT_EVERY,
                        help=f"the sampling period (default: the monitor's, {DEFAULT_EVERY})")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results",
                        help="folder for monitor-overhead.json and .md (default: benchmarks/results)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args.quick, args.batch, 2 if args.quick else args.cycles, args.every)
    depth = 2 if args.quick else 12
    result.update(report_depth=depth,
                  report_cost=report_cost((10, 50) if args.quick else (10, 100, 1000), depth))
    write(args.out, "monitor-overhead", result, markdown(result))


if __name__ == "__main__":
    main()
