"""Convert the attention modules of a transformers model to a robust_attn variant, in place, and back.

    model = LlamaForCausalLM(config)                      # or from_pretrained(...)
    model, summary = robust_attn.convert(model, "softcap")  # robust_attn.convert delegates here
    ...fine-tune...
    model, _ = robust_attn.revert(model)                   # stock modules, sigma folded in

The HF modules stay in place (their forward, RoPE, cache and projections are the
model's). Convert:

* attaches to each attention module a :class:`~.mitigations.HFAttentionMitigations`
  as ``module.robust_attn`` holding the variant's score-level mitigations (softcap,
  sink logit, sinks, sigmoid, outlier removal, sparsity, ALiBi, scalable-softmax, gated)
  the output gate, and the kernel and probe settings, and switches the model to
  ``attn_implementation="robust_attn"`` (:mod:`.function`), which reads it;
* applies ``sigma_reparam`` to the module's projections: each nn.Linear becomes a
  :class:`~robust_attn.mitigations.SigmaReparamLinear` sharing its weight and bias
  (``from_linear``; "preserve" when ``preserve_function``, so W_hat = W).
  Projections by module layout: ``q_proj``/``k_proj``/``v_proj``/``o_proj``
  (Llama, Mistral, Qwen2, HF's ViT); ``query``/``key``/``value`` plus the parent's
  ``output.dense`` (BERT), ``c_attn``/``c_proj`` (GPT-2). GPT-2's are transformers'
  ``Conv1D`` (x W + b with W stored (in, out)): each becomes the nn.Linear computing the
  same (weight W^T, copied) before it is reparametrised, and :func:`revert` folds it back
  into a Conv1D (the attributes are recorded on the container), so a reverted state dict
  loads strictly into a stock GPT-2.

Attention modules are the innermost modules whose class name contains "Attention"
and that carry ``scaling`` (the argument they pass to the attention function).
Options the HF function cannot run (:data:`~.mitigations.UNSUPPORTED`: qk_norm,
rope, differential, ...) skip the module with the reason; a conversion that converts
nothing raises ValueError (or warns or passes, ``if_nothing``) listing every module
found and why. Architecture arguments a preset sets (``proj_bias``) follow the model.
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from ...config import AttentionConfig
from ...mitigations import MITIGATIONS, SigmaReparamLinear
from ..timm.convert import (
    ConversionSummary,
    Patterns,
    RevertSummary,
    _check_arguments,
    _nothing_swapped,
    _selection_reason,
    conversion_options,
)
from .function import NAME, mitigations_of
from .inputs import watch_input
from .mitigations import HFAttentionMitigations

# Arguments of the container (HFAttentionMitigations) convert passes on.
CONTAINER_ARGUMENTS = ("kernel", "probe", "probe_queries", "probe_spectral")


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of the HF attention modules (module docstring), innermost first found."""
    def looks_like_attention(module: nn.Module) -> bool:
        return "attention" in type(module).__name__.lower() and hasattr(module, "scaling")

    return [(name, module) for name, module in model.named_modules()
            if looks_like_attention(module)
            and not any(looks_like_attention(child) for child in module.modules() if child is not module)]


def projections(model: nn.Module, name: str, module: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """Role -> (owner, attribute) of ``module``'s q, k, v (or fused qkv) and output projections."""
    def owned(owner, attributes):
        return {a: (owner, a) for a in attributes if isinstance(getattr(owner, a, None), nn.Module)}

    found = owned(module, ("q_proj", "k_proj", "v_proj", "o_proj"))
    if len(found) == 4:
        return found
    found = owned(module, ("query", "key", "value"))
    if len(found) == 3:  # BERT: the output projection is the parent's output.dense
        parent = model.get_submodule(name.rpartition(".")[0])
        if isinstance(getattr(getattr(parent, "output", None), "dense", None), nn.Linear):
            found["output.dense"] = (parent.output, "dense")
        return found
    return owned(module, ("c_attn", "c_proj"))


def _sigma_reason(layers: dict[str, tuple[nn.Module, str]]) -> str | None:
    if not layers:
        return ("sigma_reparam found no q_proj/k_proj/v_proj/o_proj, query/key/value or "
                "c_attn/c_proj projections")
    if other := [role for role, (owner, a) in layers.items()
                 if type(getattr(owner, a)) not in (nn.Linear, Conv1D)]:
        return f"sigma_reparam needs nn.Linear (or GPT-2's Conv1D) projections; {other} are not"
    return None


def _as_linear(layer: nn.Module) -> nn.Linear:
    """``layer`` itself (an nn.Linear), or the nn.Linear computing what a Conv1D computes:
    x W + b = x (W^T)^T + b, its weight a copy of W^T (Conv1D stores W as (in, out))."""
    if not isinstance(layer, Conv1D):
        return layer
    in_features, out_features = layer.weight.shape
    linear = nn.Linear(in_features, out_features, layer.bias is not None, device="meta")
    linear.weight = nn.Parameter(layer.weight.detach().T.contiguous(),
                                 requires_grad=layer.weight.requires_grad)
    linear.bias = layer.bias
    return linear


def _as_conv1d(linear: nn.Linear) -> Conv1D:
    """The Conv1D computing what ``linear`` computes (its weight transposed back, copied)."""
    conv = Conv1D(linear.out_features, linear.in_features)
    conv.weight = nn.Parameter(linear.weight.detach().T.contiguous(),
                               requires_grad=linear.weight.requires_grad)
    conv.bias = linear.bias
    return conv


def _config(module: nn.Module, layers: dict[str, tuple[nn.Module, str]]) -> AttentionConfig:
    heads = getattr(module, "num_heads", None) or getattr(module, "num_attention_heads", None) \
        or module.config.num_attention_heads
    head_dim = getattr(module, "head_dim", None) or module.attention_head_size
    output = [getattr(owner, a) for role, (owner, a) in layers.items()
              if role in ("o_proj", "output.dense", "c_proj")]
    width = getattr(getattr(module, "config", None), "hidden_size", heads * head_dim)  # x's (gated)
    return AttentionConfig(dim=width, num_heads=heads, head_dim=head_dim,
                           dim_out=heads * head_dim, qkv_bias=False,
                           proj_bias=bool(output) and output[0].bias is not None,
                           norm_layer=nn.LayerNorm)


@torch.no_grad()
def convert(model: PreTrainedModel, variant: str, include: Patterns = None, exclude: Patterns = None,
            preserve_function: bool = True,
            if_nothing: Literal["raise", "warn", "ignore"] = "raise", **overrides: Any
            ) -> tuple[PreTrainedModel, ConversionSummary]:
    """Convert every attention module of the transformers ``model`` to ``variant``, in place.

    Arguments and summary as :func:`robust_attn.convert` (timm); ``overrides`` take the
    mitigation options and ``kernel``, ``probe``, ``probe_queries``, ``probe_spectral``.
    Raises TypeError for another override, ValueError when nothing converts
    (``if_nothing="raise"``) or when the model cannot switch its attention implementation.
    """
    _check_arguments(overrides, if_nothing)
    if passed := sorted(set(overrides) - set(MITIGATIONS) - set(CONTAINER_ARGUMENTS)):
        raise TypeError(f"convert of a transformers model does not take {passed}: they follow "
                        f"the model's config")
    options = conversion_options(variant, preserve_function, **overrides)
    summary = ConversionSummary(variant, options)
    arguments = {k: options[k] for k in CONTAINER_ARGUMENTS if k in options}
    sigma = options.get("sigma_reparam")
    scores = {k: v for k, v in options.items() if k in MITIGATIONS and k != "sigma_reparam"}
    source = model.config._attn_implementation
    converted = []
    for name, module in attention_modules(model):
        layers = projections(model, name, module)
        reason = _selection_reason(name, include, exclude) or (
            "already converted" if mitigations_of(module) is not None else None) or (
            _sigma_reason(layers) if sigma else None)
        if reason is None:
            try:
                container = HFAttentionMitigations(scores, _config(module, layers), module,
                                                   source_implementation=source, **arguments)
            except (TypeError, ValueError) as error:
                reason = f"variant {variant!r} cannot be built for this module: {error}"
        if reason is not None:
            summary.skipped[name] = reason
            continue
        converted.append((name, module, container, layers))
    for name, module, container, layers in converted:
        if sigma:
            container.conv1d_projections = frozenset(
                role for role, (owner, attribute) in layers.items()
                if isinstance(getattr(owner, attribute), Conv1D))
            for owner, attribute in layers.values():
                setattr(owner, attribute, SigmaReparamLinear.from_linear(
                    _as_linear(getattr(owner, attribute)), preserve=sigma == "preserve"))
        setattr(module, NAME, container)
        container.input_hooks = watch_input(module)
        summary.swapped.append(name)
        if changes := [option for option, m in container.mitigations.items()
                       if not m.keeps_function(module)] + (["sigma_reparam"] if sigma is True else []):
            summary.changes_function[name] = changes
    if converted:
        model.set_attn_implementation(NAME)
        if model.config._attn_implementation != NAME:
            raise ValueError(f"{type(model).__name__} did not switch to attn_implementation="
                             f"{NAME!r} (it does not dispatch through AttentionInterface)")
    elif if_nothing != "ignore":
        message = _nothing_swapped(model, summary)
        if if_nothing == "raise":
            raise ValueError(message)
        warnings.warn(message, stacklevel=3)
    return model, summary


@torch.no_grad()
def revert(model: PreTrainedModel, allow_lossy: bool = False) -> tuple[PreTrainedModel, RevertSummary]:
    """Undo :func:`convert`, in place: fold each SigmaReparamLinear into an nn.Linear (W_hat, as
    eval mode computes it), remove the containers and restore the attention implementation the
    model had. The state dict then loads strictly into a stock model. Mitigations that change
    the function (all but a sink logit still at its preserving value) would be dropped: raises
    ValueError naming them unless ``allow_lossy``."""
    modules = [(name, module, c) for name, module in attention_modules(model)
               if (c := mitigations_of(module)) is not None]
    if not modules:
        raise ValueError(f"revert found no attention module of {type(model).__name__} converted "
                         f"by robust_attn.convert (none carries .{NAME})")
    summary = RevertSummary(dropped={name: lossy for name, module, c in modules
                                     if (lossy := [o for o, m in c.mitigations.items()
                                                   if not m.keeps_function(module)])})
    if summary.dropped and not allow_lossy:
        raise ValueError(f"revert would drop mitigations that the transformers model cannot "
                         f"express, changing the function: {summary.dropped}; pass "
                         f"allow_lossy=True to drop them anyway")
    for name, module, container in modules:
        conv1d = getattr(container, "conv1d_projections", frozenset())
        for role, (owner, attribute) in projections(model, name, module).items():
            if isinstance(layer := getattr(owner, attribute), SigmaReparamLinear):
                folded = layer.fold()
                setattr(owner, attribute, _as_conv1d(folded) if role in conv1d else folded)
        for handle in container.input_hooks:
            handle.remove()
        delattr(module, NAME)
        summary.reverted.append(name)
    model.set_attn_implementation(modules[0][2].source_implementation)
    return model, summary
