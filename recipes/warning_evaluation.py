#!/usr/bin/env python
"""Score and recalibrate the early warnings on the labelled corpus of recipes/warning_corpus.py.

1. Load every run of ``--corpus``: its label (recipes/_failure.py's loss-only
   verdict), train.csv (every step's loss) and health.csv, read back as a
   :class:`robust_attn.health.monitor.MonitorReport`.
2. Calibrate on the calibration seeds only: for each warm-up in WARMUPS and
   hysteresis in PERSISTENCES, and per code over its grid of thresholds
   (GRIDS), replay the rule after every sampled step and score it
   (recipes/_warning_scores.py). Per code, the best setting warns at most 5 %
   of healthy calibration runs, then meets the targets, then has the highest
   recall, the longest lead, the fewest healthy runs warned and alarms (ties:
   the default thresholds). The warm-up and hysteresis shared by all codes are
   those with which most codes meet the targets (then the highest summed
   recall, then the fewest healthy runs warned).
3. Score the chosen thresholds on the held-out seeds with
   :func:`robust_attn.health.early_warnings.replay`, exactly as a monitor checked
   after every sample would warn. Codes that miss a target there are
   "informational".

Outputs in ``--out``: evaluation.json (thresholds, calibration and held-out
scores per code and for the monitor, per-run first warnings) and
evaluation.md (:func:`render_table`, the README's table). ``--readme`` also
rewrites the README block between the warning-evaluation markers.

Example:
    python recipes/warning_evaluation.py --corpus runs/warning_corpus \\
        --out recipes/results/warning_evaluation --readme README.md
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from dataclasses import asdict, replace
from pathlib import Path

from _logging import markdown_table, read_csv
from _warning_scores import TARGETS, Run, Timeline, persist, score

import robust_attn
from robust_attn.health.early_warnings import IMMEDIATE, RULES, Thresholds, check, replay
from robust_attn.health.monitor import MonitorReport, presets_in_use

WARMUPS = (0, 50, 100)
PERSISTENCES = (1, 2, 3)
GRIDS: dict[str, list[dict]] = {
    "entropy_collapse": [{"entropy_collapse": v} for v in (0.05, 0.1, 0.2, 0.3, 0.4, 0.5)],
    "entropy_falling": [{"entropy_fall_rate": r, "entropy_fall_min": m, "trend_samples": n}
                        for r, m, n in itertools.product((1e-3, 3e-3), (0.05, 0.1, 0.2, 0.3),
                                                         (5, 10))],
    "logit_growth": [{"logit_bound": v} for v in (10.0, 15.0, 20.0, 30.0, 50.0, 100.0)],
    "rank_collapse": [{"rank_residual": r, "rank_cosine": c}
                      for r, c in itertools.product((0.01, 0.05, 0.1, 0.2),
                                                    (0.8, 0.9, 0.95, 0.99))],
    "attention_sink": [{"sink_share": v} for v in (0.5, 0.75)],
    "loss_spike": [{"loss_band": v} for v in (4.0, 6.0, 10.0)],
    "loss_oscillation": [{}],
    "divergence": [{}],
    "vanishing_gradients": [{"vanishing_ratio": v} for v in (1e-3, 1e-2)],
    "exploding_gradients": [{"exploding_factor": v} for v in (10.0, 30.0, 100.0)],
    "redundant_layer": [{"redundant_similarity": v} for v in (0.9, 0.95, 0.98)],
    "lazy_layer": [{"lazy_gain": v} for v in (1e-3, 1e-2)],
}
START, END = "<!-- warning-evaluation:start -->", "<!-- warning-evaluation:end -->"


def load_run(directory: Path) -> tuple[dict, MonitorReport]:
    label = json.loads((directory / "label.json").read_text())
    losses = [float(row["loss"]) for row in read_csv(directory / "train.csv")]
    return label, MonitorReport.from_csv(directory / "health.csv", losses)


def load_corpus(corpus: Path) -> list[tuple[dict, MonitorReport]]:
    directories = sorted(p.parent for p in corpus.glob("*/label.json"))
    if not directories:
        raise SystemExit(f"--corpus {corpus}: no runs (label.json) found; "
                         "run recipes/warning_corpus.py first")
    return [load_run(directory) for directory in directories]


def _keys(warnings) -> frozenset:
    return frozenset((w.code, w.layer, w.head) for w in warnings)


def raw_timeline(report: MonitorReport, t: Thresholds, code: str) -> Timeline:
    """The code's firings after every sample, with the warm-up, without hysteresis."""
    once = replace(t, persistence=1)
    return [(report.steps[k - 1], _keys(check(report.truncated(k), once, codes=[code])))
            for k in range(1, len(report.steps) + 1)]


def as_run(label: dict, timeline: Timeline) -> Run:
    return Run(label["run"], label["failed"], label["failure_step"], label["steps"],
               label["steps_taken"], timeline)


def _rank(result, params: dict) -> tuple:
    """Warning few enough healthy runs first, then meeting the targets, recall, lead, fewer
    healthy runs warned and alarms; on a tie, the default thresholds."""
    default = Thresholds()
    return (result.healthy_warned <= TARGETS["healthy_warned"], result.meets_targets(),
            0.0 if math.isnan(result.recall) else result.recall,
            0.0 if math.isnan(result.median_lead_before_failure)
            else result.median_lead_before_failure,
            -result.healthy_warned, -result.alarms_per_1k_steps,
            all(getattr(default, key) == value for key, value in params.items()))


def calibrate(runs: list[tuple[dict, MonitorReport]]) -> tuple[Thresholds, dict]:
    """The thresholds chosen on ``runs`` (module docstring, step 2) and their scores there."""
    best: dict[tuple[int, int], dict[str, tuple]] = {}
    for warmup in WARMUPS:
        for code, grid in GRIDS.items():
            for params in grid:
                t = replace(Thresholds(), warmup_steps=warmup, **params)
                raws = [(label, raw_timeline(report, t, code)) for label, report in runs]
                for persistence in PERSISTENCES:
                    result = score([as_run(label, persist(raw, persistence, code in IMMEDIATE))
                                    for label, raw in raws])
                    chosen = best.setdefault((warmup, persistence), {})
                    if code not in chosen or \
                            _rank(result, params) > _rank(chosen[code][1], chosen[code][0]):
                        chosen[code] = (params, result)
    (warmup, persistence), chosen = max(best.items(), key=lambda item: (
        sum(result.meets_targets() for _, result in item[1].values()),
        sum(result.recall for _, result in item[1].values() if not math.isnan(result.recall)),
        -sum(result.healthy_warned for _, result in item[1].values())))
    fields = {key: value for params, _ in chosen.values() for key, value in params.items()}
    thresholds = replace(Thresholds(), warmup_steps=warmup, persistence=persistence, **fields)
    scores = {code: result.to_dict() for code, (_, result) in chosen.items()}
    return thresholds, scores


def evaluate(runs: list[tuple[dict, MonitorReport]], t: Thresholds) -> tuple[dict, list[dict]]:
    """Held-out scores per code, for the trusted codes (those that meet the targets here)
    together and for any code; per-run first warnings."""
    timelines = []
    for label, report in runs:
        in_use = presets_in_use([robust_attn.create(label["config"]["variant"], 8, num_heads=2)])
        timelines.append((label, replay(report, t, in_use)))

    def for_codes(codes) -> list[Run]:
        return [as_run(label, [(step, _keys(w for w in warnings if w.code in codes))
                               for step, warnings in timeline]) for label, timeline in timelines]

    per_code = {code: score(for_codes({code})) for code in RULES}
    trusted = {code for code, result in per_code.items() if result.meets_targets()}
    scores = {code: result.to_dict() for code, result in per_code.items()}
    scores["monitor (trusted codes)"] = score(for_codes(trusted)).to_dict()
    scores["any code"] = score(for_codes(set(RULES))).to_dict()
    details = [{"run": label["run"], "kind": label["kind"], "failure_step": label["failure_step"],
                "first_warning": {code: run.first_warning() for code in RULES
                                  if (run := for_codes({code})[i]).first_warning() is not None}}
               for i, (label, _) in enumerate(timelines)]
    return scores, details


def _cell(value: float, percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.0%}" if percent else f"{value:.1f}"


def render_table(results: dict) -> str:
    """The README's table: held-out scores per code, from evaluation.json's content."""
    held = results["held_out"]
    rows = []
    for code, s in held["scores"].items():
        status = ("trusted" if s["meets_targets"] else "informational") \
            if code in RULES else "-"
        rows.append([f"`{code}`" if code in RULES else code, status, _cell(s["recall"], True),
                     _cell(s["median_lead_steps"]), _cell(s["median_lead_before_failure"], True),
                     _cell(s["median_lead_of_run"], True), _cell(s["alarms_per_1k_steps"]),
                     _cell(s["healthy_warned"], True)])
    header = ["code", "status", "recall", "median lead (steps)",
              "median lead / steps before failure", "median lead / run length",
              "false alarms / 1k healthy steps", "healthy runs warned"]
    counts = held["runs"]
    return (f"Held-out runs (seeds {', '.join(map(str, held['seeds']))}): {counts['failed']} "
            f"failed, {counts['healthy']} healthy. Targets: recall >= "
            f"{TARGETS['recall']:.0%}, median lead >= "
            f"{TARGETS['median_lead_before_failure']:.0%} of the run before the failure, <= "
            f"{TARGETS['healthy_warned']:.0%} of healthy runs warned. Calibrated thresholds "
            f"(`robust_attn.Thresholds` defaults): "
            + ", ".join(f"{key}={value:g}" for key, value in results["thresholds"].items())
            + ".\n\n"
            + markdown_table(header, rows))


def replace_block(text: str, table: str) -> str:
    if START not in text or END not in text:
        raise ValueError(f"the README has no {START} ... {END} block")
    head, rest = text.split(START, 1)
    return f"{head}{START}\n{table}\n{END}{rest.split(END, 1)[1]}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=Path("runs/warning_corpus"))
    parser.add_argument("--out", type=Path, default=Path("recipes/results/warning_evaluation"))
    parser.add_argument("--readme", type=Path, default=None,
                        help="rewrite this file's warning-evaluation block with the table")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    runs = load_corpus(args.corpus)
    calibration = [(label, report) for label, report in runs if label["split"] == "calibration"]
    held_out = [(label, report) for label, report in runs if label["split"] == "held_out"]
    if not calibration or not held_out:
        raise SystemExit(f"--corpus {args.corpus}: needs calibration and held-out runs")
    thresholds, calibration_scores = calibrate(calibration)
    scores, details = evaluate(held_out, thresholds)
    results = {
        "targets": TARGETS, "thresholds": asdict(thresholds),
        "grids": {"warmup_steps": WARMUPS, "persistence": PERSISTENCES, **GRIDS},
        "calibration": {"seeds": sorted({label["seed"] for label, _ in calibration}),
                        "scores": calibration_scores},
        "held_out": {"seeds": sorted({label["seed"] for label, _ in held_out}),
                     "runs": {"failed": sum(label["failed"] for label, _ in held_out),
                              "healthy": sum(not label["failed"] for label, _ in held_out)},
                     "scores": scores, "details": details},
        "informational": sorted(code for code in RULES if not scores[code]["meets_targets"]),
        "seconds": time.perf_counter() - start}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "evaluation.json").write_text(json.dumps(results, indent=1))
    table = render_table(results)
    (args.out / "evaluation.md").write_text(table + "\n")
    if args.readme:
        args.readme.write_text(replace_block(args.readme.read_text(), table))
    print(table)
    print(f"informational: {results['informational']}; thresholds: {asdict(thresholds)}; "
          f"{results['seconds']:.0f} s")


if __name__ == "__main__":
    main()
