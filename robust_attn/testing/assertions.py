"""Assertions that a model, or a measured stack, has not collapsed: for users' own tests.

Entropy collapse (Zhai et al. 2023, "Stabilizing Transformer Training by
Preventing Attention Entropy Collapse"): some layer's attention freezes onto
few keys. Measured per layer as the probe's mean normalised entropy (mean over
heads, sampled queries and batch items; 1 = uniform, 0 = one-hot, see
:func:`robust_attn.metrics.attention_entropy`)::

    H_layer = mean_{h, i} ( -sum_j a_hij log a_hij / log n_i )   >= bound  for every layer

Rank collapse (Dong, Cordonnier & Loukas 2021, "Attention is not all you
need: pure attention loses rank doubly exponentially with depth"): all output
tokens become alike. Measured on the output tokens X (N, C) with
:func:`robust_attn.metrics.token_residual`, averaged over the batch::

    res(X) = ||X - 1 mean(X)^T||_F / ||X||_F   >= bound

The default bounds are the thresholds of :mod:`robust_attn.studies.stack`'s verdicts,
so a model passes exactly when :attr:`robust_attn.studies.stack.StackHealth.verdict`
would call it healthy.

Each assertion takes either a :class:`~robust_attn.studies.stack.StackHealth` (from
:func:`robust_attn.studies.stack.measure_stack`) or a model and its inputs. A model is
an ``nn.Module``, or a bound method of one such as a timm model's
``forward_features`` (whose output is the (B, N, C) tokens). It is run once in
eval mode, without gradients, with the health probe on
(:func:`robust_attn.health_probe`); its training flags are restored afterwards::

    import torch
    from . import assert_no_entropy_collapse, assert_no_rank_collapse

    def test_my_vit_has_not_collapsed_at_init():
        model = timm.create_model("vit_small_patch16_224", attn_layer=MyRobustAttention)
        x = torch.randn(2, 3, 224, 224)
        assert_no_entropy_collapse(model, x)                       # every RobustAttention
        assert_no_rank_collapse(model.forward_features, x, bound=0.05)

A failure names the layer (the module's name in the model, or the stack layer)
with its measured value and the bound.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ..attention import RobustAttention
from ..claim import ENTROPY_COLLAPSE, RANK_COLLAPSE
from ..health.probe import AttentionHealth, health_probe
from ..metrics import token_residual
from ..studies.stack import StackHealth

Model = nn.Module | Callable[..., Any]
_LISTED = 6  # layers named in an entropy-collapse message


def _owner(model: Model) -> nn.Module:
    """The nn.Module that ``model`` is, or whose bound method it is."""
    owner = model if isinstance(model, nn.Module) else getattr(model, "__self__", None)
    if not isinstance(owner, nn.Module):
        raise TypeError(f"expected a StackHealth, an nn.Module or a bound method of one "
                        f"(e.g. model.forward_features), got {type(model).__name__}")
    return owner


@contextmanager
def _probed_inference(owner: nn.Module) -> Iterator[dict[str, RobustAttention]]:
    """Eval mode, no gradients, probe on; yields the RobustAttention modules by name."""
    layers = {name or type(owner).__name__: module for name, module in owner.named_modules()
              if isinstance(module, RobustAttention)}
    if not layers:
        raise ValueError(f"{type(owner).__name__} contains no RobustAttention module: "
                         f"nothing to check (see robust_attn.integrations to convert a timm model)")
    modes = {module: module.training for module in owner.modules()}
    owner.eval()
    for layer in layers.values():
        layer.health = None
    try:
        with torch.no_grad(), health_probe():
            yield layers
    finally:
        for module, training in modes.items():
            module.training = training


def _healths(layers: dict[str, RobustAttention]) -> dict[str, AttentionHealth]:
    missing = [name for name, layer in layers.items() if layer.health is None]
    if missing:
        raise ValueError(f"RobustAttention layer(s) {missing} recorded no health: they did not "
                         f"run, or were built with probe=False")
    return {name: layer.health for name, layer in layers.items()}


def _finite_or_lowest(value: float) -> float:
    return value if math.isfinite(value) else -math.inf


def _check_inputs(subject: StackHealth | Model, inputs: tuple) -> None:
    if isinstance(subject, StackHealth) and inputs:
        raise TypeError("a StackHealth is already measured: pass no inputs with it")
    if not isinstance(subject, StackHealth) and not inputs:
        raise TypeError("pass the model's inputs after the model, e.g. (model, x)")


def _layer_entropies(subject: StackHealth | Model, inputs: tuple) -> dict[str, float]:
    """Mean normalised entropy per layer, by layer name."""
    if isinstance(subject, StackHealth):
        return {f"layer {layer.layer}": layer.entropy for layer in subject.layers}
    with _probed_inference(_owner(subject)) as layers:
        subject(*inputs)
    return {name: _mean_entropy(health) for name, health in _healths(layers).items()}


def _mean_entropy(health: AttentionHealth) -> float:
    """Mean over heads; nan when q, k, v or the output held a non-finite value (the probe
    counts a nan logit as a blocked key, so such rows would read as healthy)."""
    if any(count.item() for count in health.nonfinite.values()):
        return math.nan
    return health.entropy.mean().item()


def assert_no_entropy_collapse(subject: StackHealth | Model, *inputs: Any,
                               bound: float = ENTROPY_COLLAPSE) -> None:
    """Every attention layer's mean normalised entropy is at least ``bound``.

    ``subject``: a StackHealth, or a model run on ``inputs`` (module docstring).
    Raises AssertionError naming the worst layer and the first few below the bound (a
    non-finite entropy counts as below).
    """
    _check_inputs(subject, inputs)
    entropies = _layer_entropies(subject, inputs)
    collapsed = {name: value for name, value in entropies.items() if not value >= bound}
    if collapsed:
        worst = min(collapsed, key=lambda name: _finite_or_lowest(collapsed[name]))
        listing = ", ".join(f"{name} ({value:.3g})" for name, value in
                            list(collapsed.items())[:_LISTED])
        more = ", ..." if len(collapsed) > _LISTED else ""
        raise AssertionError(
            f"entropy collapse: {worst} has normalised attention entropy "
            f"{collapsed[worst]:.3g} < bound {bound:g}; {len(collapsed)} of {len(entropies)} "
            f"layers below the bound: {listing}{more}")


def _residual_trace(subject: StackHealth | Model,
                    inputs: tuple) -> tuple[float, str, dict[str, float]]:
    """res(X) of the output tokens, what they are, and res(X) of each layer's output by name."""
    if isinstance(subject, StackHealth):
        trace = {f"layer {layer.layer}": layer.residual for layer in subject.layers}
        return subject.final_residual, f"the output tokens (layer {len(trace)})", trace
    trace: dict[str, float] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, out: Tensor) -> None:  # None: output unchanged
            trace.setdefault(name, _mean_residual(out))
        return hook

    with _probed_inference(_owner(subject)) as layers:
        hooks = [layer.register_forward_hook(record(name)) for name, layer in layers.items()]
        try:
            tokens = subject(*inputs)
        finally:
            for hook in hooks:
                hook.remove()
    if not isinstance(tokens, Tensor) or tokens.dim() < 2:
        raise TypeError(f"the model must return the (B, N, C) output tokens, got "
                        f"{type(tokens).__name__}; pass e.g. model.forward_features")
    name = getattr(subject, "__qualname__", type(subject).__name__)
    return _mean_residual(tokens), f"the output tokens of {name}", trace


def _mean_residual(tokens: Tensor) -> float:
    return token_residual(tokens.float()).mean().item()


def assert_no_rank_collapse(subject: StackHealth | Model, *inputs: Any,
                            bound: float = RANK_COLLAPSE) -> None:
    """res(X) of the output tokens, averaged over the batch, is at least ``bound``.

    ``subject``: a StackHealth (its last layer's output), or a model run on
    ``inputs`` whose output is the (B, N, C) tokens (module docstring). The
    message also names the first layer whose own output tokens fell below the bound. A
    non-finite res(X) counts as below.
    """
    _check_inputs(subject, inputs)
    final, output, trace = _residual_trace(subject, inputs)
    if final >= bound:
        return
    first = next((name for name, value in trace.items() if not value >= bound), None)
    where = f"; first layer whose output is below the bound: {first} ({trace[first]:.3g})" \
        if first is not None else ""
    raise AssertionError(f"rank collapse: res(X) of {output} is {final:.3g} < bound {bound:g}"
                         f"{where}")
