"""Attention maps as the probe saw them, and how alike two layers' maps are.

The probe (:mod:`robust_attn.health.probe`) recomputes, for a bounded subsample of
query rows, the attention weights of the problem the kernel solved (q and k
after every mitigation, masks, score modifiers), whichever kernel ran. An
observer that asks for maps (``register_observer(fn, maps=True)``) receives the
sampled (B', H, Nq', Nk) weights and the allowed-key mask with each call's
record (:class:`~robust_attn.health.probe.AttentionMap`): exactly what the probe
measured (same rows, same batch items).
"""

from __future__ import annotations

from contextlib import ExitStack

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...attention import RobustAttention
from ..probe import AttentionMap

HF_CONTAINER = "robust_attn"  # the attribute robust_attn.integrations.hf attaches it as


def attention_modules(model: nn.Module) -> dict[str, RobustAttention]:
    """Every attention module of ``model`` that observers can watch, by name: each RobustAttention
    (timm modules converted by robust_attn.convert are RobustAttention too), and for a
    transformers model converted by robust_attn.convert, each attention module's container of
    mitigations (robust_attn.integrations.hf: it answers the same observer interface) under the
    attention module's name; a model that is itself one is named after its class."""
    return {name.removesuffix(f".{HF_CONTAINER}") or type(model).__name__: module
            for name, module in model.named_modules()
            if isinstance(module, RobustAttention) or _is_hf_container(module)}


def _is_hf_container(module: nn.Module) -> bool:
    """Whether ``module`` is robust_attn.integrations.hf's container (checked by class name and
    module, so that this does not import transformers)."""
    return (type(module).__name__ == "HFAttentionMitigations"
            and type(module).__module__ == "robust_attn.integrations.hf.mitigations")


@torch.no_grad()
def attention_maps(model: nn.Module, *args, **kwargs) -> dict[str, Tensor]:
    """Run ``model(*args, **kwargs)`` with every probe on; each attention module's map (H, Nq', Nk).

    The map is the first batch item's sampled attention weights (all query rows
    when N <= the module's ``probe_queries``, else evenly spaced rows), from the
    module's last call, whichever kernel computed it. The modules are watched by
    observers for this call only: their probe switches and ``health`` are untouched.
    """
    maps: dict[str, Tensor] = {}
    with ExitStack() as observers:
        for name, module in attention_modules(model).items():
            observers.callback(module.register_observer(_first_item_into(maps, name),
                                                        maps=True).remove)
        model(*args, **kwargs)
    return maps


def _first_item_into(maps: dict[str, Tensor], name: str):
    def observer(module, record) -> None:
        maps[name] = record.attention_map.weights[0]

    return observer


def map_similarity(previous: AttentionMap, current: AttentionMap) -> Tensor:
    """Per head of ``current``: the largest centred cosine with any head of ``previous``; (H,).

    Formula, for head h of layer l and head g of layer l-1, with maps centred
    over the allowed keys of each row (A~_ij = A_ij - mean_{k allowed} A_ik,
    0 where not allowed) and flattened over (batch, query, key)::

        sim_h = max_g  <A~_l^h, A~_{l-1}^g> / (||A~_l^h|| ||A~_{l-1}^g||)

    Centring removes the uniform part, so two near-uniform (untrained) maps
    are not called alike, and the max over g ignores the order of heads.
    1 means head h repeats a head of the previous layer. Cross-layer
    redundancy of attention maps: Bhojanapalli et al. (2021), "Leveraging
    redundancy in attention with Reuse Transformers" (arXiv:2110.06821), who
    find adjacent layers' maps most alike; they compare maps by total
    variation distance, this uses the centred cosine above.
    Maps of different shapes (other sampled rows or keys) give nan (on the maps' device, in
    their dtype, as the normal result).
    """
    if previous.weights.shape[0] != current.weights.shape[0] or \
            previous.weights.shape[2:] != current.weights.shape[2:]:
        return torch.full((current.weights.shape[1],), torch.nan, dtype=current.weights.dtype,
                          device=current.weights.device)
    a, b = _centred_heads(current), _centred_heads(previous)
    return (a @ b.T).amax(dim=1)


def _centred_heads(attention: AttentionMap) -> Tensor:
    """(H, B' Nq' Nk) unit rows: the map centred over allowed keys, per head."""
    allowed = attention.allowed.expand_as(attention.weights)
    weights = torch.where(allowed, attention.weights, 0.0)
    counts = allowed.sum(dim=-1, keepdim=True).clamp_min(1)
    centred = torch.where(allowed, weights - weights.sum(dim=-1, keepdim=True) / counts, 0.0)
    return F.normalize(centred.transpose(0, 1).flatten(1), dim=1)
