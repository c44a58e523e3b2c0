"""convert/revert for timm's DiffAttention (Differential Transformer) through the 'differential'
mitigation: same outputs both ways, strict reloads into stock timm, refusals named."""

import copy
import re

import pytest
import torch
from torch import nn

from robust_attn import RobustAttention, convert, revert
from robust_attn.mitigations.differential import lambda_init_at

from .test_differential import TIMM_TO_OURS, randomise_lambda_and_gain

timm = pytest.importorskip("timm")
timm_layers = pytest.importorskip("timm.layers")

TOL = {"atol": 1e-5, "rtol": 1e-5}  # float32 rounding
SMALL_DWEE = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2,
              "num_classes": 3, "init_values": None}  # layer scale off: attention's share shows


def _diff(dim=32, num_heads=2, depth=0, seed=0, **options):
    """A timm DiffAttention with random weights, biases, lambda vectors and sub-norm gain."""
    torch.manual_seed(seed)
    module = timm_layers.DiffAttention(dim, num_heads=num_heads, depth=depth, **options).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        randomise_lambda_and_gain(module, generator)
        module.qkv.weight.normal_(std=0.5, generator=generator)
        for name, parameter in module.named_parameters():  # biases and norm gains
            if parameter.dim() == 1 and not name.startswith("lambda_"):
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return module


def _stock(**options):
    """The same timm DiffAttention built afresh (other random weights)."""
    return timm_layers.DiffAttention(**options)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
@pytest.mark.parametrize(("dim", "num_heads", "depth", "options"), [
    (32, 2, 0, {}),
    (48, 4, 1, {"qkv_bias": True}),
    (64, 2, 5, {"scale_norm": True}),
    (32, 4, 13, {"proj_bias": False, "scale_norm": True, "qkv_bias": True}),
])
def test_diff_attention_converts_and_reverts_with_the_same_function(fused, dim, num_heads, depth,
                                                                     options):
    module = _diff(dim, num_heads, depth, **options)
    module.fused_attn = fused
    x = torch.randn(2, 7, dim, generator=torch.Generator().manual_seed(3))
    expected = module(x)
    state = copy.deepcopy(module.state_dict())

    robust, summary = convert(module, "differential")
    assert isinstance(robust, RobustAttention) and summary.swapped == [""]
    assert summary.preserves_function, summary
    assert robust.timm_origin.kind == "DiffAttention" and robust.fused_attn is fused
    differential = robust.mitigations["differential"]
    assert differential.layer == depth + 1
    assert differential.lambda_init == lambda_init_at(depth + 1) == module.lambda_init
    assert robust.head_dim == 2 * module.head_dim
    ours = robust.state_dict()
    assert set(ours) == {TIMM_TO_OURS.get(name, name) for name in state}
    for name, value in state.items():
        torch.testing.assert_close(ours[TIMM_TO_OURS.get(name, name)], value, atol=0, rtol=0)
    torch.testing.assert_close(robust(x), expected, **TOL)

    back, reverted = revert(robust)
    assert type(back) is timm_layers.DiffAttention and reverted.reverted == [""]
    assert back.lambda_init == module.lambda_init and back.fused_attn is fused
    assert all(getattr(back, n).dtype == torch.float32 for n in TIMM_TO_OURS if "lambda" in n)
    assert not any(t.is_meta for t in back.state_dict().values())
    stock = _stock(dim=dim, num_heads=num_heads, depth=depth, **options).eval()
    stock.load_state_dict(back.state_dict(), strict=True)
    stock.fused_attn = fused
    torch.testing.assert_close(back(x), expected, **TOL)
    torch.testing.assert_close(stock(x), expected, **TOL)


def test_gradients_match_timm():
    module = _diff(48, 4, 2, qkv_bias=True).train()
    robust = convert(copy.deepcopy(module), "differential")[0].train()
    x = torch.randn(2, 6, 48, generator=torch.Generator().manual_seed(4))
    module(x).square().sum().backward()
    robust(x).square().sum().backward()
    ours = dict(robust.named_parameters())
    for name, parameter in module.named_parameters():
        torch.testing.assert_close(ours[TIMM_TO_OURS.get(name, name)].grad, parameter.grad,
                                   atol=1e-4, rtol=1e-4)


def test_dropout_comes_from_attn_drop_p_and_goes_back():
    module = _diff(attn_drop=0.25, proj_drop=0.125)
    robust, _ = convert(module, "differential")
    assert robust.attn_drop.p == 0.25 and robust.proj_drop.p == 0.125
    back, _ = revert(robust)
    assert back.attn_drop_p == back.attn_drop.p == 0.25 and back.proj_drop.p == 0.125


def test_a_frozen_diff_attention_stays_frozen():
    module = _diff().requires_grad_(False)
    robust, _ = convert(module, "differential")
    assert not any(p.requires_grad for p in robust.parameters())


def _dwee(**kwargs):
    torch.manual_seed(0)
    return timm.create_model("vit_dwee_patch16_reg1_gap_256", pretrained=False,
                             **{**SMALL_DWEE, **kwargs}).eval()


@pytest.mark.parametrize("kwargs", [{}, {"embed_dim": 64, "num_heads": 4, "qkv_bias": True}],
                         ids=["small", "wider"])
def test_vit_dwee_converts_and_reverts(kwargs):
    assert timm.list_models("*dwee*") == ["vit_dwee_patch16_reg1_gap_256"]
    model = _dwee(**kwargs)
    names = [f"blocks.{i}.attn" for i in range(SMALL_DWEE["depth"])]
    with torch.no_grad():
        for name in names:
            randomise_lambda_and_gain(model.get_submodule(name), torch.Generator().manual_seed(1))
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    expected = model(images)

    model, summary = convert(model, "differential")
    assert summary.swapped == names and not summary.skipped and summary.preserves_function
    assert [model.get_submodule(n).mitigations["differential"].layer for n in names] == [1, 2, 3, 4]
    torch.testing.assert_close(model(images), expected, **TOL)

    model, reverted = revert(model)
    assert reverted.reverted == names and not reverted.dropped
    assert all(type(model.get_submodule(n)) is timm_layers.DiffAttention for n in names)
    stock = _dwee(**kwargs)
    stock.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(stock(images), expected, **TOL)
    torch.testing.assert_close(model(images), expected, **TOL)


def test_vit_dwee_at_its_own_width():
    """The registered architecture's attention (embed_dim 256, 4 heads: D 64), fewer blocks."""
    model = _dwee(img_size=64, patch_size=16, embed_dim=256, num_heads=4, depth=2)
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    expected = model(images)
    model, summary = convert(model, "differential")
    assert len(summary.swapped) == 2 and summary.preserves_function
    torch.testing.assert_close(model(images), expected, **TOL)
    model, _ = revert(model)
    torch.testing.assert_close(model(images), expected, **TOL)


class _Pair(nn.Module):
    def __init__(self, other):
        super().__init__()
        self.ok = _diff()
        self.other = other

    def forward(self, x):
        return self.ok(x) + self.other(x)


@pytest.mark.parametrize(("other", "reason"), [
    (lambda: timm_layers.DiffAttention(32, num_heads=2, dual_lambda=True), "dual_lambda=True"),
    (lambda: timm_layers.DiffAttention(32, num_heads=2, qk_norm=True),
     r"qk_norm=True\) normalises each half-head \(width 8\)"),
], ids=["dual_lambda", "qk_norm"])
def test_unsupported_diff_attention_is_skipped_with_its_reason(other, reason):
    pair = _Pair(other()).eval()
    x = torch.randn(2, 5, 32)
    expected = pair(x)
    _, summary = convert(pair, "differential")
    assert summary.swapped == ["ok"]
    assert list(summary.skipped) == ["other"]
    assert re.search(reason, summary.skipped["other"]), summary.skipped
    torch.testing.assert_close(pair(x), expected, **TOL)
    with pytest.raises(ValueError, match=reason):
        convert(other(), "differential")


def test_a_hand_set_lambda_init_is_refused():
    module = _diff()
    module.lambda_init = 0.5
    with pytest.raises(ValueError, match=r"lambda_init=0.5 is no integer layer's"):
        convert(module, "differential")


@pytest.mark.filterwarnings("ignore:outlier_removal with proj_bias=True")  # before the conflict
@pytest.mark.parametrize(("variant", "conflict"), [
    ("sink", "'differential' and 'sink_logit' conflict"),
    ("robust", "'differential' and 'outlier_removal' conflict"),
    ("sigmoid", "'differential' and 'sigmoid' conflict"),
    ("outlier_removal", "'differential' and 'outlier_removal' conflict"),
])
def test_presets_that_conflict_with_differential_are_skipped_with_the_conflict(variant, conflict):
    pair = _Pair(timm_layers.Attention(32, num_heads=2))
    _, summary = convert(pair, variant)
    assert "other" in summary.swapped and list(summary.skipped) == ["ok"]
    reason = summary.skipped["ok"]
    assert "DiffAttention converts with differential=1" in reason and conflict in reason, reason


def test_a_preset_that_combines_keeps_differential_forced_to_the_layer():
    module = _diff(depth=4)
    robust, summary = convert(module, "sigma_reparam")
    assert robust.mitigations["differential"].layer == 5
    assert set(robust.mitigations) == {"differential", "sigma_reparam"}
    assert summary.preserves_function
    back, reverted = revert(robust)
    assert type(back) is timm_layers.DiffAttention and not reverted.dropped


def test_another_differential_layer_is_refused():
    with pytest.raises(ValueError, match=r"differential=3 would replace .* differential=5"):
        convert(_diff(depth=4), "differential", differential=3)
    robust, _ = convert(_diff(depth=4), "differential", differential=5)
    assert robust.mitigations["differential"].layer == 5


@pytest.mark.parametrize("variant", ["qk_norm", "gated"])
def test_added_qk_norm_or_gate_cannot_go_back_to_diff_attention(variant):
    robust, summary = convert(_diff(), variant)
    assert summary.changes_function == {"": [variant]}
    with pytest.raises(ValueError, match=rf"would drop .*\[.{variant}.\]"):
        revert(robust)
    back, reverted = revert(robust, allow_lossy=True)
    assert reverted.dropped == {"": [variant]}
    assert type(back) is timm_layers.DiffAttention
    assert isinstance(back.q_norm, nn.Identity) and not hasattr(back, "gate")
    stock = timm_layers.DiffAttention(32, num_heads=2)
    stock.load_state_dict(back.state_dict(), strict=True)


def test_revert_refuses_what_diff_attention_cannot_build():
    robust, _ = convert(_diff(), "differential")
    wide = RobustAttention(32, num_heads=2, dim_out=48, differential=1)
    wide.timm_origin = robust.timm_origin
    with pytest.raises(ValueError, match="DiffAttention has no dim_out"):
        revert(nn.Sequential(robust, wide))
    narrow = RobustAttention(32, num_heads=2, attn_head_dim=8, differential=1)
    narrow.timm_origin = robust.timm_origin
    with pytest.raises(ValueError, match="DiffAttention has no attn_head_dim"):
        revert(narrow)


def test_converting_twice_raises_unless_ignored():
    model = _dwee()
    model, _ = convert(model, "differential")
    with pytest.raises(ValueError, match="already a RobustAttention"):
        convert(model, "differential")
    _, summary = convert(model, "differential", if_nothing="ignore")
    assert not summary.swapped and all(r == "already a RobustAttention"
                                       for r in summary.skipped.values())


def test_plain_attention_with_the_differential_preset():
    """Every module gets layer 1 (convert does not know block indices); an override per block
    gives the paper's schedule; an odd head width is skipped naming differential; timm's
    Attention cannot hold it on revert."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                              embed_dim=32, depth=3, num_heads=2, num_classes=3).eval()
    names = [f"blocks.{i}.attn" for i in range(3)]
    layer_one, summary = convert(copy.deepcopy(model), "differential")
    assert summary.swapped == names and summary.changes_function == {n: ["differential"]
                                                                     for n in names}
    assert {layer_one.get_submodule(n).mitigations["differential"].layer for n in names} == {1}
    for i, name in enumerate(names):
        model, _ = convert(model, "differential", include=name, differential=i + 1)
    assert [model.get_submodule(n).mitigations["differential"].layer for n in names] == [1, 2, 3]
    assert model(torch.randn(1, 3, 32, 32)).isfinite().all()
    with pytest.raises(ValueError, match="differential"):
        revert(model)

    odd = nn.Sequential(timm_layers.Attention(12, num_heads=4))  # head width 3
    with pytest.raises(ValueError, match="differential needs a head width that is a multiple "
                                         "of 2, got 3"):
        convert(odd, "differential")
