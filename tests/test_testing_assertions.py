"""robust_attn.testing's collapse assertions, on measured stacks and on a user's own model."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from robust_attn import RobustAttention
from robust_attn.claim import ENTROPY_COLLAPSE, RANK_COLLAPSE, StackSetting
from robust_attn.studies.stack import AttentionStack, build_stack, measure_stack
from robust_attn.testing import assert_no_entropy_collapse, assert_no_rank_collapse
from robust_attn.testing import strategies as ras


class Tokens(nn.Module):
    """A user's own model: an attention stack whose forward returns the last tokens (B, N, C)."""

    def __init__(self, stack: AttentionStack):
        super().__init__()
        self.stack = stack

    def forward(self, x):
        return self.stack(x)[-1]


def model_and_input(setting: StackSetting):
    """The stack, weights and input that measure_stack(setting) measures, as a user's model."""
    generator = torch.Generator().manual_seed(setting.seed)
    stack = build_stack(setting, generator)
    return Tokens(stack), torch.randn(setting.batch, setting.tokens, setting.dim,
                                      generator=generator)


SMALL = StackSetting(depth=8, dim=32, num_heads=2, tokens=16, batch=1)
RANK_COLLAPSED = StackSetting(**{**SMALL.__dict__, "qk_scale": 1.0})
ENTROPY_COLLAPSED = StackSetting(**{**SMALL.__dict__, "qk_scale": 16.0, "residual": True})


@given(st.sampled_from(["baseline", "qk_norm"]).flatmap(
    lambda variant: ras.stack_settings(variant, depths=st.integers(8, 12))))
def test_a_model_passes_exactly_when_its_measured_stack_is_healthy(setting):
    health = measure_stack(setting)
    model, x = model_and_input(setting)
    for assertion, healthy in ((assert_no_entropy_collapse, health.worst_entropy >= ENTROPY_COLLAPSE),
                               (assert_no_rank_collapse, health.final_residual >= RANK_COLLAPSE)):
        for subject in ((health,), (model, x)):
            if healthy:
                assertion(*subject)
            else:
                with pytest.raises(AssertionError):
                    assertion(*subject)


def test_entropy_collapse_message_names_the_worst_layer_its_entropy_and_the_bound():
    model, x = model_and_input(ENTROPY_COLLAPSED)
    with pytest.raises(AssertionError) as failure:
        assert_no_entropy_collapse(model, x, bound=0.5)
    worst = min(measure_stack(ENTROPY_COLLAPSED).layers, key=lambda layer: layer.entropy)
    message = str(failure.value)
    assert f"stack.layers.{worst.layer - 1} has normalised attention entropy " \
           f"{worst.entropy:.3g} < bound 0.5" in message
    with pytest.raises(AssertionError, match=rf"layer {worst.layer} has .* < bound 0\.5"):
        assert_no_entropy_collapse(measure_stack(ENTROPY_COLLAPSED), bound=0.5)


def test_rank_collapse_message_names_the_output_and_the_first_collapsed_layer():
    health = measure_stack(RANK_COLLAPSED)
    first = next(layer for layer in health.layers if layer.residual < RANK_COLLAPSE)
    with pytest.raises(AssertionError, match=re.escape(
            f"res(X) of the output tokens (layer 8) is {health.final_residual:.3g} < bound 0.01; "
            f"first layer whose output is below the bound: layer {first.layer}")):
        assert_no_rank_collapse(health)
    model, x = model_and_input(RANK_COLLAPSED)
    with pytest.raises(AssertionError, match=r"output tokens of Tokens is .* < bound 0\.01; "
                                             r"first layer .*: stack\.layers\.\d+ "):
        assert_no_rank_collapse(model, x)


def test_non_finite_values_fail():
    model, x = model_and_input(SMALL)
    with torch.no_grad():
        model.stack.layers[2].qkv.weight.fill_(torch.nan)
    with pytest.raises(AssertionError, match="stack.layers.2 has normalised attention entropy nan"):
        assert_no_entropy_collapse(model, x, bound=0.0)
    with pytest.raises(AssertionError, match="is nan < bound 0;"):
        assert_no_rank_collapse(model, x, bound=0.0)


def test_a_bound_method_such_as_forward_features_is_a_model():
    model, x = model_and_input(RANK_COLLAPSED)
    with pytest.raises(AssertionError, match="output tokens of Tokens.forward is"):
        assert_no_rank_collapse(model.forward, x)


def test_the_model_runs_in_eval_mode_and_gets_its_training_flags_back():
    model, x = model_and_input(SMALL)
    model.train()
    model.stack.norms[0].eval()
    seen = []
    model.stack.layers[0].register_forward_hook(lambda module, args, out: seen.append(
        module.training))
    assert_no_entropy_collapse(model, x, bound=0.0)
    assert seen == [False]
    assert model.training and not model.stack.norms[0].training and model.stack.layers[1].training
    assert all(layer.health is not None for layer in model.stack.layers)


def test_misuse_is_refused_with_a_reason():
    model, x = model_and_input(SMALL)
    with pytest.raises(TypeError, match="pass no inputs"):
        assert_no_rank_collapse(measure_stack(SMALL), x)
    with pytest.raises(TypeError, match="pass the model's inputs"):
        assert_no_entropy_collapse(model)
    with pytest.raises(TypeError, match="nn.Module or a bound method"):
        assert_no_rank_collapse(lambda tokens: tokens, x)
    with pytest.raises(ValueError, match="no RobustAttention"):
        assert_no_entropy_collapse(nn.Linear(32, 32), x)
    with pytest.raises(TypeError, match=r"\(B, N, C\) output tokens"):
        assert_no_rank_collapse(model.stack, x)  # returns a list of hidden states
    silent = nn.Sequential(RobustAttention(32, num_heads=2, probe=False))
    with pytest.raises(ValueError, match=r"\['0'\] recorded no health"):
        assert_no_entropy_collapse(silent, x)
