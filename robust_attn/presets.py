"""Named variants: a preset is a set of RobustAttention options, never a copy of the module."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from .attention import RobustAttention
from .sparse import BlockLocal, GlobalTokens, Strided

PRESETS: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    "baseline": {},
    "qk_norm": {"qk_norm": True},
    "softcap": {"softcap": 50.0},
    # Zhai et al. 2023: W_hat = gamma W / sigma(W) on qkv and proj, gamma = 1 as in the paper.
    "sigma_reparam": {"sigma_reparam": True},
    # Bao et al. 2024: concentrated QK-eigenspectrum init plus its regulariser (weight 0.01).
    "spectral_qk": {"spectral_qk": True},
    # gpt-oss's learned per-head sink logit (zero value: it can only take mass away), starting
    # at 0 = softmax-off-by-one; H parameters. sink_tokens=k adds k learned key/value
    # slots per layer instead (not StreamingLLM's prepended input token).
    "sink": {"sink_logit": True},
    # Qiu et al. 2025's best gate (G1, elementwise), as in Qwen3-Next and timm's gated=True.
    "gated": {"gated": "elementwise"},
    # Nait Saada, Naderi & Tanner 2025: A - uniform, against rank collapse. No proj bias, as in
    # the authors' bias-free projections: (A - U) V is small at initialisation, and a bias
    # added to every token would dominate it and make the tokens alike (rank collapse).
    "outlier_removal": {"outlier_removal": True, "proj_bias": False},
    # Both failures at once, chosen by measurement (docs/collapse-setting.md): qk_norm bounds
    # the logits (no entropy collapse), outlier removal keeps the tokens apart (no rank collapse).
    "robust": {"qk_norm": True, "outlier_removal": True, "proj_bias": False},
    # Ramapuram et al. 2024: b = -log(Nk), with qk_norm as the paper recommends for stability.
    "sigmoid": {"sigmoid": True, "qk_norm": True},
    # Blocks of 64 tokens (Parmar et al. 2018; Qiu et al. 2020) plus the first token (a ViT's
    # class token) global (Longformer, Big Bird): the block_sparse kernel, linear in N.
    "block_sparse": {"sparsity": BlockLocal(64) | GlobalTokens(1)},
    # Child et al. 2019's strided pattern, (i - j) mod 8 == 0 (the paper pairs it with a local
    # window in other layers): the strided kernel, N^2 / 8 scores.
    "strided": {"sparsity": Strided(8)},
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
