"""How each supported timm attention class maps onto RobustAttention, and back.

Every supported class computes ``proj(norm(attention(q_norm(q), k_norm(k), v)))``
from one linear map x -> (q, k, v), so a RobustAttention holds it as one fused
``qkv`` (timm's layout: rows q, then k, then v; heads (h d) within each):

================  ===================================  =============================
timm class        q, k, v projection                   RobustAttention
================  ===================================  =============================
Attention         ``qkv`` (bias: qkv_bias)             RobustAttention
AttentionRope     ``qkv``, or ``q_proj``/``k_proj``/   RobustAttentionRope
                  ``v_proj`` (qkv_fused=False)
EvaAttention      ``qkv`` without bias plus ``q_bias``, RobustAttentionRope(key_bias=False):
                  ``v_bias`` (k bias a zero buffer),   the bias is [b_q, 0, b_v]
                  or ``q_proj``/``k_proj``/``v_proj``
================  ===================================  =============================

``q_norm``, ``k_norm``, ``norm`` (scale_norm) and the dropouts are moved over
as modules (their type, eps and weights kept); qkv and proj weights are copied,
since a variant may build them as another layer (sigma_reparam). The way back
builds the timm class on the meta device and hands it the same modules, with
sigma-reparametrised layers folded (W_hat = gamma W / sigma(W)) and the fused
qkv split where the timm module had separate projections or biases.

timm's own output gate (``gated=True``: sigmoid(x W_g) times the attention
output, per channel) becomes the ``gated="elementwise"`` mitigation, its
``gate`` layer moved over, where timm applies it where RobustAttention does:
with no scale_norm (timm gates after scale_norm, RobustAttention before).

Not supported, reported with the reason: a gate together with scale_norm, and
grouped-query attention (AttentionRope with ``num_kv_heads < num_heads``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ...attention import RobustAttention
from ...mitigations.sigma_reparam import SigmaReparamLinear
from .rope_attention import RobustAttentionRope


@dataclass(frozen=True)
class TimmOrigin:
    """The timm class a RobustAttention came from, and its projection layout (for revert)."""

    kind: str = "Attention"
    qkv_fused: bool = True
    qkv_bias_separate: bool = False


def timm_classes() -> dict[str, type[nn.Module]]:
    """The supported timm classes by name (timm is imported here: it is an optional dependency)."""
    from timm.layers import Attention, AttentionRope
    from timm.models.eva import EvaAttention

    return {"Attention": Attention, "AttentionRope": AttentionRope, "EvaAttention": EvaAttention}


def _has(norm: nn.Module) -> bool:
    return not isinstance(norm, nn.Identity)


def unsupported_reason(module: nn.Module) -> str | None:
    """Why ``module`` (of a supported class) cannot be converted, or None."""
    if getattr(module, "gate", None) is not None and _has(module.norm):
        return ("timm gates the attention output after scale_norm; RobustAttention's 'gated' "
                "mitigation gates it before")
    if getattr(module, "num_kv_heads", module.num_heads) != module.num_heads:
        return (f"grouped-query attention (num_kv_heads={module.num_kv_heads} < "
                f"num_heads={module.num_heads}): RobustAttention has one key/value head per head")
    return None


def _fused(module: nn.Module) -> bool:
    return module.qkv is not None


def qkv_parameters(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The fused (3 H D, C) weight and (3 H D,) bias (or None) of a supported timm module."""
    if _fused(module):
        weight, bias = module.qkv.weight, module.qkv.bias
    else:
        projections = (module.q_proj, module.k_proj, module.v_proj)
        weight = torch.cat([p.weight for p in projections])
        biases = [p.bias for p in projections]
        bias = None if biases[0] is None else \
            torch.cat([b if b is not None else torch.zeros_like(biases[0]) for b in biases])
    if getattr(module, "q_bias", None) is not None:  # EVA's fused qkv keeps its biases apart
        bias = torch.cat([module.q_bias, module.k_bias, module.v_bias])
    return weight, bias


def origin_of_timm(module: nn.Module) -> TimmOrigin:
    return TimmOrigin(type(module).__name__, _fused(module),
                      getattr(module, "qkv_bias_separate", False))


def _robust_class(module: nn.Module, origin: TimmOrigin) -> tuple[type[RobustAttention], dict]:
    if origin.kind == "Attention":
        return RobustAttention, {}
    return RobustAttentionRope, {"num_prefix_tokens": module.num_prefix_tokens,
                                 "rotate_half": getattr(module, "rotate_half", False),
                                 "key_bias": origin.kind != "EvaAttention"}


@torch.no_grad()
def _copy_linear(layer: nn.Module, weight: Tensor, bias: Tensor | None) -> None:
    layer.weight.copy_(weight)
    if bias is not None:
        layer.bias.copy_(bias)


def _with_source_gate(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` for a timm module with its own (elementwise) gate, which the mitigation takes."""
    if options.get("gated") not in (None, False, True, "elementwise"):
        raise ValueError(f"gated={options['gated']!r} would replace the module's own elementwise "
                         f"gate (timm's gated=True)")
    return {**options, "gated": "elementwise"}


def to_robust(module: nn.Module, options: dict[str, Any]) -> RobustAttention:
    """A RobustAttention with ``options`` computing what ``module`` computes, up to the options.

    Raises ValueError or TypeError when the options cannot be built (e.g. conflicts).
    """
    origin = origin_of_timm(module)
    cls, extra = _robust_class(module, origin)
    source_gate = getattr(module, "gate", None)
    if source_gate is not None:
        options = _with_source_gate(options)
    weight, bias = qkv_parameters(module)
    # The source's structure wins over a preset's (outlier_removal's proj_bias=False): its
    # weights and biases are copied over, so dropping a bias would change the function.
    kwargs = {"attn_head_dim": module.head_dim, "dim_out": module.proj.out_features,
              "attn_drop": module.attn_drop.p, "proj_drop": module.proj_drop.p,
              "device": weight.device, "dtype": weight.dtype, **extra, **options,
              "qkv_bias": bias is not None, "proj_bias": module.proj.bias is not None,
              "qk_norm": _has(module.q_norm) or bool(options.get("qk_norm", False)),
              "scale_norm": _has(module.norm)}
    robust = cls(weight.shape[1], module.num_heads, **kwargs)
    if _has(module.q_norm):
        robust.q_norm, robust.k_norm = module.q_norm, module.k_norm
    robust.norm, robust.attn_drop = module.norm, module.attn_drop
    robust.proj_drop = module.proj_drop
    if source_gate is not None:
        robust.mitigations["gated"].gate = source_gate
    _copy_linear(robust.qkv, weight, bias)
    _copy_linear(robust.proj, module.proj.weight, module.proj.bias)
    if not any(p.requires_grad for p in module.parameters()):  # a frozen module stays frozen
        robust.qkv.requires_grad_(False)
        robust.proj.requires_grad_(False)
    robust.reset_from_weights()  # sigma_reparam: u, v and gamma from the copied weights
    robust.fused_attn = module.fused_attn
    robust.timm_origin = origin
    return robust.train(module.training)


def origin_of_robust(module: RobustAttention) -> TimmOrigin:
    """Where ``module`` came from: recorded by convert, else the timm class with its forward."""
    kind = "AttentionRope" if isinstance(module, RobustAttentionRope) else "Attention"
    return getattr(module, "timm_origin", TimmOrigin(kind))


def plain_linear(layer: nn.Module) -> nn.Linear:
    """``layer`` as an nn.Linear: a sigma-reparametrised one folded (W_hat), a Linear as is."""
    return layer.fold() if isinstance(layer, SigmaReparamLinear) else layer


def _linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach().clone())
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().clone())
    return linear


def _split(qkv: nn.Linear) -> list[tuple[Tensor, Tensor | None]]:
    biases = qkv.bias.chunk(3) if qkv.bias is not None else (None,) * 3
    return list(zip(qkv.weight.chunk(3), biases, strict=True))


def _timm_module(robust: RobustAttention, origin: TimmOrigin, qkv: nn.Linear) -> nn.Module:
    """The timm class of ``origin`` on the meta device, with its q, k, v projection from ``qkv``."""
    cls = timm_classes()[origin.kind]
    common = {"num_heads": robust.num_heads, "attn_head_dim": robust.head_dim,
              "qkv_bias": qkv.bias is not None, "attn_drop": robust.attn_drop.p,
              "proj_drop": robust.proj_drop.p, "qk_norm": False, "scale_norm": False,
              "device": "meta"}
    if origin.kind == "Attention":
        module = cls(robust.dim, dim_out=robust.proj.out_features,
                     proj_bias=robust.proj.bias is not None, **common)
    else:
        rope = robust.mitigations["rope"].layout
        common.update(qkv_fused=origin.qkv_fused, num_prefix_tokens=rope.num_prefix_tokens,
                      rotate_half=rope.rotate_half)
        if origin.kind == "EvaAttention":
            module = cls(robust.dim, qkv_bias_separate=origin.qkv_bias_separate, **common)
        else:
            module = cls(robust.dim, dim_out=robust.proj.out_features,
                         proj_bias=robust.proj.bias is not None, **common)
    (q_weight, q_bias), (k_weight, k_bias), (v_weight, v_bias) = _split(qkv)
    if not origin.qkv_fused:
        if origin.kind == "EvaAttention":
            k_bias = None
        module.q_proj, module.k_proj, module.v_proj = (
            _linear(q_weight, q_bias), _linear(k_weight, k_bias), _linear(v_weight, v_bias))
    elif origin.kind == "EvaAttention":
        module.qkv = _linear(qkv.weight, None)
        if qkv.bias is not None:
            module.q_bias = nn.Parameter(q_bias.detach().clone())
            module.v_bias = nn.Parameter(v_bias.detach().clone())
            module.k_bias = torch.zeros_like(k_bias)
    else:
        module.qkv = qkv
    return module


def _timm_gate(robust: RobustAttention) -> nn.Linear | None:
    """The layer of an elementwise gate that timm's gated=True can hold (no scale_norm), or None."""
    gated = robust.mitigations["gated"] if "gated" in robust.mitigations else None
    if gated is None or gated.mode != "elementwise" or _has(robust.norm):
        return None
    return gated.gate


def unexpressible(robust: RobustAttention) -> list[str]:
    """The mitigations of ``robust`` that its timm class cannot express (revert would drop them):
    each mitigation says (Mitigation.timm_expressible)."""
    return [name for name, m in robust.mitigations.items() if not m.timm_expressible(robust)]


def to_timm(robust: RobustAttention) -> nn.Module:
    """The timm module ``robust`` came from, with its current weights (reparametrisations folded).

    Mitigations that the timm class cannot express are dropped: check :func:`unexpressible`.
    """
    origin = origin_of_robust(robust)
    module = _timm_module(robust, origin, plain_linear(robust.qkv))
    module.proj = plain_linear(robust.proj)
    module.gate = _timm_gate(robust)
    module.q_norm, module.k_norm, module.norm = robust.q_norm, robust.k_norm, robust.norm
    module.attn_drop, module.proj_drop = robust.attn_drop, robust.proj_drop
    module.fused_attn = robust.fused_attn
    return module.train(robust.training)
