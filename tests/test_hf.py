"""Hugging Face transformers integration (robust_attn.integrations.hf): the "robust_attn"
attention function against transformers' own sdpa and eager attention, convert and revert,
and the monitor and probe on converted models. Tiny models from configs with random weights."""

import copy
import math
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

import robust_attn  # noqa: E402
from robust_attn.integrations import hf  # noqa: E402
from robust_attn.mitigations import SigmaReparamLinear  # noqa: E402

VOCAB = 100


QUERY_KEY_WEIGHTS = ("q_proj.weight", "k_proj.weight", "query.weight", "key.weight", "c_attn.weight")


def sharpened(model):
    """``model`` in eval mode with its query and key weights scaled by 30: random weights at
    transformers' init (std 0.02) give nearly uniform attention, which hides masks and caps."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(QUERY_KEY_WEIGHTS):
                parameter.mul_(30.0)
    return model.eval()


def llama(heads=4, kv_heads=2, implementation="sdpa"):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=heads,
                                      num_key_value_heads=kv_heads, attn_implementation=implementation)
    return sharpened(transformers.LlamaForCausalLM(config))


def gpt2(implementation="sdpa"):
    torch.manual_seed(0)
    # scale_attn_by_inverse_layer_idx: the scaling transformers passes differs per layer
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                     scale_attn_by_inverse_layer_idx=True,
                                     attn_implementation=implementation)
    return sharpened(transformers.GPT2LMHeadModel(config))


def bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64,
                                     attn_implementation="sdpa")
    return sharpened(transformers.BertModel(config))


def vit():
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=64, image_size=16, patch_size=4,
                                    attn_implementation="sdpa")
    return sharpened(transformers.ViTModel(config))


def ids(batch=2, tokens=9, seed=1):
    return torch.randint(0, VOCAB, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def first_output(model, inputs):
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def inputs_of(name):
    if name == "vit":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))}
    return {"input_ids": ids()}


BUILDERS = {"llama": llama, "bert": bert, "vit": vit, "gpt2": gpt2}
# Reparametrised projections per layer: q, k, v and the output projection; GPT-2's fused c_attn
# and c_proj (transformers' Conv1D, reparametrised as the nn.Linear computing the same).
PROJECTIONS = {"llama": 4, "bert": 4, "vit": 4, "gpt2": 2}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_sigma_reparam_preserve_equals_stock(name):
    model = BUILDERS[name]()
    stock = copy.deepcopy(model)
    inputs = inputs_of(name)
    model, summary = robust_attn.convert(model, "sigma_reparam")
    assert summary.preserves_function and len(summary.swapped) == 2
    assert model.config._attn_implementation == "robust_attn"
    layers = [m for m in model.modules() if isinstance(m, SigmaReparamLinear)]
    assert len(layers) == 2 * PROJECTIONS[name]
    with torch.no_grad():
        torch.testing.assert_close(first_output(model, inputs), first_output(stock, inputs),
                                   atol=1e-5, rtol=0)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("builder", [llama, gpt2])
def test_function_equals_stock_attention(builder, implementation):
    """No mitigation: the model built with attn_implementation='robust_attn' (no container: our
    kernels alone) and a converted one (baseline: an empty container) equal transformers'
    own sdpa and eager attention; llama has grouped-query attention (4 heads, 2 kv heads)."""
    stock = builder(implementation=implementation)
    plain = builder(implementation="robust_attn")
    converted, summary = robust_attn.convert(builder(), "baseline")
    assert summary.preserves_function
    x = ids()
    with torch.no_grad():
        expected = stock(x).logits
        torch.testing.assert_close(plain(x).logits, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(converted(x).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("builder", [llama, gpt2])
def test_padding_mask_equals_stock(builder):
    """Left and right padding (attention_mask zeros): equal to stock sdpa on the real tokens."""
    stock = builder()
    model, _ = robust_attn.convert(builder(), "baseline")
    x = ids()
    mask = torch.ones_like(x)
    mask[0, :3] = 0   # left padding
    mask[1, -2:] = 0  # right padding
    with torch.no_grad():
        expected, got = stock(x, attention_mask=mask).logits, model(x, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-5, rtol=0)
    with torch.no_grad():  # the mask reaches the attention: without it, the outputs differ
        assert (model(x).logits[real] - got[real]).abs().max() > 1e-3


@pytest.mark.filterwarnings("ignore::robust_attn.DefeatedMitigationWarning")  # outlier_removal
@pytest.mark.parametrize("variant", ["softcap", "alibi", "sink", "scalable_softmax", "sigmoid",
                                     "gated", "outlier_removal", "strided", "sigma_reparam"])
@pytest.mark.parametrize("builder", [llama, gpt2])
def test_generate_with_cache_equals_without(builder, variant):
    """Greedy generation with the KV cache equals generation without it (query offsets: ALiBi's
    positions, the single decoding query, scalable-softmax's key counts)."""
    # A cap that bites. Sigmoid with its default b_i = -log(keys row i sees): a causal row's
    # count is its position + 1, as a cached decoding query's (sigmoid's preset also adds
    # qk_norm, which the HF function cannot run).
    overrides = {"softcap": {"softcap": 1.0}, "sigmoid": {"sigmoid": True},
                 "strided": {"sparsity": robust_attn.sparse.Strided(stride=3)}}.get(variant, {})
    model, _ = robust_attn.convert(builder(), "baseline" if variant == "sigmoid" else variant,
                                   **overrides)
    prompt = ids(batch=1, tokens=5)
    common = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        if variant == "strided":  # patterns do not know cached keys from prepended ones
            with pytest.raises(ValueError, match="sparsity.*use_cache=False"):
                model.generate(prompt, use_cache=True, **common)
            return
        cached = model.generate(prompt, use_cache=True, **common)
        uncached = model.generate(prompt, use_cache=False, **common)
        assert torch.equal(cached, uncached)
        full = model(cached).logits  # the cached decoding's logits equal one full forward's
        steps = model.generate(prompt, use_cache=True, output_logits=True, return_dict_in_generate=True,
                               **common).logits
    torch.testing.assert_close(torch.stack(steps, 1)[0], full[0, prompt.shape[1] - 1:-1],
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("builder", [llama, gpt2])
def test_sigmoid_left_padded_generation_with_cache_equals_without(builder):
    """Left padding: the mask carries causality in a full forward; sigmoid's b_i counts each
    row's allowed keys, as a cached decoding query's mask does (padding excluded both ways)."""
    model, _ = robust_attn.convert(builder(), "baseline", sigmoid=True)
    prompt = ids(batch=2, tokens=6)
    mask = torch.ones_like(prompt)
    mask[0, :2] = 0
    common = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, attention_mask=mask,
                  output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **common)
        uncached = model.generate(prompt, use_cache=False, **common)
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(uncached.logits),
                               atol=1e-5, rtol=0)


@pytest.mark.parametrize("builder", [llama, gpt2])
def test_static_cache_generation_equals_stock(builder):
    """A static cache: prefill has more keys (the cache's empty slots) than queries."""
    stock = builder()
    model, _ = robust_attn.convert(builder(), "baseline")
    prompt = ids(batch=1, tokens=5)
    common = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, cache_implementation="static")
    with torch.no_grad():
        expected = stock.generate(prompt, output_logits=True, return_dict_in_generate=True, **common)
        got = model.generate(prompt, output_logits=True, return_dict_in_generate=True, **common)
    assert torch.equal(got.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expected.logits), atol=1e-5, rtol=0)


def float64_capped_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                             **kwargs):
    """An independent reference: eager attention in float64 with scores cap * tanh(s / cap)."""
    cap = 1.0
    groups = query.shape[1] // key.shape[1]
    key, value = (t.double().repeat_interleave(groups, dim=1) for t in (key, value))
    scores = query.double() @ key.transpose(-1, -2) * scaling
    scores = cap * torch.tanh(scores / cap)
    if attention_mask is not None:
        scores = scores + attention_mask.double()
    out = torch.softmax(scores, dim=-1) @ value
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


def test_softcap_equals_float64_reference():
    transformers.AttentionInterface.register("float64_capped", float64_capped_attention)
    transformers.masking_utils.AttentionMaskInterface.register(
        "float64_capped", transformers.masking_utils.eager_mask)
    model, summary = robust_attn.convert(llama(), "softcap", softcap=1.0)
    assert summary.changes_function == {name: ["softcap"] for name in summary.swapped}
    reference = llama(implementation="float64_capped").double()
    stock = llama()
    x = ids()
    with torch.no_grad():
        expected = reference(x).logits
        got = model(x).logits
        torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)
        assert (stock(x).logits - got).abs().max() > 1e-3  # the cap bites


@pytest.mark.parametrize("builder", [llama, gpt2])
def test_revert_restores_stock_weights_loading_strictly(builder):
    model, _ = robust_attn.convert(builder(), "sigma_reparam")
    for layer in (m for m in model.modules() if isinstance(m, SigmaReparamLinear)):
        with torch.no_grad():
            layer.gamma.mul_(1.5)  # as if trained: W_hat = 1.5 W
    x = ids()
    with torch.no_grad():
        expected = model(x).logits
    model, summary = robust_attn.revert(model)
    assert len(summary.reverted) == 2
    assert model.config._attn_implementation == "sdpa"
    assert not any(isinstance(m, (SigmaReparamLinear, hf.HFAttentionMitigations))
                   for m in model.modules())
    stock = builder()
    stock.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(stock(x).logits, expected, atol=1e-5, rtol=0)


def test_revert_of_a_copy_removes_the_copy_s_input_hooks():
    model, _ = robust_attn.convert(llama(), "sigma_reparam")
    copied = copy.deepcopy(model)
    robust_attn.revert(copied)
    attentions = [m for n, m in copied.named_modules() if n.endswith("self_attn")]
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in attentions)
    assert all(hf.mitigations_of(m) is not None and m._forward_pre_hooks
               for n, m in model.named_modules() if n.endswith("self_attn"))


def test_revert_refuses_lossy_and_unconverted():
    model, _ = robust_attn.convert(llama(), "softcap")
    with pytest.raises(ValueError, match="softcap"):
        robust_attn.revert(model)
    model, summary = robust_attn.revert(model, allow_lossy=True)
    assert set(summary.dropped) == set(summary.reverted)
    with pytest.raises(ValueError, match="no attention module"):
        robust_attn.revert(model)


def test_convert_refuses_with_reasons():
    with pytest.raises(ValueError, match="differential.*two maps"):
        robust_attn.convert(llama(), "differential")
    with pytest.raises(ValueError, match="qk_norm"):
        robust_attn.convert(llama(), "qk_norm")
    with pytest.raises(TypeError, match="attn_drop"):
        robust_attn.convert(llama(), "softcap", attn_drop=0.1)
    model, _ = robust_attn.convert(llama(), "softcap")
    with pytest.raises(ValueError, match="already converted"):
        robust_attn.convert(model, "softcap")
    summary = robust_attn.convert(llama(), "softcap", include="model.layers.1.*")[1]
    assert summary.swapped == ["model.layers.1.self_attn"]
    assert "include" in summary.skipped["model.layers.0.self_attn"]


def test_float_mask_equals_bool_mask_and_sdpa():
    """The function takes transformers' additive float masks (eager_mask: finfo.min fills) as
    well as its bool ones, and equals transformers' sdpa_attention_forward on both."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    generator = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 5, 8, generator=generator) * 3 for _ in range(3))
    allowed = torch.rand(2, 1, 5, 5, generator=generator) > 0.4
    allowed[..., 0] = True  # every row has a key
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    module = torch.nn.Module()
    expected, _ = sdpa_attention_forward(module, q, k, v, allowed, scaling=0.3)
    for mask in (allowed, additive):
        got, _ = hf.robust_attn_attention(module, q, k, v, mask, scaling=0.3)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
        torch.testing.assert_close(sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)[0],
                                   expected, atol=1e-6, rtol=0)


def test_import_robust_attn_does_not_import_transformers():
    code = "import sys, robust_attn; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_function_refuses_model_mechanisms_and_attention_weights():
    q = torch.randn(1, 2, 3, 4)
    for name in hf.function.REFUSED_ARGUMENTS:
        with pytest.raises(ValueError, match=name):
            hf.robust_attn_attention(torch.nn.Module(), q, q, q, None, **{name: 1.0})
    model, _ = robust_attn.convert(llama(), "baseline")
    with pytest.raises(ValueError, match="output_attentions"):
        model(ids(), output_attentions=True)


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "vit"])
def test_monitor_and_probe_report_every_layer(name):
    model = {"gpt2": gpt2, **BUILDERS}[name]().train()
    model, summary = robust_attn.convert(model, "sink")
    inputs = inputs_of(name)
    with robust_attn.health_probe():
        first_output(model, inputs)
    containers = {n: hf.mitigations_of(model.get_submodule(n)) for n in summary.swapped}
    assert len(containers) == 2
    for container in containers.values():
        assert container.health is not None and math.isfinite(float(container.health.entropy.mean()))
    monitor = robust_attn.HealthMonitor(model, every=1)
    assert sorted(monitor.modules) == sorted(summary.swapped)
    for _ in range(2):
        loss = first_output(model, inputs).square().mean()
        loss.backward()
        monitor.step(loss)
    report = monitor.report()
    assert [layer.name for layer in report.layers] == summary.swapped
    assert set(monitor.latest_health()) == set(summary.swapped)
    monitor.close()
    with torch.no_grad():
        maps = robust_attn.attention_maps(model, **inputs)
    assert set(maps) == set(summary.swapped) and all(m.shape[0] == 4 for m in maps.values())
    with torch.no_grad(), robust_attn.recording(model, health=True) as records:
        first_output(model, inputs)
    assert [name for name, _ in records] == summary.swapped
    for _, record in records:  # the module's input, and the merged heads before its projection
        assert record.call.x.shape[:2] == record.output.shape[:2] and record.health is not None
