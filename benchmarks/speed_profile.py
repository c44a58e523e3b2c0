"""Where a case's training step spends its time, beside the reference's: torch.profiler's top operators.

    python -m benchmarks.speed_profile softcap            # at ViT-S, against timm
    python -m benchmarks.speed_profile gated --against "timm gated" --shape lm --steps 3

For a target the speed table misses: one untimed step of each module, then ``--steps`` profiled
steps each; prints each operator's self CPU (or CUDA) time per step, largest first, and with
``--out DIR`` writes the same to DIR/speed-profile-<case>-<shape>.txt. ``--quick`` profiles one
step at the speed benchmark's tiny quick shapes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from .speed import PLANS, build
from .speed_cases import all_cases


def profile_case(name: str, shape_key: str, device: torch.device, steps: int, rows: int,
                 quick: bool = False) -> str:
    plan = PLANS["quick" if quick else device.type]
    shape = next(shape for shape in plan.shapes if shape.key == shape_key)
    module = build(all_cases(device)[name], shape, device, plan.dtypes[0])
    x = torch.randn(shape.batch, shape.tokens, shape.dim, device=device, dtype=plan.dtypes[0],
                    requires_grad=True)
    grad = torch.randn_like(x)

    def step():
        module(x, is_causal=shape.causal).backward(grad)
        module.zero_grad(set_to_none=True)

    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        for _ in range(steps):
            step()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return f"{name} at {shape.label} ({shape.describe()}), {steps} steps:\n" + \
        profiler.key_averages().table(sort_by=sort, row_limit=rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case", nargs="?", default="robust",
                        help="the case to profile (default: robust)")
    parser.add_argument("--against", default="timm")
    parser.add_argument("--shape", default="vit_s", choices=("vit_s", "vit_b", "lm"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="one step at tiny shapes")
    parser.add_argument("--out", type=Path, default=None,
                        help="also write the tables to this folder (default: print only)")
    args = parser.parse_args()
    tables = "\n".join(profile_case(name, args.shape, torch.device(args.device),
                                    1 if args.quick else args.steps, args.rows, args.quick)
                       for name in (args.case, args.against))
    print(tables)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"speed-profile-{args.case}-{args.shape}.txt").write_text(tables + "\n")


if __name__ == "__main__":
    main()
