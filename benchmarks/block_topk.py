"""Cost of block top-k attention (``block_topk``): a forward + backward of one attention module at
N = 4096 tokens, one thread, against dense attention (SDPA, no mask), and the block selection
alone, so the dense-mask cost is shown as it is.

    python benchmarks/block_topk.py [--quick] [--out benchmarks/results]

Writes block-topk.json and block-topk.md (block-topk-quick.* with --quick: N = 512, one repeat).
The module passes its selection to the kernels as a per-call block selection
(robust_attn/sparse/selection.py), which the selected-blocks kernel
(robust_attn/kernels/selected_blocks.py) runs on the selected blocks only; each module row names
the kernel that ran. The kernel-level rows compare, on the same q, k, v (H = 8, head dim 64),
dense SDPA, the selection as a dense mask with SDPA (what any other kernel gets, e.g. with a
padding mask), and the selected-blocks kernel.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from machine import machine
from output import load_average, progress, write

from robust_attn import create, recording
from robust_attn.kernels.selected_blocks import selected_blocks_attention
from robust_attn.mitigations.block_topk import selected_blocks, selected_key_blocks
from robust_attn.problem import AttentionProblem

DIM, HEADS, BATCH = 256, 4, 1
# (block size, k beyond the own block): NSA's selection block of 64 with 2 more; MoBA's block of
# 512 with top-k 3 counting the own block.
SETTINGS = ((64, 2), (512, 2))


def step_seconds(module: torch.nn.Module, x: torch.Tensor, causal: bool) -> float:
    """One forward + backward of ``module`` on ``x``, in seconds."""
    start = time.perf_counter()
    module(x, is_causal=causal).square().mean().backward()
    return time.perf_counter() - start


def kernel_run(module: torch.nn.Module, x: torch.Tensor, causal: bool) -> str:
    """The kernel ``module`` runs on ``x`` (its record's)."""
    with torch.no_grad(), recording(module) as records:
        module(x, is_causal=causal)
    return records[0][1].attended.kernel


def selection_seconds(tokens: int, block_size: int, k: int, causal: bool) -> float:
    """The block selection alone (the selected key blocks, no grad), in seconds."""
    q, keys = torch.randn(2, BATCH, HEADS, tokens, DIM // HEADS).unbind(0)
    start = time.perf_counter()
    selected_key_blocks(q, keys, block_size, k, causal)
    return time.perf_counter() - start


KERNEL_HEADS, KERNEL_HEAD_DIM = 8, 64


def kernel_variants(block_size: int, k: int, causal: bool) -> dict:
    """name -> f(q, k, v): the attention output, selection included."""
    def dense(q, keys, v):
        return torch.nn.functional.scaled_dot_product_attention(q, keys, v, is_causal=causal)

    def dense_mask(q, keys, v):
        mask = selected_blocks(q, keys, block_size, k, causal)
        if causal:
            mask &= torch.ones(q.shape[-2], keys.shape[-2], dtype=torch.bool).tril()
        return torch.nn.functional.scaled_dot_product_attention(q, keys, v, attn_mask=mask)

    def per_call_layout(q, keys, v):
        problem = AttentionProblem(q, keys, v, q.shape[-1] ** -0.5, causal=causal)
        return selected_blocks_attention(problem, selected_key_blocks(q, keys, block_size, k, causal),
                                         block_size)

    return {"dense SDPA": dense, "selection as a dense mask + SDPA": dense_mask,
            "selection as a per-call layout (selected_blocks kernel)": per_call_layout}


def kernel_rows(tokens: int, repeats: int) -> list[dict]:
    """Forward + backward of each kernel variant, interleaved, at every setting and causality."""
    torch.manual_seed(0)
    q, keys, v = (torch.randn(1, KERNEL_HEADS, tokens, KERNEL_HEAD_DIM, requires_grad=True)
                  for _ in range(3))
    grad = torch.randn(q.shape)
    rows = []
    for causal in (False, True):
        for block_size, k in SETTINGS:
            variants = kernel_variants(block_size, k, causal)
            times = {name: [] for name in variants}
            for _ in range(repeats + 1):  # the first is a warm-up
                for name, fn in variants.items():
                    start = time.perf_counter()
                    fn(q, keys, v).backward(grad)
                    times[name].append(time.perf_counter() - start)
            dense = statistics.median(times["dense SDPA"][1:])
            rows += [{"setting": f"({block_size}, {k})", "causal": causal, "variant": name,
                      "step_s": statistics.median(values[1:]),
                      "ratio_to_dense": statistics.median(values[1:]) / dense}
                     for name, values in times.items()]
    return rows


def run(quick: bool) -> dict:
    torch.set_num_threads(1)
    tokens, repeats = (512, 1) if quick else (4096, 3)
    torch.manual_seed(0)
    x = torch.randn(BATCH, tokens, DIM, requires_grad=True)
    variants = {"dense (SDPA, no mask)": create("baseline", DIM, HEADS)}
    for block_size, k in SETTINGS:
        variants[f"block_topk=({block_size}, {k})"] = create("block_topk", DIM, HEADS,
                                                            block_topk=(block_size, k))
    rows = []
    for causal in (False, True):
        times = {name: [] for name in variants}
        for _ in progress(range(repeats + 1), f"causal={causal}"):  # the first is a warm-up
            for name, module in variants.items():  # interleaved: A B C A B C ...
                times[name].append(step_seconds(module, x, causal))
        dense = statistics.median(times["dense (SDPA, no mask)"][1:])
        for name, module in variants.items():
            step = statistics.median(times[name][1:])
            option = module.mitigations["block_topk"].saved_value() if "block_topk" in name else None
            select = (statistics.median(selection_seconds(tokens, *option, causal)
                                        for _ in range(repeats)) if option else None)
            rows.append({"variant": name, "causal": causal, "kernel": kernel_run(module, x, causal),
                         "step_s": step, "ratio_to_dense": step / dense, "selection_s": select})
    return {"benchmark": "block top-k", "shape": {"batch": BATCH, "tokens": tokens, "dim": DIM,
            "heads": HEADS}, "repeats": repeats, "rows": rows,
            "kernel_shape": {"heads": KERNEL_HEADS, "head_dim": KERNEL_HEAD_DIM},
            "kernel_rows": kernel_rows(tokens, repeats), "load_average": load_average(),
            "machine": machine()}


def markdown(result: dict) -> str:
    shape, info = result["shape"], result["machine"]
    lines = [
        f"Block top-k attention, forward + backward of one module (B={shape['batch']}, "
        f"N={shape['tokens']}, C={shape['dim']}, H={shape['heads']}), median of "
        f"{result['repeats']} interleaved repeats after a warm-up, {info['cpu']}, "
        f"{info['threads']} thread, torch {info['torch']}, load {result['load_average']}; the "
        "kernel the module ran:",
        "",
        "| variant | causal | kernel | fwd+bwd (s) | ratio to dense | selection alone (s) |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        select = "-" if row["selection_s"] is None else f"{row['selection_s']:.4f}"
        lines.append(f"| {row['variant']} | {row['causal']} | {row['kernel']} | "
                     f"{row['step_s']:.3f} | {row['ratio_to_dense']:.2f} | {select} |")
    lines += [
        "", f"Kernel level (B=1, N={shape['tokens']}, H={result['kernel_shape']['heads']}, "
        f"head dim {result['kernel_shape']['head_dim']}, forward + backward, the selection "
        "included; ratios against dense SDPA in the same interleaved rounds):", "",
        "| setting (block size, k) | causal | variant | fwd+bwd (s) | ratio to dense |",
        "|---|---|---|---|---|",
    ]
    for row in result["kernel_rows"]:
        lines.append(f"| {row['setting']} | {row['causal']} | {row['variant']} | "
                     f"{row['step_s']:.3f} | {row['ratio_to_dense']:.2f} |")
    return "\n".join([*lines, ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small smoke run (N = 512)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results",
                        help="folder for block-topk.json and .md (default: benchmarks/results)")
    args = parser.parse_args()
    result = run(args.quick)
    write(args.out, "block-topk-quick" if args.quick else "block-topk", result, markdown(result))


if __name__ == "__main__":
    main()
