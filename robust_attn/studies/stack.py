"""A deep stack of attention layers at initialisation: the setting in which collapse is studied.

    pre-LN,  attention only:  X_{l+1} = Attn_l(LN(X_l))
    pre-LN,  with residual:   X_{l+1} = X_l + Attn_l(LN(X_l))
    post-LN, attention only:  X_{l+1} = LN(Attn_l(X_l))
    post-LN, with residual:   X_{l+1} = LN(X_l + Attn_l(X_l))

(no MLP), as in Dong et al. 2021 and Noci et al. 2022; docs/collapse-setting.md
describes the setting and the thresholds.

The claims harness (:func:`measure_stack`) measures each preset exactly as a user
builds it: every layer is ``create(variant, dim=C, num_heads=H)``, with its own
initialisation, biases and mitigation parameters left as they are. One knob is
turned: W_q and W_k (and their biases, if any) are multiplied by the QK scale
``sqk``, so sqk = 1 is the module as built and larger values sharpen the logits.
nn.Linear's default init draws weights of standard deviation 1 / sqrt(3 C), so
the logits of LayerNormed tokens have standard deviation about sqk^2 / 3.
Every random draw comes from the setting's seed: the input from a
``torch.Generator``, and the modules' own initialisation from torch's global
generator seeded from it inside ``torch.random.fork_rng`` (the caller's global
random state is left as it was). The same setting always measures the same.

:func:`init_stack_weights` is another init, used by the trainability diagrams
(:mod:`robust_attn.studies.diagnostics`) only: the Gaussian draw of Giorlandino & Goldt's
theory, W_q, W_k ~ N(0, sqk^2 / C), W_v, W_o ~ N(0, 1 / C), biases zero.

Verdicts use the thresholds below: entropy collapse when some layer's mean
normalised entropy falls under ENTROPY_COLLAPSE, rank collapse when the output's
res(X) falls under RANK_COLLAPSE.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from ..claim import ENTROPY_COLLAPSE, RANK_COLLAPSE, StackSetting
from ..metrics import token_residual
from ..presets import create

NORM_POSITIONS = ("pre", "post")


class AttentionStack(nn.Module):
    """``depth`` attention layers of one variant, pre- or post-LN, with or without residual
    connections (module docstring)."""

    def __init__(self, depth: int, dim: int, num_heads: int, residual: bool = False,
                 variant: str = "baseline", norm: str = "pre", **options):
        super().__init__()
        if norm not in NORM_POSITIONS:
            raise ValueError(f"norm={norm!r}: expected one of {NORM_POSITIONS}")
        self.residual = residual
        self.norm = norm
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(depth))
        self.layers = nn.ModuleList(create(variant, dim, num_heads, **options) for _ in range(depth))

    def forward(self, x: Tensor, residual_scale: float | None = None) -> list[Tensor]:
        """The hidden states after each layer, (B, N, C) each. ``residual_scale`` alpha weighs the
        residual stream, x <- alpha x + attention(LN(x)) (pre-LN) or LN(alpha x + attention(x))
        (post-LN); None: 1 with residual connections, 0 without (the stream dropped)."""
        alpha = (1.0 if self.residual else 0.0) if residual_scale is None else residual_scale
        hidden = []
        for layer_norm, attention in zip(self.norms, self.layers, strict=True):
            update = attention(layer_norm(x) if self.norm == "pre" else x)
            x = update if alpha == 0 else alpha * x + update
            hidden.append(x if self.norm == "pre" else layer_norm(x))
            x = hidden[-1]
        return hidden


@torch.no_grad()
def scale_qk_weights_(stack: AttentionStack, qk_scale: float) -> None:
    """Multiply every layer's W_q and W_k (and their biases) by ``qk_scale``, in place, then let
    mitigations that derive state from the weights catch up (sigma_reparam's u, v)."""
    for attention in stack.layers:
        queries_and_keys = slice(0, 2 * attention.attn_dim)
        attention.qkv.weight[queries_and_keys] *= qk_scale
        if attention.qkv.bias is not None:
            attention.qkv.bias[queries_and_keys] *= qk_scale
        attention.reset_from_weights()


def init_stack_weights(stack: AttentionStack, qk_scale: float, generator: torch.Generator) -> None:
    """The theory's init, for the trainability diagrams only (module docstring):
    W_q, W_k ~ N(0, qk_scale^2 / C); W_v, W_o ~ N(0, 1 / C); biases zero."""
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


def construct_stack(setting: StackSetting, generator: torch.Generator, **options) -> AttentionStack:
    """The stack of ``setting``, each layer built as ``create(variant, ...)`` builds it, with
    torch's global generator seeded from ``generator`` inside ``fork_rng`` (module docstring)."""
    construction_seed = int(torch.randint(2 ** 62, (), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(construction_seed)
        return AttentionStack(setting.depth, setting.dim, setting.num_heads, setting.residual,
                              setting.variant, setting.norm, **options)


def build_stack(setting: StackSetting, generator: torch.Generator, **options) -> AttentionStack:
    """:func:`construct_stack`, then W_q and W_k scaled by sqk: the claims harness's stack."""
    stack = construct_stack(setting, generator, **options)
    scale_qk_weights_(stack, setting.qk_scale)
    return stack


def layer_health(index: int, attention, state: Tensor) -> LayerHealth:
    """Layer ``index`` (0-based)'s LayerHealth from its probe and the hidden state (B, N, C) it
    output."""
    health = attention.health
    return LayerHealth(layer=index + 1, entropy=health.entropy.mean().item(),
                       min_entropy=health.min_entropy.min().item(),
                       residual=token_residual(state).mean().item(),
                       sink_mass=health.sink_mass.mean().item(),
                       max_logit=health.max_logit.max().item())


@torch.no_grad()
def measure_stack(setting: StackSetting, **options) -> StackHealth:
    """Build the stack of ``setting`` (:func:`build_stack`), run one batch with the probe on,
    report each layer's health."""
    generator = torch.Generator().manual_seed(setting.seed)
    stack = build_stack(setting, generator, probe=True, **options)
    x = torch.randn(setting.batch, setting.tokens, setting.dim, generator=generator)
    hidden = stack(x)
    return StackHealth(setting, [layer_health(i, attention, state) for i, (attention, state)
                                 in enumerate(zip(stack.layers, hidden, strict=True))])
