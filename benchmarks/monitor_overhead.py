"""Cost of the HealthMonitor: training steps of a ViT-S with the monitor at default sampling against
none, interleaved in one process.

    python benchmarks/monitor_overhead.py [--quick] [--batch 8] [--repeats 5] [--threads N]
                                          [--out benchmarks/results]

The model is timm's vit_small_patch16_224 (random init) converted to the baseline variant
(robust_attn.convert); without timm, a 12-block attention stack at ViT-S shape. One timed block is
one sampling period (``every`` steps of forward, backward and AdamW): with the monitor, a
HealthMonitor is attached for the block (so exactly one of its steps is sampled) and closed after
it; without, the same steps run bare. Blocks alternate ABBA, so slow drift of the machine cancels;
the ratio is of the median block times. The worst case, every step sampled (every=1), is measured
the same way. Writes monitor-overhead.json and monitor-overhead.md (the machine included).
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import time
from pathlib import Path

import torch
from probe_overhead import machine

from robust_attn import HealthMonitor

DEFAULT_EVERY = inspect.signature(HealthMonitor).parameters["every"].default


def vit_small(quick: bool) -> tuple[torch.nn.Module, str]:
    """timm's ViT-S/16 converted to the baseline, or an attention stack at its shape."""
    try:
        import timm

        from robust_attn import convert
    except ImportError:
        from robust_attn.stack import AttentionStack

        return AttentionStack(2 if quick else 12, 384, 6, residual=True), "attention stack"
    depth = 2 if quick else 12
    model = timm.create_model("vit_small_patch16_224", pretrained=False, depth=depth)
    return convert(model, "baseline")[0], "timm vit_small_patch16_224 converted (baseline)"


def inputs_for(model: torch.nn.Module, batch: int) -> torch.Tensor:
    tokens = (batch, 197, 384)
    return torch.randn(*((batch, 3, 224, 224) if hasattr(model, "patch_embed") else tokens))


def loss_of(output) -> torch.Tensor:
    output = output[-1] if isinstance(output, list) else output
    return output.float().square().mean()


def block_seconds(model, optimizer, x, steps: int, every: int | None) -> float:
    """Seconds for ``steps`` training steps, with a HealthMonitor(every) attached (None: bare)."""
    start = time.perf_counter()
    monitor = HealthMonitor(model, every=every) if every else None
    for _ in range(steps):
        loss = loss_of(model(x))
        loss.backward()
        if monitor is not None:
            monitor.step(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if monitor is not None:
        monitor.close()
    return time.perf_counter() - start


def compare(model, optimizer, x, steps: int, every: int, repeats: int) -> dict:
    """Median block time bare and monitored, ABBA-interleaved; their ratio."""
    times = {"bare": [], "monitored": []}
    for repeat in range(repeats):
        order = ("bare", "monitored") if repeat % 2 == 0 else ("monitored", "bare")
        for mode in order:
            times[mode].append(block_seconds(model, optimizer, x, steps,
                                             every if mode == "monitored" else None))
    bare, monitored = statistics.median(times["bare"]), statistics.median(times["monitored"])
    return {"every": every, "steps_per_block": steps, "bare_s": bare, "monitored_s": monitored,
            "ratio": monitored / bare, "times": times}


def run(quick: bool, batch: int, repeats: int, every: int) -> dict:
    torch.manual_seed(0)
    model, description = vit_small(quick)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = inputs_for(model, 2 if quick else batch)
    block_seconds(model, optimizer, x, 2, None)  # warm-up: allocator, AdamW state
    block_seconds(model, optimizer, x, 1, 1)
    default = compare(model, optimizer, x, every, every, repeats)
    worst = compare(model, optimizer, x, 1, 1, repeats * 2)
    return {"benchmark": "monitor overhead", "model": description, "batch": x.shape[0],
            "repeats": repeats, "default_sampling": default, "every_step": worst,
            "machine": machine()}


def markdown(result: dict) -> str:
    default, worst, m = result["default_sampling"], result["every_step"], result["machine"]
    return "\n".join([
        f"HealthMonitor overhead, training steps (forward, backward, AdamW) of {result['model']}, "
        f"batch {result['batch']}, medians of ABBA-interleaved blocks in one process, "
        f"{m['device']}, {m['threads']} threads, torch {m['torch']}:",
        "",
        "| sampling | block | bare (s) | monitored (s) | ratio |",
        "|---|---|---|---|---|",
        f"| default, every={default['every']} | {default['steps_per_block']} steps, "
        f"{result['repeats']} repeats | {default['bare_s']:.3f} | {default['monitored_s']:.3f} | "
        f"{default['ratio']:.3f} |",
        f"| every step (worst case) | 1 step, {2 * result['repeats']} repeats | "
        f"{worst['bare_s']:.3f} | {worst['monitored_s']:.3f} | {worst['ratio']:.3f} |",
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--every", type=int, default=DEFAULT_EVERY,
                        help=f"the sampling period (default: the monitor's, {DEFAULT_EVERY})")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args.quick, args.batch, args.repeats, args.every)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "monitor-overhead.json").write_text(json.dumps(result, indent=1))
    (out / "monitor-overhead.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
