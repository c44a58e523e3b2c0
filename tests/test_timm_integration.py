"""timm integration: convert keeps pretrained weights, revert gives stock timm back, attn_layer=."""

import copy
import functools
import pickle
import re

import pytest
import torch
from torch import nn

import robust_attn
from robust_attn import RobustAttention, convert, layer, list_variants, revert
from robust_attn.integrations import PresetAttention, RobustAttentionRope
from robust_attn.integrations.timm import attn_layer as layer_module
from robust_attn.mitigations.rope import RopeLayout, apply_rotary

timm = pytest.importorskip("timm")
timm_layers = pytest.importorskip("timm.layers")
eva = pytest.importorskip("timm.models.eva")

SMALL = {"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 3}
ROPE_VIT = {**SMALL, "img_size": 32, "init_values": None}
# name -> (timm model, kwargs, image size, attention class)
ARCHITECTURES = {
    "vit": ("vit_tiny_patch16_224", {**SMALL, "img_size": 32}, 32, "Attention"),
    "vit_qk_norm": ("vit_tiny_patch16_224", {**SMALL, "img_size": 32, "qk_norm": True}, 32,
                    "Attention"),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", {**SMALL, "img_size": 32}, 32,
                       "Attention"),
    "vit_reg4": ("vit_base_patch16_reg4_gap_256", {**SMALL, "img_size": 32, "init_values": None},
                 32, "Attention"),
    "vit_rope": ("vit_small_patch16_rope_224", {**ROPE_VIT}, 32, "AttentionRope"),
    "vit_rope_unfused": ("vit_small_patch16_rope_224", {**ROPE_VIT, "qkv_fused": False}, 32,
                         "AttentionRope"),
    "eva02": ("eva02_tiny_patch14_224", {**SMALL, "patch_size": 14, "img_size": 28}, 28,
              "EvaAttention"),
    "eva02_unfused": ("eva02_tiny_patch14_224", {**SMALL, "patch_size": 14, "img_size": 28,
                                                 "qkv_fused": False}, 28, "EvaAttention"),
}
ATTENTION_NAMES = ["blocks.0.attn", "blocks.1.attn"]
# Variants with a function-preserving conversion, per robust_attn.integrations.timm.convert.
PRESERVING = ["baseline", "qk_clip", "sigma_reparam", "sink", "spectral_qk"]
ROPE = ("vit_rope", "vit_rope_unfused", "eva02", "eva02_unfused")


def _conflict(architecture, variant):
    """The conflict that keeps ``variant`` off ``architecture``'s attention, or None."""
    if variant == "qk_clip":
        return "options 'qk_clip' and 'qk_norm' conflict" if architecture == "vit_qk_norm" else None
    if variant != "spectral_qk":
        return None
    if architecture in ROPE:
        return "options 'rope' and 'spectral_qk' conflict"
    return "options 'spectral_qk' and 'qk_norm' conflict" if architecture == "vit_qk_norm" else None


@functools.lru_cache
def _built(architecture, extra):
    name, kwargs, _, _ = ARCHITECTURES[architecture]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **{**kwargs, **dict(extra)}).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.normal_(std=0.3)
        for module in model.modules():  # logits of order 10, so that every mitigation shows
            if isinstance(module, nn.Linear) and module.out_features == 3 * module.in_features:
                module.weight.normal_(std=1.0)
    return model


def _model(architecture, **extra):
    """A small timm model (a fresh copy), with biases and norms moved off their init (0, 1)."""
    return copy.deepcopy(_built(architecture, tuple(sorted(extra.items()))))


def _images(architecture, batch=2):
    size = ARCHITECTURES[architecture][2]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


def _attention_types(model):
    return {name: type(module).__name__ for name, module in model.named_modules()
            if name in ATTENTION_NAMES}


@pytest.mark.parametrize("variant", PRESERVING)
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_function_preserving_conversion_keeps_outputs(architecture, variant):
    model = _model(architecture)
    x = _images(architecture)
    expected = model(x)
    converted, summary = convert(model, variant, if_nothing="ignore")  # a conflict swaps nothing
    assert converted is model
    conflict = _conflict(architecture, variant)
    if conflict:  # left alone, with the reason
        assert summary.swapped == []
        assert set(summary.skipped) == set(ATTENTION_NAMES)
        assert all(conflict in reason for reason in summary.skipped.values())
        assert set(_attention_types(model).values()) == {ARCHITECTURES[architecture][3]}
    else:
        assert summary.swapped == ATTENTION_NAMES and summary.skipped == {}
        assert all(isinstance(model.get_submodule(n), RobustAttention) for n in ATTENTION_NAMES)
    assert summary.preserves_function and summary.changes_function == {}
    torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", sorted(set(list_variants()) - set(PRESERVING)))
@pytest.mark.filterwarnings("ignore:sparsity pattern")  # dense fallback on short sequences
def test_function_changing_variants_are_reported_and_do_change(variant):
    model = _model("vit", patch_size=4)  # 65 tokens: longer than block_sparse's 64-token blocks
    x = _images("vit")
    expected = model(x)
    _, summary = convert(model, variant)
    assert summary.swapped == ATTENTION_NAMES
    assert set(summary.changes_function) == set(ATTENTION_NAMES)
    assert not summary.preserves_function
    options = robust_attn.preset_options(variant)
    for changes in summary.changes_function.values():
        assert set(changes) == {name for name, value in options.items() if value}
    assert not torch.allclose(model(x), expected, atol=1e-4, rtol=1e-4)


def test_preserve_function_false_uses_the_papers_initialisation():
    model = _model("vit")
    _, summary = convert(model, "sigma_reparam", preserve_function=False)
    assert summary.changes_function == {name: ["sigma_reparam"] for name in ATTENTION_NAMES}
    assert model.blocks[0].attn.qkv.gamma.item() == 1.0


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_converted_parameters_train_unless_the_module_was_frozen(architecture):
    model = _model(architecture)
    model.blocks[0].attn.requires_grad_(False)
    convert(model, "sigma_reparam")
    frozen, trained = model.blocks[0].attn, model.blocks[1].attn
    assert all(p.requires_grad for p in trained.parameters())
    assert not any(p.requires_grad for name, p in frozen.named_parameters()
                   if name.startswith(("qkv.", "proj.", "q_norm.", "k_norm.", "norm.")))


def test_converted_state_dict_keeps_every_timm_weight():
    model = _model("vit_qk_norm")
    original = {name: value.clone() for name, value in model.state_dict().items()}
    convert(model, "sigma_reparam")
    converted = model.state_dict()
    extras = set(converted) - set(original)
    assert extras and all(name.rsplit(".", 1)[1] in {"gamma", "u", "v"} for name in extras)
    for name, value in original.items():
        torch.testing.assert_close(converted[name], value, atol=0, rtol=0, msg=name)


def test_eva_biases_map_to_the_fused_qkv_bias_with_a_zero_key_third():
    model = _model("eva02")
    source = model.blocks[0].attn
    q_bias, v_bias = source.q_bias.detach().clone(), source.v_bias.detach().clone()
    convert(model, "baseline")
    bias = model.blocks[0].attn.qkv.bias.detach()
    torch.testing.assert_close(bias, torch.cat([q_bias, torch.zeros_like(q_bias), v_bias]))
    x = _images("eva02")
    expected = model(x)
    with torch.no_grad():  # as an optimiser step would: the key third is reset at the forward
        model.blocks[0].attn.qkv.bias[32:64].fill_(5.0)
    torch.testing.assert_close(model(x), expected, atol=0, rtol=0)


def _train_steps(model, x, steps=2):
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        loss = model(x).square().mean() + sum(
            m.auxiliary_loss() for m in model.modules() if isinstance(m, RobustAttention))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.mark.parametrize("architecture,variant,stock_kwargs", [
    *((architecture, "sigma_reparam", {}) for architecture in ARCHITECTURES),
    ("vit", "baseline", {}), ("eva02", "baseline", {}), ("vit", "spectral_qk", {}),
    ("vit", "qk_norm", {"qk_norm": True}), ("vit_rope_unfused", "qk_norm", {"qk_norm": True}),
])
def test_retrained_model_reverts_and_loads_strictly_into_stock_timm(architecture, variant,
                                                                     stock_kwargs):
    model = _model(architecture)
    x = _images(architecture)
    convert(model, variant)
    expected = _train_steps(model, x)(x)

    reverted, summary = revert(model)
    assert summary.reverted == ATTENTION_NAMES and summary.dropped == {}
    assert set(_attention_types(reverted).values()) == {ARCHITECTURES[architecture][3]}
    assert not any(t.is_meta for t in [*reverted.parameters(), *reverted.buffers()])
    torch.testing.assert_close(reverted(x), expected, atol=1e-5, rtol=1e-5)
    stock = _model(architecture, **stock_kwargs)
    stock.load_state_dict(reverted.state_dict(), strict=True)
    torch.testing.assert_close(stock(x), expected, atol=1e-5, rtol=1e-5)


def test_revert_refuses_to_drop_mitigations_unless_allowed():
    model = _model("vit")
    x = _images("vit")
    convert(model, "outlier_removal")
    converted_output = model(x)
    with pytest.raises(ValueError, match="outlier_removal"):
        revert(model)
    assert all(isinstance(model.get_submodule(n), RobustAttention) for n in ATTENTION_NAMES)
    reverted, summary = revert(model, allow_lossy=True)
    assert summary.dropped == {name: ["outlier_removal"] for name in ATTENTION_NAMES}
    assert not torch.allclose(reverted(x), converted_output, atol=1e-4)
    _model("vit").load_state_dict(reverted.state_dict(), strict=True)


def test_include_and_exclude_select_modules_by_name_pattern():
    model = _model("vit")
    _, summary = convert(model, "sigma_reparam", include="blocks.1.*")
    assert summary.swapped == ["blocks.1.attn"]
    assert "not matched by include" in summary.skipped["blocks.0.attn"]
    assert isinstance(model.blocks[0].attn, timm_layers.Attention)

    model = _model("vit")
    _, summary = convert(model, "sigma_reparam", exclude=["blocks.0.*", "head*"])
    assert summary.swapped == ["blocks.1.attn"]
    assert "exclude pattern 'blocks.0.*'" in summary.skipped["blocks.0.attn"]


def test_converting_twice_skips_the_robust_modules():
    model = _model("vit")
    convert(model, "sink")
    with pytest.raises(ValueError, match=r"blocks\.1\.attn \(RobustAttention\): already a Robust"):
        convert(model, "baseline")
    _, summary = convert(model, "baseline", if_nothing="ignore")
    assert summary.swapped == [] and set(summary.skipped.values()) == {"already a RobustAttention"}


def test_unknown_options_raise_before_any_module_is_swapped():
    model = _model("vit")
    with pytest.raises(TypeError, match=r"option\(s\) \['soft_cap'\] it does not take"):
        convert(model, "softcap", soft_cap=3.0)
    with pytest.raises(TypeError, match="qkv_bias"):  # taken from each module, not an option
        convert(model, "baseline", qkv_bias=False)
    with pytest.raises(ValueError, match="if_nothing='quiet'"):
        convert(model, "baseline", if_nothing="quiet")
    assert set(_attention_types(model).values()) == {"Attention"}
    _, summary = convert(model, "softcap", softcap=3.0, probe=True, attn_drop=0.1)
    assert summary.swapped == ATTENTION_NAMES and model.blocks[0].attn.probe


def test_converting_nothing_raises_naming_what_was_found_unless_told_to_warn():
    model = _model("vit")
    with pytest.raises(ValueError, match=r"(?s)swapped no module of VisionTransformer.*"
                       r"blocks\.0\.attn \(Attention\): not matched by include=\['block\.\*'\]"
                       r".*blocks\.1\.attn \(Attention\): not matched"):
        convert(model, "sigma_reparam", include="block.*")
    with pytest.warns(UserWarning, match="swapped no module") as caught:
        _, summary = convert(model, "sigma_reparam", include="block.*", if_nothing="warn")
    assert caught[0].filename == __file__  # attributed to the caller
    assert summary.swapped == [] and set(summary.skipped) == set(ATTENTION_NAMES)
    assert set(_attention_types(model).values()) == {"Attention"}
    with pytest.raises(ValueError, match="found no attention-like module"):
        convert(nn.Sequential(nn.Linear(4, 4), nn.GELU()), "sigma_reparam")


# timm attention that convert does not support: model, kwargs, name -> class of the skipped modules
UNRECOGNISED = {
    "convit": ("convit_tiny", {"img_size": 32, "depth": 2, "local_up_to_layer": 1},
               {"blocks.0.attn": "GPSA", "blocks.1.attn": "MHSA"}),
    "xcit": ("xcit_nano_12_p16_224", {"img_size": 32, "depth": 1, "cls_attn_layers": 1},
             {"blocks.0.attn": "XCA", "cls_attn_blocks.0.attn": "ClassAttn"}),
}


@pytest.mark.parametrize("family", UNRECOGNISED)
def test_unrecognised_attention_is_listed_with_its_class(family):
    name, kwargs, expected = UNRECOGNISED[family]
    model = timm.create_model(name, pretrained=False, **kwargs)
    _, summary = convert(model, "sigma_reparam", if_nothing="ignore")
    assert summary.skipped == {module: f"{cls} is not a supported timm attention class"
                               for module, cls in expected.items()}
    with pytest.raises(ValueError, match=rf"{re.escape(next(iter(expected)))} \("):
        convert(model, "sigma_reparam")


def test_timms_own_gate_becomes_the_gated_mitigation_and_goes_back():
    torch.manual_seed(0)
    module = timm_layers.Attention(32, num_heads=4, qkv_bias=True, gated=True).eval()
    x = torch.randn(2, 5, 32)
    expected = module(x)
    converted, summary = convert(module, "sigma_reparam")
    assert isinstance(converted, RobustAttention) and summary.swapped == [""]
    assert summary.preserves_function
    torch.testing.assert_close(converted(x), expected, atol=1e-6, rtol=1e-6)
    reverted, _ = revert(converted)
    assert type(reverted) is timm_layers.Attention and reverted.gate is not None
    torch.testing.assert_close(reverted(x), expected, atol=1e-6, rtol=1e-6)


class _Zoo(nn.Module):
    """One supported module beside several that convert must leave working."""

    def __init__(self):
        super().__init__()
        self.plain = timm_layers.Attention(32, num_heads=4)
        self.gated_scale_norm = timm_layers.Attention(32, num_heads=4, gated=True, scale_norm=True,
                                                      norm_layer=nn.LayerNorm)
        self.gqa = timm_layers.AttentionRope(32, num_heads=4, num_kv_heads=2, qkv_fused=False)
        self.torch_mha = nn.MultiheadAttention(32, num_heads=4, batch_first=True, add_bias_kv=True)
        self.diff = timm.models.vision_transformer.DiffAttention(32, num_heads=4)

    def forward(self, x):
        y = self.plain(x) + self.gated_scale_norm(x) + self.gqa(x) + self.diff(x)
        return y + self.torch_mha(x, x, x, need_weights=False)[0]


def test_unsupported_attention_is_reported_and_left_working():
    zoo = _Zoo().eval()
    x = torch.randn(2, 6, 32)
    expected = zoo(x)
    _, summary = convert(zoo, "sink")
    assert summary.swapped == ["plain"]
    assert set(summary.skipped) == {"gated_scale_norm", "gqa", "torch_mha", "diff"}
    assert "after scale_norm" in summary.skipped["gated_scale_norm"]
    assert "grouped-query" in summary.skipped["gqa"]
    assert "add_bias_kv=True" in summary.skipped["torch_mha"]  # tests/test_torch_mha.py
    # DiffAttention converts to 'differential', which a sink preset conflicts with
    assert "DiffAttention" in summary.skipped["diff"] and "sink_logit" in summary.skipped["diff"]
    torch.testing.assert_close(zoo(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("architecture", ["vit", "vit_rope", "eva02"])
def test_health_on_a_converted_model_with_timms_fused_path(architecture):
    model = _model(architecture)
    convert(model, "sigma_reparam")
    attentions = [model.get_submodule(name) for name in ATTENTION_NAMES]
    assert all(a.fused_attn for a in attentions)
    x = _images(architecture)
    quiet = model(x)
    assert all(a.health is None for a in attentions)
    with robust_attn.health_probe():
        probed = model(x)
    torch.testing.assert_close(probed, quiet, atol=0, rtol=0)
    for attention in attentions:
        health = attention.health
        assert health.entropy.shape == (2,) and torch.isfinite(health.entropy).all()
        assert 0 <= health.min_entropy.min() <= health.entropy.max() <= 1
        assert "sigma_reparam.qkv.gamma" in health.extras


def test_attn_layer_route_builds_vision_transformers():
    cls = layer("qk_norm")
    assert cls is layer("qk_norm") and issubclass(cls, PresetAttention)
    assert layer("softcap", softcap=30.0) is not layer("softcap")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, attn_layer=cls,
                              **{**SMALL, "img_size": 32}).eval()
    attentions = [model.get_submodule(name) for name in ATTENTION_NAMES]
    assert all(type(a) is cls and not isinstance(a.q_norm, nn.Identity) for a in attentions)
    x = _images("vit")
    output = model(x)

    reverted, _ = revert(copy.deepcopy(model))
    stock = timm.create_model("vit_tiny_patch16_224", pretrained=False, qk_norm=True,
                              **{**SMALL, "img_size": 32}).eval()
    stock.load_state_dict(reverted.state_dict(), strict=True)
    torch.testing.assert_close(stock(x), output, atol=1e-5, rtol=1e-5)


def test_layer_takes_timms_qk_norm_and_proj_bias_beside_the_presets_own():
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, qk_norm=True,
                              attn_layer=layer("qk_norm"), **{**SMALL, "img_size": 32})
    assert all(model.get_submodule(name).normalises_qk for name in ATTENTION_NAMES)
    assert "proj_bias" in layer("outlier_removal").layer_options
    assert layer("outlier_removal")(32, 2, proj_bias=False).proj.bias is None


def test_layer_classes_and_models_pickle_in_a_fresh_cache(monkeypatch):
    cls = layer("sigma_reparam", softcap=20.0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, attn_layer=cls,
                              **{**SMALL, "img_size": 32}).eval()
    x = _images("vit")
    class_bytes, model_bytes = pickle.dumps(cls), pickle.dumps(model)
    monkeypatch.setattr(layer_module, "_CLASSES", {})  # as in a process that never called layer
    rebuilt = pickle.loads(class_bytes)
    assert rebuilt is not cls and rebuilt.layer_options == cls.layer_options
    loaded = pickle.loads(model_bytes)
    assert type(loaded.blocks[0].attn) is rebuilt
    torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)


def test_layer_rejects_unknown_variants_and_unhashable_options():
    with pytest.raises(ValueError, match="not a preset"):
        layer("no_such_variant")
    with pytest.raises(TypeError, match="hashable"):
        layer("softcap", softcap=[30.0])


@pytest.mark.parametrize("rotate_half", [False, True])
@pytest.mark.parametrize("prefix", [0, 1, 3])
def test_rotary_embedding_equals_timms(rotate_half, prefix):
    q = torch.randn(2, 3, 7 + prefix, 8)
    embedding = torch.randn(7, 16)
    expected = torch.cat([q[:, :, :prefix], timm_layers.apply_rot_embed_cat(
        q[:, :, prefix:], embedding, half=rotate_half)], dim=2)
    torch.testing.assert_close(apply_rotary(q, embedding, RopeLayout(prefix, rotate_half)),
                               expected, atol=0, rtol=0)


@pytest.mark.parametrize("qkv_fused", [True, False])
def test_rope_module_equals_timms_attention_rope_with_and_without_rope(qkv_fused):
    torch.manual_seed(0)
    source = timm_layers.AttentionRope(32, num_heads=2, num_prefix_tokens=1, rotate_half=True,
                                       qkv_fused=qkv_fused).eval()
    x, embedding = torch.randn(2, 9, 32), torch.randn(8, 32)
    expected_with, expected_without = source(x, rope=embedding), source(x)
    converted, _ = convert(source, "baseline")
    assert isinstance(converted, RobustAttentionRope)
    torch.testing.assert_close(converted(x, rope=embedding), expected_with, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(converted(x), expected_without, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(expected_with, expected_without, atol=1e-3)
