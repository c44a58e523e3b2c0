"""The non-finite guard: raises at the first bad module, names it, and leaves no hook behind."""

import pytest
import torch
from torch import nn

from robust_attn import create
from robust_attn.health.guard import NonFiniteError, nonfinite_guard


class Log(nn.Module):
    def forward(self, x):
        return x.log()  # nan for negative inputs


class Blocks(nn.Module):
    """blocks.0 .. blocks.2, each Linear then ReLU, and a functional step in between."""

    def __init__(self, poison_after=None):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(3))
        self.poison_after = poison_after

    def forward(self, x):
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index == self.poison_after:
                x = x * torch.inf  # zeros become nan: produced by this module's own code
        return x


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_raises_at_the_first_bad_module_and_names_it():
    model = nn.Sequential(nn.Linear(4, 4), Log(), nn.Linear(4, 4), Log())
    with pytest.raises(NonFiniteError, match="'1'") as caught, nonfinite_guard(model):
        model(torch.randn(8, 4))  # the first Linear's output has negative entries: log gives nan
    assert caught.value.module == "1" and caught.value.where == "output"  # not '3', not the root
    assert caught.value.count > 0


def test_a_value_made_between_submodules_is_blamed_on_the_running_parent():
    model = Blocks(poison_after=0)
    with pytest.raises(NonFiniteError, match="inside it, before its submodule 'blocks.1'") as caught, \
            nonfinite_guard(model):
        model(torch.randn(3, 4))
    assert caught.value.module == "<Blocks>"


def test_non_finite_model_input_names_the_model_and_input():
    model = Blocks()
    x = torch.randn(2, 4)
    x[1, 2] = torch.nan
    with pytest.raises(NonFiniteError, match="input") as caught, nonfinite_guard(model):
        model(x)
    assert caught.value.where == "input" and caught.value.module == "<Blocks>"
    assert caught.value.count == 1


def test_masks_with_minus_inf_are_not_flagged_and_attention_overflow_names_its_module():
    model = nn.Sequential()
    model.add_module("attn", create("baseline", 8, num_heads=2))
    mask = torch.zeros(5, 5).masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), -torch.inf)
    with nonfinite_guard(model):
        assert torch.isfinite(model.attn(torch.randn(1, 5, 8), attn_mask=mask)).all()
    with torch.no_grad():
        model.attn.qkv.weight.fill_(torch.inf)
    with pytest.raises(NonFiniteError, match="'attn.qkv'"), nonfinite_guard(model):
        model(torch.randn(1, 5, 8))


def test_backward_gradients_are_checked_when_asked():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    x = torch.randn(3, 4)
    with nonfinite_guard(model, backward=True):
        out = model(x)
        with pytest.raises(NonFiniteError, match="gradient") as caught:
            out.backward(torch.full_like(out, torch.nan))
    assert caught.value.module in ("1", "<Sequential>") and caught.value.where == "gradient"


def test_hooks_are_removed_on_exit_even_after_an_error_and_by_remove():
    model = nn.Sequential(nn.Linear(4, 4), Log())
    before = _hook_count(model)
    with pytest.raises(NonFiniteError), nonfinite_guard(model):
        model(-torch.ones(1, 4))
    assert _hook_count(model) == before
    guard = nonfinite_guard(model)
    assert _hook_count(model) > before
    guard.remove()
    assert _hook_count(model) == before
    model(-torch.ones(1, 4))  # off: nothing raises


def test_refuses_a_non_module():
    with pytest.raises(TypeError, match="model"):
        nonfinite_guard(lambda x: x)
