"""Per-call records of every attention module of a model, on request.

    with robust_attn.recording(model) as records:
        model(x)
    [(name, record.attended.kernel) for name, record in records]

Each RobustAttention in the model gets an observer
(:meth:`~robust_attn.RobustAttention.register_observer`) for the block only; the
records (:class:`~robust_attn.call.AttentionRecord`) arrive in call order, named
as ``model.named_modules()`` names the module. Nothing global is set and nothing
is left behind: the observers are removed when the block ends.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from torch import nn

from ..call import AttentionRecord
from .monitor.maps import attention_modules


@contextmanager
def recording(model: nn.Module, *, health: bool = False, maps: bool = False,
              lse: bool = False) -> Iterator[list[tuple[str, AttentionRecord]]]:
    """Within the block, every forward of an attention module of ``model`` appends
    ``(name, record)``; ``health``, ``maps``, ``lse``: what the records carry
    (:meth:`~robust_attn.RobustAttention.register_observer`)."""
    records: list[tuple[str, AttentionRecord]] = []
    with ExitStack() as observers:
        for name, module in attention_modules(model).items():
            handle = module.register_observer(
                lambda _, record, name=name: records.append((name, record)),
                health=health, maps=maps, lse=lse)
            observers.callback(handle.remove)
        yield records
