"""Every workaround over torch internals and private APIs that the library uses, in one place.

Each shim says which torch behaviour it works around and since which torch version:
"torch 2.14" for each, the installed version (2.14.1), as none was checked against an
older release. ``tests/test_compat.py`` pins each behaviour, so a torch release that
changes one fails there, not somewhere downstream.

Nothing here imports ``torch._dynamo`` (about 0.9 s, with inductor, sympy and
torch.export behind it) or ``torch.distributed.tensor`` (about 0.35 s) at import:
``import robust_attn`` stays cheap, and each shim imports what it needs when it is
first used, which is either under ``torch.compile`` (dynamo is loaded then) or on a
path that compiles anyway (FlexAttention).
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor
from torch.utils._python_dispatch import _disable_current_modes

_F = TypeVar("_F", bound=Callable[..., Any])


def assume_constant_result(fn: _F) -> _F:
    """``torch.compiler.assume_constant_result`` without importing dynamo.

    dynamo calls a function so marked eagerly with its constant arguments while it
    traces, and puts the result into the graph as a constant. The public decorator
    imports ``torch._dynamo`` to set one attribute, ``fn._dynamo_marked_constant =
    True`` (torch/_dynamo/decorators.py; torch 2.14), which dynamo reads when it
    meets the function (torch/_dynamo/variables/functions.py); setting the attribute
    here keeps that import off ``import robust_attn``."""
    fn._dynamo_marked_constant = True  # type: ignore[attr-defined]
    return fn


def graph_warning(qualname: str, category: type[Warning]) -> Callable[[str], None]:
    """An op ``qualname`` (a ``torch.library`` custom op of one str) that warns ``message`` with
    ``category`` each time it runs: in code dynamo traces, the warning of eager mode.

    dynamo cannot trace ``warnings.warn`` (a graph break, an error under ``fullgraph=True``).
    Its ``reorderable_logging_functions`` replay a call after the graph, but torch 2.14 drops
    the calls made in a function dynamo inlines (any function a module's forward calls). A
    custom op is put into the graph and runs at every call; a graph node whose result no one
    uses is removed (AOTAutograd, inductor) unless ``torch.fx.node.has_side_effect`` marks
    its op (torch 2.14; an fx API not covered by torch's backward-compatibility promise)."""
    import torch.fx.node

    def warn(message: str) -> None:
        warnings.warn(message, category, stacklevel=2)

    op = torch.library.custom_op(qualname, mutates_args=())(warn)
    op.register_fake(lambda message: None)
    namespace, name = qualname.split("::")
    overload = getattr(getattr(torch.ops, namespace), name).default
    torch.fx.node.has_side_effect(overload)
    return overload


def dynamo_config_patch(**changes: Any):
    """``torch._dynamo.config.patch(**changes)``: a context manager setting dynamo options.

    Private API (torch 2.14); FlexAttention's calls use it to set
    ``recompile_limit`` and ``specialize_float`` for their own frames only."""
    import torch._dynamo.config

    return torch._dynamo.config.patch(**changes)


def recompile_limit_error() -> type[Exception]:
    """The exception dynamo raises at its recompile limit under ``fullgraph=True``:
    ``torch._dynamo.exc.FailOnRecompileLimitHit`` (torch/_dynamo/convert_frame.py; torch 2.14;
    without fullgraph dynamo falls back to running the frame uncompiled)."""
    import torch._dynamo.exc

    return torch._dynamo.exc.FailOnRecompileLimitHit


def outside_tracing_modes():
    """A context manager that turns off the active dispatch modes (fake tensors, make_fx's
    proxies): ``torch.utils._python_dispatch._disable_current_modes`` (private; torch 2.14).
    Code run inside computes on real tensors even while non-strict ``torch.export`` traces
    its caller, so a layout of Python ints can be built from data there."""
    return _disable_current_modes()


def assert_async(condition: Tensor, message: str) -> None:
    """RuntimeError with ``message`` when the bool tensor ``condition`` is False, without a host
    synchronisation: ``torch._assert_async`` (private; torch 2.14; on CUDA the error
    surfaces at the next synchronisation). ``torch.compile(fullgraph=True)`` traces it into the
    graph, where an ``if not condition: raise`` would need the value on the host (a graph
    break)."""
    torch._assert_async(condition, message)


def _dtensor_class() -> type | None:
    """DTensor, if ``torch.distributed.tensor`` is loaded; None otherwise: no DTensor can exist
    before that package is imported (the class is defined inside it), so the check never
    imports it (about 0.35 s)."""
    module = sys.modules.get("torch.distributed.tensor")
    return None if module is None else module.DTensor


def full_tensor(tensor: Tensor) -> Tensor:
    """``tensor`` whole: a DTensor (a parameter FSDP2 sharded, outside its forward) all-gathered
    (``DTensor.full_tensor()``, a collective); any other tensor as it is."""
    dtensor = _dtensor_class()
    return tensor.full_tensor() if dtensor is not None and isinstance(tensor, dtensor) else tensor


def local_tensor(tensor: Tensor) -> Tensor:
    """The part of ``tensor`` this rank holds: ``DTensor.to_local()``, or the tensor itself."""
    dtensor = _dtensor_class()
    return tensor.to_local() if dtensor is not None and isinstance(tensor, dtensor) else tensor


def opaque_op(qualname: str, fake: Callable[..., Any]) -> Callable[[_F], _F]:
    """Decorator: ``fn`` as a ``torch.library.custom_op`` named ``qualname`` (no mutated
    arguments) with ``fake`` as its shape function, so that dynamo puts one call to it into
    the graph instead of tracing its body.

    Works around dynamo tracing through ``functools.lru_cache``: it ignores the cache and
    traces the wrapped function (torch 2.14), so a cached lookup inside a compiled graph would
    recompute, at every call of the graph, what the cache holds. A custom op's body runs
    at run time, outside dynamo."""
    def decorate(fn: _F) -> _F:
        op = torch.library.custom_op(qualname, mutates_args=())(fn)
        op.register_fake(fake)
        return op  # type: ignore[return-value]

    return decorate


def flex_lse_request() -> Any:
    """FlexAttention's request for each row's log-sum-exp: ``AuxRequest(lse=True)`` (torch >= 2.8;
    the older ``return_lse=True`` flag is deprecated). Imported here, on first use, so that
    ``import robust_attn`` does not load FlexAttention."""
    try:
        from torch.nn.attention.flex_attention import AuxRequest
    except ImportError:
        raise RuntimeError("this torch's FlexAttention has no AuxRequest (torch >= 2.8 has it): "
                           "ask for the log-sum-exp on kernel='chunked' or 'eager'") from None
    return AuxRequest(lse=True)


def refuse_torchscript(message: str) -> Callable[[Any], Any]:
    """A ``__prepare_scriptable__`` method that raises ``RuntimeError(message)``.

    ``torch.jit.script`` calls ``obj.__prepare_scriptable__()`` on the object it is given
    and on every submodule before it compiles anything (torch/jit/_script.py,
    ``call_prepare_scriptable_func``; undocumented, torch 2.14): a class that defines it refuses
    TorchScript with its own message, in place of the compiler's error about whatever line it
    first cannot parse, wherever in a model the module sits."""
    def __prepare_scriptable__(self: Any) -> Any:
        raise RuntimeError(message)

    return __prepare_scriptable__


def cpu_flash_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None,
                        scale: float) -> tuple[Tensor, Tensor]:
    """SDPA's fused CPU kernel with each row's log-sum-exp: ``(out, lse)``, lse (..., Nq) in the
    accumulation dtype (float32; float64 for float64 inputs), which
    ``F.scaled_dot_product_attention`` does not return. The private op
    ``aten._scaled_dot_product_flash_attention_for_cpu`` (torch 2.14) returns both; its mask must
    be additive in q's dtype (a bool mask is refused); a row whose keys are all masked gives
    out = 0 and lse = 0, not -inf. No dropout (the callers pass none)."""
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, False, attn_mask=mask, scale=scale)
    return out, lse


def cpu_flash_attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                                 lse: Tensor, mask: Tensor | None,
                                 scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients (dq, dk, dv) of :func:`cpu_flash_attention` from the private op
    ``aten._scaled_dot_product_flash_attention_for_cpu_backward`` (torch 2.14). It recomputes the
    weights as exp(s - lse) and takes D_i = sum_d grad_out_id out_id (FlashAttention-2's
    backward, Dao 2023, Algorithm 2), so with the lse and out of a larger softmax that these keys
    are part of, it gives this part's share of that softmax's gradients."""
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        grad_out, q, k, v, out, lse, 0.0, False, attn_mask=mask, scale=scale)
    return dq, dk, dv
