"""The robust-attn command line.

    robust-attn doctor --builtin [--variants ...] [--scales ...] [--out DIR]

``doctor --builtin`` measures, at initialisation, a deep stack of each variant
(robust_attn.stack) under several query/key weight scales, with and without
residual connections, and prints the per-layer health of the first variant, a
summary of every variant, a JSON report and a PNG of per-layer entropy and res.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .presets import list_variants
from .stack import ENTROPY_COLLAPSE, RANK_COLLAPSE, StackHealth, StackSetting, measure_stack


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    lines = [header, ["-" * width for width in widths], *rows]
    return "\n".join(" | ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines)


def _per_layer_table(reports: list[StackHealth]) -> str:
    header = ["layer"] + [f"{name} sqk={r.setting.qk_scale:g}" for r in reports
                          for name in ("H", "res", "sink", "logit")]
    rows = [[str(layers[0].layer)] + [value for layer in layers for value in (
        f"{layer.entropy:.3f}", f"{layer.residual:.1e}", f"{layer.sink_mass:.2f}",
        f"{layer.max_logit:.1f}")] for layers in zip(*(r.layers for r in reports))]
    return _table(header, rows)


def _summary_table(reports: list[StackHealth]) -> str:
    header = ["variant", "stack", "sqk", "worst H", "final res", "verdict"]
    rows = [[r.setting.variant, "with residual" if r.setting.residual else "attention only",
             f"{r.setting.qk_scale:g}", f"{r.worst_entropy:.3f}", f"{r.final_residual:.1e}",
             r.verdict] for r in reports]
    return _table(header, rows)


def doctor(args: argparse.Namespace) -> int:
    base = StackSetting(depth=args.depth, dim=args.width, num_heads=args.heads,
                        tokens=args.tokens, seed=args.seed)
    settings = [StackSetting(**{**base.__dict__, "variant": variant, "qk_scale": scale,
                                "residual": residual})
                for variant in args.variants for residual in (False, True) for scale in args.scales]
    reports = [measure_stack(setting) for setting in settings]

    print(f"Stack at initialisation: {base.depth} pre-LN attention layers, width {base.dim}, "
          f"{base.num_heads} heads, {base.tokens} tokens, batch {base.batch}, seed {base.seed}; "
          "sqk multiplies the std of W_q and W_k.")
    print(f"H = normalised attention entropy (1 = uniform, 0 = one-hot), res = "
          f"||X - 1 mean(X)|| / ||X|| (0 = all tokens identical), sink = attention on the first "
          f"token, logit = largest attention logit.\n")
    first = [r for r in reports if r.setting.variant == args.variants[0] and not r.setting.residual]
    print(f"Per layer, {args.variants[0]}, attention only:")
    print(_per_layer_table(first), "\n")
    print(f"Every variant (entropy collapse: worst H < {ENTROPY_COLLAPSE}; "
          f"rank collapse: final res < {RANK_COLLAPSE}):")
    print(_summary_table(reports))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report_path = out / "doctor.json"
    report_path.write_text(json.dumps([r.to_dict() for r in reports], indent=1))
    print(f"\nwrote {report_path}")
    try:
        from .plotting import plot_stack_health

        print(f"wrote {plot_stack_health(reports, out / 'stack_health.png')}")
    except ImportError as error:
        print(f"no picture: {error}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="robust-attn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    doctor_parser = commands.add_parser("doctor", help="health of each variant at initialisation")
    doctor_parser.add_argument("--builtin", action="store_true", default=True,
                               help="measure the built-in stack (the default; nothing is downloaded)")
    doctor_parser.add_argument("--variants", nargs="+", default=list_variants(),
                               choices=list_variants(), metavar="VARIANT",
                               help=f"presets to measure (default: all of {list_variants()})")
    doctor_parser.add_argument("--scales", nargs="+", type=float, default=[1.0, 4.0, 16.0],
                               help="query/key weight scales sqk (default: 1 4 16)")
    doctor_parser.add_argument("--depth", type=int, default=24)
    doctor_parser.add_argument("--width", type=int, default=128)
    doctor_parser.add_argument("--heads", type=int, default=4)
    doctor_parser.add_argument("--tokens", type=int, default=64)
    doctor_parser.add_argument("--seed", type=int, default=0)
    doctor_parser.add_argument("--out", default="robust-attn-doctor",
                               help="folder for doctor.json and stack_health.png")
    doctor_parser.set_defaults(run=doctor)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if "baseline" in args.variants:  # the baseline first: everything is read against it
        args.variants = ["baseline"] + [v for v in args.variants if v != "baseline"]
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
