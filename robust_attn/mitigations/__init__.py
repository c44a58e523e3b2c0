"""Mitigations: one file each, registered here under the RobustAttention option that enables it.

Registering a mitigation is its import and its entry in REGISTERED (docs/architecture.md:
"Add a mitigation"); everything else reads the class.
"""

from __future__ import annotations

from .alibi import Alibi
from .base import DefeatedMitigationWarning, Mitigation
from .block_topk import BlockTopK
from .differential import Differential
from .gated import Gated
from .outlier_removal import OutlierRemoval
from .qk_clip import QKClip
from .qk_norm import QKNorm
from .rope import RotaryEmbedding
from .scalable_softmax import ScalableSoftmax
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

REGISTERED: tuple[type[Mitigation], ...] = (
    QKNorm,
    SoftCap,
    SinkTokens,
    SinkLogit,
    Gated,
    OutlierRemoval,
    Sigmoid,
    SigmaReparam,
    SpectralQK,
    Sparsity,
    RotaryEmbedding,
    Alibi,
    Differential,
    QKClip,
    ScalableSoftmax,
    BlockTopK,
)
MITIGATIONS: dict[str, type[Mitigation]] = {cls.option: cls for cls in REGISTERED}

__all__ = ["MITIGATIONS", "REGISTERED", "BlockTopK", "DefeatedMitigationWarning", "FoldedTrainingWarning",
           "Gated", "Mitigation", "OutlierRemoval", "QKNorm", "RotaryEmbedding", "Sigmoid",
           "SigmaReparam", "SigmaReparamLinear", "SinkLogit", "SinkTokens", "SoftCap", "Sparsity",
           "SpectralQK", "fold_sigma_reparam", "sigma_reparametrize"]
