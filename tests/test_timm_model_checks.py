"""Issue 15, item 5: the checks timm's own model tests make pass on converted timm models.

Four timm architectures (plain ViT, DeiT, EVA-02 with RoPE, ViT with RoPE), built small with
random weights and converted right after creation with "baseline" and "robust" (qk_norm and
outlier removal: a q/k normalisation and an output transform inside the module): forward and
backward, torch.fx feature extraction (timm's ``FeatureGraphNet``, what ``features_only=True,
feature_cls="fx"`` builds) and a trace of the whole model, the meta device, reset_classifier,
bfloat16 and float16 casts, forward_intermediates, and TorchScript's documented refusal.
"""

import pytest
import torch

import robust_attn
from robust_attn import RobustAttention

timm = pytest.importorskip("timm")
from timm.layers import create_feature_extractor, get_graph_node_names  # noqa: E402
from timm.models import FeatureGraphNet  # noqa: E402

# name -> small config (the smallest image each patch size allows a few tokens in; two blocks)
MODELS = {
    "vit_tiny_patch16_224": dict(img_size=32, depth=2),
    "deit_tiny_patch16_224": dict(img_size=32, depth=2),
    "eva02_tiny_patch14_224": dict(img_size=28, depth=2),
    "vit_small_patch16_rope_224": dict(img_size=32, depth=2),
}
PRESETS = ("baseline", "robust")
# convert keeps the timm weights' proj bias, which outlier removal's warning is about
pytestmark = pytest.mark.filterwarnings("ignore::robust_attn.DefeatedMitigationWarning")


def each_model_and_preset(test):
    return pytest.mark.parametrize("name", MODELS)(pytest.mark.parametrize("preset", PRESETS)(test))


def _converted(name: str, preset: str, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **MODELS[name], **kwargs)
    model, summary = robust_attn.convert(model, preset)
    assert len(summary.swapped) == MODELS[name]["depth"]
    return model


def _input(name: str, batch: int = 2) -> torch.Tensor:
    size = MODELS[name]["img_size"]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))


@each_model_and_preset
def test_forward_and_backward_reach_every_parameter(name, preset):
    model = _converted(name, preset, num_classes=7)
    out = model(_input(name))
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing


def _block_outputs(model: torch.nn.Module, x: torch.Tensor, blocks: int) -> list[torch.Tensor]:
    """The outputs of the first ``blocks`` blocks in an eager forward (forward hooks)."""
    outputs = []
    handles = [block.register_forward_hook(lambda m, i, o: outputs.append(o))
               for block in model.blocks[:blocks]]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return outputs


@each_model_and_preset
def test_fx_feature_extraction_returns_the_blocks_outputs(name, preset):
    model = _converted(name, preset).eval()
    features = FeatureGraphNet(model, out_indices=(0, 1)).eval()  # features_only, feature_cls="fx"
    attention = [n for n, m in features.named_modules() if isinstance(m, RobustAttention)]
    assert len(attention) == 2  # leaf modules: call_module nodes, not traced inside
    x = _input(name)
    with torch.no_grad():
        got = features(x)
    assert len(got) == 2
    for ours, eager in zip(got, _block_outputs(model, x, 2), strict=True):
        torch.testing.assert_close(ours, eager, rtol=0, atol=0)


@each_model_and_preset
def test_whole_model_fx_graph_computes_the_model(name, preset):
    model = _converted(name, preset).eval()
    _, eval_nodes = get_graph_node_names(model)
    graph = create_feature_extractor(model, {eval_nodes[-1]: "out"}).eval()
    x = _input(name)
    with torch.no_grad():
        torch.testing.assert_close(graph(x)["out"], model(x), rtol=0, atol=0)


@each_model_and_preset
def test_plain_fx_symbolic_trace_names_the_leaf_module_way(name, preset):
    with pytest.raises(TypeError, match="torch.fx cannot trace inside RobustAttention.*leaf"):
        torch.fx.symbolic_trace(_converted(name, preset))


@each_model_and_preset
def test_built_on_meta_converted_and_materialised_computes_what_the_source_computes(name, preset):
    source = _converted(name, preset).eval()
    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, **MODELS[name])
    model, _ = robust_attn.convert(model, preset)
    x = _input(name)
    assert model(x.to("meta")).shape == source(x).shape  # shape inference on meta
    model = model.to_empty(device="cpu")
    model.load_state_dict(source.state_dict())
    for module in model.modules():  # non-persistent state: timm's RoPE tables, ours
        if callable(getattr(module, "init_non_persistent_buffers", None)):
            module.init_non_persistent_buffers()
        if isinstance(module, RobustAttention):
            module.reset_from_weights()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), source(x), rtol=0, atol=0)


@each_model_and_preset
def test_reset_classifier(name, preset):
    model = _converted(name, preset)
    x = _input(name)
    model.reset_classifier(5)
    assert model(x).shape == (2, 5)
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)


def _attention_outputs(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list]:
    """The model's output and each RobustAttention's output in one forward (forward hooks)."""
    outputs = []
    handles = [m.register_forward_hook(lambda m, i, o: outputs.append(o))
               for m in model.modules() if isinstance(m, RobustAttention)]
    with torch.no_grad():
        out = model(x)
    for handle in handles:
        handle.remove()
    return out, outputs


@each_model_and_preset
@pytest.mark.parametrize(("cast", "dtype"), [(lambda m: m.to(torch.bfloat16), torch.bfloat16),
                                              (lambda m: m.half(), torch.float16)],
                         ids=["to_bfloat16", "half"])
def test_low_precision_cast_runs_near_float32(name, preset, cast, dtype):
    """Each attention module's output, not only the model's: at random init, timm's layer scale
    (1e-5 in vit_small_patch16_rope_224) leaves the attention a negligible share of the output."""
    model = _converted(name, preset).eval()
    x = _input(name)
    reference, references = _attention_outputs(model, x)
    out, outputs = _attention_outputs(cast(model), x.to(dtype))
    assert out.dtype == dtype and out.shape == reference.shape and torch.isfinite(out).all()
    assert len(outputs) == len(references) == MODELS[name]["depth"]
    # rounding of a few eps per block, relative to the outputs' scale (measured: at most 1.6 eps)
    eps = torch.finfo(dtype).eps
    for low, full in zip([out, *outputs], [reference, *references], strict=True):
        assert low.dtype == dtype
        torch.testing.assert_close(low.float(), full, rtol=0, atol=8 * eps * full.abs().max())


@each_model_and_preset
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torchscript_is_refused_with_what_to_use(name, preset):
    with pytest.raises(RuntimeError, match="RobustAttention does not support TorchScript.*"
                                           "torch.compile.*torch.export"):
        torch.jit.script(_converted(name, preset))


@each_model_and_preset
def test_forward_intermediates(name, preset):
    model = _converted(name, preset).eval()
    x = _input(name)
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x, indices=2)
        features = model.forward_features(x)
    torch.testing.assert_close(final, features, rtol=0, atol=0)
    assert len(intermediates) == 2
    assert all(t.shape[:2] == (2, model.embed_dim) and t.dim() == 4 for t in intermediates)


def test_features_only_fx_with_attn_layer():
    """timm's features_only=True, feature_cls="fx" on a model built with robust_attn.layer: the
    subclass layer() makes is a leaf too (timm's tracer tests isinstance against its registry)."""
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **MODELS["vit_tiny_patch16_224"],
                              attn_layer=robust_attn.layer("qk_norm"), features_only=True,
                              feature_cls="fx", out_indices=(1,))
    assert isinstance(model, FeatureGraphNet)
    assert sum(isinstance(m, RobustAttention) for m in model.modules()) == 2
    (features,) = model(_input("vit_tiny_patch16_224"))
    assert features.shape[0] == 2 and torch.isfinite(features).all()


def test_torchvision_feature_extractor_with_robust_attention_as_leaf():
    """The way the refusal and the README give for tracers other than timm's."""
    from torchvision.models.feature_extraction import create_feature_extractor as tv_extractor

    model = _converted("deit_tiny_patch16_224", "baseline").eval()
    graph = tv_extractor(model, {"blocks.1": "last"},
                         tracer_kwargs={"leaf_modules": [RobustAttention]}).eval()
    x = _input("deit_tiny_patch16_224")
    with torch.no_grad():
        got = graph(x)["last"]
    torch.testing.assert_close(got, _block_outputs(model, x, 2)[1], rtol=0, atol=0)


@pytest.mark.parametrize("entry", [lambda: robust_attn.layer("softcap", softcap=7.0),
                                   lambda: _converted("vit_tiny_patch16_224", "baseline")],
                         ids=["layer", "convert"])
def test_layer_and_convert_register_the_leaf_with_timm(entry, monkeypatch):
    """Each way into a timm model registers RobustAttention (in a process where nothing did)."""
    from robust_attn.integrations.timm.fx import register_fx_leaf

    registered = []
    monkeypatch.setattr(timm.layers, "register_notrace_module", registered.append)
    register_fx_leaf.cache_clear()
    try:
        entry()
    finally:
        register_fx_leaf.cache_clear()  # the next call registers with timm's own function again
    assert registered == [RobustAttention]
