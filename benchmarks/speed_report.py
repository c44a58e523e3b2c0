"""The speed benchmark's targets (issue 17), judged on one run, its markdown table, and the
README's performance block (:func:`readme_table` of speed-<device>.json; tested)."""

from __future__ import annotations


# Issue 17's targets. Dense presets, fwd+bwd at the first shape (ViT-S), ratio to timm's fused
# Attention; their inference forwards are judged by benchmarks/dense_overhead.py. The issue names
# the presets with a time target (DENSE_TIMED and LOOSE_LIMIT's); the others (ALiBi, differential
# attention, QK-clip, ...) add work timm does not do and are shown without one.
DENSE_LIMIT = {"cpu": 1.02, "cuda": 1.05}
DENSE_TIMED = ("baseline", "qk_norm", "sigma_reparam", "gated", "outlier_removal", "spectral_qk")
LOOSE_LIMIT = {"sink": 1.05, "softcap": 1.10, "sigmoid": 1.10}  # on every device
LM_LIMIT = {"softcap": 1.5, "sigmoid": 1.5}  # fwd+bwd at the LM shape, ratio to flash SDPA
FOLDED_LIMIT = 1.02  # sigma_reparam in eval after fold(): forward
MEMORY_LIMIT = 1.2  # peak at the N x N check, ratio to timm (SDPA)
PROBE_LIMIT = 0.05  # the probe at default sampling: share of a training step
# Why a target is missed where the cause is known (profiled with torch.profiler), keyed by
# (case, what is compared); the markdown prints it beside the miss.
# (case, what, against) -> why a missed target cannot be met, as measured and understood.
_NOT_N_BY_N = "O(N D), not N x N (one N x N matrix per head would be 27x)"
_SCORE_PASSES = ("a score modifier needs the score matrix: eager's elementwise passes over it "
                 "(scale, the modifier, softmax or sigmoid, and their backward) against SDPA's "
                 "fused flash kernel, which has no hook for them on the CPU")
EXPLANATIONS: dict[tuple[str, str, str], str] = {
    ("softcap", "fwd+bwd", "timm"): _SCORE_PASSES,
    ("softcap", "fwd+bwd", "timm unfused"): _SCORE_PASSES + "; timm unfused also materialises "
                                            "the scores, without the modifier's three passes",
    ("sigmoid", "fwd+bwd", "timm"): _SCORE_PASSES,
    ("sigmoid", "fwd+bwd", "timm qk_norm"): _SCORE_PASSES,
    ("softcap", "LM fwd+bwd", "timm"): "the tiled kernel without a modifier is about 1.5x flash "
                                       "SDPA already (eager ops per tile); softcap's tanh adds "
                                       "three passes forward and three backward per tile "
                                       "(benchmarks/long_context.py); 1.5x needs a fused kernel",
    ("sigma_reparam", "fwd+bwd", "timm"): "the reparametrisation itself: a power-iteration step "
                                          "(two matrix-vector passes per weight), sigma and "
                                          "W_hat = gamma W / sigma with its backward "
                                          "(benchmarks/dense_overhead.py)",
    ("outlier_removal", "fwd+bwd", "timm"): "its own two passes, the mean of v and its "
                                            "subtraction from the output "
                                            "(benchmarks/dense_overhead.py)",
    ("sink", "fwd+bwd", "timm"): "the baseline's gap plus the sink's rescale of the output and "
                                 "its gradient pass (benchmarks/dense_overhead.py: 1.01x the "
                                 "baseline with the overflow check off)",
    ("gated", "fwd+bwd", "timm"): "the elementwise gate is an extra C x C projection (+25% of the "
                                  "linear FLOPs), inherent: judged against timm's "
                                  "Attention(gated=True) beside it",
    ("qk_norm", "peak memory", "timm"): f"{_NOT_N_BY_N}: LayerNorm keeps the normalised q and k "
                                        "for its backward (2 x 8 MiB here), as timm's "
                                        "qk_norm=True does",
    ("sigmoid", "peak memory", "timm"): f"{_NOT_N_BY_N}: the preset's qk_norm (above) plus the "
                                        "tiled kernel's tile of scores "
                                        "(benchmarks/long_context.py: 1.09x timm with qk_norm)",
    ("robust", "peak memory", "timm"): f"{_NOT_N_BY_N}: qk_norm's normalised q and k (above) "
                                       "plus outlier removal's uniform part U V",
    ("differential", "peak memory", "timm"): f"{_NOT_N_BY_N}: two softmax maps per head, by "
                                             "construction: two kernel calls whose outputs the "
                                             "backward keeps, and the per-head RMSNorm's input",
    ("block_topk", "peak memory", "timm"): f"{_NOT_N_BY_N}: the block gate, B H (N / 8)^2 float32 "
                                           "scores with the preset's blocks of 8 tokens (32 MiB "
                                           "at this shape), and the gathered key blocks",
    ("probe", "training step", "probe off"): "the probe's own cost per step is what it was "
                                             "(0.10 s a step here; 0.10 s of a 5.9 s step in the "
                                             "earlier run on a slower, loaded machine); the step "
                                             "is 4x faster on this machine, so its share rose",
    ("block_sparse", "peak memory", "timm"): f"{_NOT_N_BY_N}: the gathered key/value blocks of "
                                             "the block-sparse plan",
}


def _target(dtype: str, case: str, what: str, against: str, value: float | None, limit: float,
            note: str | None = None) -> dict:
    met = value is not None and value <= limit
    if not met and note is None:
        note = EXPLANATIONS.get((case, what, against))
    return {"dtype": dtype, "case": case, "what": what, "against": against, "value": value,
            "limit": limit, "met": met, "note": note}


def targets(report: dict) -> list[dict]:
    first = report["plan"]["shapes"][0]["key"]
    found = []
    for row in report["results"]:
        ratio, to_equivalent = row["ratio"] or {}, row["ratio_to_equivalent"] or {}
        if row["shape"] == "lm" and row["group"] == "preset" and row["case"] in LM_LIMIT:
            found.append(_target(row["dtype"], row["case"], "LM fwd+bwd", "timm",
                                 ratio.get("forward_backward_s"), LM_LIMIT[row["case"]],
                                 row["error"]))
        if row["shape"] != first:
            continue
        if row["group"] == "preset" and (row["case"] in DENSE_TIMED or row["case"] in LOOSE_LIMIT):
            limit = LOOSE_LIMIT.get(row["case"], DENSE_LIMIT[report["device"]])
            found.append(_target(row["dtype"], row["case"], "fwd+bwd", "timm",
                                 ratio.get("forward_backward_s"), limit, row["error"]))
            if row["equivalent"]:
                found.append(_target(row["dtype"], row["case"], "fwd+bwd", row["equivalent"],
                                     to_equivalent.get("forward_backward_s"), limit, row["error"]))
        if row["case"] == "sigma_reparam folded":
            found.append(_target(row["dtype"], row["case"], "eval fwd", "timm eval",
                                 ratio.get("forward_s"), FOLDED_LIMIT, row["error"]))
    for result in report["memory_check"]:
        if result["case"] != "timm":
            note = f"over the {report['plan']['memory_cap_mib']} MiB cap" if result["over_cap"] \
                else result["error"]
            found.append(_target(result["dtype"], result["case"], "peak memory", "timm",
                                 result["peak_ratio"], MEMORY_LIMIT, note))
    probe = report["probe_overhead"]
    if probe is not None:
        found.append(_target("float32", "probe", "training step", "probe off", probe["ratio"] - 1,
                             PROBE_LIMIT))
    return found


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1e3:.3g} ms" if value < 1 else f"{value:.2f} s"


def _cell(row: dict | None, key: str, reference: bool) -> str:
    """A reference's median, or a case's ratio to its reference (and to its timm equivalent)."""
    if row is None:
        return ""
    if row["error"]:
        return f"fails: {row['error'][:60]}"
    if reference:
        return _seconds(row[key])
    cell = _ratio((row["ratio"] or {}).get(key)) + (" (1 run)" if row["slow"] else "")
    equivalent = (row["ratio_to_equivalent"] or {}).get(key)
    return cell + (f" ({_ratio(equivalent)} {row['equivalent']})" if equivalent else "")


def _memory_cell(result: dict | None, cap: int, reference: bool) -> str:
    if result is None:
        return ""
    if result["over_cap"]:
        return f"over {cap} MiB"
    if result["error"]:
        return f"fails: {result['error'][:60]}"
    return f"{result['step_peak_mib']:.3g} MiB" if reference else _ratio(result["peak_ratio"])


def _verdicts(found: list[dict], case: str) -> tuple[str, str]:
    mine = [t for t in found if t["case"] == case]
    limits = "; ".join(f"{t['what']} <= {t['limit']:.2f}x {t['against']}" for t in mine)
    verdicts = "; ".join("pass" if t["met"] else "**miss**" for t in mine)
    return limits, verdicts


def _main_table(report: dict, dtype: str) -> list[str]:
    rows = {(row["shape"], row["case"]): row for row in report["results"] if row["dtype"] == dtype}
    memory = {r["case"]: r for r in report["memory_check"] if r["dtype"] == dtype}
    found = [t for t in report["targets"] if t["dtype"] == dtype]
    cap = report["plan"]["memory_cap_mib"]
    first, second, third = (shape["key"] for shape in report["plan"]["shapes"])
    memory_label = report["plan"]["memory_shape"]["label"]
    lines = [f"| variant | kernel | ViT-S fwd | ViT-S fwd+bwd | ViT-B fwd+bwd | LM fwd+bwd "
             f"| compiled ViT-S fwd+bwd | peak, {memory_label} | target | pass/miss |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    names = [row["case"] for row in report["results"]
             if row["dtype"] == dtype and row["shape"] == first and row["group"] in ("reference", "preset")
             and row["mode"] == "train" and not row["case"].endswith("compiled")]
    for name in names:
        reference = name == "timm"
        limits, verdicts = _verdicts(found, name)
        label = "timm Attention (reference: time, MiB)" if reference else name
        compiled = "timm compiled" if reference else f"{name} compiled"
        lines.append("| " + " | ".join([
            label, rows[(first, name)]["kernel"],
            _cell(rows.get((first, name)), "forward_s", reference),
            _cell(rows.get((first, name)), "forward_backward_s", reference),
            _cell(rows.get((second, name)), "forward_backward_s", reference),
            _cell(rows.get((third, name)), "forward_backward_s", reference),
            _cell(rows.get((first, compiled)), "forward_backward_s", reference),
            _memory_cell(memory.get(name), cap, reference), limits, verdicts]) + " |")
    return lines


def _other_table(report: dict, dtype: str) -> list[str]:
    first = report["plan"]["shapes"][0]["key"]
    rows = {row["case"]: row for row in report["results"]
            if row["dtype"] == dtype and row["shape"] == first}
    others = [row for row in rows.values() if row["group"] in ("timm", "inference", "kernel")
              or row["case"] in ("timm eval", "timm compiled")]
    lines = ["| case | mode | kernel | against | fwd | fwd+bwd | first call |",
             "|---|---|---|---|---|---|---|"]
    for row in others:
        reference = row["case"] == row["reference"]
        against = "(reference)" if reference else row["reference"]
        eager = rows["timm"]["forward_backward_s"]
        if row["case"] == "timm compiled" and row["forward_backward_s"] and eager:
            against = f"(reference; {row['forward_backward_s'] / eager:.2f}x eager timm)"
        step = _cell(row, "forward_backward_s", reference) if row["mode"] == "train" else ""
        lines.append(f"| {row['case']} | {row['mode']} | {row['kernel']} | {against} "
                     f"| {_cell(row, 'forward_s', reference)} | {step} | {row['first_call_s']:.1f} s |")
    return lines


def _peak_table(report: dict, dtype: str) -> list[str]:
    plan = report["plan"]
    checks = [(plan["shapes"][0]["label"], report["peak_memory"]),
              (plan["memory_shape"]["label"], report["memory_check"])]
    found = [{r["case"]: r for r in results if r["dtype"] == dtype} for _, results in checks]
    names = list(dict.fromkeys(name for results in found for name in results))
    lines = ["| variant | " + " | ".join(label for label, _ in checks) + " |",
             "|---|" + "---|" * len(checks)]
    for name in names:
        cells = [_peak_cell(results.get(name), plan["memory_cap_mib"]) for results in found]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _peak_cell(result: dict | None, cap: int) -> str:
    cell = _memory_cell(result, cap, reference=True)
    return f"{cell} ({_ratio(result['peak_ratio'])})" if result and result.get("peak_ratio") else cell


def markdown(report: dict) -> str:
    m, plan = report["machine"], report["plan"]
    shapes = "; ".join(f"{shape['label']} ({_describe(shape)})" for shape in plan["shapes"])
    memory_shape = plan["memory_shape"]
    lines = [
        f"# Speed and peak memory against timm's fused Attention ({report['device']})", "",
        f"`{report['command'].strip()}` on {m['cpu']} ({m['cores']} cores, {m['threads']} torch "
        f"threads), {m['device']}, torch {m['torch']}, python {m['python']}; load average "
        f"{report['load_average_before']} before, {report['load_average_after']} after; "
        f"{report['wall_s']:.0f} s (" + ", ".join(f"{k} {v:.0f} s" for k, v in report["phases_s"].items())
        + ").", "",
        f"Shapes: {shapes}. Medians of "
        + ", ".join(f"{plan['repeats'][shape['key']]} ({shape['label']})" for shape in plan["shapes"])
        + " interleaved rounds after an untimed first call, one process. Cells are ratios of a "
        "variant's median to timm's "
        "`Attention` (fused SDPA) in the same rounds (< 1 is faster); the reference row gives its "
        "times. fwd = time to the output within the training step, fwd+bwd = the step. Compiled: "
        "`torch.compile` (inductor) of the module, against compiled timm. Peak: resident memory "
        f"above the step's start, one training step at {memory_shape['label']} "
        f"({_describe(memory_shape)}) in a fresh process per variant: one (N, N) float32 "
        f"attention matrix per head would take "
        f"{memory_shape['batch'] * memory_shape['heads'] * memory_shape['tokens'] ** 2 * 4 / 2 ** 20:.0f}"
        " MiB. In brackets: the ratio to timm's own equivalent.",
    ]
    for dtype in plan["dtypes"]:
        found = [t for t in report["targets"] if t["dtype"] == dtype]
        lines += ["", f"## {dtype}", "", *_main_table(report, dtype), "",
                  f"Other cases at {plan['shapes'][0]['label']}:", "", *_other_table(report, dtype),
                  "", "Peak memory of one training step above its start, each in a fresh process "
                  "(ratio to timm):", "",
                  *_peak_table(report, dtype)]
        lines += ["", *_target_lines(found)]
    lines += ["", _probe_line(report)]
    failed = [row for row in report["results"] if row["error"]]
    if failed:
        lines += ["", "Cases that do not run here:", ""]
        lines += [f"- {row['case']} ({row['dtype']}, {row['shape']}): {row['error']}" for row in failed]
    return "\n".join(lines) + "\n"


def _target_lines(found: list[dict]) -> list[str]:
    """How many targets were met, then each miss with its explanation where one is known."""
    misses = [t for t in found if not t["met"]]
    return [f"Targets: {len(found) - len(misses)} of {len(found)} met."] + [
        f"- {t['case']} {t['what']} {_ratio(t['value'])} against {t['against']} "
        f"(target <= {t['limit']:.2f}x): missed" + (f"; {t['note']}" if t["note"] else "")
        for t in misses]


def _probe_line(report: dict) -> str:
    probe = report["probe_overhead"]
    return "Health probe at default sampling: " + (
        "not measured (run `python benchmarks/probe_overhead.py` first)" if probe is None else
        f"{(probe['ratio'] - 1) * 100:.1f} % of a training step (target < {PROBE_LIMIT * 100:.0f} %; "
        f"`{probe['path']}`)") + "."


def readme_table(report: dict) -> str:
    """The README's performance block (between its speed-table markers): per dtype, the main
    table, the targets met and the misses; then the probe's share; rendered from the JSON."""
    m, shapes = report["machine"], report["plan"]["shapes"]
    lines = [f"From `{report['command'].strip()}` on {m['cpu']} ({m['threads']} torch threads, "
             f"torch {m['torch']}, load {report['load_average_before'][0]}-"
             f"{report['load_average_after'][0]}); shapes: "
             + "; ".join(f"{shape['label']} ({_describe(shape)})" for shape in shapes) + "."]
    for dtype in report["plan"]["dtypes"]:
        found = [t for t in report["targets"] if t["dtype"] == dtype]
        lines += ["", *([f"{dtype}:", ""] if len(report["plan"]["dtypes"]) > 1 else []),
                  *_main_table(report, dtype), "", *_target_lines(found)]
    return "\n".join([*lines, "", _probe_line(report)]) + "\n"


def _describe(shape: dict) -> str:
    causal = ", causal" if shape["causal"] else ""
    return f"B={shape['batch']}, N={shape['tokens']}, C={shape['dim']}, H={shape['heads']}{causal}"
