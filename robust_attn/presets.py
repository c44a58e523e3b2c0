"""Named variants: a preset is a set of RobustAttention options, never a copy of the module.

Each mitigation defines its presets (``Mitigation.presets``, in its own file); this
module gathers them, beside the baseline (no option). A preset's name says what
it enables; its options are exactly what ``create(name, dim, num_heads)`` builds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from .attention import RobustAttention
from .mitigations import MITIGATIONS


def _gathered() -> dict[str, Mapping[str, Any]]:
    presets: dict[str, Mapping[str, Any]] = {"baseline": {}}
    for mitigation in MITIGATIONS.values():
        for name, options in mitigation.presets.items():
            if name in presets:
                raise ValueError(f"preset {name!r} is defined twice ({mitigation.__name__})")
            presets[name] = MappingProxyType(dict(options))
    return presets


PRESETS: Mapping[str, Mapping[str, Any]] = MappingProxyType(_gathered())


def list_variants() -> list[str]:
    """The preset names, sorted."""
    return sorted(PRESETS)


def preset_options(name: str) -> dict[str, Any]:
    """The options of preset ``name``."""
    if name not in PRESETS:
        raise ValueError(f"variant={name!r} is not a preset; choose one of {list_variants()}")
    return dict(PRESETS[name])


def head_dim_multiple(name: str) -> int:
    """The head widths preset ``name`` accepts are the multiples of this (each enabled
    mitigation's ``head_dim_multiple``, their least common multiple)."""
    return math.lcm(1, *(MITIGATIONS[option].head_dim_multiple
                         for option, value in preset_options(name).items()
                         if option in MITIGATIONS and value is not None and value is not False))


def create(name: str, dim: int, num_heads: int = 8, **overrides: Any) -> RobustAttention:
    """RobustAttention with preset ``name``'s options, updated by ``overrides``."""
    return RobustAttention(dim, num_heads=num_heads, **{**preset_options(name), **overrides})
