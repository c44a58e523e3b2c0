"""A deep stack of attention layers at initialisation: the setting in which collapse is studied.

    attention only:  X_{l+1} = Attn_l(LN(X_l))
    with residual:   X_{l+1} = X_l + Attn_l(LN(X_l))

(pre-LayerNorm, no MLP), as in DESIGN.md's table and in Dong et al. 2021 and
Noci et al. 2022. Weights are drawn so that the query/key scale is one knob:
W_q, W_k ~ N(0, qk_scale^2 / C) and W_v, W_o ~ N(0, 1 / C), biases zero, so
qk_scale = 1 gives attention logits of order 1 and larger scales sharpen them
(the beta of Giorlandino & Goldt 2025, "Two failure modes of deep
transformers and how to avoid them").

Verdicts use the thresholds below: entropy collapse when some layer's mean
normalised entropy falls under ENTROPY_COLLAPSE, rank collapse when the output's
res(X) falls under RANK_COLLAPSE.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from .metrics import token_residual
from .presets import create

ENTROPY_COLLAPSE = 0.1
RANK_COLLAPSE = 0.01


class AttentionStack(nn.Module):
    """``depth`` pre-LN attention layers of one variant, with or without residual connections."""

    def __init__(self, depth: int, dim: int, num_heads: int, residual: bool = False,
                 variant: str = "baseline", **options):
        super().__init__()
        self.residual = residual
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        self.layers = nn.ModuleList(create(variant, dim, num_heads, **options) for _ in range(depth))

    def forward(self, x: Tensor) -> list[Tensor]:
        """The hidden states after each layer, (B, N, C) each."""
        hidden = []
        for norm, attention in zip(self.norms, self.layers, strict=True):
            update = attention(norm(x))
            x = x + update if self.residual else update
            hidden.append(x)
        return hidden


def init_stack_weights(stack: AttentionStack, qk_scale: float, generator: torch.Generator) -> None:
    """W_q, W_k ~ N(0, qk_scale^2 / C); W_v, W_o ~ N(0, 1 / C); biases zero (see module docstring)."""
    with torch.no_grad():
        for attention in stack.layers:
            dim, attn_dim = attention.dim, attention.attn_dim
            qkv = attention.qkv.weight
            stds = (qk_scale, qk_scale, 1.0)
            for block, std in zip(qkv.split(attn_dim, dim=0), stds, strict=True):
                block.copy_(torch.randn(block.shape, generator=generator) * std / dim ** 0.5)
            proj = attention.proj.weight
            proj.copy_(torch.randn(proj.shape, generator=generator) / attn_dim ** 0.5)
            for linear in (attention.qkv, attention.proj):
                if linear.bias is not None:
                    linear.bias.zero_()
            attention.initialise_weights()  # e.g. spectral_qk's concentrated spectrum
            attention.reset_from_weights()  # e.g. sigma_reparam's u, v from the new weights


@dataclass(frozen=True)
class StackSetting:
    """One measurement: a variant's stack at one weight scale, drawn from one seed."""

    variant: str = "baseline"
    depth: int = 24
    dim: int = 128
    num_heads: int = 4
    tokens: int = 64
    batch: int = 2
    qk_scale: float = 1.0
    residual: bool = False
    seed: int = 0


@dataclass(frozen=True)
class LayerHealth:
    """Health of one layer (means over heads): entropy, its worst query, res(X), sink mass, logit."""

    layer: int
    entropy: float
    min_entropy: float
    residual: float
    sink_mass: float
    max_logit: float


@dataclass(frozen=True)
class StackHealth:
    setting: StackSetting
    layers: list[LayerHealth]

    @property
    def worst_entropy(self) -> float:
        return min(layer.entropy for layer in self.layers)

    @property
    def final_residual(self) -> float:
        return self.layers[-1].residual

    @property
    def verdict(self) -> str:
        """'healthy', 'rank collapse', 'entropy collapse' or 'both' (thresholds in the module doc)."""
        entropy = self.worst_entropy < ENTROPY_COLLAPSE
        rank = self.final_residual < RANK_COLLAPSE
        return {(False, False): "healthy", (True, False): "entropy collapse",
                (False, True): "rank collapse", (True, True): "both"}[(entropy, rank)]

    def to_dict(self) -> dict:
        return {"setting": asdict(self.setting), "worst_entropy": self.worst_entropy,
                "final_residual": self.final_residual, "verdict": self.verdict,
                "layers": [asdict(layer) for layer in self.layers]}


@torch.no_grad()
def measure_stack(setting: StackSetting, **options) -> StackHealth:
    """Build the stack of ``setting``, initialise it, run one batch with the probe on, report."""
    generator = torch.Generator().manual_seed(setting.seed)
    stack = AttentionStack(setting.depth, setting.dim, setting.num_heads, setting.residual,
                           setting.variant, probe=True, **options)
    init_stack_weights(stack, setting.qk_scale, generator)
    x = torch.randn(setting.batch, setting.tokens, setting.dim, generator=generator)
    hidden = stack(x)
    layers = []
    for index, (attention, state) in enumerate(zip(stack.layers, hidden, strict=True)):
        health = attention.health
        layers.append(LayerHealth(
            layer=index + 1,
            entropy=health.entropy.mean().item(),
            min_entropy=health.min_entropy.min().item(),
            residual=token_residual(state).mean().item(),
            sink_mass=health.sink_mass.mean().item(),
            max_logit=health.max_logit.max().item(),
        ))
    return StackHealth(setting, layers)
