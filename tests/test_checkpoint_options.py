"""Issue 16, finding 9: checkpoints saved with other option values, another preset's state
dict, and training after fold().

- A state dict records each mitigation's option value in its metadata; loading it into a
  module with another value refuses, naming the option and both values (softcap 30 into
  softcap 50 loaded silently before), through torch.save / torch.load(weights_only=True) too.
- A timm state dict has no record and still loads strictly into every preset without
  learned mitigation state (also tests/test_timm_equivalence.py and test_checkpoints.py).
- A strict load of another preset's state dict no longer advises load_upgrading, which
  refuses it.
- After fold_sigma_reparam, .train() warns.
"""

import io
import warnings

import pytest
import torch
from torch import nn

from robust_attn import RobustAttention, create, list_variants, load_upgrading, preset_options
from robust_attn.mitigations import FoldedTrainingWarning, fold_sigma_reparam
from robust_attn.mitigations.rope import RopeLayout
from robust_attn.sparse import Strided

DIM, HEADS = 16, 2


def _saved_and_loaded(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize(("option", "saved", "current"), [
    ("softcap", 30.0, 50.0),
    ("sigmoid", -3.0, True),
    ("sparsity", Strided(4), Strided(8)),
    ("rope", RopeLayout(1, False), RopeLayout(0, True)),
    ("sink_logit", "off_by_one", True),
])
def test_a_state_dict_with_another_option_value_is_refused_naming_both(option, saved, current):
    extra = {"qk_norm": True} if option == "sigmoid" else {}
    source = RobustAttention(DIM, num_heads=HEADS, **extra, **{option: saved})
    target = RobustAttention(DIM, num_heads=HEADS, **extra, **{option: current})
    state_dict = _saved_and_loaded(source.state_dict())
    names = f"{option}: checkpoint {source.saved_options()[option]!r}, this module " \
            f"{target.saved_options()[option]!r}"
    for strict in (True, False):
        with pytest.raises(RuntimeError) as refused:
            target.load_state_dict(state_dict, strict=strict)
        assert names in str(refused.value)
    with pytest.raises(RuntimeError, match=option):
        load_upgrading(target, state_dict)


def test_the_same_values_load_and_a_plain_dict_copy_loads_on_purpose():
    source = create("softcap", DIM, num_heads=HEADS, softcap=30.0)
    same = create("softcap", DIM, num_heads=HEADS, softcap=30.0)
    same.load_state_dict(_saved_and_loaded(source.state_dict()))
    other = create("softcap", DIM, num_heads=HEADS)
    other.load_state_dict(dict(source.state_dict()))  # no metadata: the documented way round
    torch.testing.assert_close(other.qkv.weight, source.qkv.weight)


def test_a_nested_module_names_itself_and_stateless_options_may_be_added():
    model = torch.nn.Sequential(create("softcap", DIM, num_heads=HEADS, softcap=30.0))
    with pytest.raises(RuntimeError, match=r"module '0' was saved with other option values"):
        torch.nn.Sequential(create("softcap", DIM, num_heads=HEADS)).load_state_dict(
            model.state_dict())
    baseline = create("baseline", DIM, num_heads=HEADS)  # options the checkpoint lacked: allowed
    create("softcap", DIM, num_heads=HEADS).load_state_dict(baseline.state_dict())


@pytest.mark.filterwarnings("ignore::robust_attn.kernels.SparseFallbackWarning")
def _state_beyond_timm(preset: str) -> bool:
    """Whether the preset's module holds mitigation state timm's Attention lacks (qk_norm's norms
    timm has, with qk_norm=True)."""
    return bool(set(create(preset, DIM, num_heads=HEADS).mitigation_state_keys()) - {"qk_norm"})


@pytest.mark.parametrize("preset", [p for p in list_variants() if not _state_beyond_timm(p)])
def test_a_timm_state_dict_loads_strictly_into_presets_without_learned_state(preset):
    """timm's Attention built with the preset's structure (outlier_removal and robust have no proj
    bias; robust normalises q and k, as timm's qk_norm=True does)."""
    timm = pytest.importorskip("timm")
    options = preset_options(preset)
    stock = timm.layers.Attention(DIM, num_heads=HEADS, proj_bias=options.get("proj_bias", True),
                                  qk_norm=options.get("qk_norm", False), norm_layer=nn.LayerNorm)
    module = create(preset, DIM, num_heads=HEADS)
    module.load_state_dict(stock.state_dict(), strict=True)


@pytest.mark.parametrize(("saved", "loaded"), [("sigma_reparam", "gated"),
                                               ("gated", "sigma_reparam"),
                                               ("sink", "qk_norm")])
def test_another_presets_state_dict_is_not_sent_to_load_upgrading(saved, loaded):
    state_dict = create(saved, DIM, num_heads=HEADS).state_dict()
    module = create(loaded, DIM, num_heads=HEADS)
    with pytest.raises(RuntimeError) as refused:
        module.load_state_dict(state_dict)
    message = str(refused.value)
    assert "saved with other options (another preset)" in message
    assert "load_upgrading" not in message
    with pytest.raises(RuntimeError, match="does not match"):
        load_upgrading(module, state_dict)  # the advice would have failed


def test_a_baseline_state_dict_still_advises_load_upgrading_which_works():
    state_dict = create("baseline", DIM, num_heads=HEADS).state_dict()
    module = create("gated", DIM, num_heads=HEADS)
    with pytest.raises(RuntimeError, match="load_upgrading"):
        module.load_state_dict(state_dict)
    assert load_upgrading(module, state_dict) == {"": ["gated"]}


def test_training_after_fold_warns_and_eval_does_not():
    module = create("sigma_reparam", DIM, num_heads=HEADS).eval()
    fold_sigma_reparam(module)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module.eval()
    with pytest.warns(FoldedTrainingWarning, match="without the reparametrisation"):
        module.train()
    model = torch.nn.Sequential(create("sigma_reparam", DIM, num_heads=HEADS))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.train()  # not folded: no warning
    fold_sigma_reparam(model)
    with pytest.warns(FoldedTrainingWarning):
        model.train()
