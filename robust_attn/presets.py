"""Named variants: a preset is a set of RobustAttention options, never a copy of the module."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from .attention import RobustAttention

PRESETS: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    "baseline": {},
    "qk_norm": {"qk_norm": True},
    "softcap": {"softcap": 50.0},
})


def list_variants() -> list[str]:
    """The preset names, sorted."""
    return sorted(PRESETS)


def preset_options(name: str) -> dict[str, Any]:
    """The options of preset ``name``."""
    if name not in PRESETS:
        raise ValueError(f"variant={name!r} is not a preset; choose one of {list_variants()}")
    return dict(PRESETS[name])


def create(name: str, dim: int, num_heads: int = 8, **overrides: Any) -> RobustAttention:
    """RobustAttention with preset ``name``'s options, updated by ``overrides``."""
    return RobustAttention(dim, num_heads=num_heads, **{**preset_options(name), **overrides})
