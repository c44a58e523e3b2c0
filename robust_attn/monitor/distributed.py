"""Reduction of one sampled step's readings across ranks, in two collectives.

Each reading has a kind: "mean" (summed, then divided by the world size),
"max" or "min" (the worst case over ranks: the largest logit, the lowest
entropy). All "mean" readings travel in one SUM all_reduce and all "max" and
"min" readings (the latter negated) in one MAX all_reduce. Without an
initialised default process group the readings come back unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

import torch
import torch.distributed as dist
from torch import Tensor


def pack(tensors: list[Tensor], device: torch.device) -> Tensor:
    """The tensors flattened into one float32 vector on ``device``."""
    if not tensors:
        return torch.zeros(0, device=device)
    return torch.cat([t.detach().reshape(-1).float().to(device) for t in tensors])


def unpack(flat: Tensor, like: list[Tensor]) -> list[Tensor]:
    """Inverse of :func:`pack`: views of ``flat`` with the shapes of ``like``."""
    sizes = [t.numel() for t in like]
    return [part.view(t.shape) for part, t in zip(flat.split(sizes), like, strict=True)]


def ranks_to_reduce() -> bool:
    """True when torch.distributed is available and its default group is initialised."""
    return dist.is_available() and dist.is_initialized()


def all_reduce(readings: dict[Hashable, Tensor], kind: Callable[[Hashable], str],
               device: torch.device) -> dict[Hashable, Tensor]:
    """Every reading reduced over the ranks by its kind ("mean", "max" or "min")."""
    if not ranks_to_reduce():
        return readings
    groups = {name: [key for key in readings if kind(key) == name]
              for name in ("mean", "max", "min")}
    unknown = set(readings) - {key for keys in groups.values() for key in keys}
    if unknown:
        raise ValueError(f"readings {sorted(map(str, unknown))} have no reduction kind")
    means = pack([readings[key] for key in groups["mean"]], device)
    dist.all_reduce(means, op=dist.ReduceOp.SUM)
    means /= dist.get_world_size()
    extremes = pack([readings[key] for key in groups["max"]] +
                    [-readings[key] for key in groups["min"]], device)
    dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
    largest = unpack(extremes, [readings[key] for key in groups["max"] + groups["min"]])
    means = unpack(means, [readings[key] for key in groups["mean"]])
    reduced = dict(zip(groups["mean"], means, strict=True))
    reduced.update(zip(groups["max"], largest[:len(groups["max"])], strict=True))
    reduced.update({key: -value for key, value in
                    zip(groups["min"], largest[len(groups["max"]):], strict=True)})
    return reduced
