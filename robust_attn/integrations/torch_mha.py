"""PyTorch's ``nn.MultiheadAttention``: convert it to a RobustAttention behind MHA's own forward,
and back.

``convert`` replaces an ``nn.MultiheadAttention`` used as self-attention (alone, or the
``self_attn`` of ``nn.TransformerEncoderLayer`` and ``nn.TransformerDecoderLayer``) by a
:class:`MultiheadRobustAttention`: the forward signature and return value of
``nn.MultiheadAttention`` (``batch_first`` True or False), computed by a RobustAttention
(its child ``attention``) built with the preset's options. MHA's packed ``in_proj_weight``
(rows q, k, v; heads (h d) within each) is RobustAttention's ``qkv`` layout, so it and
``in_proj_bias`` are copied to ``qkv``, ``out_proj`` to ``proj``; the head scale
1/sqrt(head_dim) and the attention dropout (``dropout``) are the same.

Not converted, with the reason in the summary: cross-attention (RobustAttention projects one
input x, so keys and values cannot come from another: MHA with ``kdim``/``vdim`` other than
``embed_dim``, whose separate q/k/v projections exist only for that, and the
``multihead_attn`` of ``nn.TransformerDecoderLayer``, which attends to the encoder's memory),
``add_bias_kv=True`` and ``add_zero_attn=True`` (keys RobustAttention does not add), and
subclasses of ``nn.MultiheadAttention`` (their forward may differ). Elsewhere, the
adapter's forward refuses a key or value that is not the query.

torch's fused fast paths (``TransformerEncoderLayer`` in inference, ``TransformerEncoder``'s
nested tensors) compute stock attention from a packed ``in_proj_weight`` that the adapter
does not have (its projections may be reparametrised): the adapter's ``in_proj_bias`` is None
and ``_qkv_same_embed_dim`` False, which keep the layer's fast path off, and :func:`convert`
sets ``use_nested_tensor = False`` on every ``nn.TransformerEncoder`` whose layers it converted.

``revert`` builds ``nn.MultiheadAttention`` again (sigma_reparam folded into the weights),
loading strictly into a stock module, when every mitigation is one MHA can hold
(:func:`unexpressible`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..attention import RobustAttention
from ..kernels.eager import attention_weights
from ..mitigations.base import Mitigation
from .timm.adapters import plain_linear

DECODER_CROSS_ATTENTION = ("the cross-attention of nn.TransformerDecoderLayer (multihead_attn "
                           "attends to the encoder's memory): RobustAttention projects one input, "
                           "so only self-attention converts")


class MultiheadRobustAttention(nn.Module):
    """``nn.MultiheadAttention``'s forward over a RobustAttention, for self-attention.

    ``forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False) -> (out, weights or None)`` as in torch, where
    key and value must be the query (the same tensor, or equal ones). Inputs are batched:
    (B, L, E) with ``batch_first``, else (L, B, E).

    Masks, converted to RobustAttention's (bool True = may attend, or additive float):
    ``key_padding_mask`` (B, L), bool True = ignore the key, or additive float, is passed as a
    (B, 1, 1, L) mask (bool: its negation), the documented way to give RobustAttention a key
    padding mask; ``attn_mask`` (L, L) or (B * num_heads, L, L), bool True = NOT allowed (the
    opposite of RobustAttention's), or additive float, as (L, L) or (B, H, L, L). Both given:
    two bool masks are combined with "and", otherwise the bool one becomes additive (-inf where
    not allowed) and they add, as torch does. ``is_causal`` is causal attention, combined with
    attn_mask when given (torch takes it as a hint that attn_mask is causal: the same result).

    ``need_weights=True`` returns the attention weights (B, H, L, L), their mean over heads when
    ``average_attn_weights``: the eager reference's weights of the problem the kernel solved
    (read from an observer record), before dropout and without keys a mitigation prepended
    (sinks), at the cost of one materialised (B, H, L, L) map as in torch. A mitigation that
    solves attention its own way (differential attention: two maps) has no such map:
    need_weights=True raises, naming it.
    """

    # Read by torch's fused fast paths (module docstring): no packed in-projection here.
    in_proj_weight = None
    in_proj_bias = None
    _qkv_same_embed_dim = False

    def __init__(self, attention: RobustAttention, batch_first: bool = False) -> None:
        super().__init__()
        if not isinstance(attention, RobustAttention):
            raise TypeError(f"attention must be a RobustAttention, got {type(attention).__name__}")
        self.attention = attention
        self.batch_first = bool(batch_first)

    @property
    def embed_dim(self) -> int:
        return self.attention.dim

    @property
    def num_heads(self) -> int:
        return self.attention.num_heads

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Tensor | None = None, need_weights: bool = True,
                attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        _check_self_attention(query, key, value)
        x = query if self.batch_first else query.transpose(0, 1)
        batch, length = x.shape[:2]
        mask = robust_mask(key_padding_mask, attn_mask, batch, self.num_heads, length)
        if need_weights:
            out, weights = self._attention_with_weights(x, mask, is_causal)
            if average_attn_weights:
                weights = weights.mean(dim=1)
        else:
            out, weights = self.attention(x, mask, is_causal), None
        return (out if self.batch_first else out.transpose(0, 1)), weights

    def _attention_with_weights(self, x: Tensor, mask: Tensor | None,
                                is_causal: bool) -> tuple[Tensor, Tensor]:
        """The output and the weights (B, H, L, L) of the problem solved, from an observer record."""
        own_way = [name for name, m in self.attention.mitigations.items()
                   if type(m).attend is not Mitigation.attend]
        if own_way:
            raise ValueError(f"need_weights=True: {own_way} solve attention their own way, with no "
                             f"single map of weights; pass need_weights=False")
        records = []
        handle = self.attention.register_observer(lambda module, record: records.append(record))
        try:
            out = self.attention(x, mask, is_causal)
        finally:
            handle.remove()
        problem = records[0].attended.problem
        weights = attention_weights(problem)[..., problem.prepended_keys:]
        return out, weights.to(out.dtype)

    def extra_repr(self) -> str:
        return f"batch_first={self.batch_first}"


def _check_self_attention(query: Tensor, key: Tensor, value: Tensor) -> None:
    if not isinstance(query, Tensor) or query.dim() != 3:
        raise ValueError(f"query must be a batched (L, B, E) or (B, L, E) tensor, got "
                         f"{tuple(query.shape) if isinstance(query, Tensor) else type(query).__name__}"
                         f" (unbatched input: add the batch dimension)")
    for name, other in (("key", key), ("value", value)):
        if other is not query and not (isinstance(other, Tensor) and other.shape == query.shape
                                       and torch.equal(other, query)):
            raise ValueError(f"{name} is not the query: a converted nn.MultiheadAttention computes "
                             f"self-attention only (RobustAttention projects one input); exclude "
                             f"cross-attention modules from convert (exclude=...)")


def _allowed(name: str, mask: Tensor) -> Tensor:
    """``mask`` in RobustAttention's sense: a bool mask negated (torch's True = ignore), an
    additive float mask as is."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a tensor or None, got {type(mask).__name__}")
    if mask.dtype == torch.bool:
        return ~mask
    if not mask.is_floating_point():
        raise TypeError(f"{name} must be bool (True = not allowed) or an additive float tensor, "
                        f"got {mask.dtype}")
    return mask


def robust_mask(key_padding_mask: Tensor | None, attn_mask: Tensor | None, batch: int,
                heads: int, length: int) -> Tensor | None:
    """MHA's ``key_padding_mask`` (B, L) and ``attn_mask`` (L, L) or (B * heads, L, L) as one
    RobustAttention mask (bool True = may attend, or additive float), or None."""
    masks = []
    if key_padding_mask is not None:
        allowed = _allowed("key_padding_mask", key_padding_mask)
        if tuple(allowed.shape) != (batch, length):
            raise ValueError(f"key_padding_mask has shape {tuple(allowed.shape)}, expected "
                             f"(B, L) = {(batch, length)}")
        masks.append(allowed.view(batch, 1, 1, length))
    if attn_mask is not None:
        allowed = _allowed("attn_mask", attn_mask)
        if tuple(allowed.shape) not in ((length, length), (batch * heads, length, length)):
            raise ValueError(f"attn_mask has shape {tuple(allowed.shape)}, expected (L, L) = "
                             f"{(length, length)} or (B * num_heads, L, L) = "
                             f"{(batch * heads, length, length)}")
        masks.append(allowed if allowed.dim() == 2 else allowed.view(batch, heads, length, length))
    if len(masks) < 2:
        return masks[0] if masks else None
    first, second = masks
    if first.dtype == second.dtype == torch.bool:
        return first & second
    dtype = first.dtype if first.is_floating_point() else second.dtype
    return _additive(first, dtype) + _additive(second, dtype)


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A mask as additive float: a bool one (True = may attend) 0 where allowed, -inf elsewhere."""
    if mask.dtype != torch.bool:
        return mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, -torch.inf)


def is_source(module: nn.Module) -> bool:
    """Whether convert treats ``module`` as torch's MultiheadAttention (the class itself only)."""
    return type(module) is nn.MultiheadAttention


def unsupported_reason(module: nn.MultiheadAttention, parent: nn.Module | None,
                       attribute: str) -> str | None:
    """Why ``module`` (attribute ``attribute`` of ``parent``) cannot be converted, or None."""
    if module.bias_k is not None:
        return ("add_bias_kv=True: learned key/value biases appended to the sequence, which "
                "RobustAttention does not add")
    if module.add_zero_attn:
        return "add_zero_attn=True: a zero key/value appended, which RobustAttention does not add"
    if not module._qkv_same_embed_dim:
        return (f"kdim={module.kdim}, vdim={module.vdim} differ from embed_dim={module.embed_dim}: "
                f"keys and values come from another input (cross-attention); RobustAttention "
                f"projects one input")
    if isinstance(parent, nn.TransformerDecoderLayer) and attribute == "multihead_attn":
        return DECODER_CROSS_ATTENTION
    return None


@torch.no_grad()
def to_robust(module: nn.MultiheadAttention, options: dict[str, Any]) -> MultiheadRobustAttention:
    """The adapter with a RobustAttention with ``options`` and ``module``'s weights, configuration
    (the module's bias and dropout win over a preset's, e.g. the robust preset's proj_bias=False:
    its weights are copied) and training mode. Raises ValueError or TypeError when the options
    cannot be built (conflicts)."""
    weight, bias, out = module.in_proj_weight, module.in_proj_bias, module.out_proj
    robust = RobustAttention(module.embed_dim, module.num_heads,
                             **{"attn_drop": module.dropout, "device": weight.device,
                                "dtype": weight.dtype, **options, "qkv_bias": bias is not None,
                                "proj_bias": out.bias is not None})
    for layer, (w, b) in ((robust.qkv, (weight, bias)), (robust.proj, (out.weight, out.bias))):
        layer.weight.copy_(w)
        if b is not None:
            layer.bias.copy_(b)
    if not any(p.requires_grad for p in module.parameters()):  # a frozen module stays frozen
        robust.qkv.requires_grad_(False)
        robust.proj.requires_grad_(False)
    robust.reset_from_weights()  # sigma_reparam: u, v and gamma from the copied weights
    return MultiheadRobustAttention(robust, module.batch_first).train(module.training)


def revert_reason(adapter: MultiheadRobustAttention) -> str | None:
    """Why ``adapter`` cannot become an nn.MultiheadAttention at all, or None."""
    robust = adapter.attention
    if robust.proj.out_features != robust.dim or robust.attn_dim != robust.dim:
        return (f"nn.MultiheadAttention maps embed_dim={robust.dim} to itself: this module has "
                f"num_heads * head_dim = {robust.attn_dim} and output width "
                f"{robust.proj.out_features}")
    if (robust.qkv.bias is None) != (robust.proj.bias is None):
        return "nn.MultiheadAttention has one bias flag for its in- and out-projections"
    if not isinstance(robust.norm, nn.Identity):
        return "nn.MultiheadAttention has no scale_norm"
    return None


def unexpressible(adapter: MultiheadRobustAttention) -> list[str]:
    """The mitigations that nn.MultiheadAttention cannot hold (revert would drop them).

    MHA holds the q, k, v and output projections only: it holds a mitigation that timm's
    Attention holds (Mitigation.timm_expressible: folded into the weights, a loss, a clip
    between optimiser steps) and that brings no layer of its own (parameters, such as a gate,
    or the q_norm/k_norm layers of qk_norm)."""
    robust = adapter.attention
    norm_builders = {robust.layer_builders.get(role) for role in ("q_norm", "k_norm")}
    return [name for name, m in robust.mitigations.items()
            if not m.timm_expressible(robust) or name in norm_builders
            or any(True for _ in m.parameters())]


@torch.no_grad()
def to_torch(adapter: MultiheadRobustAttention) -> nn.MultiheadAttention:
    """The nn.MultiheadAttention ``adapter`` stands for, with its current weights (reparametrisations
    folded), dropout, batch_first, training mode and trainability. Mitigations it cannot hold are
    dropped: check :func:`unexpressible`. Raises ValueError when it cannot be built
    (:func:`revert_reason`)."""
    if reason := revert_reason(adapter):
        raise ValueError(f"cannot revert to nn.MultiheadAttention: {reason}")
    robust = adapter.attention
    qkv, proj = plain_linear(robust.qkv), plain_linear(robust.proj)
    module = nn.MultiheadAttention(robust.dim, robust.num_heads, dropout=robust.attn_drop.p,
                                   bias=qkv.bias is not None, batch_first=adapter.batch_first,
                                   device=qkv.weight.device, dtype=qkv.weight.dtype)
    pairs = [(module.in_proj_weight, qkv.weight), (module.out_proj.weight, proj.weight)]
    if qkv.bias is not None:
        pairs += [(module.in_proj_bias, qkv.bias), (module.out_proj.bias, proj.bias)]
    for target, source in pairs:
        target.copy_(source)
    trainable = any(p.requires_grad for layer in (robust.qkv, robust.proj) for p in layer.parameters())
    return module.requires_grad_(trainable).train(robust.training)


def keep_off_nested_tensors(model: nn.Module) -> None:
    """Set ``use_nested_tensor = False`` on every nn.TransformerEncoder of ``model`` with a layer
    whose self-attention is an adapter: its nested-tensor path (inference with a key padding
    mask) would hand the layers nested tensors and read a packed in_proj_weight."""
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoder) and any(
                isinstance(getattr(layer, "self_attn", None), MultiheadRobustAttention)
                for layer in module.layers):
            module.use_nested_tensor = False
