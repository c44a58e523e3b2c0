"""An opt-in guard that stops a model at the first non-finite activation, naming the module.

    with robust_attn.nonfinite_guard(model):          # or: guard = nonfinite_guard(model) ... guard.remove()
        loss = model(x).sum()                          # NonFiniteError at the first nan/inf
        loss.backward()                                # with backward=True: also gradients

It registers a forward pre-hook and a forward hook on every submodule: the pre-hook checks the
tensors a module receives (positional and keyword arguments, except arguments named ``*mask``:
additive masks hold -inf by design), the hook the tensors it returns. The first check that finds
a nan or an inf raises :class:`NonFiniteError` naming the module by its qualified name in
``model`` (e.g. ``blocks.3.attn``) and what was non-finite (input or output, how many values).
Non-finite values that appear between submodules, in a module's own code, are attributed to
that module: the innermost module running when a submodule received them. With
``backward=True`` each module output's gradient is checked as backward reaches it.

Off (outside the block, or after ``remove()``) no hook is left: it costs nothing. On, each
check is one float32 sum per tensor (nan and inf propagate through a sum, so a finite sum proves
there are none) and a device synchronisation: a debugging tool, not for production runs.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from .probe import count_nonfinite


class NonFiniteError(FloatingPointError):
    """A non-finite activation. ``module``: the qualified name of the module that produced it
    (or received it, for the model's own inputs); ``where``: 'input', 'output' or 'gradient';
    ``count``: non-finite values in the tensor."""

    def __init__(self, message: str, module: str, where: str, count: int):
        super().__init__(message)
        self.module, self.where, self.count = module, where, count


def _tensors(value, prefix: str):
    """(label, tensor) for every floating tensor in nested tuples, lists and dicts."""
    if isinstance(value, Tensor):
        if value.is_floating_point() or value.is_complex():
            yield prefix, value
    elif isinstance(value, (tuple, list)):
        for index, item in enumerate(value):
            yield from _tensors(item, f"{prefix}[{index}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors(item, f"{prefix}[{key!r}]")


class NonFiniteGuard:
    """The hooks of :func:`nonfinite_guard`; a context manager, or call :meth:`remove`."""

    def __init__(self, model: nn.Module, backward: bool = False):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.backward = backward
        self._running: list[str] = []  # modules whose forward is running, innermost last
        self._handles: list[RemovableHandle] = []
        root = type(model).__name__
        for name, module in model.named_modules():
            label = name or f"<{root}>"
            self._handles.append(module.register_forward_pre_hook(self._check_inputs(label, module),
                                                                  with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._check_outputs(label)))

    def _raise(self, module: str, where: str, label: str, tensor: Tensor, count: int,
               detail: str = "") -> None:
        self._running.clear()
        kind = "nan" if torch.isnan(tensor).any() else "inf"
        raise NonFiniteError(f"non-finite {where} of module {module!r}{detail}: {count} of "
                             f"{tensor.numel()} values in {label} are not finite (first kind: "
                             f"{kind})", module, where, count)

    def _check_inputs(self, name: str, module: nn.Module):
        try:
            signature = inspect.signature(module.forward)
        except (TypeError, ValueError):
            signature = None

        def hook(module, args, kwargs):
            arguments = _named_arguments(signature, args, kwargs)
            for argument, value in arguments.items():
                if argument.endswith("mask"):
                    continue
                for label, tensor in _tensors(value, argument):
                    count = int(count_nonfinite(tensor))
                    if count:
                        stack = self._running
                        if stack:  # produced by the running parent's own code
                            self._raise(stack[-1], "output", label, tensor, count,
                                        f" (inside it, before its submodule {name!r})")
                        self._raise(name, "input", label, tensor, count)
            self._running.append(name)
        return hook

    def _check_outputs(self, name: str):
        def hook(module, args, output):
            stack = self._running
            if stack and stack[-1] == name:
                stack.pop()
            for label, tensor in _tensors(output, "output"):
                count = int(count_nonfinite(tensor))
                if count:
                    self._raise(name, "output", label, tensor, count)
                if self.backward and tensor.requires_grad:
                    tensor.register_hook(self._check_gradient(name, label))
        return hook

    def _check_gradient(self, name: str, label: str):
        def hook(grad: Tensor) -> None:
            count = int(count_nonfinite(grad))
            if count:
                self._raise(name, "gradient", f"the gradient of {label}", grad, count)
        return hook

    def remove(self) -> None:
        """Remove every hook (gradient hooks already registered on live tensors stay until those
        tensors are freed)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._running.clear()

    def __enter__(self) -> NonFiniteGuard:
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()


def _named_arguments(signature, args: tuple, kwargs: dict) -> dict:
    """The call's arguments by parameter name (positional ones as args[i] if unnamed)."""
    if signature is not None:
        try:
            return dict(signature.bind(*args, **kwargs).arguments)
        except TypeError:
            pass
    return {**{f"args[{index}]": value for index, value in enumerate(args)}, **kwargs}


def nonfinite_guard(model: nn.Module, backward: bool = False) -> NonFiniteGuard:
    """Hooks on every submodule of ``model`` that raise :class:`NonFiniteError` at the first
    non-finite activation (module docstring); use as a context manager or call ``.remove()``."""
    return NonFiniteGuard(model, backward)
