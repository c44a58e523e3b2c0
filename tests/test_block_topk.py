"""Block top-k attention against a float64 reference written from the formula (blocks selected
here, one query block at a time), forward and backward, with causality, masks and sinks."""

import math

import pytest
import torch
from einops import rearrange

import robust_attn
from robust_attn import RobustAttention, create
from robust_attn.kernels import KERNELS
from robust_attn.kernels.eager import EAGER
from robust_attn.mitigations import MITIGATIONS
from robust_attn.call import AttentionCall
from robust_attn.mitigations.block_topk import selected_key_blocks
from robust_attn.mitigations.outlier_removal import uniform_attention_output
from robust_attn.problem import SOFTMAX, AttentionProblem
from robust_attn.sparse.selection import BlockSelection

from .float64_reference import assert_same_forward_and_backward, forward_backward, with_sink_columns

DIM, HEADS = 16, 2


def _module(kernel="auto", **options):
    torch.manual_seed(0)
    return RobustAttention(DIM, num_heads=HEADS, qkv_bias=True, kernel=kernel, **options).double()


def reference_selection(q, k, block_size, top, causal):
    """Bool (B, H, N, N): query i may see key j when block(j) is block(i) or one of the ``top``
    earlier (causal) or other blocks with the largest mean(Q_block(i)) . mean(K_block(j))."""
    batch, heads, tokens, _ = q.shape
    starts = range(0, tokens, block_size)
    allowed = torch.zeros(batch, heads, tokens, tokens, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            key_means = [k[b, h, s:s + block_size].mean(0) for s in starts]
            for a, start in enumerate(starts):
                query_mean = q[b, h, start:start + block_size].mean(0)
                others = [j for j in range(len(key_means)) if j != a and (j < a or not causal)]
                ranked = sorted(others, key=lambda j: float(query_mean @ key_means[j]),
                                reverse=True)
                for j in [a, *ranked[:top]]:
                    allowed[b, h, start:start + block_size, j * block_size:(j + 1) * block_size] = True
    return allowed


def reference(module, x, attn_mask=None, causal=False):
    """proj of softmax over [sink columns, scale q k^T + float mask, -inf outside the selected
    blocks, the bool mask and the causal triangle] times [sink values, v]."""
    q, k, v = rearrange(module.qkv(x), "b n (t h d) -> t b h n d", t=3, h=module.num_heads)
    block_size, top = module.mitigations["block_topk"].saved_value()
    allowed = reference_selection(q.detach(), k.detach(), block_size, top, causal)
    scores = module.scale * q @ k.mT
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        allowed = allowed & attn_mask
    elif attn_mask is not None:
        scores = scores + attn_mask
    if causal:
        allowed = allowed & torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
    logits, values = with_sink_columns(module, q, v, scores.masked_fill(~allowed, -math.inf))
    out = SOFTMAX(logits) @ values
    return module.proj(rearrange(out, "b h n d -> b n (h d)"))


def _check(module, x, attn_mask=None, causal=False):
    expected = forward_backward(module, lambda t: reference(module, t, attn_mask, causal), x)
    actual = forward_backward(module, lambda t: module(t, attn_mask=attn_mask, is_causal=causal), x)
    assert_same_forward_and_backward(actual, expected)


@pytest.mark.parametrize("kernel", ["auto", "selected_blocks", "sdpa", "chunked", "eager"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("tokens", [29, 32])
def test_equals_the_reference_forward_and_backward(kernel, causal, tokens):
    """29 tokens: a short last block (8 + 8 + 8 + 5)."""
    module = _module(kernel, block_topk=(8, 1))
    _check(module, torch.randn(2, tokens, DIM, dtype=torch.float64), causal=causal)


def test_the_selection_differs_from_block_local_and_from_dense():
    """So the reference comparison tests a content choice: keys outside the own block are seen,
    and not all of them."""
    module = _module(block_topk=(8, 1))
    with torch.no_grad():
        q, k, _ = rearrange(module.qkv(torch.randn(2, 32, DIM, dtype=torch.float64)),
                            "b n (t h d) -> t b h n d", t=3, h=HEADS)
    allowed = reference_selection(q, k, 8, 1, causal=False)
    assert allowed.float().mean() == pytest.approx(0.5)  # own + 1 of 4 blocks
    chosen = allowed[..., ::8, ::8].flatten(0, 1)  # (B H, query block, key block)
    assert len({tuple(row.tolist()) for heads in chosen for row in heads}) > 4


@pytest.mark.parametrize("causal", [False, True])
def test_masks_apply_inside_the_selected_blocks(causal):
    module = _module(block_topk=(4, 2))
    x = torch.randn(2, 20, DIM, dtype=torch.float64)
    generator = torch.Generator().manual_seed(1)
    bool_mask = torch.rand(2, 1, 20, 20, generator=generator) > 0.3
    float_mask = torch.randn(2, HEADS, 20, 20, generator=generator, dtype=torch.float64)
    float_mask = float_mask.masked_fill(torch.rand(2, HEADS, 20, 20, generator=generator) < 0.2,
                                        -math.inf)
    for mask in (bool_mask, float_mask, float_mask[:1, :1, :1]):  # the last broadcasts
        _check(module, x, mask, causal)


@pytest.mark.parametrize("options", [
    {"block_topk": (8, 1), "sink_tokens": 2},
    {"sink_tokens": 2, "block_topk": (8, 1)},  # prepended before the selection runs
    {"block_topk": (8, 1), "sink_logit": True},
    {"sink_logit": True, "sink_tokens": 1, "block_topk": (8, 1)},
])
@pytest.mark.parametrize("causal", [False, True])
def test_prepended_sink_keys_stay_visible_to_every_query(options, causal):
    module = _module(**options)
    with torch.no_grad():
        for parameter in module.mitigations.parameters():
            parameter.normal_()  # sinks that carry weight, so a hidden one would show
    mask = torch.rand(1, 1, 24, 24, generator=torch.Generator().manual_seed(2)) > 0.5
    _check(module, torch.randn(2, 24, DIM, dtype=torch.float64), mask, causal)


@pytest.mark.parametrize("causal", [False, True])
def test_top_k_of_every_block_is_dense_attention(causal):
    x = torch.randn(2, 30, DIM, dtype=torch.float64)
    mask = torch.rand(2, 1, 30, 30, generator=torch.Generator().manual_seed(3)) > 0.2
    dense = _module()
    expected = forward_backward(dense, lambda t: dense(t, attn_mask=mask, is_causal=causal), x)
    for top in (3, 100):  # 4 blocks: 3 beyond the own one; more than there are
        topk = _module(block_topk=(8, top))
        actual = forward_backward(topk, lambda t, m=topk: m(t, attn_mask=mask, is_causal=causal), x)
        assert_same_forward_and_backward(actual, expected)


def test_k_zero_sees_only_its_own_block():
    module = _module(block_topk=(8, 0))
    _check(module, torch.randn(1, 24, DIM, dtype=torch.float64))


def test_preset_option_and_saved_value():
    module = create("block_topk", dim=32, num_heads=4)
    assert module.mitigations["block_topk"].saved_value() == (8, 2)
    assert MITIGATIONS["block_topk"].claims[0].variant == "block_topk"
    assert create("block_topk", dim=32, num_heads=4, block_topk=[16, 3]).mitigations[
        "block_topk"].saved_value() == (16, 3)
    assert "block_topk" not in create("block_topk", dim=32, num_heads=4,
                                      block_topk=None).mitigations


@pytest.mark.parametrize("bad", [True, 8, (8,), (8, 2, 1), (0, 2), (8, -1), (8.0, 2), (8, True),
                                 "8,2"])
def test_bad_options_name_the_option(bad):
    with pytest.raises(ValueError, match=r"block_topk=.*\(block_size, k\)"):
        RobustAttention(DIM, num_heads=HEADS, block_topk=bad)


def _kernels_run(module, x, attn_mask=None, lse=False):
    with robust_attn.recording(module, lse=lse) as records:
        module(x, attn_mask=attn_mask)
    return [record.attended.kernel for _, record in records]


def test_auto_runs_the_selected_blocks_kernel_where_it_can_and_a_mask_elsewhere():
    """No mask: only the selected blocks are computed. A padding mask, or a log-sum-exp asked
    for: the selection becomes a mask for the usual kernels, and the result is the same."""
    module = _module(block_topk=(8, 1))
    x = torch.randn(2, 32, DIM, dtype=torch.float64)
    assert _kernels_run(module, x) == ["selected_blocks"]
    padding = torch.ones(2, 1, 1, 32, dtype=torch.bool)
    padding[0, ..., 27:] = False
    assert "selected_blocks" not in _kernels_run(module, x, padding)
    _check(module, x, padding)
    assert "selected_blocks" not in _kernels_run(module, x, lse=True)
    with pytest.raises(ValueError, match="no sparsity pattern or attn_mask"):
        _module("selected_blocks", block_topk=(8, 1))(x, attn_mask=padding)


@pytest.mark.parametrize("causal", [False, True])
def test_no_kernel_ignores_a_selection(causal):
    """Every kernel that runs a problem with a block selection computes what eager computes with
    the selection as a mask (outputs and log-sum-exp), so none can drop it."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 2, 29, 8, dtype=torch.float64)
    blocks = selected_key_blocks(q, k, 8, 1, causal)
    problem = AttentionProblem(q, k, v, 8 ** -0.5, causal=causal,
                               selection=BlockSelection(blocks, 8))
    masked = problem.with_selection_as_mask()
    expected = EAGER.solve(masked.with_(selection=None), lse=True)
    assert not torch.equal(expected.out, EAGER.solve(problem.with_(selection=None)).out)
    ran = []
    for name, kernel in KERNELS.items():
        lse = kernel.unsupported(problem, 0.0, lse=True) is None
        if kernel.unsupported(problem, 0.0) is not None:
            continue
        ran.append(name)
        solved = kernel.solve(problem, lse=lse)
        torch.testing.assert_close(solved.out, expected.out, msg=name)
        if lse:
            torch.testing.assert_close(solved.lse, expected.lse.float(), msg=name)
    assert {"selected_blocks", "sdpa", "chunked", "eager"} <= set(ran)


def test_outlier_removal_removes_the_uniform_attention_over_the_selected_blocks():
    """U is uniform over the keys each query may attend: the selected blocks, not every key."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 2, 29, 8, dtype=torch.float64)
    problem = AttentionProblem(q, k, v, 8 ** -0.5,
                               selection=BlockSelection(selected_key_blocks(q, k, 8, 1, False), 8))
    call = AttentionCall(None)
    expected = uniform_attention_output(problem.with_selection_as_mask(), call)
    torch.testing.assert_close(uniform_attention_output(problem, call).expand_as(expected), expected)
    assert not torch.allclose(v.mean(dim=-2, keepdim=True).expand_as(expected), expected)
