"""The robust-attn command line.

    robust-attn doctor [--builtin] [--variants ...] [--scales ...] [--out DIR]
    robust-attn doctor --model TIMM_NAME [--checkpoint PATH] [--num-classes K] [--variants ...]
    robust-attn doctor --model hf:MODEL_TYPE [--variants ...]
    robust-attn doctor --run DIR [--variant PRESET] [--out PNG]
    robust-attn diagram [--variants ...] [--norm pre post] [--betas ...] [--alphas ...] [--out DIR]
    robust-attn bench [--quiet] [NAME [ARGS ...]]

``doctor --builtin`` (the default) measures, at initialisation, a deep stack
of each variant (robust_attn.studies.stack) under several query/key weight scales,
with and without residual connections: the per-layer health of the first
variant, a summary of every variant, the early warnings of one monitored
training step of each stack, a JSON report, a PNG of per-layer entropy and
res, and each variant's attention maps.

``doctor --model hf:MODEL_TYPE`` does the same for a Hugging Face transformers model
type (``hf:llama``, ``hf:gpt2``, ``hf:bert``, ``hf:vit``, ...) built from a tiny config
with random weights (no download): the logits' mean square is the loss.

``doctor --model`` builds a timm model (random init, or the local checkpoint
given; ``--num-classes`` and ``--img-size`` build it to fit the checkpoint),
converts it to each variant (robust_attn.convert), runs one training step on a
random batch under a HealthMonitor, and prints a per-layer health table and the
warnings per variant, with attention maps and a JSON report.

``doctor --run`` checks a finished training run after the fact: it reads the
run's ``health.csv`` (``HealthMonitor.to_csv``) and ``train.csv`` (a ``loss``
column, one row per step), replays the early warnings after every sampled
step as the monitor would have raised them, prints each code's first step and
evidence, and draws the health curves with those steps marked.

``diagram`` draws the trainability diagram (robust_attn.studies.diagnostics) of each
variant.

``bench`` lists the benchmarks of a source checkout, or runs one as
``python -m benchmarks.NAME ARGS`` does from the checkout, in a fresh process
(its output comes through; the exit status is the benchmark's). A benchmark is
a module of benchmarks/ that runs as a program, i.e. has an
``if __name__ == "__main__":`` block; the others (machine, measure, output,
speed_cases, ...) are helpers the benchmarks import, and are not listed. Each is
listed with the first sentence of its docstring, and each takes ``--quick`` (its
smallest size: a smoke run of seconds) and ``--out DIR`` (where its results go);
tests/test_cli_commands.py runs every one that way.

Progress bars (tqdm) go to stderr, and only when stderr is a terminal;
``--quiet`` turns them off (for ``bench``, give it before NAME: what follows NAME
is the benchmark's). Bad input (a missing or unreadable checkpoint, one that
does not fit the model, an unknown benchmark) ends in one line on stderr naming
the argument, and exit status 2, as argparse's own errors do.
"""

from __future__ import annotations

import argparse
import ast
import copy
import csv
import json
import os
import re
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from statistics import fmean

import torch
from tqdm import tqdm

from .health.early_warnings import EarlyWarnings, HealthWarning, check
from .health.monitor import HealthMonitor, MonitorReport, presets_in_use
from .integrations import convert
from .presets import create, list_variants
from .studies.diagnostics import (
    DEFAULT_ALPHAS,
    DEFAULT_BETAS,
    NORM_POSITIONS,
    Architecture,
    trainability_diagram,
)
from .studies.plotting import (
    plot_attention_maps,
    plot_health_curves,
    plot_stack_health,
    plot_trainability_diagrams,
)
from .studies.stack import (
    ENTROPY_COLLAPSE,
    RANK_COLLAPSE,
    StackHealth,
    StackSetting,
    build_stack,
    layer_health,
)

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


class CommandError(Exception):
    """Bad input a command found (its message names the argument): :func:`main` prints it as one
    line on stderr and returns 2, the status argparse gives a bad argument; no traceback."""


def _progress(iterable, args: argparse.Namespace, desc: str):
    """``iterable`` with a progress bar on stderr (the tables go to stdout): none with --quiet, or
    when stderr is not a terminal (logs, tests)."""
    return tqdm(iterable, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True,
                disable=True if args.quiet else None)


def _say(text: str = "") -> None:
    """print() while a progress bar runs: tqdm.write clears the bar, prints, and redraws it."""
    tqdm.write(text, file=sys.stdout)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = [header, ["-" * width for width in widths], *rows]
    return "\n".join(" | ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True))
                     for line in lines)


def _per_layer_table(reports: list[StackHealth]) -> str:
    header = ["layer"] + [f"{name} sqk={r.setting.qk_scale:g}" for r in reports
                          for name in ("H", "res", "sink", "logit")]
    rows = [[str(layers[0].layer)] + [value for layer in layers for value in (
        f"{layer.entropy:.3f}", f"{layer.residual:.1e}", f"{layer.sink_mass:.2f}",
        f"{layer.max_logit:.1f}")] for layers in zip(*(r.layers for r in reports), strict=True)]
    return _table(header, rows)


def _stack_name(setting: StackSetting) -> str:
    return "with residual" if setting.residual else "attention only"


def _summary_table(reports: list[StackHealth]) -> str:
    header = ["variant", "stack", "sqk", "worst H", "final res", "verdict"]
    rows = [[r.setting.variant, _stack_name(r.setting), f"{r.setting.qk_scale:g}",
             f"{r.worst_entropy:.3f}", f"{r.final_residual:.1e}", r.verdict] for r in reports]
    return _table(header, rows)


def _codes(warnings: list[HealthWarning]) -> dict[str, list[HealthWarning]]:
    grouped = defaultdict(list)
    for warning in warnings:
        grouped[warning.code].append(warning)
    return dict(grouped)


def _warning_cell(warnings: list[HealthWarning]) -> tuple[str, str]:
    """("code x count, ...", "preset, ...") for one row of a warnings table."""
    grouped = _codes(warnings)
    found = ", ".join(f"{code} x{len(items)}" for code, items in grouped.items())
    presets = dict.fromkeys(items[0].mitigations[0] for items in grouped.values()
                            if items[0].mitigations)
    return found or "-", ", ".join(presets) or "-"


def _warning_lines(warnings: list[HealthWarning]) -> list[str]:
    """One line per code: how many, where, the first message, what to try."""
    lines = []
    for code, items in _codes(warnings).items():
        where = sorted({w.layer if w.head is None else f"{w.layer}/{w.head}" for w in items
                        if w.layer is not None})
        place = f" in {', '.join(where[:4])}{' ...' if len(where) > 4 else ''}" if where else ""
        lines.append(f"  {code} x{len(items)}{place}: {items[0].message}\n"
                     f"    try: {', '.join(items[0].mitigations)} ({items[0].advice})")
    return lines or ["  none"]


def _loss(output: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against random labels for (B, K) outputs, else the output's mean square."""
    if output.dim() == 2:
        labels = torch.randint(output.shape[1], (output.shape[0],),
                               generator=torch.Generator().manual_seed(0))
        return torch.nn.functional.cross_entropy(output.float(), labels)
    return output.float().square().mean()


def _training_step(model: torch.nn.Module, inputs: torch.Tensor):
    """One forward and backward of ``model`` under a HealthMonitor: its output, report, warnings,
    and the sampled attention maps."""
    with HealthMonitor(model, every=1, keep_maps=True) as monitor:
        output = model(inputs)
        loss = _loss(output[-1] if isinstance(output, list) else output)
        loss.backward()
        monitor.step(loss)
        return output, monitor.report(), monitor.warnings(), monitor.attention_maps()


def _builtin_step(setting: StackSetting, kernel: str):
    """The stack of ``setting``, built as robust_attn.studies.stack.measure_stack builds it (each preset as
    users build it), after one monitored training step on the loss mean(X_L^2): its StackHealth
    (measure_stack's numbers, from the same forward), warnings and attention maps."""
    generator = torch.Generator().manual_seed(setting.seed)
    stack = build_stack(setting, generator, kernel=kernel, probe=True)
    x = torch.randn(setting.batch, setting.tokens, setting.dim, generator=generator)
    hidden, _, warnings, maps = _training_step(stack, x)
    layers = [layer_health(index, attention, state.detach()) for index, (attention, state)
              in enumerate(zip(stack.layers, hidden, strict=True))]
    return StackHealth(setting, layers), warnings, maps


def _picture(plot, *args) -> bool:
    """``plot(*args)``, printing the path it wrote, or why there is no picture (False)."""
    try:
        _say(f"wrote {plot(*args)}")
        return True
    except ImportError as error:
        _say(f"no pictures: {error}")
        return False


def doctor_builtin(args: argparse.Namespace) -> int:
    base = StackSetting(depth=args.depth, dim=args.width, num_heads=args.heads,
                        tokens=args.tokens, seed=args.seed)
    settings = [StackSetting(**{**base.__dict__, "variant": variant, "qk_scale": scale,
                                "residual": residual})
                for variant in args.variants for residual in (False, True) for scale in args.scales]
    reports, warnings, maps = zip(*(_builtin_step(setting, args.kernel)
                                    for setting in _progress(settings, args, "doctor: stacks")),
                                  strict=True)

    print(f"Stack at initialisation: {base.depth} pre-LN attention layers, width {base.dim}, "
          f"{base.num_heads} heads, {base.tokens} tokens, batch {base.batch}, seed {base.seed}; "
          "sqk multiplies the std of W_q and W_k.")
    print("H = normalised attention entropy (1 = uniform, 0 = one-hot), res = "
          "||X - 1 mean(X)|| / ||X|| (0 = all tokens identical), sink = attention on the first "
          "token, logit = largest attention logit.\n")
    first = [r for r in reports if r.setting.variant == args.variants[0] and not r.setting.residual]
    print(f"Per layer, {args.variants[0]}, attention only:")
    print(_per_layer_table(first), "\n")
    print(f"Every variant (entropy collapse: worst H < {ENTROPY_COLLAPSE}; "
          f"rank collapse: final res < {RANK_COLLAPSE}):")
    print(_summary_table(reports))

    print("\nEarly warnings of one training step of each stack on the loss mean(X_L^2) "
          "(HealthMonitor; codes and thresholds: robust_attn.health.early_warnings):")
    print(_table(["variant", "stack", "sqk", "warnings", "try"],
                 [[s.variant, _stack_name(s), f"{s.qk_scale:g}",
                   *_warning_cell(found)] for s, found in zip(settings, warnings, strict=True)]))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report_path = out / "doctor.json"
    report_path.write_text(json.dumps(
        [{**r.to_dict(), "warnings": [w.to_dict() for w in found]}
         for r, found in zip(reports, warnings, strict=True)], indent=1))
    print(f"\nwrote {report_path}")
    if _picture(plot_stack_health, reports, out / "stack_health.png"):
        for s, kept in zip(settings, maps, strict=True):
            if s.residual and s.qk_scale == max(args.scales):  # where the variants differ most
                _picture(plot_attention_maps, kept, out / f"attention_maps_{s.variant}.png",
                         f"{s.variant}, with residual, sqk={s.qk_scale:g}")
    return 0


def _layer_table(report) -> str:
    """Each layer at the latest sample: mean over heads, but the lowest min H and largest logit."""
    rows = [[s.name, f"{fmean(s.entropy[-1]):.3f}", f"{min(s.min_entropy[-1]):.3f}",
             f"{fmean(s.sink_mass[-1]):.2f}", f"{max(s.max_logit[-1]):.1f}",
             f"{s.input_residual[-1]:.2e}", f"{s.input_cosine[-1]:.3f}",
             f"{s.branch_gain[-1]:.2e}", f"{s.grad_norm[-1]:.2e}"] for s in report.layers]
    return _table(["layer", "H", "min H", "sink", "logit", "res in", "cos in", "gain", "grad"],
                  rows)


def _build_timm_model(args: argparse.Namespace) -> torch.nn.Module:
    try:
        import timm
    except ImportError:
        raise CommandError("--model needs timm: pip install 'robust-attn[timm]'") from None
    torch.manual_seed(args.seed)
    kwargs = {name: value for name, value in (("img_size", args.img_size),
                                              ("num_classes", args.num_classes))
              if value is not None}
    try:
        model = timm.create_model(args.model, pretrained=False, **kwargs)
    except (RuntimeError, TypeError) as error:  # an unknown name; an option the model lacks
        raise CommandError(f"--model: cannot build timm model {args.model!r}"
                           f"{' with ' + str(kwargs) if kwargs else ''}: {error}") from None
    if args.checkpoint:
        _load_checkpoint(model, Path(args.checkpoint), args.model)
    return model


def _load_checkpoint(model: torch.nn.Module, path: Path, name: str) -> None:
    """Load ``path`` into ``model`` strictly, as timm.create_model(checkpoint_path=...) does, but
    with one-line errors: a missing file, an unreadable one, one whose keys or shapes differ."""
    from timm.models import load_checkpoint, load_state_dict

    if not path.is_file():
        raise CommandError(f"--checkpoint {path}: no such file")
    try:
        if path.suffix.lower() in (".npz", ".npy"):  # timm hands these to the model's own loader
            load_checkpoint(model, str(path))
            return
        state = load_state_dict(str(path))  # also unwraps state_dict/model/EMA and "module."
        mismatch = _mismatch(model.state_dict(), state)
    except Exception as error:  # whatever torch.load or numpy raise on a file they cannot read
        reason = re.split(r"(?<=\.)\s", (str(error).strip().splitlines() or [""])[0])[0][:200]
        raise CommandError(f"--checkpoint {path}: cannot read it as a checkpoint "
                           f"({type(error).__name__}{': ' + reason if reason else ''})") from None
    if mismatch:
        raise CommandError(f"--checkpoint {path} does not fit {name}: {mismatch} "
                           "(--num-classes and --img-size build the model to match)")
    model.load_state_dict(state)


def _mismatch(expected: dict, found: dict) -> str:
    """Why ``found`` would not load strictly where ``expected`` is the model's state dict: a few
    keys of each kind (missing, unexpected, another shape); empty if it loads."""
    shapes = [f"{key} {tuple(found[key].shape)} vs {tuple(value.shape)}"
              for key, value in expected.items()
              if key in found and tuple(getattr(found[key], "shape", ())) != tuple(value.shape)]
    kinds = (("missing", [key for key in expected if key not in found]),
             ("unexpected", [key for key in found if key not in expected]),
             ("of another shape (checkpoint vs model)", shapes))
    return "; ".join(f"{len(keys)} key(s) {kind}: {', '.join(keys[:3])}"
                     f"{', ...' if len(keys) > 3 else ''}" for kind, keys in kinds if keys)


# A transformers model built from its config alone (no download): tiny, random weights. The
# names are the configs' standard ones (each config maps them to its own, e.g. GPT-2's n_embd).
HF_PREFIX = "hf:"
HF_TINY_CONFIG = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "intermediate_size": 128, "vocab_size": 256, "image_size": 32, "patch_size": 8}
HF_TOKENS = 32
HF_HEADS = ("AutoModelForCausalLM", "AutoModelForMaskedLM", "AutoModelForImageClassification")


class _Logits(torch.nn.Module):
    """A transformers model's logits as a plain tensor output (what the training step reads)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model(inputs).logits


def _build_hf_model(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.Tensor]:
    """``--model hf:MODEL_TYPE``: transformers' model of that type from a tiny config
    (HF_TINY_CONFIG), random weights, with the first head class that takes it, and its inputs."""
    try:
        import transformers
    except ImportError:
        raise CommandError(f"--model {args.model}: needs transformers: pip install "
                           "'robust-attn[transformers]'") from None
    model_type = args.model[len(HF_PREFIX):]
    try:
        config = transformers.AutoConfig.for_model(model_type, **HF_TINY_CONFIG)
    except ValueError:
        raise CommandError(f"--model {args.model}: {model_type!r} is not a transformers model type "
                           "(transformers.CONFIG_MAPPING lists them: llama, gpt2, bert, vit, ...)"
                           ) from None
    torch.manual_seed(args.seed)
    for head in HF_HEADS:
        try:
            model = getattr(transformers, head).from_config(config)
            break
        except ValueError:  # this head does not take the config
            continue
    else:
        raise CommandError(f"--model {args.model}: none of {HF_HEADS} takes a {model_type} config")
    generator = torch.Generator().manual_seed(args.seed)
    if model.main_input_name == "pixel_values":
        size = args.img_size or config.image_size
        inputs = torch.randn(args.batch, config.num_channels, size, size, generator=generator)
    else:
        inputs = torch.randint(config.vocab_size, (args.batch, HF_TOKENS), generator=generator)
    return model, inputs


def doctor_model(args: argparse.Namespace) -> int:
    if args.model.startswith(HF_PREFIX):
        if args.checkpoint or args.num_classes is not None:
            raise CommandError(f"--model {args.model}: --checkpoint and --num-classes are for timm "
                               "models (a transformers model is built from a tiny config)")
        base, inputs = _build_hf_model(args)
        source = "random init, tiny config"
        task = "the mean square of the logits"
    else:
        base = _build_timm_model(args)
        size = base.pretrained_cfg.get("input_size", (3, 224, 224))
        if args.img_size:
            size = (size[0], args.img_size, args.img_size)
        inputs = torch.randn(args.batch, *size, generator=torch.Generator().manual_seed(args.seed))
        source = f"checkpoint {args.checkpoint}" if args.checkpoint else "random init"
        task = "cross-entropy against random labels"
    print(f"{args.model} ({source}), batch of {args.batch} random inputs "
          f"{tuple(inputs.shape[1:])}; one training step ({task}) per variant.")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for variant in _progress(args.variants, args, "doctor: variants"):
        model, summary = convert(copy.deepcopy(base), variant, if_nothing="ignore")  # said below
        _say(f"\n== {variant}: {len(summary.swapped)} attention modules converted, "
             f"{len(summary.skipped)} skipped")
        if not summary.swapped:
            _say("  nothing to monitor: " + "; ".join(f"{k}: {v}" for k, v in
                                                      summary.skipped.items()))
            continue
        model.train()
        if args.model.startswith(HF_PREFIX):
            model = _Logits(model)
        _, report, warnings, maps = _training_step(model, inputs)
        _say(_layer_table(report))
        _say("warnings:\n" + "\n".join(_warning_lines(warnings)))
        results.append({"variant": variant, "model": args.model, "source": source,
                        "swapped": summary.swapped, "skipped": summary.skipped,
                        "changes_function": summary.changes_function,
                        "report": report.to_dict(), "warnings": [w.to_dict() for w in warnings]})
        _picture(plot_attention_maps, maps, out / f"attention_maps_{variant}.png",
                 f"{args.model}, {variant}, {source}")
    report_path = out / "doctor.json"
    report_path.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {report_path}")
    return 0


def _run_losses(path: Path) -> list[float | None] | None:
    """Every step's loss from a run's train.csv (None where empty); None if there is no file."""
    if not path.is_file():
        return None
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or "loss" not in rows[0]:
        raise CommandError(f"--run: {path} has no 'loss' column")
    if "step" in rows[0]:
        rows.sort(key=lambda row: int(row["step"]))
    return [float(row["loss"]) if row["loss"] not in ("", "None") else None for row in rows]


def _run_variant(directory: Path, variant: str | None) -> str | None:
    """The preset the run used: --variant, else label.json's config.variant, else unknown."""
    label = directory / "label.json"
    if variant is None and label.is_file():
        variant = json.loads(label.read_text()).get("config", {}).get("variant")
    return variant


def doctor_run(args: argparse.Namespace) -> int:
    directory = Path(args.run_dir)
    if not directory.is_dir():
        raise CommandError(f"--run {directory}: no such folder")
    losses = _run_losses(directory / "train.csv")
    try:
        report = MonitorReport.from_csv(directory / "health.csv", losses)
    except (FileNotFoundError, ValueError) as error:
        raise CommandError(f"--run {directory}: {error}") from None
    variant = _run_variant(directory, args.variant)
    in_use = presets_in_use([create(variant, 8, num_heads=2)]) if variant else frozenset()
    # early_warnings.replay, one sample at a time under a progress bar
    early_warnings, timeline = EarlyWarnings(), []
    for k in _progress(range(1, len(report.steps) + 1), args, "doctor: replaying"):
        early_warnings.update(report, k)
        timeline.append((report.steps[k - 1], early_warnings.warnings(in_use)))
    first: dict[str, int] = {}
    for step, warnings in timeline:
        for warning in warnings:
            first.setdefault(warning.code, step)
    print(f"run {directory}: {len(report.losses)} steps"
          f"{'' if losses is not None else ' (no train.csv: losses of sampled steps only)'}, "
          f"{len(report.steps)} samples, {len(report.layers)} attention layers; preset "
          f"{variant or 'unknown'}" + (f" (uses {', '.join(sorted(in_use))})" if in_use else ""))
    latest: dict[str, HealthWarning] = {}
    for warnings in [*(warnings for _, warnings in timeline), check(report, in_use=in_use)]:
        for warning in warnings:  # the last check sees the losses after the last sample too
            first.setdefault(warning.code, len(report.losses) - 1)
            latest[warning.code] = warning
    print("\nwarnings (replayed after every sampled step; first step, then the latest evidence):")
    for code, step in first.items():
        warning = latest[code]
        raised = len({(w.layer, w.head) for _, ws in timeline for w in ws if w.code == code})
        print(f"  {code}: first at step {step}, raised for {raised} layer(s)/head(s)"
              + (" [informational]" if warning.informational else ""))
        print(f"    {warning}")
        print(f"    evidence: steps {warning.evidence['steps']}, values "
              f"{[round(v, 4) if isinstance(v, float) else v for v in warning.evidence['values']]}")
    if not first:
        print("  none")
    out = Path(args.out) if args.out != "robust-attn-doctor" else directory / "doctor.png"
    _picture(lambda *where: plot_health_curves(*where, marks=first), report, out)
    return 0


def doctor(args: argparse.Namespace) -> int:
    if args.run_dir:
        if args.checkpoint:
            raise CommandError("--checkpoint loads weights into a timm model: not with --run")
        return doctor_run(args)
    if args.variant:
        raise CommandError("--variant names the preset of a --run DIR: give --run too")
    for option, value in (("--checkpoint", args.checkpoint), ("--num-classes", args.num_classes)):
        if value is not None and not args.model:
            raise CommandError(f"{option} is for a timm model: give --model too")
    torch.set_num_threads(args.threads or (torch.get_num_threads() if args.model else 1))
    return doctor_model(args) if args.model else doctor_builtin(args)


def diagram(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads or 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for norm in args.norm:
        architecture = Architecture(depth=args.depth, dim=args.width, num_heads=args.heads,
                                    tokens=args.tokens, norm=norm, seed=args.seed)
        diagrams = [trainability_diagram(variant, args.betas, args.alphas, architecture,
                                         kernel=args.kernel)
                    for variant in _progress(args.variants, args, f"diagram: {norm}-LN")]
        print(f"\nTrainability at initialisation, {norm}-LN: {args.depth} layers, width "
              f"{args.width}, {args.heads} heads, {args.tokens} tokens; beta = logit std / "
              "sqrt(log N), alpha = residual strength.")
        print(_table(["variant", "healthy cells", "theory agrees"],
                     [[d.variant, f"{d.healthy_share():.0%}",
                       "-" if (agree := d.to_dict()["theory_agreement"]) is None
                       else f"{agree:.0%}"] for d in diagrams]))
        for d in diagrams:
            if d.disagreements():
                print(f"\n{d.variant}: where theory and measurement disagree")
                print(_disagreement_table(d))
        path = out / f"trainability_{norm}.json"
        path.write_text(json.dumps([d.to_dict() for d in diagrams], indent=1))
        print(f"wrote {path}")
        _picture(plot_trainability_diagrams, diagrams, out / f"trainability_{norm}.png")
    return 0


def _disagreement_table(diagram) -> str:
    return _table(["beta", "alpha", "measured", "theory", "worst H", "theory H", "final res",
                   "theory res"],
                  [[f"{c.beta:g}", f"{c.alpha:g}", c.verdict, c.theory.verdict,
                    f"{c.health.worst_entropy:.3f}", f"{c.theory.worst_entropy:.3f}",
                    f"{c.health.final_residual:.1e}", f"{c.theory.final_residual:.1e}"]
                   for c in diagram.disagreements()])


def _benchmarks() -> dict[str, str]:
    """Every benchmark of the checkout (a module with a ``__main__`` block; see the module
    docstring) and the first sentence of its docstring, by name."""
    found = {}
    for path in sorted(BENCHMARKS.glob("*.py")):
        tree = ast.parse(path.read_text())
        if any(isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'"
               for node in tree.body):
            paragraph = " ".join((ast.get_docstring(tree) or "").split("\n\n")[0].split())
            found[path.stem] = re.split(r"(?<=\.)\s", paragraph, maxsplit=1)[0]
    return found


def bench(args: argparse.Namespace) -> int:
    available = _benchmarks()
    if not available:
        raise CommandError(f"bench: no benchmarks at {BENCHMARKS}: they ship with the source "
                           "repository, not the package")
    if args.name is None:
        for name, description in available.items():
            print(f"{name}: {description}")
        return 0
    if args.name not in available:
        raise CommandError(f"bench {args.name!r}: no such benchmark; available: "
                           f"{', '.join(available)}")
    # The speed suite imports its siblings relatively (a package), the other benchmarks
    # absolutely (benchmarks/ on the path): both, as the Makefile runs them.
    path = os.pathsep.join([str(BENCHMARKS.parent), str(BENCHMARKS),
                            *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1"}
    if args.quiet:
        env["ROBUST_ATTN_QUIET"] = "1"  # benchmarks/output.py's progress bars
    sys.stdout.flush()
    with subprocess.Popen([sys.executable, "-m", f"benchmarks.{args.name}", *args.args],
                          env=env, stdout=subprocess.PIPE, text=True) as child:
        for line in child.stdout:  # through this process's stdout, so callers of main() see it
            sys.stdout.write(line)
    return child.returncode if child.returncode >= 0 else 128 - child.returncode  # as shells do


def _count(minimum: int):
    """An argparse type: an integer of at least ``minimum`` (argparse names the option)."""
    def count(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    count.__name__ = "integer"  # argparse's message: "invalid integer value: 'x'"
    return count


def _add_architecture(parser: argparse.ArgumentParser, depth: int, width: int) -> None:
    parser.add_argument("--depth", type=int, default=depth)
    parser.add_argument("--width", type=int, default=width)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kernel", default="auto",
                        choices=["auto", "sdpa", "flex", "xformers", "eager"],
                        help="attention kernel of the stacks (the probe measures the same on each)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default 1: these stacks are too small to gain from "
                             "more, and shared machines lose a lot to oversubscription)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="robust-attn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    quiet = argparse.ArgumentParser(add_help=False)
    quiet.add_argument("--quiet", action="store_true",
                       help="no progress bars (they go to stderr, and only to a terminal)")
    variants = dict(nargs="+", default=list_variants(), choices=list_variants(),
                    metavar="VARIANT", help=f"presets (default: all of {list_variants()})")

    doctor_parser = commands.add_parser("doctor", parents=[quiet],
                                        help="health of each variant at initialisation")
    source = doctor_parser.add_mutually_exclusive_group()
    source.add_argument("--builtin", action="store_true", default=True,
                        help="measure the built-in stack (the default; nothing is downloaded)")
    source.add_argument("--model", metavar="TIMM_NAME",
                        help="a timm model, or hf:MODEL_TYPE for a tiny transformers model built "
                             "from its config, converted to each variant (random init)")
    source.add_argument("--run", dest="run_dir", metavar="DIR",
                        help="a finished run's folder (health.csv, train.csv): replay its "
                             "warnings and draw its health curves")
    doctor_parser.add_argument("--variant", choices=list_variants(), default=None,
                               help="with --run: the preset the run used (default: from "
                                    "label.json, if any); its mitigations are not suggested")
    doctor_parser.add_argument("--checkpoint", metavar="PATH",
                               help="with --model: load this local checkpoint (strictly: its "
                                    "keys and shapes must be the model's)")
    doctor_parser.add_argument("--num-classes", type=_count(0), default=None, metavar="K",
                               help="with --model: classes of the model's head, e.g. a "
                                    "fine-tuned checkpoint's (default: the model's; 0: no head)")
    doctor_parser.add_argument("--img-size", type=_count(1), default=None,
                               help="with --model: input image size (default: the model's)")
    doctor_parser.add_argument("--batch", type=_count(1), default=4,
                               help="with --model: batch size")
    doctor_parser.add_argument("--variants", **variants)
    doctor_parser.add_argument("--scales", nargs="+", type=float, default=[1.0, 4.0, 16.0],
                               help="query/key weight scales sqk (default: 1 4 16)")
    _add_architecture(doctor_parser, depth=24, width=128)
    doctor_parser.add_argument("--out", default="robust-attn-doctor",
                               help="folder for doctor.json and the pictures (with --run: the "
                                    "PNG's path, default DIR/doctor.png)")
    doctor_parser.set_defaults(run=doctor)

    diagram_parser = commands.add_parser("diagram", parents=[quiet],
                                         help="trainability diagram of each variant")
    diagram_parser.add_argument("--variants", **variants)
    diagram_parser.add_argument("--norm", nargs="+", default=["pre"], choices=NORM_POSITIONS,
                                help="LayerNorm position(s) (default: pre)")
    diagram_parser.add_argument("--betas", nargs="+", type=float, default=list(DEFAULT_BETAS),
                                help="QK init scales beta: logit std / sqrt(log N)")
    diagram_parser.add_argument("--alphas", nargs="+", type=float, default=list(DEFAULT_ALPHAS),
                                help="residual strengths alpha (0 = attention only)")
    _add_architecture(diagram_parser, depth=12, width=64)
    diagram_parser.add_argument("--out", default="robust-attn-diagram",
                                help="folder for trainability_<norm>.json and .png")
    diagram_parser.set_defaults(run=diagram)

    bench_parser = commands.add_parser("bench", parents=[quiet],
                                       help="list the benchmarks, or run one")
    bench_parser.add_argument("name", nargs="?", help="benchmark to run (none: list them)")
    bench_parser.add_argument("args", nargs=argparse.REMAINDER, help="its own arguments")
    bench_parser.set_defaults(run=bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if "baseline" in getattr(args, "variants", []):  # the baseline first: read all against it
        args.variants = ["baseline"] + [v for v in args.variants if v != "baseline"]
    threads = torch.get_num_threads()
    try:
        return args.run(args)
    except CommandError as error:
        print(f"robust-attn {args.command}: error: {error}", file=sys.stderr)
        return 2
    finally:  # commands may set the thread count; callers in the same process keep theirs
        torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
