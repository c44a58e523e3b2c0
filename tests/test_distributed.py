"""torch.distributed on the CPU (gloo): DDP, FSDP2 (fully_shard) and health reduced across ranks.

Starting ranks costs a torch import each, so every check runs inside one spawn of
the ranks per world size (the module-scoped fixture ``ranks``) and sends back
what the tests below assert on. A check that raises on a rank sends back its
traceback instead, which fails only the tests that read that check.
The 'thorough' profile adds a world of 3 ranks (uneven FSDP shards), more
training steps and causal attention.
"""

import os
from copy import deepcopy

import pytest
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from robust_attn import HealthMonitor, create, list_variants
from robust_attn.health.distributed import all_reduce, reduce_health

from .spawn_ranks import spawn_ranks

THOROUGH = os.environ.get("ROBUST_ATTN_PROFILE") == "thorough"
WORLD_SIZES = (2, 3) if THOROUGH else (2,)
STEPS = 5 if THOROUGH else 2
CAUSAL = (False, True) if THOROUGH else (False,)
DIM, HEADS, TOKENS, ITEMS_PER_RANK = 16, 2, 8, 2
LR = 0.05


def _global_batch(world: int) -> torch.Tensor:
    """The same (world * ITEMS_PER_RANK, TOKENS, DIM) batch on every rank."""
    return torch.randn(world * ITEMS_PER_RANK, TOKENS, DIM, generator=torch.Generator().manual_seed(1))


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _state(module) -> dict[str, torch.Tensor]:
    """Parameters and buffers, whole (gathered from FSDP2's shards: a collective)."""
    return {name: _whole(value).detach().clone() for name, value in module.state_dict().items()}


def _grads(module) -> dict[str, torch.Tensor]:
    return {name: _whole(p.grad).clone() for name, p in module.named_parameters()}


# --- checks, run on every rank -----------------------------------------------------------------

def _ddp_sigma_reparam(rank, world, broadcast_buffers, forwards):
    """DDP on the local batch against one process on the global batch, ``forwards`` forwards
    (training mode: each takes a power-iteration step) before each backward."""
    torch.manual_seed(0)
    module = create("sigma_reparam", DIM, num_heads=HEADS)
    reference = deepcopy(module)
    ddp = DistributedDataParallel(module, broadcast_buffers=broadcast_buffers)
    batch = _global_batch(world)
    local = batch.chunk(world)[rank]
    optimizers = [torch.optim.SGD(m.parameters(), lr=LR) for m in (ddp, reference)]
    grads = []
    for _ in range(STEPS):
        for model, x in ((ddp, local), (reference, batch)):
            sum(model(x).square().mean() for _ in range(forwards)).backward()
        grads.append((_grads(module), _grads(reference)))
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    return {"grads": grads, "state": _state(module), "reference": _state(reference)}


def _training_loss(module, x, causal):
    return (x + module(x, is_causal=causal)).square().mean() + module.auxiliary_loss()


def _fsdp_training(rank, world, mesh, variant, causal):
    """A preset sharded with fully_shard on the local batch against one process on the global one."""
    torch.manual_seed(0)
    module = create(variant, DIM, num_heads=HEADS)
    reference = deepcopy(module)
    fully_shard(module, mesh=mesh)
    batch = _global_batch(world)
    local = batch.chunk(world)[rank]
    optimizers = [torch.optim.SGD(m.parameters(), lr=LR) for m in (module, reference)]
    losses, reference_losses = [], []
    for _ in range(STEPS):
        loss = _training_loss(module, local, causal)
        loss.backward()
        reference_loss = _training_loss(reference, batch, causal)
        reference_loss.backward()
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)
        losses.append(global_loss.item() / world)
        reference_losses.append(reference_loss.item())
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    return {"losses": losses, "reference_losses": reference_losses, "state": _state(module),
            "reference": _state(reference)}


def _fsdp_sigma_of_the_full_weight(rank, world, mesh):
    """qkv's row shards made 1, 2, .. times the first: the whole's norm, sqrt(1 + 4 + ..) times
    the first shard's, differs from every shard's.

    "preserve", so that reset_from_weights on the shards also sets gamma = sigma(W)."""
    torch.manual_seed(0)
    module = create("sigma_reparam", DIM, num_heads=HEADS, probe=True, sigma_reparam="preserve")
    with torch.no_grad():
        first, *others = module.qkv.weight.chunk(world)  # FSDP2's shards, as torch.chunk cuts them
        for factor, rows in enumerate(others, start=2):
            rows.copy_(factor * first)
    module.reset_from_weights()  # converged u, v: sigma is then the spectral norm
    reference = deepcopy(module)
    weight = module.qkv.weight.detach().clone()
    fully_shard(module, mesh=mesh)
    shard_norm = torch.linalg.matrix_norm(module.qkv.weight.to_local(), ord=2)
    x = _global_batch(world)
    outputs = [(module(x), reference(x)) for _ in range(STEPS)]  # training: power iteration
    probed_sigma = module.health.extras["sigma_reparam.qkv.sigma"]
    sigma_outside_forward = module.qkv.sigma().detach()  # a DTensor weight: gathered
    for model in (module, reference):
        model.reset_from_weights()  # u, v from an SVD and gamma = sigma(W): on the shards for one
    return {"full_norm": torch.linalg.matrix_norm(weight, ord=2), "shard_norm": shard_norm,
            "probed_sigma": probed_sigma, "sigma_outside_forward": sigma_outside_forward,
            "outputs": [(out.detach(), ref.detach()) for out, ref in outputs],
            "state": _state(module), "reference": _state(reference)}


def _health_reduction(rank, world):
    torch.manual_seed(0)
    module = create("sigma_reparam", DIM, num_heads=HEADS, probe=True, probe_spectral=True).eval()
    batch = _global_batch(world)
    module(batch.chunk(world)[rank])
    local = module.health
    reduced = reduce_health(local)
    module(batch)
    return {"local": local.to_dict(), "reduced": reduced.to_dict(), "whole": module.health.to_dict()}


def _monitor_reduction(rank, world):
    torch.manual_seed(0)
    module = create("baseline", DIM, num_heads=HEADS)  # the same weights on every rank
    x = _global_batch(world).chunk(world)[rank]  # each rank its own data
    group = dist.new_group(list(range(world)))
    reports = {}
    for reduce in (False, True):
        with HealthMonitor(module, every=1, reduce_across_ranks=reduce,
                           process_group=group) as monitor:
            loss = module(x).square().mean()
            loss.backward()
            monitor.step(loss)
            module.zero_grad()
        reports[reduce] = monitor.report().to_dict()
    return reports


def _checks(rank, world, mesh):
    checks = {("ddp", broadcast, forwards): lambda b=broadcast, f=forwards: _ddp_sigma_reparam(
                  rank, world, b, f) for broadcast in (True, False) for forwards in (1, 2)}
    checks.update({("fsdp", variant, causal): lambda v=variant, c=causal: _fsdp_training(
                       rank, world, mesh, v, c) for variant in list_variants() for causal in CAUSAL})
    checks["fsdp_sigma"] = lambda: _fsdp_sigma_of_the_full_weight(rank, world, mesh)
    checks["health"] = lambda: _health_reduction(rank, world)
    checks["monitor"] = lambda: _monitor_reduction(rank, world)
    return checks


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda world: f"world{world}")
def ranks(request) -> list[dict]:
    return spawn_ranks(_checks, request.param)


def _result(ranks, name) -> list:
    """One check's results, one per rank; fails with the rank's traceback if it raised."""
    results = [results[name] for results in ranks]
    for rank, result in enumerate(results):
        if isinstance(result, str):
            pytest.fail(f"rank {rank} raised in check {name}:\n{result}")
    return results


def _assert_states_close(state, reference, atol=1e-5, rtol=1e-4):
    assert state.keys() == reference.keys()
    for name in state:
        torch.testing.assert_close(state[name], reference[name], atol=atol, rtol=rtol, msg=name)


# --- DDP ---------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("forwards", [1, 2], ids=["one_forward", "two_forwards"])
@pytest.mark.parametrize("broadcast_buffers", [True, False])
def test_ddp_gradients_equal_one_process_on_the_global_batch(ranks, broadcast_buffers, forwards):
    results = _result(ranks, ("ddp", broadcast_buffers, forwards))
    for result in results:
        for grads, reference in result["grads"]:
            _assert_states_close(grads, reference)
        _assert_states_close(result["state"], result["reference"])


@pytest.mark.slow
@pytest.mark.parametrize("forwards", [1, 2], ids=["one_forward", "two_forwards"])
@pytest.mark.parametrize("broadcast_buffers", [True, False])
def test_ddp_keeps_sigma_reparam_buffers_identical_across_ranks(ranks, broadcast_buffers, forwards):
    first, *others = _result(ranks, ("ddp", broadcast_buffers, forwards))
    for other in others:
        for name in ("qkv.u", "qkv.v", "proj.u", "proj.v"):
            assert torch.equal(first["state"][name], other["state"][name]), name


# --- FSDP2 -------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("causal", CAUSAL, ids=lambda causal: "causal" if causal else "full")
@pytest.mark.parametrize("variant", list_variants())
def test_fsdp2_trains_every_preset_with_the_loss_of_the_unsharded_run(ranks, variant, causal):
    first, *others = _result(ranks, ("fsdp", variant, causal))
    assert first["losses"][-1] != first["losses"][0]  # it trains
    assert first["losses"] == pytest.approx(first["reference_losses"], rel=1e-5, abs=1e-6)
    _assert_states_close(first["state"], first["reference"])
    for other in others:  # parameters gathered whole, buffers replicated: the same on every rank
        for name, value in first["state"].items():
            assert torch.equal(value, other["state"][name]), name


@pytest.mark.slow
def test_fsdp2_sigma_reparam_uses_the_full_weight_not_a_shard(ranks):
    results = _result(ranks, "fsdp_sigma")
    for result in results:
        full, shard = result["full_norm"], result["shard_norm"]
        assert not torch.isclose(shard, full, rtol=0.1)  # each shard's norm differs from the whole's
        torch.testing.assert_close(result["probed_sigma"], full, rtol=1e-4, atol=0)
        torch.testing.assert_close(result["sigma_outside_forward"], full, rtol=1e-4, atol=0)
        for out, reference in result["outputs"]:
            torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-4)
        _assert_states_close(result["state"], result["reference"])  # reset_from_weights sharded
    assert len({result["shard_norm"].item() for result in results}) == len(results)
    for result in results[1:]:
        for name in ("qkv.u", "qkv.v", "proj.u", "proj.v"):
            assert torch.equal(results[0]["state"][name], result["state"][name]), name


# --- health ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_reduced_health_equals_the_health_of_the_concatenated_batch(ranks):
    results = _result(ranks, "health")
    locals_ = [result["local"] for result in results]
    reduced, whole = results[0]["reduced"], results[0]["whole"]
    assert all(result["reduced"] == reduced for result in results)  # every rank gets the same
    assert locals_[0]["entropy"] != locals_[1]["entropy"]  # the ranks saw different data
    for field in ("entropy", "sink_mass", "sparsity", "residual", "cosine", "spectral_gap",
                  "min_entropy", "max_logit"):
        assert reduced[field] == pytest.approx(whole[field], rel=1e-5, abs=1e-6), field
    assert reduced["sampled_queries"] == whole["sampled_queries"] \
        == sum(local["sampled_queries"] for local in locals_)
    assert reduced["empty_queries"] == whole["empty_queries"] == 0
    assert reduced["nonfinite"] == whole["nonfinite"]
    # Quantities of the weights are the same on every rank; the entropy bound is the weakest's.
    assert reduced["extras"] == pytest.approx(whole["extras"], rel=1e-5, abs=1e-6)
    assert reduced["extras"]["sigma_reparam.entropy_bound"] == pytest.approx(
        min(local["extras"]["sigma_reparam.entropy_bound"] for local in locals_))


@pytest.mark.slow
def test_monitor_reduces_across_the_process_group_when_asked(ranks):
    results = _result(ranks, "monitor")
    local = [result[False]["layers"][0] for result in results]
    reduced = results[0][True]
    assert local[0]["entropy"] != local[1]["entropy"]  # the ranks saw different data
    layer = reduced["layers"][0]
    compared = ("entropy", "min_entropy", "max_logit", "grad_norm", "nonfinite")  # none nan here
    for result in results:  # every rank gets the same
        assert all(result[True]["layers"][0][metric] == layer[metric] for metric in compared)
        assert result[True]["losses"] == reduced["losses"]

    def across(metric, reduce):
        return [reduce(values) for values in zip(*(series[metric][0] for series in local),
                                                  strict=True)]

    assert layer["entropy"][0] == pytest.approx(across("entropy", lambda v: sum(v) / len(v)))
    assert layer["max_logit"][0] == pytest.approx(across("max_logit", max))
    assert layer["min_entropy"][0] == pytest.approx(across("min_entropy", min))
    assert layer["nonfinite"][0] == sum(series["nonfinite"][0] for series in local)
    losses = [result[False]["losses"][0] for result in results]
    assert reduced["losses"] == pytest.approx([sum(losses) / len(losses)])


# --- without a process group -------------------------------------------------------------------

def test_without_a_process_group_readings_and_health_come_back_unchanged():
    readings = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor(3)}
    assert all_reduce(readings, lambda key: "sum") is readings
    module = create("baseline", DIM, num_heads=HEADS, probe=True)
    module(torch.randn(1, 4, DIM))
    assert reduce_health(module.health) is module.health


def test_a_reading_without_a_known_kind_is_named():
    with pytest.raises(ValueError, match=r"readings \['b'\] have no reduction kind"):
        all_reduce({"a": torch.ones(1), "b": torch.ones(1)}, {"a": "max", "b": "median"}.get)
