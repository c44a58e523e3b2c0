"""Issue 16, finding 7: an overflow refusal on one DDP rank never desynchronises the group.

Two gloo ranks train a DDP module for STEPS steps through
:func:`robust_attn.health.distributed.forward_together`; at step REFUSED_STEP some ranks feed an x
whose logits overflow, so RobustAttention refuses it there (``RuntimeError("x: ...")``).
Every rank must skip that step (and only it), and the weights must end equal on both ranks and
equal to one process training on the global batch without that step. Another exception on
one rank makes every rank raise at once. A short process-group timeout (10 s) and a watchdog
(60 s for every pattern together) turn a hang into a failure instead of a stuck suite. One
spawn runs every scenario (a torch import per rank is the cost).
"""

import os
import tempfile
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from robust_attn import create
from robust_attn.health.distributed import StepFailedElsewhere, forward_together

WORLD, DIM, HEADS, TOKENS, ITEMS_PER_RANK, STEPS, REFUSED_STEP, LR = 2, 16, 2, 8, 2, 4, 1, 0.05
PRESETS = ("baseline", "sigma_reparam")
# which ranks refuse at REFUSED_STEP
PATTERNS = {"one rank refuses": (1,), "every rank refuses": (0, 1)}
GROUP_TIMEOUT_S, WATCHDOG_S = 10, 60


def _batch(step: int) -> torch.Tensor:
    """The global batch of a step, the same on every rank."""
    generator = torch.Generator().manual_seed(100 + step)
    return torch.randn(WORLD * ITEMS_PER_RANK, TOKENS, DIM, generator=generator)


def _train(rank: int, preset: str, refusing: tuple[int, ...]) -> dict:
    torch.manual_seed(0)
    module = create(preset, DIM, num_heads=HEADS)
    ddp = DistributedDataParallel(module, broadcast_buffers=True)
    optimizer = torch.optim.SGD(module.parameters(), lr=LR)
    skipped = []
    for step in range(STEPS):
        x = _batch(step).chunk(WORLD)[rank]
        if step == REFUSED_STEP and rank in refusing:
            x = x * 1e30  # finite, but the logits' bound overflows: refused
        loss = forward_together(lambda x=x: ddp(x).square().mean())
        if loss is None:
            skipped.append(step)
            continue
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return {"skipped": skipped, "state": {k: v.clone() for k, v in module.state_dict().items()}}


def _fail_on_rank_one(rank: int) -> str:
    module = DistributedDataParallel(create("baseline", DIM, num_heads=HEADS))

    def forward():
        if rank == 1:
            raise ValueError("a data-loading bug on rank 1")
        return module(_batch(0).chunk(WORLD)[rank]).sum()

    try:
        forward_together(forward)
    except StepFailedElsewhere:
        return "elsewhere"
    except ValueError:
        return "own"
    return "no error"


def _rank(rank: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=GROUP_TIMEOUT_S))
    results = {}
    scenarios = {(preset, name): (lambda p=preset, r=refusing: _train(rank, p, r))
                 for preset in PRESETS for name, refusing in PATTERNS.items()}
    scenarios["other error"] = lambda: _fail_on_rank_one(rank)
    for key, scenario in scenarios.items():
        try:
            results[key] = scenario()
        except Exception:  # reported by the test
            results[key] = traceback.format_exc()
            break  # the group may be out of step now: stop rather than hang
    torch.save(results, os.path.join(folder, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    with tempfile.TemporaryDirectory() as folder:
        context = mp.start_processes(_rank, args=(folder,), nprocs=WORLD, join=False,
                                     start_method="spawn")
        deadline = time.monotonic() + WATCHDOG_S
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                pytest.fail(f"the ranks did not finish within {WATCHDOG_S} s: the group hung")
        return [torch.load(os.path.join(folder, f"rank{rank}.pt"), weights_only=False)
                for rank in range(WORLD)]


def _reference(preset: str, refusing: tuple[int, ...]) -> dict:
    """One process on the global batch, without the refused step's update. The refused forward
    has run up to the refusal, though: in training mode sigma_reparam's qkv has taken its
    power-iteration step, and so has proj where the forward completed; DDP broadcasts rank 0's
    buffers at the next forward. So the reference runs rank 0's part of that forward."""
    torch.manual_seed(0)
    module = create(preset, DIM, num_heads=HEADS)
    optimizer = torch.optim.SGD(module.parameters(), lr=LR)
    for step in range(STEPS):
        if step == REFUSED_STEP:
            with torch.no_grad():
                (module.qkv if 0 in refusing else module)(_batch(step))
            continue
        module(_batch(step)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    return module.state_dict()


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize("preset", PRESETS)
def test_every_rank_skips_the_refused_step_together(ranks, preset, pattern):
    results = [rank[(preset, pattern)] for rank in ranks]
    for result in results:
        assert isinstance(result, dict), result  # else a traceback
    assert [r["skipped"] for r in results] == [[REFUSED_STEP]] * WORLD
    reference = _reference(preset, PATTERNS[pattern])
    for result in results:
        for name, value in reference.items():
            torch.testing.assert_close(result["state"][name], value, rtol=1e-5, atol=1e-6,
                                       msg=lambda m, n=name: f"{n}: {m}")


def test_another_error_on_one_rank_makes_every_rank_raise_at_once(ranks):
    assert [rank["other error"] for rank in ranks] == ["elsewhere", "own"]


def test_without_a_process_group_a_refusal_returns_none():
    module = create("baseline", DIM, num_heads=HEADS)
    assert forward_together(lambda: module(torch.full((1, TOKENS, DIM), 1e30))) is None
    with pytest.raises(ValueError, match="kept"):
        forward_together(lambda: (_ for _ in ()).throw(ValueError("kept")))
