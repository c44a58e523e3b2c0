"""RobustAttention(sparsity=...): the presets, the option, and the probe over the allowed keys."""

import pytest
import torch

import robust_attn
from robust_attn import RobustAttention
from robust_attn.call import AttentionCall
from robust_attn.kernels import select_kernel
from robust_attn.sparse import BlockLocal, GlobalTokens, GridWindow, SlidingWindow, Strided


@pytest.mark.filterwarnings("ignore::robust_attn.kernels.SparseFallbackWarning")  # 37 tokens
@pytest.mark.parametrize("pattern", [SlidingWindow(5) | GlobalTokens(1), Strided(3),
                                     BlockLocal(8), GridWindow((6, 6), 2, prefix=1)])
def test_sparse_module_equals_its_eager_reference_forward_and_backward(pattern):
    module = RobustAttention(32, num_heads=4, sparsity=pattern)
    x = torch.randn(2, 37, 32, requires_grad=True)
    fused = module(x)
    fused.sum().backward()
    grads = x.grad.clone(), module.qkv.weight.grad.clone()
    module.zero_grad()
    x.grad = None
    module.fused_attn = False
    eager = module(x)
    eager.sum().backward()
    torch.testing.assert_close(fused, eager, atol=1e-5, rtol=1e-5)
    for got, expected in zip(grads, (x.grad, module.qkv.weight.grad), strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, kernel", [("block_sparse", "block_sparse"),
                                          ("strided", "strided")])
def test_presets_run_their_structured_kernel(name, kernel):
    assert name in robust_attn.list_variants()
    module = robust_attn.create(name, dim=32, num_heads=2)
    x = torch.randn(1, 1024, 32)
    q = torch.randn(1, 2, 1024, 16)
    problem = module.mitigations["sparsity"].extend_keys(
        robust_attn.problem.AttentionProblem(q, q, q, module.scale), AttentionCall(x))
    assert select_kernel("auto", problem, 0.0).name == kernel
    assert module(x).shape == x.shape


def test_pattern_and_override():
    module = robust_attn.create("strided", dim=32, num_heads=2, sparsity=Strided(4))
    assert module.mitigations["sparsity"].pattern == Strided(4)
    assert "Strided(stride=4)" in repr(module)


@pytest.mark.parametrize("value", ["local", 3, True, torch.ones(4, 4, dtype=torch.bool)])
def test_sparsity_option_takes_a_pattern(value):
    with pytest.raises(ValueError, match="(?s)sparsity=.*robust_attn.sparse pattern"):
        RobustAttention(32, num_heads=4, sparsity=value)


def test_no_sparsity_builds_nothing():
    assert "sparsity" not in RobustAttention(32, num_heads=4, sparsity=None).mitigations


@pytest.mark.filterwarnings("ignore::robust_attn.kernels.SparseFallbackWarning")  # 12 tokens
def test_probe_normalises_by_the_allowed_keys_and_counts_empty_queries():
    module = RobustAttention(16, num_heads=2, sparsity=GlobalTokens(2) & BlockLocal(4), probe=True)
    with torch.no_grad():
        module.qkv.weight[:32].zero_()  # q = k = 0: uniform over each query's allowed keys
    out = module(torch.randn(1, 12, 16))
    health = module.health
    # Queries 0..3 see 4, 4, 2, 2 keys, uniformly; queries 4..11 see none (zeros, not nan).
    assert torch.isfinite(out).all()
    assert health.empty_queries.item() == 2 * 8
    torch.testing.assert_close(health.entropy, torch.ones(2))
    torch.testing.assert_close(health.sparsity, torch.zeros(2))
    assert health.max_logit.isfinite().all()


def test_timm_state_dict_loads_into_a_sparse_module():
    timm_layers = pytest.importorskip("timm.layers")
    reference = timm_layers.Attention(32, num_heads=4)
    module = RobustAttention(32, num_heads=4, sparsity=BlockLocal(8))
    module.load_state_dict(reference.state_dict(), strict=True)
