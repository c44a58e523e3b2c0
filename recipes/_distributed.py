"""Data-parallel training under torchrun, with the loss curve of one process on the same batch.

Run a recipe as ``torchrun --nproc_per_node=N recipes/<recipe>.py ...``: torchrun
sets RANK, WORLD_SIZE and LOCAL_RANK (and the rendezvous address); without them
the recipe runs in one process. Backend: nccl on CUDA, gloo on CPU.

Every rank draws the same global batch (same seed) and keeps its contiguous
slice; DistributedDataParallel averages the gradients of the slices' mean
losses, which is the gradient of the global batch's mean loss when the slices
have equal sizes (so the global batch must divide by the world size). Logged
losses are all-reduced means. So N processes follow the curve of one process
with the same global batch, up to float32 summation order.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class Distributed:
    """This process's place: rank, world size and device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def local_slice(self, global_batch: int) -> slice:
        """This rank's contiguous share of a global batch."""
        if global_batch % self.world_size:
            raise ValueError(f"global batch {global_batch} does not divide by the world size "
                             f"{self.world_size}")
        size = global_batch // self.world_size
        return slice(self.rank * size, (self.rank + 1) * size)

    def mean(self, value: Tensor) -> Tensor:
        """The mean of ``value`` over the ranks (itself in one process)."""
        if self.world_size == 1:
            return value
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value / self.world_size

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` in DistributedDataParallel when there are several ranks."""
        if self.world_size == 1:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto': this rank's GPU when CUDA is available, else the CPU; otherwise ``name``."""
    if name != "auto":
        return torch.device(name)
    return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")


def init_distributed(device: str = "auto") -> Distributed:
    """Join torchrun's process group when launched by it; a one-process Distributed otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device, local_rank)
    if world_size == 1:
        return Distributed(device=resolved)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), world_size, resolved)


def shutdown(distributed: Distributed) -> None:
    if distributed.world_size > 1:
        dist.destroy_process_group()
