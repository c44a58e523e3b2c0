"""What the speed benchmark measures: the shapes, and the modules (cases) it times against timm's.

A case builds one module for a shape. Every case is compared with a reference
case measured in the same rounds: training steps with ``timm`` (timm.layers.Attention,
fused SDPA), inference forwards with ``timm eval``, compiled steps with ``timm compiled``.
Where timm has the same mitigation (``qk_norm=True``, ``gated=True``), the case
also names that equivalent, so that a mitigation's inherent cost (the gate is an
extra C x C projection) shows apart from ours.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from timm.layers import Attention
from torch import nn

import robust_attn
from robust_attn.mitigations.sigma_reparam import fold_sigma_reparam

TRAIN, EVAL = "train", "eval"
# timm's own equivalent of a preset: the same mitigation in timm.layers.Attention. The sigmoid
# preset carries qk_norm too (Ramapuram et al. 2024's recommendation). timm has no softcap; its
# unfused path (fused_attn = False) computes the scores as softcap must where no fused kernel
# takes a score modifier (the CPU with gradients).
EQUIVALENTS = {"qk_norm": "timm qk_norm", "gated": "timm gated", "sigmoid": "timm qk_norm",
               "softcap": "timm unfused"}


@dataclass(frozen=True)
class Shape:
    key: str
    label: str
    batch: int
    tokens: int
    dim: int
    heads: int
    causal: bool = False

    def describe(self) -> str:
        causal = ", causal" if self.causal else ""
        return f"B={self.batch}, N={self.tokens}, C={self.dim}, H={self.heads}{causal}"


@dataclass(frozen=True)
class Case:
    """One module to time. ``mode``: TRAIN times forward + backward, EVAL an inference forward
    (module.eval(), torch.inference_mode). ``compiled``: torch.compile'd after moving it."""

    name: str
    build: Callable[[Shape], nn.Module] = field(repr=False)
    group: str
    mode: str = TRAIN
    reference: str = "timm"
    equivalent: str | None = None
    compiled: bool = False


def timm_attention(fused: bool = True, **options) -> Callable[[Shape], nn.Module]:
    def build(shape: Shape) -> nn.Module:
        module = Attention(shape.dim, num_heads=shape.heads, **options)
        module.fused_attn = fused  # timm's default is fused unless TIMM_FUSED_ATTN=0
        return module
    return build


def preset(name: str, **overrides) -> Callable[[Shape], nn.Module]:
    return lambda shape: robust_attn.create(name, dim=shape.dim, num_heads=shape.heads, **overrides)


def folded_sigma_reparam(shape: Shape) -> nn.Module:
    return fold_sigma_reparam(preset("sigma_reparam")(shape).eval())


REFERENCE = Case("timm", timm_attention(), "reference")


def preset_cases() -> list[Case]:
    return [Case(name, preset(name), "preset", equivalent=EQUIVALENTS.get(name))
            for name in robust_attn.list_variants()]


def timm_equivalents() -> list[Case]:
    # timm needs the norm layer named; RobustAttention's default is the same LayerNorm.
    return [Case("timm qk_norm", timm_attention(qk_norm=True, norm_layer=nn.LayerNorm), "timm"),
            Case("timm gated", timm_attention(gated=True), "timm"),
            Case("timm unfused", timm_attention(fused=False), "timm")]


def inference_cases() -> list[Case]:
    return [Case("timm eval", timm_attention(), "reference", mode=EVAL, reference="timm eval"),
            Case("sigma_reparam folded", folded_sigma_reparam, "inference", mode=EVAL,
                 reference="timm eval")]


def kernel_cases(kernel: str, presets: tuple[str, ...], device: torch.device) -> list[Case]:
    """Presets forced onto ``kernel``. FlexAttention has no CPU backward, so on the CPU it is
    timed in inference against timm's inference forward."""
    mode = EVAL if kernel == "flex" and device.type == "cpu" else TRAIN
    reference = "timm eval" if mode == EVAL else "timm"
    return [Case(f"{name} {kernel}", preset(name, kernel=kernel), "kernel", mode=mode,
                 reference=reference) for name in presets]


def compiled_cases() -> list[Case]:
    return [Case("timm compiled", timm_attention(), "reference", reference="timm compiled",
                 compiled=True)] + [
        Case(f"{case.name} compiled", case.build, "compiled", reference="timm compiled",
             compiled=True) for case in preset_cases()]


def memory_cases() -> list[Case]:
    """The N x N check: the reference and every preset, training steps."""
    return [REFERENCE, *preset_cases()]


def all_cases(device: torch.device) -> dict[str, Case]:
    """Every case by name (the memory check's subprocess finds its case here)."""
    presets = tuple(robust_attn.list_variants())
    cases = [REFERENCE, *preset_cases(), *timm_equivalents(), *inference_cases(),
             *kernel_cases("flex", presets, device), *kernel_cases("xformers", presets, device),
             *compiled_cases()]
    return {case.name: case for case in cases}
