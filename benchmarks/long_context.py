"""Long-context cost of what SDPA cannot compute (softcap, sigmoid, ALiBi): the tiled and chunked
kernels against timm's fused Attention (SDPA), time at the LM shape and peak memory at N = 16384.

    python benchmarks/long_context.py [--quick] [--threads 1,2] [--out benchmarks/results]

Time: a training step (forward, then backward) of one attention module at the LM shape
(B=1, N=4096, C=512, H=8, causal), every variant interleaved in one process (rounds rotated,
medians; benchmarks/measure.py; the chunked variants, 3 to 12 times slower, in the first round
only), once per thread count. Each variant's ratio is to timm's
``Attention`` (fused SDPA) in the same rounds, and for sigmoid (its preset carries qk_norm, as
the paper recommends) also to timm with ``qk_norm=True``. Peak: resident memory above the step's
start, one training step at B=1, N=16384, C=128, H=2, causal, each variant in a fresh process.
Targets (issue 17): softcap and sigmoid within 1.5x of SDPA in time (fwd+bwd), every variant
within 1.2x of SDPA's peak. Writes long-context-cpu.json and .md (long-context-quick.* with
--quick: N = 256 and 512, one repeat, one thread).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from machine import machine
from measure import Clock, PeakMemory, interleaved, median, training_step
from output import load_average, progress, write
from timm.layers import Attention
from torch import nn

from robust_attn import create

TIME_SHAPE = {"batch": 1, "tokens": 4096, "dim": 512, "heads": 8}
PEAK_SHAPE = {"batch": 1, "tokens": 16384, "dim": 128, "heads": 2}
QUICK_TIME_TOKENS, QUICK_PEAK_TOKENS = 256, 512
TIME_TARGET, PEAK_TARGET = 1.5, 1.2
TIMED = ("softcap", "sigmoid")  # the presets with a time target
# variant -> (preset or timm, kernel): every variant is one module.
VARIANTS = {
    "timm": ("timm", None),
    "timm qk_norm": ("timm qk_norm", None),
    "baseline (sdpa)": ("baseline", "sdpa"),
    **{f"{preset} ({kernel})": (preset, kernel) for preset in ("softcap", "sigmoid", "alibi")
       for kernel in ("tiled", "chunked")},
}
AGAINST = {"sigmoid": "timm qk_norm"}  # a preset's own timm equivalent, besides timm


def build(variant: str, dim: int, heads: int) -> torch.nn.Module:
    preset, kernel = VARIANTS[variant]
    if preset.startswith("timm"):
        qk_norm = {"qk_norm": True, "norm_layer": nn.LayerNorm} if preset == "timm qk_norm" else {}
        module = Attention(dim, num_heads=heads, **qk_norm)
        module.fused_attn = True
        return module
    return create(preset, dim, heads, kernel=kernel)


def _step(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor, clock: Clock,
          memory: PeakMemory | None = None) -> dict:
    result = training_step(lambda: module(x, is_causal=True), grad, clock, memory)
    x.grad = None
    module.zero_grad(set_to_none=True)
    return result


def timings(tokens: int, threads: int, repeats: int) -> list[dict]:
    """Every variant's median forward and step times and their ratios, one thread count."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    dim, heads = TIME_SHAPE["dim"], TIME_SHAPE["heads"]
    modules = {name: build(name, dim, heads) for name in VARIANTS}
    x = torch.randn(TIME_SHAPE["batch"], tokens, dim, requires_grad=True)
    grad, clock = torch.randn_like(x), Clock(x.device)
    slow = {name: 1 for name, (_, kernel) in VARIANTS.items() if kernel == "chunked"}
    runs = interleaved(list(progress(modules, f"{threads} thread(s)")), repeats,
                       lambda name: _step(modules[name], x, grad, clock), limits=slow)
    times = {name: {key: median(runs[name], key) for key in ("forward_s", "forward_backward_s")}
             for name in modules}
    rows = []
    for name, (preset, kernel) in VARIANTS.items():
        row = {"variant": name, "preset": preset, "kernel": kernel or "sdpa (timm)", **times[name]}
        for reference in ("timm", AGAINST.get(preset)):
            if reference is not None:
                for key in ("forward_s", "forward_backward_s"):
                    row[f"{key.removesuffix('_s')}_ratio_{reference}"] = \
                        times[name][key] / times[reference][key]
        rows.append(row)
    return rows


def _peak_here(variant: str, tokens: int) -> dict:
    """One training step of ``variant`` at the peak shape (after a 256-token warm-up), its peak."""
    torch.set_num_threads(1)
    dim, heads = PEAK_SHAPE["dim"], PEAK_SHAPE["heads"]
    module, clock, memory = build(variant, dim, heads), Clock(torch.device("cpu")), PeakMemory()
    for n in (min(256, tokens), tokens):
        x = torch.randn(PEAK_SHAPE["batch"], n, dim, requires_grad=True)
        result = _step(module, x, torch.randn_like(x), clock, memory)
    return {"variant": variant, "step_peak_mib": result["step_peak_mib"]}


def peaks(tokens: int) -> list[dict]:
    """:func:`_peak_here` for every variant, each in a fresh process, with its ratio to timm's."""
    rows = []
    for variant in progress(VARIANTS, "peak memory"):
        answer = subprocess.run([sys.executable, __file__, "--peak-of", variant, "--tokens",
                                 str(tokens)], capture_output=True, text=True, check=True)
        rows.append(json.loads(answer.stdout.splitlines()[-1]))
    reference = {row["variant"]: row["step_peak_mib"] for row in rows}
    for row in rows:
        preset = VARIANTS[row["variant"]][0]
        row["peak_ratio_timm"] = row["step_peak_mib"] / reference["timm"]
        if preset in AGAINST:
            row[f"peak_ratio_{AGAINST[preset]}"] = row["step_peak_mib"] / reference[AGAINST[preset]]
    return rows


def run(quick: bool, threads: list[int]) -> dict:
    time_tokens = QUICK_TIME_TOKENS if quick else TIME_SHAPE["tokens"]
    peak_tokens = QUICK_PEAK_TOKENS if quick else PEAK_SHAPE["tokens"]
    repeats = 1 if quick else 3
    load_before = load_average()
    return {"benchmark": "long context", "time_shape": {**TIME_SHAPE, "tokens": time_tokens},
            "peak_shape": {**PEAK_SHAPE, "tokens": peak_tokens}, "repeats": repeats,
            "targets": {"time_ratio": TIME_TARGET, "timed_presets": list(TIMED),
                        "peak_ratio": PEAK_TARGET},
            "timings": {str(n): timings(time_tokens, n, repeats) for n in threads},
            "peaks": peaks(peak_tokens), "load_average": [load_before, load_average()],
            "machine": machine()}


def _ratio(row: dict, key: str, preset: str) -> str:
    text = f"{row[f'{key}_ratio_timm']:.2f}x"
    if preset in AGAINST:
        text += f", {row[f'{key}_ratio_{AGAINST[preset]}']:.2f}x {AGAINST[preset]}"
    return text


def _verdict(passed: bool) -> str:
    return "pass" if passed else "**miss**"


def markdown(result: dict) -> str:
    """long-context-cpu.md: a title, then :func:`readme_table`."""
    return "# Long context: the tiled and chunked kernels against SDPA (cpu)\n\n" + \
        readme_table(result)


def readme_table(result: dict) -> str:
    """The README's long-context block (tests/test_long_context_benchmark.py checks it)."""
    time_shape, peak_shape, info = result["time_shape"], result["peak_shape"], result["machine"]
    peaks_of = {row["variant"]: row for row in result["peaks"]}
    lines = [
        f"`python benchmarks/long_context.py` on {info['cpu']} ({info['cores']} cores), torch "
        f"{info['torch']}, python {info['python']}; load average {result['load_average'][0]} "
        f"before, {result['load_average'][1]} after.", "",
        f"Time: a training step of one module at B={time_shape['batch']}, "
        f"N={time_shape['tokens']}, C={time_shape['dim']}, H={time_shape['heads']}, causal; "
        f"medians of {result['repeats']} interleaved rounds after a warm-up (chunked: the first "
        "round only); ratios to timm's "
        "`Attention` (fused SDPA) in the same rounds (sigmoid's preset carries qk_norm: its "
        "ratios also to timm with qk_norm). Peak: resident memory above the step's start, "
        f"B={peak_shape['batch']}, N={peak_shape['tokens']}, C={peak_shape['dim']}, "
        f"H={peak_shape['heads']}, causal, a fresh process per variant, one thread. Targets: "
        f"softcap and sigmoid fwd+bwd <= {result['targets']['time_ratio']}x SDPA, peak <= "
        f"{result['targets']['peak_ratio']}x SDPA.", "",
    ]
    for threads, rows in result["timings"].items():
        lines += [f"**{threads} thread{'s' if threads != '1' else ''}**", "",
                  "| variant | kernel | fwd | fwd+bwd | fwd ratio | fwd+bwd ratio | "
                  f"peak, N = {peak_shape['tokens']} | target | pass/miss |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in rows:
            preset, peak = row["preset"], peaks_of[row["variant"]]
            reference = AGAINST.get(preset, "timm")
            targets, verdicts = [], []
            if preset in TIMED:
                targets.append(f"fwd+bwd <= {TIME_TARGET}x {reference}")
                verdicts.append(_verdict(row[f"forward_backward_ratio_{reference}"]
                                         <= TIME_TARGET))
            if not preset.startswith("timm"):
                targets.append(f"peak <= {PEAK_TARGET}x {reference}")
                verdicts.append(_verdict(peak[f"peak_ratio_{reference}"] <= PEAK_TARGET))
            lines.append(
                f"| {row['variant']} | {row['kernel']} | {row['forward_s'] * 1e3:.0f} ms | "
                f"{row['forward_backward_s'] * 1e3:.0f} ms | {_ratio(row, 'forward', preset)} | "
                f"{_ratio(row, 'forward_backward', preset)} | {peak['step_peak_mib']:.1f} MiB, "
                f"{_ratio(peak, 'peak', preset)} | {'; '.join(targets)} | "
                f"{'; '.join(verdicts)} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a small smoke run (N = 256 and 512, one repeat, one thread)")
    parser.add_argument("--threads", default="1,2",
                        help="torch thread counts to time, comma separated (default 1,2)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results",
                        help="folder for long-context-cpu.json and .md (default: benchmarks/results)")
    parser.add_argument("--peak-of", help=argparse.SUPPRESS)  # one variant's peak (a child)
    parser.add_argument("--tokens", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_of:
        print(json.dumps(_peak_here(args.peak_of, args.tokens)))
        return
    threads = [1] if args.quick else [int(n) for n in args.threads.split(",")]
    result = run(args.quick, threads)
    write(args.out, "long-context-quick" if args.quick else "long-context-cpu", result,
          markdown(result))


if __name__ == "__main__":
    main()
