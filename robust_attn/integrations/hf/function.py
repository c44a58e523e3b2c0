"""The "robust_attn" attention function for transformers' ``AttentionInterface``.

transformers calls ``fn(module, query, key, value, attention_mask, dropout=, scaling=,
is_causal=, **kwargs)`` with q (B, H, Nq, D), k, v (B, Hkv, Nk, D) after the model's
RoPE and KV cache, and expects ``(out (B, Nq, H, Dv), weights or None)``. This
function matches transformers' own ``integrations/sdpa_attention.py``
(``sdpa_attention_forward``) step for step, then solves the resulting
:class:`~robust_attn.problem.AttentionProblem` with our kernels and the stages of
the module's :class:`~.mitigations.HFAttentionMitigations` (``module.robust_attn``),
when it has one; without one it is plain attention on our kernels.

* Grouped-query attention: k and v heads are repeated (transformers' ``repeat_kv``).
* Masks: the name is registered with ``AttentionMaskInterface`` as ``sdpa_mask``
  (a model whose implementation has no mask function gets no mask at all), so the
  mask is bool (True = may attend), (B, 1, Nq, Nk), or None when causality alone
  covers it.
* Causality, as sdpa_attention_forward decides it: ``is_causal`` (else the module's)
  only when Nq > 1 and there is no mask; with Nk > Nq then (prefill into an empty
  static cache) the keys past Nq are cut, so our lower-right causal alignment and
  SDPA's top-left one agree. A single query with a cache sees every cached key.
  Positional score modifiers (ALiBi) then see query positions offset by Nk - Nq
  (robust_attn.problem): the cached keys come first.
* Sparsity patterns with a KV cache are refused (the pattern would see the cached keys
  as prepended ones, visible to every query): generate with ``use_cache=False``.
* ``output_attentions=True`` is refused (sdpa warns and returns no weights):
  :func:`robust_attn.attention_maps` gives the probe's maps;
  ``softcap``, ``position_bias`` and ``s_aux`` (the model's own logit cap, relative
  bias and sink logits) are refused, naming the argument: the model's own mechanism
  belongs to its eager path, and our mitigations are set by convert.

``call.x`` is the module's input when convert watches it (:mod:`.inputs`). The
observers receive the record with ``record.output`` = the merged heads
(B, Nq, H * Dv) before the module's output projection, which the function does not run.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ...call import AttentionCall, AttentionRecord
from ...problem import AttentionProblem
from .inputs import module_input
from .mitigations import HFAttentionMitigations

NAME = "robust_attn"
# Arguments some models pass that carry a mechanism of their own, refused (module docstring).
REFUSED_ARGUMENTS = ("softcap", "position_bias", "s_aux")


def register() -> None:
    """Register the function and its mask function under :data:`NAME` (done on import of
    robust_attn.integrations.hf; calling it again re-registers the same functions)."""
    AttentionInterface.register(NAME, robust_attn_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def mitigations_of(module: nn.Module) -> HFAttentionMitigations | None:
    """The container convert attached to ``module`` (``module.robust_attn``), or None."""
    container = getattr(module, NAME, None)
    return container if isinstance(container, HFAttentionMitigations) else None


def robust_attn_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                          attention_mask: Tensor | None, dropout: float = 0.0,
                          scaling: float | None = None, is_causal: bool | None = None,
                          **kwargs: Any) -> tuple[Tensor, None]:
    """transformers' attention function signature (module docstring); returns (out, None)."""
    if given := [name for name in REFUSED_ARGUMENTS if kwargs.get(name) is not None]:
        raise ValueError(f"the robust_attn attention function does not take {given} (the "
                         f"model's own mechanism): use attn_implementation='eager' for this model")
    if kwargs.get("output_attentions"):
        raise ValueError("output_attentions=True: the robust_attn attention function does not "
                         "return attention weights; use robust_attn.attention_maps(model, ...) "
                         "or attn_implementation='eager'")
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"query has {query.shape[1]} heads, not a multiple of key's {key.shape[1]}")
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    q_length = query.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(q_length > 1 and attention_mask is None and causal)
    if causal and key.shape[2] > q_length:  # sdpa_attention_forward's cut (module docstring)
        key, value = key[:, :, :q_length], value[:, :, :q_length]
    if attention_mask is not None and attention_mask.dtype != torch.bool:
        attention_mask = attention_mask.to(query.dtype)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    container = mitigations_of(module)
    if container is None:
        call = AttentionCall(None, attention_mask, causal, None, "auto", dropout)
        attended = call.attend(AttentionProblem(query, key, value, scale, attention_mask, causal))
        return attended.out.transpose(1, 2).contiguous(), None
    if "sparsity" in container.mitigations and key.shape[2] > q_length:
        raise ValueError(f"sparsity: a pattern is aligned on the call's own {q_length} tokens and "
                         f"would treat the {key.shape[2] - q_length} cached keys as prepended "
                         f"keys, visible to every query (robust_attn.sparse.Pattern."
                         f"problem_mask_mod); run without the KV cache (use_cache=False)")
    call = AttentionCall(module_input(module), attention_mask, causal, None, container.kernel,
                         dropout)
    return _run_stages(container, call, query, key, value, scale), None


def _run_stages(container: HFAttentionMitigations, call: AttentionCall, q: Tensor, k: Tensor,
                v: Tensor, scale: float) -> Tensor:
    """RobustAttention's stages after the projections (robust_attn/attention.py), on
    ``container``'s mitigations; the heads' output (B, Nq, H, Dv)."""
    for mitigation in container.mitigations.values():
        q, k = mitigation.transform_qk(q, k, call)
    problem = AttentionProblem(q, k, v, scale, call.attn_mask, call.is_causal,
                               container._score_mods(), container._normalizer())
    for mitigation in container.mitigations.values():
        problem = mitigation.extend_keys(problem, call)
    observers = tuple(container._observers.values())
    attended = container._attend(problem, call, lse=any(entry.lse for entry in observers))
    for mitigation in container.mitigations.values():
        attended = attended.with_out(mitigation.transform_output(attended, call))
    health, attention_map = container._measure(attended, call, observers)
    out = attended.out.transpose(1, 2).contiguous()
    if observers:
        record = AttentionRecord(call, attended, out.flatten(2), health, attention_map)
        for entry in observers:
            entry.fn(container, record)
    return out


__all__ = ["NAME", "mitigations_of", "register", "robust_attn_attention"]
