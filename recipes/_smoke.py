"""The recipes' ``--smoke`` flag: a tiny configuration for tests, as overridable defaults."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any


def add_smoke_flag(parser: argparse.ArgumentParser, smoke: Mapping[str, Any], what: str) -> None:
    parser.add_argument("--smoke", action="store_true", help=f"defaults for {what}, for tests: {dict(smoke)}")


def parse_with_smoke(parser: argparse.ArgumentParser, argv: list[str] | None,
                     smoke: Mapping[str, Any]) -> argparse.Namespace:
    """Parse ``argv``; with --smoke, parse again with ``smoke`` as the defaults."""
    args = parser.parse_args(argv)
    if args.smoke:
        parser.set_defaults(**smoke)
        args = parser.parse_args(argv)
    return args
