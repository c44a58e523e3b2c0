"""RobustAttention's contract: clear errors naming the argument, conflicts refused, presets built."""

import pickle
from copy import deepcopy

import pytest
import torch

import robust_attn
from robust_attn import RobustAttention, create, list_variants
from robust_attn.mitigations import MITIGATIONS, Mitigation


@pytest.mark.parametrize("kwargs, match", [
    (dict(dim=30, num_heads=4), "dim=30 is not divisible by num_heads=4"),
    (dict(dim=0, num_heads=1), "dim=0"),
    (dict(dim=16, num_heads=0), "num_heads=0"),
    (dict(dim=16, num_heads=2, attn_drop=1.5), "attn_drop"),
    (dict(dim=16, num_heads=2, proj_drop=-0.1), "proj_drop"),
    (dict(dim=16, num_heads=2, kernel="fastest"), "kernel='fastest'"),
    (dict(dim=16, num_heads=2, softcap=-1.0), "softcap=-1.0"),
    (dict(dim=16, num_heads=2, softcap="big"), "softcap='big'"),
])
def test_bad_construction_names_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RobustAttention(**kwargs)


def test_unknown_option_is_a_type_error_listing_known_options():
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['softcapp'\].*softcap"):
        RobustAttention(16, num_heads=2, softcapp=30.0)


@pytest.mark.parametrize("x, error, match", [
    (torch.randn(5, 16), ValueError, r"\(B, N, C\)"),
    (torch.randn(1, 5, 12), ValueError, "width 12 .* dim=16"),
    (torch.ones(1, 5, 16, dtype=torch.long), TypeError, "floating point"),
])
def test_bad_input_names_the_argument(x, error, match):
    with pytest.raises(error, match=match):
        RobustAttention(16, num_heads=2)(x)


@pytest.mark.parametrize("mask, error, match", [
    (torch.ones(4, 4, dtype=torch.bool), ValueError, "attn_mask of shape"),
    (torch.ones(3, 2, 5, 5, dtype=torch.bool), ValueError, "attn_mask of shape"),
    (torch.ones(1, 1, 1, 5, 5, dtype=torch.bool), ValueError, "attn_mask of shape"),
    (torch.ones(5, 5, dtype=torch.int64), TypeError, "attn_mask must be bool"),
    ([[True]], TypeError, "attn_mask must be a tensor"),
])
def test_bad_mask_names_the_argument(mask, error, match):
    with pytest.raises(error, match=match):
        RobustAttention(16, num_heads=2)(torch.randn(2, 5, 16), attn_mask=mask)


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
@pytest.mark.parametrize("mask_shape", [(1,), (5,), (1, 5), (5, 5), (2, 5, 5), (1, 1, 5),
                                        (3, 1, 1, 5), (3, 2, 5, 5)])
@pytest.mark.parametrize("dtype", [torch.bool, torch.float32])
def test_a_mask_of_any_rank_is_the_4d_mask_it_broadcasts_to(kernel, mask_shape, dtype):
    torch.manual_seed(0)
    module = RobustAttention(16, num_heads=2, kernel=kernel)
    x = torch.randn(3, 5, 16)
    allowed = torch.rand(mask_shape) < 0.7
    allowed[..., 0] = True
    mask = allowed if dtype == torch.bool else torch.randn(mask_shape).masked_fill(~allowed, -torch.inf)
    torch.testing.assert_close(module(x, attn_mask=mask),
                               module(x, attn_mask=mask.expand(3, 2, 5, 5)))


def test_a_0d_mask_applies_to_every_pair():
    module = RobustAttention(16, num_heads=2)
    x = torch.randn(3, 5, 16)
    torch.testing.assert_close(module(x, attn_mask=torch.tensor(True)), module(x))
    torch.testing.assert_close(module(x, attn_mask=torch.tensor(-1.5)), module(x))


@pytest.mark.parametrize("variant", ["baseline", "softcap", "sink"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_float32_mask_on_a_low_precision_module_is_cast_to_its_dtype(variant, dtype):
    module = create(variant, 16, num_heads=2).to(dtype)
    x = torch.randn(2, 5, 16, dtype=dtype)
    mask = torch.randn(5, 5).masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), -torch.inf)
    out = module(x, attn_mask=mask)
    assert out.dtype == dtype
    torch.testing.assert_close(out, module(x, attn_mask=mask.to(dtype)), rtol=0, atol=0)


def test_fully_masked_rows_give_zeros_not_nan_on_every_cpu_kernel():
    mask = torch.ones(6, 6, dtype=torch.bool)
    mask[2] = False
    x = torch.randn(2, 6, 16)
    for kernel in ("sdpa", "eager"):
        module = RobustAttention(16, num_heads=2, kernel=kernel, proj_bias=False)
        out = module(x.clone().requires_grad_(), attn_mask=mask)
        out.sum().backward()
        assert torch.isfinite(out).all(), kernel
        assert (out[:, 2] == 0).all(), kernel
        assert all(torch.isfinite(p.grad).all() for p in module.parameters()), kernel


def test_mask_and_causal_together_both_apply():
    module = RobustAttention(16, num_heads=2)
    x = torch.randn(1, 6, 16)
    keep_first_three = torch.zeros(6, 6, dtype=torch.bool)
    keep_first_three[:, :3] = True
    both = module(x, attn_mask=keep_first_three, is_causal=True)
    explicit = module(x, attn_mask=keep_first_three & torch.ones(6, 6, dtype=torch.bool).tril())
    torch.testing.assert_close(both, explicit)


class _Sharpen(Mitigation):
    """A test-only score modifier that declares a conflict with softcap."""

    option = "sharpen"
    conflicts = {"softcap": "sharpening undoes the cap"}

    def __init__(self, config):
        super().__init__()


def test_conflicting_options_fail_at_construction_naming_both(monkeypatch):
    monkeypatch.setitem(MITIGATIONS, "sharpen", _Sharpen)
    RobustAttention(16, num_heads=2, sharpen=True)  # alone it builds
    with pytest.raises(ValueError, match="options 'sharpen' and 'softcap' conflict: sharpening"):
        RobustAttention(16, num_heads=2, sharpen=True, softcap=30.0)


def test_softcap_caps_logits_and_matches_the_formula():
    module = RobustAttention(16, num_heads=2, softcap=2.0, probe=True)
    with torch.no_grad():
        module.qkv.weight.mul_(30)  # logits far beyond the cap
        module(torch.randn(1, 8, 16))
    assert module.health.max_logit.max() <= 2.0  # tanh saturates to the cap in float32
    plain = RobustAttention(16, num_heads=2, kernel="eager")
    plain.load_state_dict(module.state_dict())
    plain.fused_attn = False
    x = torch.randn(1, 8, 16)
    q, k, v = plain.qkv(x).reshape(1, 8, 3, 2, 8).permute(2, 0, 3, 1, 4)
    scores = 2.0 * torch.tanh((q @ k.transpose(-2, -1)) * plain.scale / 2.0)
    expected = plain.proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(1, 8, 16))
    torch.testing.assert_close(module(x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore::robust_attn.kernels.SparseFallbackWarning")  # 7 tokens
@pytest.mark.parametrize("variant", list_variants())
def test_every_preset_builds_runs_and_round_trips(variant):
    module = create(variant, 32, num_heads=4)
    x = torch.randn(2, 7, 32)
    out = module(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    copy = create(variant, 32, num_heads=4)
    copy.load_state_dict(module.state_dict(), strict=True)
    torch.testing.assert_close(copy(x), out)
    torch.testing.assert_close(deepcopy(module)(x), out)
    torch.testing.assert_close(pickle.loads(pickle.dumps(module))(x), out)


def test_create_rejects_unknown_variant_and_applies_overrides():
    with pytest.raises(ValueError, match="variant='nope'.*baseline"):
        create("nope", 16)
    assert create("softcap", 16, num_heads=2, softcap=7.0).mitigations["softcap"].cap == 7.0
    assert set(robust_attn.list_variants()) >= {"baseline", "qk_norm", "softcap"}


@pytest.mark.parametrize("variant", list_variants())
@pytest.mark.parametrize("is_causal", [False, True])
def test_an_empty_sequence_gives_an_empty_output_for_every_preset(variant, is_causal):
    """N = 0 tokens: (B, 0, C) out and a backward pass, whatever the kernel would have been
    (sigmoid's bias -log N, block_sparse's block size and the guarded softmax need a row)."""
    module = create(variant, dim=8, num_heads=2)
    x = torch.randn(2, 0, 8, requires_grad=True)
    y = module(x, is_causal=is_causal)
    assert y.shape == (2, 0, 8)
    y.sum().backward()
    assert x.grad.shape == x.shape
