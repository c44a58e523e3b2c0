"""Checks run on CPU ranks (gloo) in spawned processes, their results gathered: one helper for
every test file that needs real ranks (tests/test_distributed.py, tests/test_qk_clip.py).

    results = spawn_ranks(checks, world)   # [rank 0's {name: result}, rank 1's, ...]

``checks(rank, world, mesh)`` (a module-level function, so the spawn can pickle it) returns
{name: callable}; each rank calls each one and keeps its result, or its traceback as a string
when it raised (the test reading that check reports it). Each rank writes its results to a file,
then waits at a barrier for the others, so no rank tears the group down while another still
works. A rank that aborts in gloo's teardown after that barrier (seen once in CI: "terminate
called without an active exception") is not the code under test: the spawn's error is tolerated
when every rank wrote its results; a rank that died earlier left no file and the error stands.
"""

from __future__ import annotations

import os
import tempfile
import traceback
from collections.abc import Callable
from datetime import timedelta

import torch


def spawn_ranks(checks: Callable, world: int) -> list[dict]:
    """Run ``checks`` on ``world`` gloo ranks; each rank's {name: result or traceback}."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        files = [os.path.join(folder, f"rank{rank}.pt") for rank in range(world)]
        try:
            mp.spawn(_rank, args=(world, folder, checks), nprocs=world)
        except mp.ProcessExitedException:
            if not all(os.path.exists(path) for path in files):
                raise
        return [torch.load(path, weights_only=False) for path in files]


def _rank(rank: int, world: int, folder: str, checks: Callable) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank,
                            world_size=world, timeout=timedelta(seconds=120))
    mesh = init_device_mesh("cpu", (world,))
    results = {}
    for name, check in checks(rank, world, mesh).items():
        try:
            results[name] = check()
        except Exception:  # reported by the test that reads this check
            results[name] = traceback.format_exc()
    torch.save(results, os.path.join(folder, f"rank{rank}.pt"))
    dist.barrier()  # every rank's results are written before any tears down
    dist.destroy_process_group()
