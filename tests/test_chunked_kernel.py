"""The chunked kernel equals the eager reference, block by block, and never holds the whole matrix."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from robust_attn import RobustAttention
from robust_attn.kernels.chunked import (
    BLOCK_SCORES_PER_Q,
    WHOLE_MATRIX_SCORES_PER_Q,
    chunked_attention,
    rows_per_block,
)
from robust_attn.kernels.eager import eager_attention
from robust_attn.mitigations.sigmoid import SigmoidWeights
from robust_attn.mitigations.softcap import TanhSoftCap
from robust_attn.problem import AttentionProblem

from .test_kernels import problems


class LargestNewTensor(TorchDispatchMode):
    """Records the largest tensor any operation creates inside the block (forward and backward),
    so a test can show that no (B, H, Nq, Nk) attention matrix is ever allocated."""

    def __init__(self):
        super().__init__()
        self.numel, self.operation = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, Tensor) and tensor.numel() > self.numel:
                self.numel, self.operation = tensor.numel(), func
        return out


class LearnedDistancePenalty:
    """A score_mod with a parameter: score - slope_h |q_idx - kv_idx| (ALiBi with learned slopes),
    so block rows must see their own query indices and the slopes need gradients."""

    def __init__(self, heads: int, dtype: torch.dtype):
        self.slopes = torch.rand(heads, dtype=dtype).requires_grad_()

    def __call__(self, score, b, h, q_idx, kv_idx):
        return score - self.slopes[h] * (q_idx - kv_idx).abs()


@st.composite
def chunked_cases(draw):
    """A float64 problem (more or fewer keys than queries, masks, causal), with or without score
    modifiers and softmax or sigmoid, and a block size of 1 to 4 rows."""
    problem = draw(problems(extra_keys=st.integers(-2, 2), dtype=torch.float64))
    heads = problem.q.shape[1]
    mods = draw(st.sampled_from(["none", "softcap", "learned"]))
    score_mods = {"none": (), "softcap": (TanhSoftCap(2.0),),
                  "learned": (LearnedDistancePenalty(heads, torch.float64),)}[mods]
    normalizer = draw(st.sampled_from([problem.normalizer, SigmoidWeights()]))
    problem = problem.with_(score_mods=score_mods, normalizer=normalizer)
    return problem, draw(st.integers(1, 4))


def _with_grad(problem: AttentionProblem) -> AttentionProblem:
    fields = ["q", "k", "v"] + (["attn_mask"] if problem.attn_mask is not None
                                and problem.attn_mask.is_floating_point() else [])
    return problem.with_(**{name: getattr(problem, name).detach().clone().requires_grad_()
                            for name in fields})


def _forward_backward(kernel, problem: AttentionProblem) -> tuple[Tensor, ...]:
    """kernel(problem), then the gradients of <out, cos(out)> for every input that needs one."""
    problem = _with_grad(problem)
    inputs = [problem.q, problem.k, problem.v]
    inputs += [problem.attn_mask] if problem.attn_mask is not None and \
        problem.attn_mask.requires_grad else []
    inputs += [mod.slopes for mod in problem.score_mods if isinstance(mod, LearnedDistancePenalty)]
    out = kernel(problem)
    grads = torch.autograd.grad(out, inputs, torch.cos(out.detach()), allow_unused=True)
    return out, *grads


@given(chunked_cases(), st.sampled_from([None, True, False]))
def test_equals_eager_forward_and_backward(case, recompute):
    problem, block_rows = case
    expected = _forward_backward(eager_attention, problem)
    actual = _forward_backward(
        lambda p: chunked_attention(p, block_rows=block_rows, recompute=recompute), problem)
    for index, (a, e) in enumerate(zip(actual, expected, strict=True)):
        if e is None:  # an input the output does not depend on (a fully blocked mask entry)
            assert a is None or (a == 0).all()
            continue
        torch.testing.assert_close(a, e, atol=1e-10, rtol=1e-10,
                                   msg=lambda m, i=index: f"output/grad {i}: {m}")


@pytest.mark.parametrize("score_mod", [TanhSoftCap(2.0), LearnedDistancePenalty(2, torch.float64)],
                         ids=["gradients added in place", "checkpoint"])
def test_dropout_recomputed_blocks_draw_the_forward_masks(score_mod):
    """The backward pass recomputes each block's dropout: with the random state restored it is the
    forward's mask, so the gradients equal those of the blocks kept alive (to rounding; another
    mask would change them by O(1))."""
    q, k, v = torch.randn(3, 2, 2, 9, 4, dtype=torch.float64)
    problem = AttentionProblem(q, k, v, 0.5, causal=True, score_mods=(score_mod,))

    def run(recompute):
        torch.manual_seed(7)
        return _forward_backward(
            lambda p: chunked_attention(p, 0.4, block_rows=2, recompute=recompute), problem)

    recomputed, kept = run(True), run(False)
    for a, e in zip(recomputed, kept, strict=True):
        torch.testing.assert_close(a, e, atol=1e-12, rtol=1e-12)
    without_dropout = chunked_attention(problem, 0.0, block_rows=2)
    assert not torch.allclose(recomputed[0], without_dropout)


def test_one_block_without_recompute_while_the_matrix_is_small():
    """Keys up to 4 head widths (a ViT-S at 224 px: 197 keys, D = 64): the eager kernel itself."""
    head_dim = 16
    for keys in (1, WHOLE_MATRIX_SCORES_PER_Q * head_dim, WHOLE_MATRIX_SCORES_PER_Q * head_dim + 1):
        q = torch.randn(2, 3, 50, head_dim)
        problem = AttentionProblem(q, *torch.randn(2, 2, 3, keys, head_dim), head_dim ** -0.5)
        rows = rows_per_block(problem)
        whole = keys <= WHOLE_MATRIX_SCORES_PER_Q * head_dim
        assert (rows == 50) == whole
        if not whole:
            scores_per_row = 2 * 3 * keys
            assert rows * scores_per_row <= BLOCK_SCORES_PER_Q * q.numel() or rows == 1


@pytest.mark.parametrize("options", [dict(causal=True, score_mods=(TanhSoftCap(5.0),)),
                                     dict(normalizer=SigmoidWeights())])
def test_a_long_sequence_never_holds_the_attention_matrix(options):
    """Forward and backward of 256 tokens: no tensor as large as a quarter of the matrix (q, k, v
    and their gradients have an eighth of its size)."""
    q, k, v = (torch.randn(1, 2, 256, 32, requires_grad=True) for _ in range(3))
    problem = AttentionProblem(q, k, v, 32 ** -0.5, **options)
    with LargestNewTensor() as largest:
        chunked_attention(problem).square().sum().backward()
    assert largest.numel < 2 * 256 * 256 / 4, largest.operation


def test_module_softcap_and_sigmoid_train_through_the_chunked_kernel():
    x = torch.randn(1, 300, 64, requires_grad=True)  # 300 keys > 4 * 64: blocks of 8 rows
    for options in (dict(softcap=5.0), dict(sigmoid=True, qk_norm=True)):
        module = RobustAttention(64, num_heads=1, kernel="chunked", **options)
        reference = RobustAttention(64, num_heads=1, kernel="eager", **options)
        reference.load_state_dict(module.state_dict())
        outputs, grads = [], []
        for attention in (module, reference):
            outputs.append(attention(x, is_causal=True))
            grads.append(torch.autograd.grad(outputs[-1].square().sum(), x)[0])
        torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grads[0], grads[1], atol=1e-4, rtol=1e-4)


def test_bad_block_rows_raise_naming_the_argument():
    q = torch.randn(1, 1, 4, 2)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="^block_rows="):
            chunked_attention(AttentionProblem(q, q, q, 1.0), block_rows=bad)


class _LargeCopies(TorchDispatchMode):
    """Counts copies of at least ``numel`` elements (clone, contiguous, copy_)."""

    def __init__(self, numel: int):
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.clone.default, torch.ops.aten.copy_.default,
                    torch.ops.aten._to_copy.default) and args[-1].numel() >= self.numel:
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("normalizer", ["softmax", "sigmoid"])
def test_views_of_the_qkv_projection_are_copied_once_not_at_every_block(normalizer):
    """q, k, v as RobustAttention makes them (views into the qkv output): the kernel copies each
    once (with_contiguous_heads), not once per block of rows, forward and backward, and computes
    what it computes on contiguous copies."""
    batch, tokens, heads, width = 2, 64, 2, 8  # batch and heads > 1: no (B H) view
    qkv = torch.randn(batch, tokens, 3 * heads * width, dtype=torch.float64, requires_grad=True)
    q, k, v = qkv.view(batch, tokens, 3, heads, width).permute(2, 0, 3, 1, 4).unbind(0)
    extra = {} if normalizer == "softmax" else {"normalizer": SigmoidWeights()}
    problem = AttentionProblem(q, k, v, width ** -0.5, causal=True, score_mods=(TanhSoftCap(5.0),),
                               **extra)
    copies = []
    for block_rows in (16, 4):
        with _LargeCopies(k.numel() // 2) as counter:
            chunked_attention(problem, block_rows=block_rows).sum().backward()
        copies.append(counter.count)
    assert copies[0] == copies[1] <= 6, copies
    contiguous = problem.with_(q=q.contiguous(), k=k.contiguous(), v=v.contiguous())
    torch.testing.assert_close(chunked_attention(problem, block_rows=4),
                               eager_attention(contiguous), rtol=0, atol=1e-12)
