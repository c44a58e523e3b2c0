"""The per-call block layout (kernels/selected_blocks.py) and the log-sum-exp merge of key parts
(kernels/lse_merge.py) against the dense masked eager reference, forward and gradients, in
float64: odd lengths, causal, prepended keys, queries fewer than keys, rows with no key."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from robust_attn.kernels.eager import eager_attention
from robust_attn.kernels.lse_merge import Part, merged_attention
from robust_attn.kernels.selected_blocks import selected_blocks_attention, selected_blocks_unsupported
from robust_attn.mitigations.block_topk import selected_blocks, selected_key_blocks
from robust_attn.problem import AttentionProblem


def _forward_backward(run, tensors):
    tensors = [t.detach().clone().requires_grad_() for t in tensors]
    out = run(*tensors)
    grads = torch.autograd.grad(out, tensors, torch.cos(out.detach()))
    return out, *grads


def _assert_same(run, reference, tensors):
    for name, a, e in zip(("out", "dq", "dk", "dv"), _forward_backward(run, tensors),
                          _forward_backward(reference, tensors), strict=True):
        torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-10, msg=lambda m, n=name: f"{n}: {m}")


@given(st.integers(1, 3), st.integers(1, 12), st.integers(1, 10), st.integers(0, 2**31 - 1))
def test_merged_parts_equal_the_softmax_over_all_their_keys(parts, rows, keys, seed):
    """Keys split into parts (masks with rows empty in a part, and in every part) merged by their
    log-sum-exp equal one masked softmax over all the keys."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 3, rows, 8, generator=generator, dtype=torch.float64)
    k, v = torch.randn(2, 2, 3, parts * keys, 8, generator=generator, dtype=torch.float64)
    allowed = torch.rand(rows, parts * keys, generator=generator) < 0.5
    allowed[0] = False

    def merged(q, k, v):
        pieces = []
        for index, mask in enumerate(allowed.split(keys, dim=1)):
            part = slice(index * keys, (index + 1) * keys)
            # The odd parts take the rows as one (6, 1, rows) batch: the parts' rows need only
            # share their order.
            shape = (6, 1, rows, 8) if index % 2 else q.shape
            key_shape = (6, 1, keys, 8) if index % 2 else k[:, :, part].shape
            pieces.append(Part(q.reshape(shape), k[:, :, part].reshape(key_shape),
                               v[:, :, part].reshape(key_shape), mask, ~mask.any(dim=1)))
        return merged_attention(pieces, (6, rows), 0.3).view(2, 3, rows, 8)

    def reference(q, k, v):
        return eager_attention(AttentionProblem(q, k, v, 0.3, attn_mask=allowed))

    _assert_same(merged, reference, (q, k, v))


def _layout_mask(blocks, block, num_queries, tokens, prepended, causal):
    """Bool (B, H, Nq, P + T): the layout as a dense mask, from its definition."""
    batch, heads = blocks.shape[:2]
    allowed = torch.zeros(batch, heads, num_queries, prepended + tokens, dtype=torch.bool)
    allowed[..., :prepended] = True
    for i in range(num_queries):
        position = i + tokens - num_queries
        for b in range(batch):
            for h in range(heads):
                for c in blocks[b, h, position // block].tolist():
                    for t in range(c * block, min((c + 1) * block, tokens)):
                        if not causal or t <= position:
                            allowed[b, h, i, prepended + t] = True
    return allowed


@given(st.integers(1, 30), st.integers(0, 8), st.integers(0, 2), st.integers(1, 6),
       st.integers(1, 3), st.booleans(), st.integers(0, 2**31 - 1))
def test_selected_blocks_equal_eager_with_the_layout_as_a_mask(tokens, fewer, prepended, block,
                                                               selected, causal, seed):
    generator = torch.Generator().manual_seed(seed)
    num_queries = max(1, tokens - fewer)
    key_blocks = -(-tokens // block)
    blocks = torch.stack([torch.randperm(key_blocks, generator=generator)[:selected]
                          for _ in range(2 * 2 * key_blocks)]).view(2, 2, key_blocks, -1)
    q = torch.randn(2, 2, num_queries, 4, generator=generator, dtype=torch.float64)
    k, v = torch.randn(2, 2, 2, prepended + tokens, 4, generator=generator, dtype=torch.float64)
    mask = _layout_mask(blocks, block, num_queries, tokens, prepended, causal)

    def problem(q, k, v, **changes):
        return AttentionProblem(q, k, v, 0.5, causal=causal, prepended_keys=prepended).with_(**changes)

    assert selected_blocks_unsupported(problem(q, k, v), blocks, block) is None
    _assert_same(lambda q, k, v: selected_blocks_attention(problem(q, k, v), blocks, block),
                 lambda q, k, v: eager_attention(problem(q, k, v, attn_mask=mask, causal=False)),
                 (q, k, v))


def test_block_topk_selection_through_the_kernel_equals_its_dense_mask():
    """block_topk's selection as a per-call layout gives what its dense mask gives."""
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 3, 50, 8, dtype=torch.float64)
    for causal in (False, True):
        blocks = selected_key_blocks(q, k, 8, 2, causal)
        problem = AttentionProblem(q, k, v, 8 ** -0.5, causal=causal)
        dense = problem.with_(attn_mask=selected_blocks(q, k, 8, 2, causal))
        torch.testing.assert_close(selected_blocks_attention(problem, blocks, 8),
                                   eager_attention(dense), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("changes, needs", [
    ({"attn_mask": torch.ones(4, 4, dtype=torch.bool)}, "no sparsity pattern or attn_mask"),
    ({"score_mods": (lambda s, b, h, i, j: s,)}, "no score modifiers"),
])
def test_the_selected_blocks_kernel_names_what_it_cannot_run(changes, needs):
    q = torch.randn(1, 1, 4, 2)
    problem = AttentionProblem(q, q, q, 1.0).with_(**changes)
    blocks = torch.zeros(1, 1, 2, 1, dtype=torch.long)
    assert needs in selected_blocks_unsupported(problem, blocks, 2)
    with pytest.raises(ValueError, match=needs):
        selected_blocks_attention(problem, blocks, 2)
    assert "int64 (B, H, query blocks, S)" in selected_blocks_unsupported(
        AttentionProblem(q, q, q, 1.0), blocks.int(), 2)
    assert math.isfinite(float(selected_blocks_attention(AttentionProblem(q, q, q, 1.0), blocks, 2).sum()))
