"""Checkpoints: old state dicts (before a mitigation) fail clearly or upgrade explicitly; round trips."""

import io

import pytest
import torch
from timm.layers import Attention
from torch import nn

from robust_attn import create, list_variants
from robust_attn.attention import RobustAttention, load_upgrading
from robust_attn.mitigations import fold_sigma_reparam

DIM, HEADS = 16, 2

# Options with state of their own: (options, does a fresh start keep the checkpoint's function?)
STATEFUL = {
    "sigma_reparam": ({"sigma_reparam": True}, False),  # gamma = 1: W_hat = W / sigma(W)
    "sigma_reparam_preserve": ({"sigma_reparam": "preserve"}, True),  # gamma = sigma(W)
    "sink_logit": ({"sink_logit": True}, False),  # softmax-off-by-one
    "sink_logit_preserve": ({"sink_logit": "preserve"}, True),  # e^-40: the same in float32
    "sink_tokens": ({"sink_tokens": 2}, False),
    "gated": ({"gated": "elementwise"}, False),
    "gated_headwise": ({"gated": "headwise"}, False),
    "qk_norm": ({"qk_norm": True}, False),
}


def _option(options: dict) -> str:
    """The option whose state is added (sink_tokens is one option, qk_norm a timm argument)."""
    return next(iter(options))


def _old_state_dicts() -> dict[str, dict]:
    """State dicts saved before any mitigation: timm's Attention and our baseline (with biases)."""
    torch.manual_seed(0)
    return {"timm": Attention(DIM, HEADS, qkv_bias=True).state_dict(),
            "baseline": create("baseline", DIM, num_heads=HEADS, qkv_bias=True).state_dict()}


def _module(options: dict) -> RobustAttention:
    return RobustAttention(DIM, HEADS, qkv_bias=True, **options)


@pytest.mark.parametrize("source", ["timm", "baseline"])
@pytest.mark.parametrize("name", STATEFUL)
def test_strict_load_of_an_old_checkpoint_names_the_mitigation_and_the_upgrade(name, source):
    options, _ = STATEFUL[name]
    module = _module(options)
    with pytest.raises(RuntimeError, match=rf"mitigation\(s\) \['{_option(options)}'\] whose "
                                           r"state the state dict lacks.*load_upgrading"):
        module.load_state_dict(_old_state_dicts()[source])


@pytest.mark.parametrize("name", STATEFUL)
def test_non_strict_load_still_returns_the_missing_keys_without_raising(name):
    options, _ = STATEFUL[name]
    module = _module(options)
    missing, unexpected = module.load_state_dict(_old_state_dicts()["baseline"], strict=False)
    assert sorted(missing) == sorted(module.mitigation_state_keys()[_option(options)])
    assert not unexpected


def _fresh_state(module: RobustAttention, option: str) -> dict[str, torch.Tensor]:
    state = module.state_dict()
    return {key: state[key].clone() for key in module.mitigation_state_keys()[option]}


@pytest.mark.parametrize("name", STATEFUL)
def test_load_upgrading_loads_the_weights_and_keeps_the_fresh_mitigation_state(name):
    options, keeps_function = STATEFUL[name]
    option = _option(options)
    source = create("baseline", DIM, num_heads=HEADS, qkv_bias=True)
    old = source.state_dict()
    module = _module(options)
    fresh = _fresh_state(module, option)

    assert load_upgrading(module, old) == {"": [option]}
    state = module.state_dict()
    assert all(torch.equal(state[key], value) for key, value in old.items())
    x = torch.randn(2, 6, DIM)
    if option == "sigma_reparam":  # derived from the loaded weights: u, v their top singular
        for layer in (module.qkv, module.proj):  # vectors, gamma = sigma(W) or a fresh 1
            sigma = torch.linalg.matrix_norm(layer.weight.detach(), ord=2)
            torch.testing.assert_close(layer.sigma().detach(), sigma)
            torch.testing.assert_close(layer.gamma.detach(), sigma[None] if keeps_function
                                       else torch.ones(1))
    else:
        assert all(torch.equal(state[key], value) for key, value in fresh.items())
    same = torch.allclose(module(x), source(x), atol=1e-5, rtol=1e-5)
    assert same == keeps_function


def test_load_upgrading_upgrades_every_module_of_a_model_and_names_them():
    old = nn.Sequential(*(create("baseline", DIM, num_heads=HEADS) for _ in range(3)))
    new = nn.Sequential(create("sigma_reparam", DIM, num_heads=HEADS),
                        create("baseline", DIM, num_heads=HEADS),
                        create("sink", DIM, num_heads=HEADS, gated=True))
    with pytest.raises(RuntimeError) as error:
        new.load_state_dict(old.state_dict())
    assert "module '0' has mitigation(s) ['sigma_reparam']" in str(error.value)
    assert "module '2' has mitigation(s) ['gated', 'sink_logit']" in str(error.value)
    assert load_upgrading(new, old.state_dict()) == {"0": ["sigma_reparam"],
                                                     "2": ["gated", "sink_logit"]}


def _without_sigma_reparam(state: dict) -> dict:
    return {key: value for key, value in state.items() if key.rsplit(".", 1)[1] not in "gamma u v"}


@pytest.mark.parametrize("change, named", [
    (lambda state: _without_sigma_reparam(state) | {"extra.weight": torch.ones(1)},
     r"unexpected keys \['extra.weight'\]"),
    (lambda state: {k: v for k, v in _without_sigma_reparam(state).items() if k != "proj.bias"},
     r"missing keys \['proj.bias'\]"),
    (lambda state: {k: v for k, v in state.items() if k != "qkv.u"},  # sigma_reparam's, in part
     r"missing keys \['qkv.u'\]"),
])
def test_load_upgrading_refuses_other_mismatches_before_loading_anything(change, named):
    torch.manual_seed(0)
    checkpoint = change(create("sigma_reparam", DIM, num_heads=HEADS).state_dict())
    torch.manual_seed(1)
    module = create("sigma_reparam", DIM, num_heads=HEADS)
    before = {key: value.clone() for key, value in module.state_dict().items()}
    with pytest.raises(RuntimeError, match=named):
        load_upgrading(module, checkpoint)
    assert all(torch.equal(module.state_dict()[key], value) for key, value in before.items())


def test_a_folded_sigma_reparam_module_round_trips_strictly():
    module = create("sigma_reparam", DIM, num_heads=HEADS).eval()
    fold_sigma_reparam(module)
    assert module.mitigation_state_keys() == {}  # the folded layers hold no sigma_reparam state
    other = fold_sigma_reparam(create("sigma_reparam", DIM, num_heads=HEADS).eval())
    other.load_state_dict(module.state_dict())
    x = torch.randn(2, 5, DIM)
    assert torch.equal(other(x), module(x))


def _saved_and_loaded(state_dict: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.filterwarnings("ignore::robust_attn.kernels.SparseFallbackWarning")  # 6 tokens
@pytest.mark.parametrize("variant", list_variants())
def test_a_state_dict_saved_in_training_loads_with_weights_only_into_eval(variant):
    torch.manual_seed(0)
    trained = create(variant, DIM, num_heads=HEADS, attn_drop=0.1, proj_drop=0.1).train()
    x = torch.randn(2, 6, DIM)
    trained(x).square().mean().backward()  # a training forward (sigma_reparam updates u, v)
    with torch.no_grad():
        for parameter in trained.parameters():
            parameter -= 0.1 * parameter.grad
    torch.manual_seed(1)
    restored = create(variant, DIM, num_heads=HEADS, attn_drop=0.1, proj_drop=0.1).eval()
    restored.load_state_dict(_saved_and_loaded(trained.state_dict()))
    assert not restored.training
    assert torch.equal(restored(x), trained.eval()(x))
