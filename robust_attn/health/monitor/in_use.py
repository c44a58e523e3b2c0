"""Which presets a model already uses, so that early warnings never suggest them again."""

from __future__ import annotations

from collections.abc import Iterable

from ...attention import RobustAttention
from ...presets import list_variants, preset_options


def _has_option(module: RobustAttention, option: str) -> bool:
    return module.normalises_qk if option == "qk_norm" else option in module.mitigations


def presets_in_use(modules: Iterable[RobustAttention]) -> frozenset[str]:
    """Presets (other than ``baseline``) all of whose options some module has: a sigmoid module
    uses ``sigmoid`` and ``qk_norm``; a module converted with ``sigma_reparam`` uses that."""
    modules = list(modules)
    return frozenset(name for name in list_variants()
                     if (options := preset_options(name))
                     and any(all(_has_option(m, option) for option in options) for m in modules))
