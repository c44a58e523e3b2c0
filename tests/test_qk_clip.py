"""qk_clip: Kimi K2's per-head QK-clip after optimiser steps (robust_attn/mitigations/qk_clip.py)."""

import copy
import math

import pytest
import torch

import robust_attn
from robust_attn import RobustAttention, create
from robust_attn.integrations.timm.rope_attention import RobustAttentionRope
from robust_attn.mitigations.qk_clip import DEFAULT_TAU, head_max_logits
from robust_attn.mitigations.softcap import TanhSoftCap
from robust_attn.problem import AttentionProblem
from robust_attn.sparse import Strided

from .spawn_ranks import spawn_ranks

DIM, HEADS, TOKENS, BATCH = 12, 3, 7, 2
HEAD_DIM = DIM // HEADS
TAU = 4.0
# Per head, the factor W_q and W_k rows are multiplied by: head 0's logits grow 36-fold, head 1's
# 9-fold, head 2 stays as drawn (its logits stay below TAU).
BLOW_UP = (6.0, 3.0, 1.0)


def _clip(module: RobustAttention):
    return module.mitigations["qk_clip"]


def _module(tau=TAU, seed=0, **options) -> RobustAttention:
    torch.manual_seed(seed)
    module = RobustAttention(DIM, HEADS, qk_clip=tau, **options)
    with torch.no_grad():
        for head, factor in enumerate(BLOW_UP):
            for block in (0, 1):  # W_q, W_k (and their biases)
                rows = slice(block * DIM + head * HEAD_DIM, block * DIM + (head + 1) * HEAD_DIM)
                module.qkv.weight[rows] *= factor
                if module.qkv.bias is not None:
                    module.qkv.bias[rows] = torch.randn(HEAD_DIM) * factor
    module.reset_from_weights()
    return module


def _x(seed=1, batch=BATCH, tokens=TOKENS) -> torch.Tensor:
    return torch.randn(batch, tokens, DIM, generator=torch.Generator().manual_seed(seed))


MASKS = {
    "none": lambda: {},
    "causal": lambda: {"is_causal": True},
    "bool": lambda: {"attn_mask": torch.rand(TOKENS, TOKENS,
                                             generator=torch.Generator().manual_seed(2)) > 0.4},
    "float": lambda: {"attn_mask": torch.where(
        torch.rand(BATCH, 1, TOKENS, TOKENS, generator=torch.Generator().manual_seed(3)) > 0.4,
        torch.randn(BATCH, 1, TOKENS, TOKENS, generator=torch.Generator().manual_seed(4)),
        -math.inf)},
}


def _reference_max_logits(weight, bias, x, inputs) -> torch.Tensor:
    """S_max^h in float64, spelled out: scale * q_i . k_j over every allowed (b, i, j)."""
    weight, x = weight.double(), x.double()
    qkv = x @ weight.T + (0 if bias is None else bias.double())
    q, k = (qkv[..., block * DIM:(block + 1) * DIM].unflatten(-1, (HEADS, HEAD_DIM))
            for block in (0, 1))
    logits = torch.einsum("bihd,bjhd->bhij", q, k) * HEAD_DIM ** -0.5
    allowed = torch.ones(TOKENS, TOKENS, dtype=torch.bool)
    if inputs.get("is_causal"):
        allowed = torch.ones(TOKENS, TOKENS, dtype=torch.bool).tril()
    mask = inputs.get("attn_mask")
    if mask is not None:
        allowed = allowed & (mask if mask.dtype == torch.bool else mask != -math.inf)
    return logits.masked_fill(~allowed, -math.inf).amax(dim=(0, 2, 3))


def _reference_clip(weight, bias, max_logits, tau):
    """The paper's rule in float64: gamma_h = min(1, tau / S_max^h), W_q^h, W_k^h (and their
    bias rows) times sqrt(gamma_h)."""
    gamma = torch.clamp(tau / max_logits, max=1.0)
    factors = torch.ones(3 * DIM, dtype=torch.float64)
    for block in (0, 1):
        factors[block * DIM:(block + 1) * DIM] = gamma.sqrt().repeat_interleave(HEAD_DIM)
    clipped = weight.double() * factors[:, None]
    return clipped, None if bias is None else bias.double() * factors


def test_option_values():
    assert _clip(create("qk_clip", DIM, HEADS)).tau == DEFAULT_TAU == 100.0
    assert _clip(RobustAttention(DIM, HEADS, qk_clip=30)).tau == 30.0
    for off in (None, False):
        assert "qk_clip" not in RobustAttention(DIM, HEADS, qk_clip=off).mitigations
    for bad in (0, -1.0, math.nan, math.inf, "100", 1j):
        with pytest.raises(ValueError, match="qk_clip="):
            RobustAttention(DIM, HEADS, qk_clip=bad)


@pytest.mark.parametrize("other", ["qk_norm", "sigma_reparam"])
def test_options_that_defeat_it_are_refused(other):
    with pytest.raises(ValueError, match=f"'qk_clip' and '{other}' conflict"):
        RobustAttention(DIM, HEADS, qk_clip=True, **{other: True})


def test_it_clips_the_qkv_the_host_holds_now():
    """No reference kept: a qkv the user put in after construction is the one clipped (and the
    replaced one is left alone)."""
    module = _module()
    replaced = module.qkv
    module.qkv = copy.deepcopy(replaced)
    before = replaced.weight.detach().clone()
    x = _x()
    module(x)
    robust_attn.after_optimizer_step(module)
    assert torch.equal(replaced.weight, before)
    module(x)
    torch.testing.assert_close(_clip(module).max_logit[:2], torch.full((2,), TAU), rtol=1e-5, atol=0)


def test_it_combines_with_spectral_qk_on_one_qkv():
    """Both act on the host's qkv: spectral_qk concentrates its spectrum at construction, the
    clip then bounds the same layer's logits."""
    torch.manual_seed(0)
    module = RobustAttention(DIM, HEADS, qk_clip=TAU, spectral_qk=True)
    assert type(module.qkv) is torch.nn.Linear
    with torch.no_grad():
        module.qkv.weight[:2 * DIM] *= 30.0  # W_q and W_k: logits far above tau
    x = _x()
    module(x)
    assert (_clip(module).max_logit > TAU).all()
    robust_attn.after_optimizer_step(module)
    module(x)
    assert (_clip(module).max_logit <= TAU * (1 + 1e-5)).all()
    assert torch.isfinite(module.auxiliary_loss())


def test_a_fresh_module_is_the_baseline():
    """Same weights from the same seed, same forward, a plain nn.Linear qkv, no new state keys."""
    torch.manual_seed(0)
    baseline = create("baseline", DIM, HEADS)
    torch.manual_seed(0)
    clipped = create("qk_clip", DIM, HEADS)
    assert type(clipped.qkv) is torch.nn.Linear
    assert clipped.state_dict().keys() == baseline.state_dict().keys()  # max_logit: not persistent
    for name, value in baseline.state_dict().items():
        assert torch.equal(clipped.state_dict()[name], value), name
    x = _x()
    assert torch.equal(clipped(x), baseline(x))
    clipped.load_state_dict(baseline.state_dict(), strict=True)
    baseline.load_state_dict(clipped.state_dict(), strict=True)


@pytest.mark.parametrize("mask", sorted(MASKS))
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_the_step_applies_the_papers_rule_as_a_float64_reference_does(mask, qkv_bias):
    """After a training step through attach_to_optimizer: S_max from the step's forward (before the
    update), gamma applied to the updated weights."""
    module = _module(qkv_bias=qkv_bias)
    unclipped = copy.deepcopy(module)  # the same step, without the clip
    inputs, x = MASKS[mask](), _x()
    expected_max = _reference_max_logits(module.qkv.weight.detach(), module.qkv.bias, x, inputs)
    assert expected_max[0] > expected_max[1] > TAU > expected_max[2]  # two heads to clip
    optimizers = []
    for model in (module, unclipped):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        model(x, **inputs).square().mean().backward()
        optimizers.append(optimizer)
    handle = robust_attn.attach_to_optimizer(module, optimizers[0])
    torch.testing.assert_close(_clip(module).max_logit, expected_max.float())
    for optimizer in optimizers:
        optimizer.step()
    handle.remove()

    weight, bias = _reference_clip(unclipped.qkv.weight.detach(), unclipped.qkv.bias,
                                   expected_max, TAU)
    torch.testing.assert_close(module.qkv.weight.detach().double(), weight, rtol=1e-6, atol=0)
    if qkv_bias:
        torch.testing.assert_close(module.qkv.bias.detach().double(), bias, rtol=1e-6, atol=0)
    # head 2 (below tau) and the value rows: bit for bit the unclipped step's
    untouched = [slice(DIM - HEAD_DIM, DIM), slice(2 * DIM - HEAD_DIM, 3 * DIM)]
    for rows in untouched:
        assert torch.equal(module.qkv.weight[rows], unclipped.qkv.weight[rows])
        if qkv_bias:
            assert torch.equal(module.qkv.bias[rows], unclipped.qkv.bias[rows])
    assert torch.equal(module.proj.weight, unclipped.proj.weight)
    assert torch.isneginf(_clip(module).max_logit).all()  # restarted


@pytest.mark.parametrize("mask", sorted(MASKS))
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_after_the_clip_a_clipped_heads_logits_have_shrunk_by_gamma(mask, qkv_bias):
    """Bias or not, the head's q and k scale by sqrt(gamma) as a whole: its largest logit on the
    same batch is tau, the other heads' stay as they were."""
    module = _module(qkv_bias=qkv_bias)
    inputs, x = MASKS[mask](), _x()
    module(x, **inputs)
    before = _clip(module).max_logit.clone()
    robust_attn.after_optimizer_step(module)
    module(x, **inputs)
    after = _clip(module).max_logit
    torch.testing.assert_close(after[:2], torch.full((2,), TAU), rtol=1e-5, atol=0)
    assert after[2] == before[2]
    torch.testing.assert_close(
        after, _reference_max_logits(module.qkv.weight.detach(), module.qkv.bias, x, inputs).float())


def test_with_rope_the_logits_shrink_by_gamma_too():
    """RoPE rotates q and k after the projection: scaling commutes with it."""
    torch.manual_seed(0)
    module = RobustAttentionRope(DIM, HEADS, num_prefix_tokens=0, qk_clip=TAU)
    with torch.no_grad():
        module.qkv.weight[:2 * DIM] *= 6.0
    angles = torch.rand(TOKENS, HEAD_DIM, generator=torch.Generator().manual_seed(5)) * 6.0
    rope, x = torch.cat([angles.sin(), angles.cos()], dim=-1), _x()
    module(x, rope=rope)
    before = _clip(module).max_logit.clone()
    assert (before > TAU).all()
    robust_attn.after_optimizer_step(module)
    module(x, rope=rope)
    torch.testing.assert_close(_clip(module).max_logit, torch.full((HEADS,), TAU), rtol=1e-5,
                               atol=0)


def test_eval_forwards_do_not_accumulate():
    module = _module().eval()
    weight = module.qkv.weight.detach().clone()
    module(_x())
    assert torch.isneginf(_clip(module).max_logit).all()
    robust_attn.after_optimizer_step(module)
    assert torch.equal(module.qkv.weight, weight)


def test_the_running_max_spans_the_training_forwards_since_the_last_step():
    module = _module()
    first, second = _x(1), 3 * _x(2)
    with torch.no_grad():  # grad mode does not matter, training mode does
        module(first)
    one = _clip(module).max_logit.clone()
    module(second)
    both = _clip(module).max_logit.clone()
    module.eval()(second)
    assert torch.equal(_clip(module).max_logit, both)
    module.train()
    fresh = _module()
    fresh(second)
    torch.testing.assert_close(both, torch.maximum(one, _clip(fresh).max_logit), rtol=0, atol=0)
    module(first)  # a recomputed forward (activation checkpointing) changes nothing
    assert torch.equal(_clip(module).max_logit, both)


def test_no_forward_no_clip_and_the_hook_detaches():
    module = _module()
    weight = module.qkv.weight.detach().clone()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.0)
    handle = robust_attn.attach_to_optimizer(module, optimizer)
    optimizer.step()  # no forward since the last step: nothing to clip
    assert torch.equal(module.qkv.weight, weight)
    handle.remove()
    module(_x()).sum().backward()
    optimizer.step()  # detached: the maximum stays, the weights too
    assert torch.equal(module.qkv.weight, weight)
    assert (_clip(module).max_logit[:2] > TAU).all()


def test_a_non_finite_maximum_leaves_its_head_alone():
    module = _module()
    weight = module.qkv.weight.detach().clone()
    _clip(module).max_logit.copy_(torch.tensor([math.inf, math.nan, -math.inf]))
    robust_attn.after_optimizer_step(module)
    assert torch.equal(module.qkv.weight, weight)


def test_resets_restart_the_running_max():
    module = _module()
    for reset in (module.reset_from_weights, module.reset_parameters):
        module(_x())
        assert torch.isfinite(_clip(module).max_logit).all()
        reset()
        assert torch.isneginf(_clip(module).max_logit).all()


def test_the_clip_reaches_every_layer_of_a_model_and_a_copy_clips_its_own_weights():
    model = torch.nn.Sequential(_module(seed=0), torch.nn.LayerNorm(DIM), _module(seed=1))
    x = _x()
    model(x)
    copied = copy.deepcopy(model)
    original = [layer.qkv.weight.detach().clone() for layer in (model[0], model[2])]
    robust_attn.after_optimizer_step(copied)
    for layer, weight in zip((model[0], model[2]), original, strict=True):
        assert torch.equal(layer.qkv.weight, weight)  # the copy's clip left the original alone
    maxima = [_clip(layer).max_logit.clone() for layer in (model[0], model[2])]
    assert all((m > TAU).any() for m in maxima)
    robust_attn.after_optimizer_step(model)
    for layer, twin, weight in zip((model[0], model[2]), (copied[0], copied[2]), original,
                                   strict=True):
        assert torch.equal(layer.qkv.weight, twin.qkv.weight)
        assert not torch.equal(layer.qkv.weight, weight)
    model(x)  # the first layer sees the same input: its largest logits are back to tau
    assert (_clip(model[0]).max_logit <= TAU * (1 + 1e-5)).all()


def test_the_running_max_stays_float32_when_the_module_is_cast():
    module = _module().to(torch.bfloat16)
    assert module.qkv.weight.dtype == torch.bfloat16
    assert _clip(module).max_logit.dtype == torch.float32
    module(_x().to(torch.bfloat16))
    assert _clip(module).max_logit.dtype == torch.float32


def _largest_logits_in_training(tau, steps=150, lr=0.05, dim=32, heads=2, tokens=16, batch=32):
    """A toy task that rewards sharp attention (copy the previous token, through learned
    positions), Adam at a large learning rate: after each step (and its clip), the largest logit
    on the step's batch."""
    torch.manual_seed(0)
    positions = torch.nn.Parameter(torch.randn(tokens, dim))
    module = RobustAttention(dim, heads, qk_clip=tau)
    optimizer = torch.optim.Adam([positions, *module.parameters()], lr=lr)
    if tau is not None:
        robust_attn.attach_to_optimizer(module, optimizer)
    generator = torch.Generator().manual_seed(1)
    largest = []
    for _ in range(steps):
        x = torch.randn(batch, tokens, dim, generator=generator)
        loss = (module(x + positions) - torch.roll(x, 1, dims=1)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            q, k, _ = module.qkv(x + positions).unflatten(-1, (3, heads, dim // heads)).unbind(2)
            logits = torch.einsum("bihd,bjhd->bhij", q, k) * module.scale
            largest.append(logits.amax().item())
    return largest


def test_in_training_the_clip_holds_the_largest_logit_near_tau_where_the_baseline_explodes():
    """The factor comes from the step's forward (the weights before the update), so the update
    itself can push the logits past tau until the next step's clip: near tau, not at most tau
    (measured here: 1.4 tau at most, the baseline's up to 49 tau)."""
    tau = 10.0
    baseline, clipped = _largest_logits_in_training(None), _largest_logits_in_training(tau)
    assert max(baseline[75:]) > 30 * tau
    assert max(clipped[75:]) < 2 * tau


# --- S_max itself: which pairs count ---------------------------------------------------------

def _problem(seed=0, batch=2, heads=2, queries=9, keys=9, **fields) -> AttentionProblem:
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, queries, 4, generator=generator) * 3
    k = torch.randn(batch, heads, keys, 4, generator=generator) * 3
    return AttentionProblem(q, k, torch.zeros_like(k), 0.5, **fields)


def _dense_max(problem: AttentionProblem, allowed: torch.Tensor) -> torch.Tensor:
    scores = problem.scale * problem.q.double() @ problem.k.double().transpose(-1, -2)
    return scores.masked_fill(~allowed, -math.inf).amax(dim=(0, 2, 3)).float()


@pytest.mark.parametrize("block_elements", [1, 50, 2 ** 22])
def test_head_max_logits_counts_the_allowed_pairs_only_in_any_block_size(block_elements):
    problem = _problem()
    n = problem.num_queries
    ones = torch.ones(n, n, dtype=torch.bool)
    bool_mask = torch.rand(n, n, generator=torch.Generator().manual_seed(7)) > 0.5
    float_mask = torch.where(bool_mask, 1000.0, -math.inf)  # a finite bias is not a logit
    pattern = Strided(3)
    cases = {
        "all": (problem, ones),
        "causal": (problem.with_(causal=True), ones.tril()),
        "bool mask": (problem.with_(attn_mask=bool_mask), bool_mask),
        "float mask": (problem.with_(attn_mask=float_mask), bool_mask),
        "softcap": (problem.with_(score_mods=(TanhSoftCap(1.0),)), ones),  # raw logits
        "pattern": (problem.with_(pattern=pattern),
                    pattern.allowed(torch.arange(n), torch.arange(n), n, n)),
    }
    for name, (case, allowed) in cases.items():
        torch.testing.assert_close(head_max_logits(case, block_elements),
                                   _dense_max(case, allowed), msg=name)


def test_head_max_logits_leaves_prepended_keys_out_and_empty_heads_at_minus_infinity():
    problem = _problem(keys=11).with_(prepended_keys=2, attn_mask=torch.ones(1, 1, 9, 11,
                                                                              dtype=torch.bool))
    own = problem.with_(k=problem.k[..., 2:, :], v=problem.v[..., 2:, :], prepended_keys=0,
                        attn_mask=None)
    torch.testing.assert_close(head_max_logits(problem), head_max_logits(own))
    blocked = problem.with_(attn_mask=torch.zeros(1, 1, 9, 11, dtype=torch.bool))
    assert torch.isneginf(head_max_logits(blocked)).all()
    for empty in (_problem(batch=0), _problem(queries=0)):
        assert torch.isneginf(head_max_logits(empty)).all()


@pytest.mark.parametrize("sink", [{"sink_logit": True}, {"sink_tokens": 2}])
def test_sink_keys_do_not_count(sink):
    """A huge sink logit (or sink key) is a parameter the clip cannot scale: S_max is the tokens'."""
    plain, with_sink = _module(), _module(**sink)
    with_sink.qkv.load_state_dict(plain.qkv.state_dict())
    with torch.no_grad():
        sinks = with_sink.mitigations["sink_logit" if "sink_logit" in sink else "sink_tokens"]
        if "sink_logit" in sink:
            sinks.logit.fill_(1e4)
        else:
            sinks.key.mul_(1e3)
    x = _x()
    plain(x)
    with_sink(x)
    torch.testing.assert_close(_clip(with_sink).max_logit, _clip(plain).max_logit)


def test_a_bfloat16_module_measures_its_logits_in_float32():
    """q and k in bfloat16, their products in float32: S_max of the module's own q and k."""
    module = _module().to(torch.bfloat16)
    x = _x().to(torch.bfloat16)
    module(x)
    q, k, _ = module.qkv(x).unflatten(-1, (3, HEADS, HEAD_DIM)).permute(2, 0, 3, 1, 4)
    expected = (q.double() @ k.double().transpose(-1, -2) * HEAD_DIM ** -0.5).amax(dim=(0, 2, 3))
    torch.testing.assert_close(_clip(module).max_logit.double(), expected, rtol=1e-6, atol=0)


# --- data parallel: every replica clips by the global batch's maximum --------------------------

def _data_parallel_step(rank, world, wrap):
    """One training step of ``_module()`` on this rank's share of a global batch, wrapped by
    ``wrap`` (DDP or fully_shard), the clip attached, against one process on the whole batch."""
    module = _module(seed=0)
    reference = copy.deepcopy(module)
    model = wrap(module)
    batch = torch.randn(world * BATCH, TOKENS, DIM, generator=torch.Generator().manual_seed(9))
    batch[:BATCH] *= 3  # the ranks' own maxima differ: rank 0's is the global one
    local = batch.chunk(world)[rank]
    for net, x in ((model, local), (reference, batch)):
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
        robust_attn.attach_to_optimizer(net, optimizer)
        net(x).square().mean().backward()
        if net is model:
            local_max = _clip(module).max_logit.clone()  # this rank's, before the reduction
        optimizer.step()
    from torch.distributed.tensor import DTensor

    def whole(tensor):
        return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor

    return {"local_max": local_max,
            "state": {name: whole(value).detach().clone()
                      for name, value in module.state_dict().items()},
            "reference": reference.state_dict()}


def _data_parallel_checks(rank, world, mesh):
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    return {"ddp": lambda: _data_parallel_step(rank, world, DistributedDataParallel),
            "fsdp": lambda: _data_parallel_step(rank, world,
                                                lambda module: fully_shard(module, mesh=mesh))}


@pytest.fixture(scope="module")
def data_parallel_ranks() -> list[dict]:
    return spawn_ranks(_data_parallel_checks, world=2)


@pytest.mark.slow
@pytest.mark.parametrize("wrapper", ["ddp", "fsdp"])
def test_data_parallel_replicas_clip_as_one_process_on_the_global_batch(data_parallel_ranks,
                                                                         wrapper):
    results = [ranks[wrapper] for ranks in data_parallel_ranks]
    for rank, result in enumerate(results):
        if isinstance(result, str):
            pytest.fail(f"rank {rank} raised:\n{result}")
    assert not torch.equal(results[0]["local_max"], results[1]["local_max"])
    for result in results:
        assert result["state"].keys() == result["reference"].keys()
        for name, value in result["state"].items():
            torch.testing.assert_close(value, result["reference"][name], rtol=1e-5, atol=1e-6,
                                       msg=name)
