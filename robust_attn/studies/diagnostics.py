"""Trainability diagrams: where in (QK init scale beta, residual strength alpha) a stack is healthy.

After Giorlandino & Goldt (2025), "Two failure modes of deep transformers and
how to avoid them: a unified theory of signal propagation at initialisation"
(arXiv:2505.24333, ICLR 2026). For an architecture (depth, width, heads,
tokens, pre- or post-LN) and a variant, :func:`trainability_diagram` builds
the stack of :mod:`robust_attn.studies.stack` for every (beta, alpha), initialises it
with :func:`robust_attn.studies.stack.init_stack_weights`, runs one batch with the
probe on, and classifies the cell with the stack's verdict (entropy collapse:
worst layer's mean normalised entropy < ENTROPY_COLLAPSE; rank collapse:
final res < RANK_COLLAPSE; "healthy"; "both"). The blocks, with LN the
stack's LayerNorms and Attn the variant's attention::

    pre-LN:   X_{l+1} = alpha X_l + Attn(LN(X_l))
    post-LN:  X_{l+1} = LN(alpha X_l + Attn(X_l))

alpha = 0 is the attention-only stack, alpha = 1 the usual residual one
(pre-LN alpha = 1 is ``AttentionStack(residual=True)``, bit for bit).

beta. The paper scales the attention logits so that the softmax is a Random
Energy Model over the N keys: logit standard deviation beta sqrt(log N) for
uncorrelated unit-norm tokens (the authors' code, github.com/aGiorlandino/
ICLR-Signal-Propagation-Transformers, ``deep_prop_encoder.ipynb``, draws
W_q, W_k with std sqrt(beta) (log T)^(1/4) / sqrt(d_H), one head). Our
init draws W_q, W_k ~ N(0, sqk^2 / C) on LayerNormed tokens, so logits have
std sqk^2, and beta = sqk^2 / sqrt(log N): :func:`qk_scale_for_beta`.

Theory (baseline only; :func:`theory_layers`). With c the overlap (cosine) of
the tokens entering attention, the authors' ``theory_update_general.py``
(``get_attention_update``) gives the attention output, in units of the
input's squared norm::

    beta_c = sqrt(2 / (1 - c))
    beta <  beta_c:  q_att = c,                          p_att = c   (output = token mean)
    beta >= beta_c:  q_att = c + (1 - c)(1 - beta_c / beta), p_att = c   (frozen, condensed)

(q_att: squared norm of an output token, p_att: overlap of two). Our value
and output weights have variance 1 / width, so these pass through unscaled.
Blocks: post-LN is their ``get_block_update_wres`` without the MLP (and
without biases): c' = (p_att + alpha^2 c) / (q_att + alpha^2). Pre-LN is
our derivation under the same assumption (the branch is uncorrelated with
the residual stream at initialisation): with q, p the stream's squared norm
and overlap, q' = alpha^2 q + q_att(p / q), p' = alpha^2 p + p_att(p / q).
Entropy: below beta_c the REM's entropy is log N (1 - (beta / beta_c)^2)
(Derrida 1981; normalised, H = 1 - beta^2 (1 - c) / 2), and 0 in the frozen
phase above it. This formula is the standard REM result, not read from the
paper. res of N tokens of equal norm with overlap c is sqrt((1 - c)(1 - 1/N)).
The theory is the N -> infinity limit; at N = 64 (log N = 4.2) finite-size
effects are large near the boundaries, which is what
:meth:`TrainabilityDiagram.disagreements` lists.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from ..claim import StackSetting
from ..metrics import token_cosine_similarity
from .stack import (
    NORM_POSITIONS,
    LayerHealth,
    StackHealth,
    construct_stack,
    init_stack_weights,
    layer_health,
)

DEFAULT_BETAS = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
DEFAULT_ALPHAS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)


@dataclass(frozen=True)
class Architecture:
    """The stack a diagram is drawn for (the defaults are the claims table's: docs/collapse-setting.md)."""

    depth: int = 24
    dim: int = 128
    num_heads: int = 4
    tokens: int = 64
    batch: int = 2
    norm: str = "pre"
    seed: int = 0

    def __post_init__(self):
        if self.norm not in NORM_POSITIONS:
            raise ValueError(f"norm={self.norm!r}: expected one of {NORM_POSITIONS}")
        if self.tokens < 2:
            raise ValueError(f"tokens={self.tokens}: beta needs log N > 0, so at least 2 tokens")


def qk_scale_for_beta(beta: float, tokens: int) -> float:
    """The std multiplier sqk of W_q, W_k that gives logits of std beta sqrt(log N):
    sqk = sqrt(beta) (log N)^(1/4) (module docstring)."""
    return math.sqrt(beta) * math.log(tokens) ** 0.25


def attention_update(c: float, beta: float) -> tuple[float, float]:
    """(q_att, p_att) of the attention output for input overlap c (Giorlandino & Goldt's REM)."""
    if c >= 1.0:
        return 1.0, 1.0
    beta_c = math.sqrt(2.0 / (1.0 - c))
    if beta < beta_c:
        return c, c
    return c + (1.0 - c) * (1.0 - beta_c / beta), c


def rem_entropy(c: float, beta: float) -> float:
    """Normalised attention entropy of the REM: max(0, 1 - beta^2 (1 - c) / 2)."""
    return max(0.0, 1.0 - beta ** 2 * (1.0 - c) / 2.0)


@dataclass(frozen=True)
class TheoryLayer:
    """Predicted overlap of the tokens leaving a layer, and the entropy of its attention."""

    overlap: float
    entropy: float


def theory_layers(beta: float, alpha: float, depth: int, norm: str = "pre",
                  overlap: float = 0.0) -> list[TheoryLayer]:
    """The block recursion (module docstring) from input overlap ``overlap``, layer by layer."""
    q, p = 1.0, min(max(overlap, 0.0), 1.0)
    layers = []
    for _ in range(depth):
        c = p / q if q > 0 else 1.0  # q = 0: every token is the (zero) mean, all identical
        entropy = rem_entropy(c, beta)
        q_att, p_att = attention_update(c, beta)
        if norm == "pre":
            q, p = alpha ** 2 * q + q_att, alpha ** 2 * p + p_att
        else:
            total = q_att + alpha ** 2
            q, p = 1.0, (p_att + alpha ** 2 * c) / total if total > 0 else 1.0
        c_out = p / q if q > 0 else 1.0
        layers.append(TheoryLayer(c_out, entropy))
    return layers


def theory_health(beta: float, alpha: float, architecture: Architecture,
                  overlap: float = 0.0) -> StackHealth:
    """The theory's predicted StackHealth: per layer, entropy and res of the tokens leaving it.

    res from the predicted overlap c: sqrt((1 - c)(1 - 1/N)). The REM gives
    every query row the same entropy (min_entropy = entropy); sinks and
    logits are not predicted (nan). Its ``verdict`` is the theory's call.
    """
    a = architecture
    setting = _setting("baseline", a, beta, alpha)
    predicted = theory_layers(beta, alpha, a.depth, a.norm, overlap)
    layers = [LayerHealth(layer=index + 1, entropy=layer.entropy, min_entropy=layer.entropy,
                          residual=math.sqrt((1.0 - layer.overlap) * (1.0 - 1.0 / a.tokens)),
                          sink_mass=math.nan, max_logit=math.nan)
              for index, layer in enumerate(predicted)]
    return StackHealth(setting, layers)


def _setting(variant: str, a: Architecture, beta: float, alpha: float) -> StackSetting:
    return StackSetting(variant=variant, depth=a.depth, dim=a.dim, num_heads=a.num_heads,
                        tokens=a.tokens, batch=a.batch, qk_scale=qk_scale_for_beta(beta, a.tokens),
                        residual=alpha != 0, norm=a.norm, seed=a.seed)


@dataclass(frozen=True)
class DiagramCell:
    """One measured cell: the stack's health, the final tokens' cosine, and the theory's call."""

    beta: float
    alpha: float
    health: StackHealth
    final_cosine: float
    theory: StackHealth | None = None

    @property
    def verdict(self) -> str:
        return self.health.verdict

    @property
    def agrees(self) -> bool | None:
        """Whether measurement and theory give the same verdict (None without theory)."""
        return None if self.theory is None else self.theory.verdict == self.verdict

    def to_dict(self, per_layer: bool = False) -> dict:
        """The cell's numbers; ``per_layer`` adds every layer's LayerHealth."""
        cell = {"beta": self.beta, "alpha": self.alpha, "verdict": self.verdict,
                "worst_entropy": self.health.worst_entropy,
                "final_residual": self.health.final_residual, "final_cosine": self.final_cosine,
                "theory": None if self.theory is None else {
                    "verdict": self.theory.verdict, "worst_entropy": self.theory.worst_entropy,
                    "final_residual": self.theory.final_residual}}
        if per_layer:
            cell["layers"] = [asdict(layer) for layer in self.health.layers]
        return cell


@dataclass
class TrainabilityDiagram:
    """The measured phase diagram of one variant on one architecture (cells row-major in alpha)."""

    variant: str
    architecture: Architecture
    betas: tuple[float, ...]
    alphas: tuple[float, ...]
    input_overlap: float
    cells: list[DiagramCell] = field(default_factory=list)

    def cell(self, beta: float, alpha: float) -> DiagramCell:
        for cell in self.cells:
            if cell.beta == beta and cell.alpha == alpha:
                return cell
        raise KeyError(f"no cell at beta={beta}, alpha={alpha}")

    def disagreements(self) -> list[DiagramCell]:
        """Cells where the theory's verdict differs from the measured one."""
        return [cell for cell in self.cells if cell.agrees is False]

    def healthy_share(self) -> float:
        """Share of cells measured healthy: how much of the grid the variant trains in."""
        return sum(cell.verdict == "healthy" for cell in self.cells) / len(self.cells)

    def to_dict(self, per_layer: bool = False) -> dict:
        """Plain numbers for JSON: the grid, agreement with theory, and every cell (``per_layer``:
        with each layer's health)."""
        with_theory = [cell for cell in self.cells if cell.theory is not None]
        return {"variant": self.variant, "architecture": asdict(self.architecture),
                "betas": list(self.betas), "alphas": list(self.alphas),
                "qk_scales": [qk_scale_for_beta(b, self.architecture.tokens) for b in self.betas],
                "input_overlap": self.input_overlap, "healthy_share": self.healthy_share(),
                "theory_agreement": (sum(cell.agrees for cell in with_theory) / len(with_theory)
                                     if with_theory else None),
                "disagreements": [{"beta": c.beta, "alpha": c.alpha, "measured": c.verdict,
                                   "theory": c.theory.verdict} for c in self.disagreements()],
                "cells": [cell.to_dict(per_layer) for cell in self.cells]}


@torch.no_grad()
def measure_cell(variant: str, architecture: Architecture, beta: float, alpha: float,
                 **options) -> tuple[StackHealth, float, float]:
    """The stack at (beta, alpha) at initialisation: its health, final and input token cosine."""
    a = architecture
    setting = _setting(variant, a, beta, alpha)
    generator = torch.Generator().manual_seed(a.seed)
    stack = construct_stack(setting, generator, probe=True, **options)
    init_stack_weights(stack, setting.qk_scale, generator)
    x = torch.randn(a.batch, a.tokens, a.dim, generator=generator)
    hidden = stack(x, residual_scale=alpha)
    layers = [layer_health(i, attention, state)
              for i, (attention, state) in enumerate(zip(stack.layers, hidden, strict=True))]
    return (StackHealth(setting, layers), token_cosine_similarity(hidden[-1]).mean().item(),
            token_cosine_similarity(x).mean().item())


def trainability_diagram(variant: str = "baseline", betas=DEFAULT_BETAS, alphas=DEFAULT_ALPHAS,
                         architecture: Architecture | None = None, theory: bool | None = None,
                         **options) -> TrainabilityDiagram:
    """Measure every (beta, alpha) cell of ``variant`` at initialisation, and the theory's verdicts.

    ``theory`` (default: only for the baseline, which is what the theory
    describes) adds :func:`theory_health`'s prediction to each cell, started
    from the measured overlap of the input tokens. ``options`` go to the
    attention modules (e.g. ``kernel="eager"``).
    """
    architecture = architecture or Architecture()
    theory = variant == "baseline" if theory is None else theory
    diagram = TrainabilityDiagram(variant, architecture, tuple(betas), tuple(alphas), math.nan)
    for alpha in diagram.alphas:
        for beta in diagram.betas:
            health, final_cosine, input_cosine = measure_cell(variant, architecture, beta, alpha,
                                                              **options)
            diagram.input_overlap = input_cosine
            predicted = theory_health(beta, alpha, architecture, input_cosine) if theory else None
            diagram.cells.append(DiagramCell(beta, alpha, health, final_cosine, predicted))
    return diagram
