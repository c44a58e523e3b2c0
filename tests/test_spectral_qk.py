"""spectral_qk: per-head QK eigenspectrum statistics, regulariser and init (Bao et al. 2024)."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from robust_attn import RobustAttention, create
from robust_attn.mitigations.spectral_qk import DEFAULT_WEIGHT

heads = st.integers(1, 4)
head_dims = st.integers(1, 12)
extra_width = st.integers(0, 12)  # dim = heads * head_dim + extra: attn_head_dim sets D apart


def _module(num_heads, head_dim, extra, **options):
    return RobustAttention(num_heads * head_dim + extra, num_heads, attn_head_dim=head_dim,
                           **options)


def _explicit_eigenvalues(module):
    """Per head, the C eigenvalues of the explicit C x C matrix W_Q^h^T W_K^h, in float64."""
    w_q, w_k, _ = module.qkv.weight.detach().double().chunk(3)
    w_q, w_k = (w.unflatten(0, (module.num_heads, module.head_dim)) for w in (w_q, w_k))
    return torch.linalg.eigvals(w_q.transpose(-1, -2) @ w_k)


def _true_spread(module):
    """E|l - mean|^2 over each head's D eigenvalues (the C - D structural zeros left out)."""
    eigenvalues = _explicit_eigenvalues(module)
    mean = eigenvalues.sum(-1, keepdim=True) / module.head_dim
    nonzero_part = (eigenvalues - mean).abs().square().sum(-1)
    structural_zeros = eigenvalues.shape[-1] - module.head_dim
    return (nonzero_part - structural_zeros * mean.squeeze(-1).abs().square()) / module.head_dim


@given(heads, head_dims, extra_width, st.booleans())
def test_mean_and_variance_are_those_of_the_explicit_eigenvalues(num_heads, head_dim, extra,
                                                                 concentrated):
    module = _module(num_heads, head_dim, extra, spectral_qk=True)
    if not concentrated:
        with torch.no_grad():
            module.qkv.weight.normal_()
    health = module.mitigations["spectral_qk"].health(module.layers_by_role())
    # Our normalisation: over D eigenvalues. The C x C matrix has the same non-zero
    # eigenvalues plus zeros, which add nothing to either sum.
    eigenvalues = _explicit_eigenvalues(module)
    mean = eigenvalues.sum(-1) / head_dim
    variance = eigenvalues.square().sum(-1) / head_dim - mean.square()
    scale = 1 + eigenvalues.abs().amax(-1)
    assert torch.allclose(health["eigenvalue_mean"].double(), mean.real, atol=1e-4 * scale.max())
    assert torch.allclose(health["eigenvalue_variance"].double(), variance.real,
                          atol=1e-4 * scale.max() ** 2)
    spread = health["spread"].double()
    assert (spread >= _true_spread(module) - 1e-4 * scale**2).all()  # Schur's inequality


@given(heads, st.integers(2, 12), extra_width, st.floats(-3.0, 3.0).filter(lambda m: abs(m) > 0.1))
def test_loss_is_zero_when_concentrated_and_positive_otherwise(num_heads, head_dim, extra, mu):
    module = _module(num_heads, head_dim, extra, spectral_qk=1.0)
    with torch.no_grad():  # W_Q^h with orthonormal rows Q_h, W_K^h = mu Q_h: W_K^h W_Q^h^T = mu I
        rows = torch.linalg.qr(torch.randn(num_heads, module.dim, head_dim))[0].transpose(-1, -2)
        module.qkv.weight[:module.attn_dim] = rows.flatten(0, 1)
        module.qkv.weight[module.attn_dim:2 * module.attn_dim] = mu * rows.flatten(0, 1)
    assert module.auxiliary_loss().item() < 1e-10
    with torch.no_grad():  # W_K^0 row 0 += 0.1 W_Q^0 row 1: M_0[0, 1] = 0.1
        module.qkv.weight[module.attn_dim] += 0.1 * module.qkv.weight[1]
    assert module.auxiliary_loss().item() > 1e-6


def test_auxiliary_loss_is_the_weighted_mean_spread():
    module = RobustAttention(24, 3, spectral_qk=0.5)
    spread = module.mitigations["spectral_qk"].health(module.layers_by_role())["spread"]
    assert torch.allclose(module.auxiliary_loss(), 0.5 * spread.mean())


@pytest.mark.parametrize("start", ["default", "perturbed concentrated"])
def test_optimizer_steps_on_the_auxiliary_loss_alone_reduce_the_variance(start):
    torch.manual_seed(0)
    module = create("spectral_qk", 32, num_heads=4)
    with torch.no_grad():
        if start == "default":
            module.qkv.weight.copy_(RobustAttention(32, 4).qkv.weight)
        else:
            module.qkv.weight.add_(0.05 * torch.randn_like(module.qkv.weight))
    before = _true_spread(module), module.mitigations["spectral_qk"].health(module.layers_by_role())["eigenvalue_mean"]
    optimizer = torch.optim.SGD(module.parameters(), lr=10.0)
    for _ in range(20):
        optimizer.zero_grad()
        module.auxiliary_loss().backward()
        optimizer.step()
    after = _true_spread(module), module.mitigations["spectral_qk"].health(module.layers_by_role())["eigenvalue_mean"]
    assert (after[0] < 0.9 * before[0]).all()
    if start == "perturbed concentrated":  # the mean is held (approximately, see the docstring)
        assert torch.allclose(after[1], before[1], rtol=0.05)


@given(heads, st.integers(2, 12), extra_width, st.integers(0, 2**16))
def test_concentrated_init_has_lower_variance_than_the_default_init(num_heads, head_dim, extra,
                                                                   seed):
    torch.manual_seed(seed)
    default = _module(num_heads, head_dim, extra)
    torch.manual_seed(seed)
    concentrated = _module(num_heads, head_dim, extra, spectral_qk=True)
    assert torch.equal(concentrated.qkv.weight[:default.attn_dim],
                       default.qkv.weight[:default.attn_dim])  # W_Q is nn.Linear's draw
    assert (_true_spread(concentrated) < _true_spread(default)).all()
    health = concentrated.mitigations["spectral_qk"].health(concentrated.layers_by_role())
    assert (health["eigenvalue_mean"] > 0).all()
    w_q, w_k, _ = concentrated.qkv.weight.detach().chunk(3)
    w_q, w_k = (w.unflatten(0, (num_heads, head_dim)) for w in (w_q, w_k))
    assert torch.allclose(w_k.norm(dim=(-2, -1)), w_q.norm(dim=(-2, -1)), rtol=1e-4)


def test_loads_timm_state_dicts_strictly_and_keeps_proj_plain():
    module = create("spectral_qk", 24, num_heads=3)
    module.load_state_dict(RobustAttention(24, 3).state_dict(), strict=True)
    assert type(module.qkv) is nn.Linear and type(module.proj) is nn.Linear


@pytest.mark.parametrize("other", [{"qk_norm": True}, {"sigma_reparam": True}])
def test_conflicts_name_both_options(other):
    with pytest.raises(ValueError, match=rf"spectral_qk.*{next(iter(other))}"):
        RobustAttention(16, 2, spectral_qk=True, **other)


@pytest.mark.parametrize("value, weight", [(True, DEFAULT_WEIGHT), (0.1, 0.1), (0, 0.0), (2, 2.0)])
def test_option_value_sets_the_weight(value, weight):
    mitigation = RobustAttention(16, 2, spectral_qk=value).mitigations["spectral_qk"]
    assert mitigation.loss_weight == weight


@pytest.mark.parametrize("value", [-0.1, float("nan"), float("inf"), "yes", [0.1]])
def test_bad_option_values_name_the_option(value):
    with pytest.raises(ValueError, match="spectral_qk"):
        RobustAttention(16, 2, spectral_qk=value)
