"""Every preset's claim against collapse (robust_attn.studies.claims), shown beside the baseline on the same
draw, and the invariants every preset keeps.

Claims: for each guarantee, hypothesis draws a stack from the guarantee's setting
(robust_attn.testing.strategies.stack_settings narrowed to it); on every draw
the baseline must fall below the bound (else the setting is too wide, and the
test fails saying so) and the preset must stay at or above it.
"""

from __future__ import annotations

from dataclasses import replace
from operator import attrgetter

import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st

from benchmarks.claims_table import measure
from robust_attn import create, list_variants
from robust_attn.claim import (
    BASELINE_ENTROPY_COLLAPSE,
    BASELINE_RANK_COLLAPSE,
    ENTROPY,
    ENTROPY_COLLAPSE,
    RANK,
    RANK_COLLAPSE,
    ROBUST_HOLDS,
    Setting,
    StackSetting,
)
from robust_attn.kernels import KERNELS
from robust_attn.kernels.eager import attention_logits, attention_weights
from robust_attn.problem import is_positional
from robust_attn.studies.claims import CLAIMS
from robust_attn.studies.stack import measure_stack
from robust_attn.testing import assert_no_entropy_collapse, assert_no_rank_collapse
from robust_attn.testing import strategies as ras

FAILURES = {  # failure -> (the user-facing assertion, the measure it bounds, its name)
    ENTROPY: (assert_no_entropy_collapse, attrgetter("worst_entropy"), "worst-layer entropy"),
    RANK: (assert_no_rank_collapse, attrgetter("final_residual"), "final res(X)"),
}
GUARANTEES = [pytest.param(variant, guarantee, id=f"{variant}-{guarantee.failure}")
              for variant, claim in CLAIMS.items() if variant in list_variants()
              for guarantee in claim.guarantees]


def claim_settings(variant: str, setting: Setting):
    """Stack settings of ``variant`` drawn from a claim's setting."""
    return ras.stack_settings(variant, depths=st.integers(*setting.depths),
                              tokens=st.integers(*setting.tokens),
                              heads=st.integers(*setting.heads),
                              head_dims=st.sampled_from(setting.head_dims),
                              qk_scales=ras.qk_scales(*setting.qk_scales),
                              residual=st.sampled_from(setting.residual),
                              norms=st.sampled_from(setting.norms))


def test_every_preset_states_a_claim():
    assert sorted(CLAIMS) == list_variants(), "record every preset's claim in robust_attn/studies/claims.py"


@pytest.mark.parametrize(("variant", "guarantee"), GUARANTEES)
@given(data=st.data())
def test_preset_keeps_its_guarantee_where_the_baseline_collapses(variant, guarantee, data):
    setting = data.draw(claim_settings(variant, guarantee.setting), label="setting")
    assertion, value, name = FAILURES[guarantee.failure]
    baseline = value(measure(replace(setting, variant="baseline")))
    assert baseline < guarantee.bound, (
        f"the baseline shows no {guarantee.failure} in this draw ({name} {baseline:.3g} >= "
        f"{guarantee.bound:g}): the claim's setting is wider than where the baseline fails")
    assertion(measure(setting), bound=guarantee.bound)


THRESHOLDS = {RANK: RANK_COLLAPSE, ENTROPY: ENTROPY_COLLAPSE}
BASELINE_FAILS = {RANK: BASELINE_RANK_COLLAPSE, ENTROPY: BASELINE_ENTROPY_COLLAPSE}


def unaddressed(variant: str) -> list[str]:
    return [failure for failure in (ENTROPY, RANK)
            if CLAIMS[variant].addresses not in (failure, "both")]


def within(stack: StackSetting, setting: Setting) -> bool:
    return (stack.residual in setting.residual and stack.norm in setting.norms
            and setting.qk_scales[0] <= stack.qk_scale <= setting.qk_scales[1]
            and setting.depths[0] <= stack.depth <= setting.depths[1]
            and setting.tokens[0] <= stack.tokens <= setting.tokens[1]
            and setting.heads[0] <= stack.num_heads <= setting.heads[1]
            and stack.dim // stack.num_heads in setting.head_dims)


@pytest.mark.parametrize("variant", sorted(CLAIMS))
def test_a_witness_for_each_failure_a_claim_leaves_open(variant):
    claim = CLAIMS[variant]
    assert sorted(claim.witnesses) == sorted(unaddressed(variant))
    for failure, witness in claim.witnesses.items():
        assert witness.variant == variant
        assert within(witness, BASELINE_FAILS[failure]), f"{failure} witness outside the setting"


@pytest.mark.parametrize(("variant", "failure"), [
    (variant, failure) for variant in list_variants() if variant in CLAIMS
    for failure in unaddressed(variant)])
def test_preset_still_fails_where_it_claims_nothing(variant, failure):
    """A claim is not understated: its witness, where the baseline fails, fails too."""
    witness = CLAIMS[variant].witnesses[failure]
    _, value, name = FAILURES[failure]
    measured = value(measure(witness))
    assert measured < THRESHOLDS[failure], (
        f"{variant} shows no {failure} in its witness ({name} {measured:.3g}): measure where "
        f"it holds and record it as a guarantee in robust_attn/studies/claims.py")


@pytest.mark.parametrize("setting", ROBUST_HOLDS, ids=["with-residual", "attention-only"])
@given(data=st.data())
def test_robust_avoids_both_collapses_where_it_claims_to(setting, data):
    """The both-collapse preset keeps H >= 0.1 and res >= 0.01 on every draw of ROBUST_HOLDS, with
    the baseline measured on the same draw beside it (its verdict is a hypothesis event)."""
    drawn = data.draw(claim_settings("robust", setting), label="setting")
    baseline = measure(replace(drawn, variant="baseline"))
    event(f"baseline: {baseline.verdict}")
    health = measure(drawn)
    context = f"(baseline on the same draw: {baseline.verdict})"
    assert health.worst_entropy >= ENTROPY_COLLAPSE, context
    assert health.final_residual >= RANK_COLLAPSE, context


def test_robust_range_includes_baseline_failures_of_both_kinds():
    """ROBUST_HOLDS is not a range where nothing fails: it contains the baseline's entropy collapse
    (with residual, large sqk) and its rank collapse (attention only, sqk 1), and robust is healthy
    at both points."""
    for failure, point in ((ENTROPY, {"qk_scale": 16.0, "residual": True, "depth": 24}),
                           (RANK, {"qk_scale": 1.0, "residual": False, "depth": 12})):
        setting = StackSetting(variant="robust", dim=64, num_heads=4, tokens=32, batch=1, **point)
        assert any(within(setting, holds) for holds in ROBUST_HOLDS)
        assert measure(replace(setting, variant="baseline")).verdict in (failure, "both")
        assert measure(setting).verdict == "healthy"


def test_sigma_reparam_preserving_init_collapses_like_the_baseline():
    """The guarantee comes from gamma = 1: with gamma = sigma(W) ("preserve"), W_hat = W and the
    stack collapses in entropy where the baseline does."""
    witness = replace(CLAIMS["baseline"].witnesses[ENTROPY], variant="sigma_reparam")
    assert measure(witness).worst_entropy >= ENTROPY_COLLAPSE
    preserving = measure_stack(witness, kernel="eager", sigma_reparam="preserve")
    assert preserving.worst_entropy < ENTROPY_COLLAPSE
    assert measure(replace(witness, variant="baseline")).worst_entropy < ENTROPY_COLLAPSE


# Invariants of every preset, on the module as users build it.

def build(variant: str, shape: ras.AttentionShape, seed: int, kernel: str = "eager"):
    """The preset's module (eval mode) and an input, both from ``seed``."""
    torch.manual_seed(seed)
    module = create(variant, shape.dim, shape.heads, kernel=kernel).eval()
    return module, torch.randn(shape.batch, shape.tokens, shape.dim)


def solve(module, x, attn_mask=None):
    """The module's output and the problem it solved (from an observer's record)."""
    records = []
    handle = module.register_observer(lambda _, record: records.append(record))
    with torch.no_grad():
        out = module(x, attn_mask=attn_mask)
    handle.remove()
    return out, records[0].attended.problem


def shapes(variant):
    """Shapes with head widths 3, 8, 12: those the preset accepts."""
    return ras.attention_shapes(head_dims=(3, 8, 12), variant=variant)


@pytest.mark.parametrize("variant", list_variants())
@given(seed=ras.seeds, data=st.data())
def test_attention_rows_sum_to_one_where_softmax(variant, seed, data):
    shape = data.draw(shapes(variant), label="shape")
    module, x = build(variant, shape, seed)
    mask = data.draw(ras.attention_masks(shape), label="mask")
    _, problem = solve(module, x, mask)
    weights = attention_weights(problem)
    has_keys = (attention_logits(problem) > -torch.inf).any(dim=-1)
    if problem.is_softmax:
        torch.testing.assert_close(weights.sum(dim=-1), has_keys.to(weights.dtype))
    else:  # sigmoid attention: rows need not sum to one, but stay in [0, 1] per weight
        assert ((weights >= 0) & (weights <= 1)).all()


@pytest.mark.parametrize("variant", list_variants())
@given(seed=ras.seeds, data=st.data())
def test_masked_keys_get_zero_weight(variant, seed, data):
    shape = data.draw(shapes(variant), label="shape")
    module, x = build(variant, shape, seed)
    mask = data.draw(ras.attention_masks(shape, kinds=("bool", "float")), label="mask")
    _, problem = solve(module, x, mask)
    blocked = ~mask if mask.dtype == torch.bool else mask == -torch.inf
    blocked = blocked.expand(shape.batch, shape.heads, shape.tokens, shape.tokens)
    user_keys = attention_weights(problem)[..., -shape.tokens:]  # extra keys are prepended
    assert (user_keys[blocked] == 0).all()


def depends_on_positions(variant: str) -> bool:
    """Whether the preset's attention depends on token positions: through a sparsity pattern, a
    positional score modifier (a distance bias), a block selection (block top-k's selected blocks
    of positions) or a mask a mitigation adds to a call that passed none."""
    problem = solve(create(variant, 8, 1, kernel="eager"), torch.zeros(1, 2, 8))[1]
    return (problem.pattern is not None or problem.attn_mask is not None
            or problem.selection is not None or any(map(is_positional, problem.score_mods)))


@pytest.mark.parametrize("variant", [v for v in list_variants() if not depends_on_positions(v)])
@given(seed=ras.seeds, data=st.data())
def test_permuting_tokens_permutes_the_output(variant, seed, data):
    shape = data.draw(shapes(variant), label="shape")
    module, x = build(variant, shape, seed)
    out, _ = solve(module, x)
    permutation = torch.tensor(data.draw(st.permutations(range(shape.tokens)), label="permutation"))
    permuted, _ = solve(module, x[:, permutation])
    torch.testing.assert_close(permuted, out[:, permutation])


@pytest.mark.parametrize("variant", list_variants())
@given(seed=ras.seeds, data=st.data())
def test_kernels_that_run_on_cpu_agree_with_eager(variant, seed, data):
    shape = data.draw(shapes(variant), label="shape")
    """Every kernel that can run the problem here, except FlexAttention (on a CPU it compiles
    once per shape: tens of seconds), gives the eager reference's output."""
    module, x = build(variant, shape, seed)
    mask = data.draw(ras.attention_masks(shape), label="mask")
    reference, problem = solve(module, x, mask)
    for name, kernel in KERNELS.items():
        if name in ("eager", "flex") or kernel.unsupported(problem, 0.0) is not None:
            continue
        other, _ = build(variant, shape, seed, kernel=name)
        other.load_state_dict(module.state_dict())
        out, _ = solve(other, x, mask)
        torch.testing.assert_close(out, reference, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("variant", list_variants())
@given(seed=ras.seeds, data=st.data())
def test_state_dict_round_trips(variant, seed, data):
    shape = data.draw(shapes(variant), label="shape")
    module, x = build(variant, shape, seed)
    loaded, _ = build(variant, shape, seed + 1)
    loaded.load_state_dict(module.state_dict(), strict=True)
    assert torch.equal(solve(loaded, x)[0], solve(module, x)[0])
