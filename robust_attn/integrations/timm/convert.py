"""Convert the attention modules of a timm model to a robust_attn variant, in place, and back.

    model, summary = robust_attn.convert(model, "sigma_reparam", include="blocks.1[01].*")
    ...fine-tune...
    model, _ = robust_attn.revert(model)            # plain timm modules, sigma folded in
    stock = timm.create_model(name); stock.load_state_dict(model.state_dict())  # strict

Supported classes and their weight mapping: :mod:`.timm_adapters`; torch's own
``nn.MultiheadAttention`` (self-attention) becomes a
:class:`~robust_attn.integrations.torch_mha.MultiheadRobustAttention` with MHA's forward
(:mod:`robust_attn.integrations.torch_mha`). A module
looks like attention when it is an ``nn.MultiheadAttention``, its class name
contains "Attention" or "Attn" (any case), or it has a child named ``qkv``,
``qk``, ``q`` or ``q_proj`` (timm's GPSA, MHSA, XCA); convert considers the
innermost such modules (a ``ClassAttentionBlock`` is searched for the
``ClassAttn`` inside it). Every one it does not swap is left alone and reported
in the summary with the reason (for an unsupported class, naming the class), as
is every module that include/exclude leave out or whose variant options cannot
be built for it (conflicts). A conversion that swaps nothing raises ValueError
(or warns, or passes, as ``if_nothing`` says), listing those reasons.

Function preservation (``preserve_function=True``, the default): options with
a function-preserving initialisation use it, so that the converted model
computes what the timm model computed, within float32 rounding:

  * ``sigma_reparam=True`` -> "preserve": gamma = sigma(W), so W_hat = W
    (Zhai et al. 2023's gamma = 1 would rescale every weight to unit spectral norm);
  * ``sink_logit=True`` -> "preserve": the sink logit starts at -40, so
    exp(-40) ~ 4e-18 is below float32 resolution next to the row's mass.

``spectral_qk`` only adds a loss on the loaded weights, timm's RoPE becomes the
``rope`` q/k transform, timm's own gate (``gated=True``) the ``gated``
mitigation and timm's ``DiffAttention`` the ``differential`` mitigation at its
layer (timm's depth + 1, whatever the preset says): these keep the function.

The ``differential`` preset on a plain timm ``Attention`` gives every module
``differential=True``, layer 1 (lambda_init 0.2): convert does not know block
indices. For the paper's depth schedule, convert block by block with the layer
as an override, ``convert(model, "differential", include=f"blocks.{i}.attn",
differential=i + 1)``. A head width that is odd cannot split into two halves:
the module is skipped, the reason naming ``differential``. Every other enabled
mitigation (outlier removal, an added gate, soft-capping, sigmoid attention,
scalable-softmax, ALiBi, sink tokens, an added qk_norm, sparsity patterns)
changes the function at conversion: the summary
lists them per module, and fine-tuning is expected.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from ...attention import RobustAttention
from ...mitigations import MITIGATIONS
from ...presets import preset_options
from .. import torch_mha
from .adapters import revert_reason, timm_classes, to_robust, to_timm, unexpressible, unsupported_reason
from .fx import register_fx_leaf

# RobustAttention arguments convert passes on; the others (dim, qkv_bias, ...) follow each module.
PASSED_ARGUMENTS = frozenset({"qk_norm", "attn_drop", "proj_drop", "device", "dtype", "kernel",
                              "probe", "probe_queries", "probe_spectral"})
# Direct children that make a module look like attention: a (fused) query projection.
QUERY_CHILDREN = frozenset({"qkv", "qk", "q", "q_proj"})

Patterns = str | Sequence[str] | None


@dataclass
class ConversionSummary:
    """What :func:`convert` did.

    swapped: names of the modules replaced by RobustAttention.
    skipped: name -> reason, for attention-like modules left as they were.
    changes_function: name -> the enabled options that change that swapped
        module's function at conversion (absent: the module computes as before);
        a sparsity pattern is listed although it changes nothing on sequences it
        covers whole (e.g. 64-token blocks on a 50-token ViT).
    options: the options every swapped module was built with.
    """

    variant: str
    options: dict[str, Any]
    swapped: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    changes_function: dict[str, list[str]] = field(default_factory=dict)

    @property
    def preserves_function(self) -> bool:
        """True when no swapped module changes the model's function at conversion."""
        return not self.changes_function

    def __str__(self) -> str:
        lines = [f"convert to {self.variant!r} with {self.options}: {len(self.swapped)} swapped, "
                 f"{len(self.skipped)} skipped"]
        lines += [f"  swapped  {name}" + (f"  (changes function: {', '.join(changes)})"
                                           if (changes := self.changes_function.get(name)) else "")
                  for name in self.swapped]
        lines += [f"  skipped  {name}: {reason}" for name, reason in self.skipped.items()]
        return "\n".join(lines)


@dataclass
class RevertSummary:
    """What :func:`revert` did: reverted module names, and name -> mitigations dropped."""

    reverted: list[str] = field(default_factory=list)
    dropped: dict[str, list[str]] = field(default_factory=dict)


def _as_list(patterns: Patterns) -> list[str]:
    return [patterns] if isinstance(patterns, str) else list(patterns or ())


def _selection_reason(name: str, include: Patterns, exclude: Patterns) -> str | None:
    """Why include/exclude leave ``name`` out (fnmatch patterns on module names), or None."""
    includes = _as_list(include)
    if include is not None and not any(fnmatchcase(name, p) for p in includes):
        return f"not matched by include={includes}"
    matched = [p for p in _as_list(exclude) if fnmatchcase(name, p)]
    return f"matched by exclude pattern {matched[0]!r}" if matched else None


def _looks_like_attention(module: nn.Module) -> bool:
    name = type(module).__name__.lower()
    return (isinstance(module, nn.MultiheadAttention) or "attention" in name or "attn" in name
            or not QUERY_CHILDREN.isdisjoint(dict(module.named_children())))


# Converted modules: convert does not enter them, revert turns them back.
CONVERTED = (RobustAttention, torch_mha.MultiheadRobustAttention)


def _attention_modules(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """(name, module) of the innermost attention-like modules; a converted one is not entered."""
    found = []
    if not isinstance(module, CONVERTED):
        for name, child in module.named_children():
            found += _attention_modules(child, f"{prefix}.{name}" if prefix else name)
    return found or ([(prefix, module)] if _looks_like_attention(module) else [])


def _class_reason(model: nn.Module, name: str, module: nn.Module) -> str | None:
    """Why ``module`` (``model``'s submodule ``name``) keeps its class, or None."""
    if isinstance(module, CONVERTED):
        return "already a RobustAttention"
    if torch_mha.is_source(module):
        parent_name, _, attribute = name.rpartition(".")
        return torch_mha.unsupported_reason(module, model.get_submodule(parent_name) if name
                                            else None, attribute)
    if type(module) not in timm_classes().values():
        return f"{type(module).__name__} is not a supported timm attention class"
    return unsupported_reason(module)


def _replace(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """``model`` with its submodule ``name`` replaced by ``new`` ("" replaces the model itself)."""
    if not name:
        return new
    parent_name, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent_name), attribute, new)
    return model


def conversion_options(variant: str, preserve_function: bool = True,
                       **overrides: Any) -> dict[str, Any]:
    """The options :func:`convert` builds modules with: the preset's, ``overrides``, then the
    function-preserving values when ``preserve_function``."""
    options = {**preset_options(variant), **overrides}
    if preserve_function:  # each mitigation's own function-preserving values
        options = {name: _preserving(name, value) for name, value in options.items()}
    return options


def _preserving(name: str, value: Any) -> Any:
    """The function-preserving value of option ``name`` (Mitigation.preserving_values), or
    ``value`` itself."""
    if name not in MITIGATIONS or not isinstance(value, bool):
        return value
    return MITIGATIONS[name].preserving_values.get(value, value)


def function_changes(source: nn.Module, robust: RobustAttention) -> list[str]:
    """The options of ``robust`` that make it compute otherwise than ``source`` did."""
    return [name for name, m in robust.mitigations.items() if not m.keeps_function(source)]


def _transformers_integration(model: nn.Module):
    """robust_attn.integrations.hf when ``model`` is a transformers ``PreTrainedModel`` (convert
    and revert delegate to it), else None. transformers is imported by then if it is one."""
    transformers = sys.modules.get("transformers")
    if transformers is None or not isinstance(model, transformers.PreTrainedModel):
        return None
    from .. import hf
    return hf


def _check_arguments(overrides: dict[str, Any], if_nothing: str) -> None:
    """Raise for an option convert does not take (TypeError) or a bad ``if_nothing``."""
    if unknown := sorted(set(overrides) - set(MITIGATIONS) - PASSED_ARGUMENTS):
        raise TypeError(f"convert got option(s) {unknown} it does not take; it takes the "
                        f"mitigation options {sorted(MITIGATIONS)} and the RobustAttention "
                        f"arguments {sorted(PASSED_ARGUMENTS)} (the others follow each module)")
    if if_nothing not in ("raise", "warn", "ignore"):
        raise ValueError(f"if_nothing={if_nothing!r}: expected 'raise', 'warn' or 'ignore'")


def _nothing_swapped(model: nn.Module, summary: ConversionSummary) -> str:
    """Why :func:`convert` swapped no module of (the unchanged) ``model``: each module found,
    its class and why it was skipped."""
    found = "".join(f"\n  {name or '(the model itself)'} ({type(model.get_submodule(name)).__name__})"
                    f": {reason}" for name, reason in summary.skipped.items())
    return (f"convert(..., {summary.variant!r}) swapped no module of {type(model).__name__}: "
            + (f"it skipped every attention-like module:{found}" if found else
               "it found no attention-like module (nn.MultiheadAttention, a class name with "
               f"'Attention' or 'Attn', or a child named one of {sorted(QUERY_CHILDREN)})"))


@torch.no_grad()
def convert(model: nn.Module, variant: str, include: Patterns = None, exclude: Patterns = None,
            preserve_function: bool = True,
            if_nothing: Literal["raise", "warn", "ignore"] = "raise", **overrides: Any
            ) -> tuple[nn.Module, ConversionSummary]:
    """Swap every supported timm attention module (and nn.MultiheadAttention used as
    self-attention) of ``model`` for ``variant``, in place.

    A transformers ``PreTrainedModel`` is converted by robust_attn.integrations.hf.convert
    instead (the HF modules stay; the attention function and sigma_reparam change).

    Args:
        model: a timm model (or any module containing timm attention modules).
        variant: a preset name (:func:`robust_attn.list_variants`).
        include, exclude: fnmatch patterns (or lists of them) on module names,
            e.g. ``include="blocks.1[01].attn"``: only matching modules are swapped
            (include None: all), minus those matching an exclude pattern.
        preserve_function: use function-preserving initialisations where the
            variant has one (module docstring).
        if_nothing: what happens when no module is swapped: "raise" a ValueError
            naming every attention-like module found and why it was skipped (or
            that none was found), "warn" the same as a UserWarning and return, or
            "ignore" it and return.
        **overrides: options on top of the preset's: mitigation options (e.g.
            ``softcap=30.0``) and the RobustAttention arguments in
            :data:`PASSED_ARGUMENTS` (e.g. ``probe=True``).
    Returns:
        ``model`` (the new module when ``model`` itself is the attention) and a
        :class:`ConversionSummary`. Modules that cannot be converted are left
        as they were and listed in ``summary.skipped``.
    Raises:
        TypeError: an override that is neither a mitigation option nor in
            :data:`PASSED_ARGUMENTS`, before any module is swapped.
        ValueError: no module was swapped (``if_nothing="raise"``).
    """
    if hf := _transformers_integration(model):
        return hf.convert(model, variant, include, exclude, preserve_function, if_nothing,
                          **overrides)
    _check_arguments(overrides, if_nothing)
    options = conversion_options(variant, preserve_function, **overrides)
    summary = ConversionSummary(variant, options)
    register_fx_leaf()
    for name, module in _attention_modules(model):
        reason = _selection_reason(name, include, exclude) or _class_reason(model, name, module)
        if reason is None:
            try:
                robust = (torch_mha.to_robust if torch_mha.is_source(module) else to_robust)(
                    module, options)
            except (TypeError, ValueError) as error:
                reason = f"variant {variant!r} cannot be built for this module: {error}"
        if reason is not None:
            summary.skipped[name] = reason
            continue
        model = _replace(model, name, robust)
        summary.swapped.append(name)
        inner = robust.attention if isinstance(robust, torch_mha.MultiheadRobustAttention) \
            else robust
        if changes := function_changes(module, inner):
            summary.changes_function[name] = changes
    torch_mha.keep_off_nested_tensors(model)
    if not summary.swapped and if_nothing != "ignore":
        message = _nothing_swapped(model, summary)
        if if_nothing == "raise":
            raise ValueError(message)
        warnings.warn(message, stacklevel=3)  # convert's caller (under torch.no_grad's wrapper)
    return model, summary


class _WayBack(NamedTuple):
    """An integration's revert: why a module cannot go back at all, the mitigations going back
    would drop, and the original module."""

    reason: Any
    dropped: Any
    build: Any


def _way_back(module: nn.Module) -> _WayBack:
    """The way back of ``module``: torch's MultiheadAttention adapter's, else timm's."""
    if isinstance(module, torch_mha.MultiheadRobustAttention):
        return _WayBack(torch_mha.revert_reason, torch_mha.unexpressible, torch_mha.to_torch)
    return _WayBack(revert_reason, unexpressible, to_timm)


@torch.no_grad()
def revert(model: nn.Module, allow_lossy: bool = False) -> tuple[nn.Module, RevertSummary]:
    """Replace every RobustAttention of ``model`` by the plain timm module it stands for, in place.
    (A transformers ``PreTrainedModel``: robust_attn.integrations.hf.revert.)

    sigma_reparam is folded into the weights (W_hat = gamma W / sigma(W), as eval mode
    computes it); modules converted from AttentionRope or EvaAttention go back to
    those classes with their original projection layout; every other
    RobustAttention (e.g. built by ``attn_layer=robust_attn.layer(...)``) becomes a
    ``timm.layers.Attention``. An added qk_norm stays (timm's ``qk_norm=True``).
    The result loads into a stock timm model (with ``strict=True``) built with the
    same arguments.

    An elementwise gate without scale_norm becomes timm's ``gated=True``. Mitigations
    timm cannot express (sinks, headwise gates, outlier removal, soft-capping,
    sigmoid attention, sparsity) would be dropped, changing the function: revert
    raises ValueError naming them unless ``allow_lossy=True``.

    A module converted from timm's ``DiffAttention`` goes back to one (``depth`` = its
    ``differential`` layer - 1); an added qk_norm or gate is dropped there (lossy).

    A converted ``nn.MultiheadAttention`` goes back to one (same configuration, sigma_reparam
    folded); it holds neither qk_norm nor a gate (:func:`torch_mha.unexpressible`).
    """
    if hf := _transformers_integration(model):
        return hf.revert(model, allow_lossy)
    modules = [(name, module, _way_back(module)) for name, module in _attention_modules(model)
               if isinstance(module, CONVERTED)]
    if refused := {name: reason for name, m, way in modules if (reason := way.reason(m))}:
        raise ValueError(f"revert cannot build the original modules of {refused}")
    summary = RevertSummary(dropped={name: lossy for name, m, way in modules
                                     if (lossy := way.dropped(m))})
    if summary.dropped and not allow_lossy:
        raise ValueError(f"revert would drop mitigations that the original attention class "
                         f"cannot express, changing the function: {summary.dropped}; pass "
                         f"allow_lossy=True to drop them anyway")
    for name, module, way in modules:
        model = _replace(model, name, way.build(module))
        summary.reverted.append(name)
    return model, summary
