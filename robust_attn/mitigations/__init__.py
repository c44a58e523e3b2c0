"""Mitigations: one file each, registered here under the RobustAttention option that enables it."""

from __future__ import annotations

from .base import Mitigation
from .softcap import SoftCap

MITIGATIONS: dict[str, type[Mitigation]] = {cls.option: cls for cls in (SoftCap,)}

__all__ = ["MITIGATIONS", "Mitigation", "SoftCap"]
