"""The README's claims table: each preset's claim against collapse at initialisation
(robust_attn.claims), its bounds, and its measured health next to the baseline's.

    python benchmarks/claims_table.py [--quick] [--out benchmarks/results]

DESIGN.md's setting: 24 pre-LN attention layers, width 128, 4 heads, 64 tokens,
batch 2, seed 0, W_q and W_k scaled by sqk in {1, 16}, attention only and with
residual; ``--quick`` uses depth 8. For each preset and column: the worst
layer's normalised entropy H and the output's res(X). Prints the table and
writes claims.json and claims.md.

:func:`measure` is the one measurement protocol, shared with
tests/test_collapse_claims.py: robust_attn.stack.measure_stack on the eager
reference kernel (kernels agree, see the tests; FlexAttention would compile
once per shape on a CPU).
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

from robust_attn import list_variants
from robust_attn.claims import CLAIMS, ENTROPY, Claim, Setting
from robust_attn.stack import StackHealth, StackSetting, measure_stack

if __package__:  # imported as benchmarks.claims_table, by the tests
    from .machine import machine
else:  # run as a script
    from machine import machine

COLUMNS = ((False, 1.0), (False, 16.0), (True, 1.0), (True, 16.0))  # (residual, sqk)


@functools.cache
def measure(setting: StackSetting) -> StackHealth:
    """The stack's health at initialisation (cached: a setting always measures the same)."""
    return measure_stack(setting, kernel="eager")


def _describe(setting: Setting) -> str:
    stacks = {(False,): "attention only", (True,): "with residual"}.get(
        setting.residual, "with or without residual")
    low, high = setting.qk_scales
    head_dims = "/".join(str(width) for width in setting.head_dims)
    return (f"{stacks}, sqk {low:g}-{high:g}, depth {setting.depths[0]}-{setting.depths[1]}, "
            f"{setting.tokens[0]}-{setting.tokens[1]} tokens, {setting.heads[0]}-{setting.heads[1]} "
            f"heads of width {head_dims}")


def _claim_row(claim: Claim, depth: int) -> dict:
    measured = []
    for residual, qk_scale in COLUMNS:
        health = measure(StackSetting(variant=claim.variant, depth=depth, qk_scale=qk_scale,
                                      residual=residual))
        measured.append({"residual": residual, "qk_scale": qk_scale,
                         "worst_entropy": health.worst_entropy,
                         "final_residual": health.final_residual, "verdict": health.verdict})
    return {"variant": claim.variant, "addresses": claim.addresses, "source": claim.source,
            "source_claim": claim.source_claim, "note": claim.note,
            "guarantees": [{"failure": g.failure, "setting": _describe(g.setting),
                            "measure": "worst-layer H" if g.failure == ENTROPY else "res(X)",
                            "bound": g.bound} for g in claim.guarantees],
            "measured": measured}


def run(quick: bool) -> dict:
    depth = 8 if quick else 24
    base = StackSetting(depth=depth)
    variants = ["baseline", *(name for name in list_variants() if name != "baseline")]
    return {"setting": {"depth": depth, "width": base.dim, "heads": base.num_heads,
                        "tokens": base.tokens, "batch": base.batch, "seed": base.seed,
                        "columns": [{"residual": r, "qk_scale": s} for r, s in COLUMNS]},
            "machine": machine(),
            "rows": [_claim_row(CLAIMS[variant], depth) for variant in variants]}


def markdown(report: dict) -> str:
    setting = report["setting"]
    header = ["preset", "addresses", "guaranteed where (bound)"] + [
        f"{'with residual' if r else 'attention only'}, sqk {s:g}" for r, s in COLUMNS]
    lines = [
        f"Measured at initialisation: {setting['depth']} pre-LN attention layers, width "
        f"{setting['width']}, {setting['heads']} heads, {setting['tokens']} tokens, batch "
        f"{setting['batch']}, seed {setting['seed']}. Each cell: worst-layer normalised "
        f"entropy H / output res(X); the baseline's row first. Guarantees are tested by "
        f"tests/test_collapse_claims.py against the baseline on the same draws.", "",
        "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in report["rows"]:
        guarantees = "; ".join(f"{g['measure']} >= {g['bound']:g}: {g['setting']}"
                               for g in row["guarantees"]) or "-"
        cells = [f"H {m['worst_entropy']:.3f} / res {m['final_residual']:.1e}"
                 for m in row["measured"]]
        lines.append("| " + " | ".join([row["variant"], row["addresses"], guarantees, *cells])
                     + " |")
    lines += ["", "Sources and notes:", ""]
    lines += [f"- **{row['variant']}** ({row['source']}): claims that {row['source_claim']}."
              + (f" {row['note']}" if row["note"] else "") for row in report["rows"]]
    machine_info = report["machine"]
    lines += ["", "Machine: " + ", ".join(f"{key} {value}" for key, value in machine_info.items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="depth 8 instead of 24")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    report = run(args.quick)
    text = markdown(report)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "claims.json").write_text(json.dumps(report, indent=1))
    (out / "claims.md").write_text(text)
    print(f"wrote {out / 'claims.json'} and {out / 'claims.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
