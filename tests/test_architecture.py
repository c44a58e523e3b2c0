"""The architecture's promises (docs/architecture.md), each shown able to fail.

- The kernel contract: each row's log-sum-exp, where a kernel gives it, equals the eager
  reference's in float64; a kernel without it says why, and auto picks one with it.
- Score modifiers: a positional one sees token positions and never touches prepended keys.
- Per-call data stays off modules: a forward writes no module attribute but the documented
  health record, and observers see each call's record.
- Observers instead of globals: two threads monitoring and probing one model give the same
  outputs and readings as one thread, and leave nothing behind.
"""

from __future__ import annotations

import copy
import json
import threading
from dataclasses import dataclass

import pytest
import torch

from robust_attn import (
    HealthMonitor,
    RobustAttention,
    create,
    health_probe,
    list_variants,
    recording,
)
from robust_attn.call import AttentionCall
from robust_attn.kernels import KERNELS, select_kernel
from robust_attn.kernels.eager import attention_logits
from robust_attn.mitigations.base import Mitigation
from robust_attn.problem import AttentionProblem
from robust_attn.sparse import SlidingWindow

DIM, HEADS = 16, 2


def _problem(causal=False, mask=False, prepended=0, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, HEADS, 9, 8, generator=generator, dtype=dtype) for _ in range(3))
    attn_mask = torch.rand(2, 1, 9, 9, generator=generator) > 0.3 if mask else None
    return AttentionProblem(q, k, v, 8 ** -0.5, attn_mask, causal, prepended_keys=prepended)


def _reference_lse(problem):
    """log sum_j exp(s_ij) over the allowed keys, from the masked logits in float64."""
    return torch.logsumexp(attention_logits(problem).double(), dim=-1)


@pytest.mark.parametrize("kernel", ["eager", "chunked"])
@pytest.mark.parametrize("causal, mask", [(False, False), (True, False), (False, True), (True, True)])
def test_lse_equals_the_float64_reference(kernel, causal, mask):
    problem = _problem(causal, mask)
    solved = KERNELS[kernel].solve(problem, 0.0, lse=True)
    torch.testing.assert_close(solved.lse.double(), _reference_lse(problem).float().double(),
                               rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(solved.out, KERNELS["eager"].run(problem, 0.0))
    assert solved.lse.dtype == torch.float32 and not solved.lse.requires_grad


def test_lse_of_a_row_with_no_allowed_key_is_minus_infinity():
    problem = _problem(mask=True)
    problem = problem.with_(attn_mask=torch.zeros_like(problem.attn_mask))
    assert torch.isneginf(KERNELS["chunked"].solve(problem, 0.0, lse=True).lse).all()


def test_a_kernel_without_lse_says_why_and_auto_picks_one_with_it():
    problem = _problem(dtype=torch.float32)
    assert "log-sum-exp" in KERNELS["sdpa"].unsupported(problem, 0.0, lse=True)
    with pytest.raises(ValueError, match="sdpa.*log-sum-exp"):
        select_kernel("sdpa", problem, 0.0, lse=True)
    assert select_kernel("auto", problem, 0.0).name == "sdpa"
    assert select_kernel("auto", problem, 0.0, lse=True).name == "tiled"


def test_an_observer_asking_for_lse_gets_the_rows_log_sum_exp():
    module = RobustAttention(DIM, HEADS)
    x = torch.randn(2, 7, DIM)
    records = []
    module.register_observer(lambda _, record: records.append(record), lse=True)
    out = module(x)
    attended = records[0].attended
    assert attended.kernel == "tiled"  # sdpa gives no lse
    torch.testing.assert_close(attended.lse, _reference_lse(attended.problem).float())
    torch.testing.assert_close(out, records[0].output)


@dataclass(frozen=True)
class DistanceBias:
    """A positional score modifier: -(q_pos - kv_pos)^2 / 10 (any position-dependent form)."""

    positional = True

    def __call__(self, score, b, h, q_idx, kv_idx):
        return score - (q_idx - kv_idx).float() ** 2 / 10


@dataclass(frozen=True)
class RawDistanceBias(DistanceBias):
    """The same form at kernel indices (not marked positional)."""

    positional = False


@pytest.mark.parametrize("kernel", ["eager", "chunked"])
def test_a_positional_score_mod_sees_token_positions_past_prepended_keys(kernel):
    problem = _problem(prepended=0).with_(score_mods=(DistanceBias(),))
    # Two sink keys in front: zero keys, so their scores are 0 before the modifier.
    sinks = problem.k.new_zeros(2, HEADS, 2, 8)
    with_sinks = problem.with_(k=torch.cat([sinks, problem.k], dim=-2),
                               v=torch.cat([sinks, problem.v], dim=-2), prepended_keys=2)
    logits = attention_logits(with_sinks)
    assert (logits[..., :2] == 0).all()  # the prepended keys have no position: untouched
    torch.testing.assert_close(logits[..., 2:], attention_logits(problem))  # query i, own key i
    torch.testing.assert_close(KERNELS[kernel].run(with_sinks, 0.0),
                               KERNELS["eager"].run(with_sinks, 0.0))
    # At raw kernel indices (a position-free modifier, the old behaviour) it would differ:
    raw = with_sinks.with_(score_mods=(RawDistanceBias(),))
    assert not torch.allclose(attention_logits(raw)[..., 2:], attention_logits(problem))
    assert not (attention_logits(raw)[..., :2] == 0).all()


def _attribute_snapshot(module: torch.nn.Module) -> dict:
    return {(name, key): value for name, sub in module.named_modules()
            for key, value in vars(sub).items()
            if key not in ("_parameters", "_buffers", "_modules")}


@pytest.mark.filterwarnings("ignore::robust_attn.kernels.SparseFallbackWarning")  # short N
@pytest.mark.parametrize("variant", list_variants())
def test_a_forward_writes_no_module_attribute_but_the_health_record(variant):
    module = create(variant, DIM, HEADS, probe=True).train()
    x = torch.randn(2, 8, DIM)
    module(x)  # first call: lazily created state, if any, exists from now on
    before = _attribute_snapshot(module)
    with recording(module, health=True, maps=True, lse=variant in ("baseline", "softcap")):
        module(x, is_causal=True).sum().backward()
    after = _attribute_snapshot(module)
    changed = sorted(key for key in before.keys() | after.keys()
                     if key not in before or key not in after or after[key] is not before[key])
    assert changed == [("", "health")]
    assert not module._observers  # recording removed its observers


def test_a_stage_that_stored_per_call_data_would_be_caught():
    """The snapshot above fails for a module that keeps something of the call."""
    module = create("gated", DIM, HEADS)
    before = _attribute_snapshot(module)
    module.mitigations["gated"].last_input = torch.zeros(1)  # what the old gate's _mean was
    after = _attribute_snapshot(module)
    assert before != after


class _Remembering(Mitigation):
    option = "remembering"

    def transform_qk(self, q, k, call: AttentionCall):
        assert call.x is not None and call.kernel == "eager" and call.rope is None
        return q, k


def test_every_stage_receives_the_call():
    module = RobustAttention(DIM, HEADS, kernel="eager")
    module.mitigations["remembering"] = _Remembering()
    module(torch.randn(1, 4, DIM))


def _monitored_run(model, x, probe: bool):
    """Three training steps under a HealthMonitor sampling every step, inside a probe block
    when ``probe``: the outputs and the monitor's readings."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    outputs = []
    with HealthMonitor(model, every=1) as monitor:
        for _ in range(3):
            with health_probe(probe):
                out = model(x)
            out.square().mean().backward()
            monitor.step(out.square().mean())
            optimizer.step()
            optimizer.zero_grad()
            outputs.append(out.detach())
    return outputs, monitor.report().to_dict()


def test_two_threads_probing_and_monitoring_give_what_one_gives_and_leave_nothing():
    torch.manual_seed(0)
    models = [torch.nn.Sequential(create("robust", DIM, HEADS), create("sink", DIM, HEADS))
              for _ in range(2)]
    copies = [copy.deepcopy(model) for model in models]
    inputs = [torch.randn(2, 6, DIM, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    alone = [_monitored_run(model, x, probe=i == 0)
             for i, (model, x) in enumerate(zip(copies, inputs, strict=True))]
    results, barrier = {}, threading.Barrier(2)

    def run(i):
        barrier.wait(5)
        results[i] = _monitored_run(models[i], inputs[i], probe=i == 0)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for i in range(2):
        torch.testing.assert_close(results[i][0], alone[i][0], rtol=0, atol=0)
        assert json.dumps(results[i][1]) == json.dumps(alone[i][1])  # nan-aware
        for module in models[i]:
            assert not module._observers and module.probe is None
    assert models[0][0].health is not None and models[1][0].health is None  # thread 0 probed


def test_observer_handles_remove_them_and_records_name_the_modules():
    model = torch.nn.Sequential(create("baseline", DIM, HEADS),
                                create("baseline", DIM, HEADS, sparsity=SlidingWindow(2)))
    with recording(model, health=True) as records:
        model(torch.randn(1, 5, DIM))
    assert [name for name, _ in records] == ["0", "1"]
    assert records[1][1].attended.problem.pattern is not None
    assert all(record.health is not None for _, record in records)
    assert all(not module._observers for module in model)
