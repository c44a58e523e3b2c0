"""Mitigations: one file each, registered here under the RobustAttention option that enables it."""

from __future__ import annotations

from .base import DefeatedMitigationWarning, Mitigation
from .gated import Gated
from .outlier_removal import OutlierRemoval
from .qk_norm import QKNorm
from .rope import RotaryEmbedding
from .sigma_reparam import (
    FoldedTrainingWarning,
    SigmaReparam,
    SigmaReparamLinear,
    fold_sigma_reparam,
    sigma_reparametrize,
)
from .sigmoid import Sigmoid
from .sinks import SinkLogit, SinkTokens
from .softcap import SoftCap
from .sparsity import Sparsity
from .spectral_qk import SpectralQK

MITIGATIONS: dict[str, type[Mitigation]] = {cls.option: cls for cls in (
    QKNorm, SoftCap, SinkTokens, SinkLogit, Gated, OutlierRemoval, Sigmoid, SigmaReparam,
    SpectralQK, Sparsity, RotaryEmbedding,
)}

__all__ = ["MITIGATIONS", "DefeatedMitigationWarning", "FoldedTrainingWarning", "Gated",
           "Mitigation", "OutlierRemoval", "QKNorm", "RotaryEmbedding", "Sigmoid", "SinkLogit", "SinkTokens",
           "SoftCap", "Sparsity", "SigmaReparam", "SigmaReparamLinear", "SpectralQK",
           "fold_sigma_reparam", "sigma_reparametrize"]
