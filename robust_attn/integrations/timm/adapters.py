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
DiffAttention     ``qkv`` (bias: qkv_bias)             RobustAttention(differential=l,
                                                       attn_head_dim=2 * timm's head_dim)
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

timm's ``DiffAttention`` (Differential Transformer) becomes the ``differential``
mitigation at layer l = timm's depth + 1, recovered from its ``lambda_init``
(:func:`~robust_attn.mitigations.differential.layer_of_lambda_init`): whatever the
preset, ``differential`` is forced to l (a preset that conflicts with it, e.g. ``sink``
or ``robust``, cannot be built and is reported). timm's ``head_dim`` is the half-head
width, so ``attn_head_dim`` is twice it; ``lambda_q1``, ``lambda_k1``, ``lambda_q2``,
``lambda_k2`` and ``sub_norm.weight`` become ``mitigations.differential.*`` (every other
key keeps its name); the fused path's dropout ``attn_drop_p`` is the attention dropout.
The way back builds ``DiffAttention(depth=l - 1)`` with those tensors (lambda vectors in
float32, as timm makes them). An added qk_norm or gate cannot be held by DiffAttention.

Not supported, reported with the reason: a gate together with scale_norm,
grouped-query attention (AttentionRope with ``num_kv_heads < num_heads``), and a
DiffAttention with ``dual_lambda=True``, with ``qk_norm=True`` (timm normalises each
half-head, RobustAttention's qk_norm the whole head) or with a hand-set ``lambda_init``
that no integer layer gives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ...attention import RobustAttention
from ...mitigations.differential import layer_of_lambda_init
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
    from timm.layers import Attention, AttentionRope, DiffAttention
    from timm.models.eva import EvaAttention

    return {"Attention": Attention, "AttentionRope": AttentionRope, "EvaAttention": EvaAttention,
            "DiffAttention": DiffAttention}


# timm DiffAttention's lambda vectors, named as in the differential mitigation.
DIFF_LAMBDAS = ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")


def _is_diff(module: nn.Module) -> bool:
    return type(module).__name__ == "DiffAttention"


def _diff_reason(module: nn.Module) -> str | None:
    """Why a timm DiffAttention cannot be converted, or None."""
    if getattr(module, "lambda_a", None) is not None:
        return ("DiffAttention(dual_lambda=True): its two scalar lambdas are timm's own; the "
                "'differential' mitigation has the paper's four lambda vectors")
    if _has(module.q_norm) or _has(module.k_norm):
        return (f"DiffAttention(qk_norm=True) normalises each half-head (width "
                f"{module.head_dim}); RobustAttention's qk_norm normalises the whole head "
                f"(width {2 * module.head_dim})")
    try:
        layer_of_lambda_init(module.lambda_init)
    except ValueError as error:
        return f"DiffAttention with {error}"
    return None


def _has(norm: nn.Module) -> bool:
    return not isinstance(norm, nn.Identity)


def unsupported_reason(module: nn.Module) -> str | None:
    """Why ``module`` (of a supported class) cannot be converted, or None."""
    if _is_diff(module):
        return _diff_reason(module)
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
    if origin.kind in ("Attention", "DiffAttention"):
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


def _with_source_differential(module: nn.Module, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` for a timm DiffAttention: ``differential`` forced to its layer index l (True,
    the preset's "enabled", takes it; another value would replace the module's lambda_init)."""
    layer = layer_of_lambda_init(module.lambda_init)
    value = options.get("differential")
    if not (value is None or value is True or (type(value) is int and value == layer)):
        raise ValueError(f"differential={value!r} would replace the module's own differential "
                         f"attention (timm's DiffAttention at depth {layer - 1}: "
                         f"differential={layer})")
    return {**options, "differential": layer}


def to_robust(module: nn.Module, options: dict[str, Any]) -> RobustAttention:
    """A RobustAttention with ``options`` computing what ``module`` computes, up to the options.

    Raises ValueError or TypeError when the options cannot be built (e.g. conflicts).
    """
    origin = origin_of_timm(module)
    cls, extra = _robust_class(module, origin)
    source_gate = getattr(module, "gate", None)
    if source_gate is not None:
        options = _with_source_gate(options)
    diff = _is_diff(module)
    if diff:
        options = _with_source_differential(module, options)
    weight, bias = qkv_parameters(module)
    # The source's structure wins over a preset's (outlier_removal's proj_bias=False): its
    # weights and biases are copied over, so dropping a bias would change the function.
    # DiffAttention: timm's head_dim is the half-head; its fused path drops with attn_drop_p.
    kwargs = {"attn_head_dim": 2 * module.head_dim if diff else module.head_dim,
              "dim_out": module.proj.out_features,
              "attn_drop": module.attn_drop_p if diff else module.attn_drop.p,
              "proj_drop": module.proj_drop.p,
              "device": weight.device, "dtype": weight.dtype, **extra, **options,
              "qkv_bias": bias is not None, "proj_bias": module.proj.bias is not None,
              "qk_norm": _has(module.q_norm) or bool(options.get("qk_norm", False)),
              "scale_norm": _has(module.norm)}
    try:
        robust = cls(weight.shape[1], module.num_heads, **kwargs)
    except ValueError as error:
        if not diff:
            raise
        raise ValueError(f"a timm DiffAttention converts with differential="
                         f"{options['differential']}: {error}") from error
    if _has(module.q_norm):
        robust.q_norm, robust.k_norm = module.q_norm, module.k_norm
    robust.norm = module.norm
    if not diff:  # DiffAttention: a fresh Dropout(attn_drop_p), built above
        robust.attn_drop = module.attn_drop
    robust.proj_drop = module.proj_drop
    if source_gate is not None:
        robust.mitigations["gated"].gate = source_gate
    _copy_linear(robust.qkv, weight, bias)
    _copy_linear(robust.proj, module.proj.weight, module.proj.bias)
    if diff:
        differential = robust.mitigations["differential"]
        for name in DIFF_LAMBDAS:
            getattr(differential, name).copy_(getattr(module, name))
        differential.sub_norm.weight.copy_(module.sub_norm.weight)
        differential.sub_norm.eps = module.sub_norm.eps
    if not any(p.requires_grad for p in module.parameters()):  # a frozen module stays frozen
        robust.qkv.requires_grad_(False)
        robust.proj.requires_grad_(False)
        if diff:
            robust.mitigations["differential"].requires_grad_(False)
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


def _parameter(tensor: Tensor, dtype: torch.dtype | None = None) -> nn.Parameter:
    return nn.Parameter(tensor.detach().clone().to(dtype or tensor.dtype),
                        requires_grad=tensor.requires_grad)


def revert_reason(robust: RobustAttention) -> str | None:
    """Why ``robust`` cannot go back to its timm class at all (whatever is dropped), or None."""
    if origin_of_robust(robust).kind != "DiffAttention":
        return None
    if "differential" not in robust.mitigations:
        return "it came from a timm DiffAttention but has no 'differential' mitigation"
    if robust.proj.out_features != robust.dim:
        return (f"DiffAttention has no dim_out: proj maps to {robust.proj.out_features}, "
                f"not dim={robust.dim}")
    if robust.num_heads * robust.head_dim != robust.dim:
        return (f"DiffAttention has no attn_head_dim: num_heads * head_dim = "
                f"{robust.num_heads} * {robust.head_dim} is not dim={robust.dim}")
    return None


def _timm_diff(robust: RobustAttention, qkv: nn.Linear) -> nn.Module:
    """timm's DiffAttention for ``robust`` (from one), materialised with its qkv, lambda vectors
    (float32, as timm makes them) and sub norm; proj and norms are set by :func:`to_timm`."""
    from timm.layers import RmsNorm

    differential = robust.mitigations["differential"]
    module = timm_classes()["DiffAttention"](
        robust.dim, num_heads=robust.num_heads, qkv_bias=qkv.bias is not None,
        proj_bias=robust.proj.bias is not None, attn_drop=robust.attn_drop.p,
        proj_drop=robust.proj_drop.p, depth=differential.layer - 1, device="meta")
    module.qkv = qkv
    for name in DIFF_LAMBDAS:
        setattr(module, name, _parameter(getattr(differential, name), torch.float32))
    gain = differential.sub_norm.weight
    module.sub_norm = RmsNorm(robust.head_dim, eps=differential.sub_norm.eps,
                              device=gain.device, dtype=gain.dtype)
    module.sub_norm.weight = _parameter(gain)
    return module


def _timm_module(robust: RobustAttention, origin: TimmOrigin, qkv: nn.Linear) -> nn.Module:
    """The timm class of ``origin`` on the meta device, with its q, k, v projection from ``qkv``."""
    if origin.kind == "DiffAttention":
        return _timm_diff(robust, qkv)
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
    Raises ValueError when it cannot be built at all (:func:`revert_reason`).
    """
    if reason := revert_reason(robust):
        raise ValueError(f"cannot revert to timm: {reason}")
    origin = origin_of_robust(robust)
    module = _timm_module(robust, origin, plain_linear(robust.qkv))
    module.proj = plain_linear(robust.proj)
    if origin.kind == "DiffAttention":  # no gate; an added (whole-head) qk_norm is dropped
        module.q_norm, module.k_norm = nn.Identity(), nn.Identity()
        module.attn_drop_p = robust.attn_drop.p
    else:
        module.gate = _timm_gate(robust)
        module.q_norm, module.k_norm = robust.q_norm, robust.k_norm
    module.norm = robust.norm
    module.attn_drop, module.proj_drop = robust.attn_drop, robust.proj_drop
    module.fused_attn = robust.fused_attn
    return module.train(robust.training)
