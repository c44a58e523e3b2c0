"""The README's claims table: each preset's claim against collapse at initialisation
(robust_attn.studies.claims), and its measured health over seeds next to the baseline's.

    python benchmarks/claims_table.py [--quick] [--out benchmarks/results]

The setting (docs/collapse-setting.md): 24 layers of ``create(preset, dim=128,
num_heads=4)`` exactly as a user builds them, LayerNorm before each, 64 tokens,
batch 2, W_q and W_k multiplied by sqk in {1, 16}, attention only and with
residual connections; one stack per seed, seeds 0-19. ``--quick`` (for the
tests) uses depth 4, width 32, 16 tokens and seeds 0-15.

Each cell is the distribution over seeds of the worst layer's normalised entropy
H and of the output's res(X): median and 10th-90th percentile (stdlib
``statistics.quantiles``, inclusive method), and the cell's verdict by the
claims rule (:data:`robust_attn.studies.claims.HOLD_SHARE`): a failure is shown where
fewer than 95 % of the seeds keep its measure at or above its bound.

Every draw comes from the setting's seed (robust_attn.studies.stack.measure_stack), and
nothing time- or load-dependent is written: the same command writes the same
files, byte for byte.

After training: each row also carries the preset's health at the end of the
learning-rate sweep on real text (recipes/lr_sensitivity.py --task text, its
``health.json``; see the README's Recipes): the worst layer's entropy, the lowest
res(X) and the largest logit, at the preset's best learning rate and at the
sweep's largest. Presets the sweep did not train show "-".

Writes claims.json and claims.md; the README's table is
:func:`claims_markdown` of claims.json, and its opening list :func:`addresses_markdown`
(tests/test_claims_table.py checks both).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
from pathlib import Path

import torch

from robust_attn import list_variants
from robust_attn.claim import ENTROPY, ENTROPY_COLLAPSE, HOLD_SHARE, RANK_COLLAPSE, Claim, StackSetting
from robust_attn.studies.claims import CLAIMS, describe_setting
from robust_attn.studies.stack import StackHealth, measure_stack

if __package__:  # imported as benchmarks.claims_table, by the tests
    from .machine import machine
    from .output import write
else:  # run as a script
    from machine import machine
    from output import write

COLUMNS = ((False, 1.0), (False, 16.0), (True, 1.0), (True, 16.0))  # (residual, sqk)
ROOT = Path(__file__).resolve().parent.parent
TRAINED_HEALTH = ROOT / "recipes" / "results" / "lr_sensitivity_text" / "health.json"
FULL = {"depth": 24, "dim": 128, "num_heads": 4, "tokens": 64, "batch": 2, "seeds": 20}
QUICK = {"depth": 4, "dim": 32, "num_heads": 4, "tokens": 16, "batch": 2, "seeds": 16}


@functools.cache
def measure(setting: StackSetting) -> StackHealth:
    """The stack's health at initialisation on the eager reference kernel (the kernels agree:
    tests/test_collapse_claims.py), cached: a setting always measures the same."""
    return measure_stack(setting, kernel="eager")


def distribution(values: list[float]) -> dict:
    """Median and 10th / 90th percentiles (inclusive method) of ``values``."""
    deciles = statistics.quantiles(values, n=10, method="inclusive")
    return {"median": statistics.median(values), "p10": deciles[0], "p90": deciles[-1]}


def verdict(entropy_kept: float, rank_kept: float) -> str:
    """The cell's verdict by the claims rule: a failure counts where fewer than HOLD_SHARE of the
    seeds avoid it."""
    entropy, rank = entropy_kept < HOLD_SHARE, rank_kept < HOLD_SHARE
    return {(False, False): "healthy", (True, False): "entropy collapse",
            (False, True): "rank collapse", (True, True): "both"}[(entropy, rank)]


def measure_cell(variant: str, shape: dict, residual: bool, qk_scale: float) -> dict:
    healths = [measure(StackSetting(variant=variant, depth=shape["depth"], dim=shape["dim"],
                                    num_heads=shape["num_heads"], tokens=shape["tokens"],
                                    batch=shape["batch"], qk_scale=qk_scale, residual=residual,
                                    seed=seed))
               for seed in range(shape["seeds"])]
    entropies = [health.worst_entropy for health in healths]
    residuals = [health.final_residual for health in healths]
    entropy_kept = sum(value >= ENTROPY_COLLAPSE for value in entropies) / len(healths)
    rank_kept = sum(value >= RANK_COLLAPSE for value in residuals) / len(healths)
    return {"residual": residual, "qk_scale": qk_scale,
            "worst_entropy": distribution(entropies), "final_residual": distribution(residuals),
            "entropy_kept": entropy_kept, "rank_kept": rank_kept,
            "verdict": verdict(entropy_kept, rank_kept)}


def after_training(trained: dict, variant: str) -> dict | None:
    """The preset's end-of-training health from the sweep's health.json (None if not trained)."""
    health = trained["variants"].get(variant)
    if health is None:
        return None
    return {"best_lr": health["best_lr"], "at_best_lr": health["at_best_lr"],
            "largest_lr": max(run["lr"] for run in health["runs"]),
            "at_largest_lr": health["at_largest_lr"]}


def _claim_row(claim: Claim, shape: dict, trained: dict) -> dict:
    return {"variant": claim.variant, "addresses": claim.addresses, "source": claim.source,
            "source_claim": claim.source_claim, "note": claim.note,
            "guarantees": [{"failure": g.failure, "setting": describe_setting(g.setting),
                            "measure": "worst-layer H" if g.failure == ENTROPY else "res(X)",
                            "bound": g.bound} for g in claim.guarantees],
            "measured": [measure_cell(claim.variant, shape, residual, qk_scale)
                         for residual, qk_scale in COLUMNS],
            "after_training": after_training(trained, claim.variant)}


def run(quick: bool) -> dict:
    torch.set_num_threads(1)  # one summation order: the same numbers on every run
    shape = QUICK if quick else FULL
    trained = json.loads(TRAINED_HEALTH.read_text())
    variants = ["baseline", *(name for name in list_variants() if name != "baseline")]
    return {"setting": {**shape, "norm": "pre", "hold_share": HOLD_SHARE,
                        "entropy_bound": ENTROPY_COLLAPSE, "rank_bound": RANK_COLLAPSE,
                        "columns": [{"residual": r, "qk_scale": s} for r, s in COLUMNS],
                        "after_training": {"source": TRAINED_HEALTH.relative_to(ROOT).as_posix(),
                                           "config": trained["config"]}},
            "machine": machine(),
            "rows": [_claim_row(CLAIMS[variant], shape, trained) for variant in variants]}


def _column_name(residual: bool, qk_scale: float) -> str:
    return f"{'with residual' if residual else 'attention only'}, sqk {qk_scale:g}"


def _cell(measured: dict) -> str:
    entropy, residual = measured["worst_entropy"], measured["final_residual"]
    return (f"**{measured['verdict']}**<br>H {entropy['median']:.3f} ({entropy['p10']:.3f}-"
            f"{entropy['p90']:.3f})<br>res {residual['median']:.1e} ({residual['p10']:.1e}-"
            f"{residual['p90']:.1e})")


def _trained_cell(health: dict) -> str:
    def number(value, spec):
        return "-" if value is None else format(value, spec)

    return (f"H {number(health['entropy_min'], '.2f')}<br>res {number(health['residual_min'], '.1e')}"
            f"<br>logit {number(health['max_logit'], '.3g')}")


def _trained_cells(trained: dict | None) -> list[str]:
    if trained is None:
        return ["-", "-"]
    return [f"LR {trained['best_lr']:g}<br>{_trained_cell(trained['at_best_lr'])}",
            f"LR {trained['largest_lr']:g}<br>{_trained_cell(trained['at_largest_lr'])}"]


def claims_markdown(report: dict) -> str:
    """The claims table (the README's, between its claims-table markers)."""
    setting = report["setting"]
    header = ["preset", "addresses", "guaranteed where (bound)"] + [
        _column_name(column["residual"], column["qk_scale"]) for column in setting["columns"]] + [
        "after training, best LR", "after training, largest LR"]
    lines = [
        f"{setting['depth']} layers of `create(preset, dim={setting['dim']}, "
        f"num_heads={setting['num_heads']})` as built, pre-LN, {setting['tokens']} tokens, "
        f"batch {setting['batch']}, W_q and W_k multiplied by sqk; {setting['seeds']} seeds per "
        f"cell. Each cell: the verdict (a failure counts where fewer than "
        f"{setting['hold_share']:.0%} of seeds avoid it: H >= {setting['entropy_bound']:g}, "
        f"res >= {setting['rank_bound']:g}), then the worst-layer entropy H and the output's "
        f"res(X), median (10th-90th percentile). After training: the worst layer's entropy, "
        f"lowest res(X) and largest logit at the end of the learning-rate sweep on real text "
        f"(`{setting['after_training']['source']}`, one seed; `-`: not trained there).", "",
        "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in report["rows"]:
        guarantees = "; ".join(f"{g['measure']} >= {g['bound']:g}: {g['setting']}"
                               for g in row["guarantees"]) or "-"
        cells = [_cell(measured) for measured in row["measured"]] + _trained_cells(
            row["after_training"])
        lines.append("| " + " | ".join([row["variant"], row["addresses"], guarantees, *cells])
                     + " |")
    return "\n".join(lines) + "\n"


def addresses_markdown(report: dict) -> str:
    """Which presets avoid which failure at initialisation (the README's opening list)."""
    groups = {"both": [], "entropy collapse": [], "rank collapse": [], "neither": []}
    for row in report["rows"]:
        groups[row["addresses"]].append(f"`{row['variant']}`")
    words = {"both": "**both failures**", "entropy collapse": "entropy collapse only",
             "rank collapse": "rank collapse only",
             "neither": "neither, as a guarantee (see their notes)"}
    return "".join(f"- {words[failure]}: {', '.join(names)}\n"
                   for failure, names in groups.items() if names)


def markdown(report: dict) -> str:
    """claims.md: the table, each preset's source and note, and the machine."""
    lines = [claims_markdown(report), "Sources and notes:", ""]
    lines += [f"- **{row['variant']}** ({row['source']}): claims that {row['source_claim']}."
              + (f" {row['note']}" if row["note"] else "") for row in report["rows"]]
    lines += ["", "Machine: " + ", ".join(f"{key} {value}"
                                          for key, value in report["machine"].items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="depth 4, width 32, 16 tokens, 16 seeds (for the tests)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    report = run(args.quick)
    write(Path(args.out), "claims", report, markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
