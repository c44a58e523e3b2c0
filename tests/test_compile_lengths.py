"""Issue 16, finding 6: compiled sparse presets over varying sequence lengths.

``torch.compile(fullgraph=True)`` of the block_sparse and strided presets compiled one graph
per length and failed hard at dynamo's recompile limit (8), with ``dynamic=True`` too. Now, under
dynamo, the strided kernel pads to whole classes (no case on N mod stride) and block_sparse runs
its pattern as an SDPA mask, so lengths stay symbolic: with the recompile limit
lowered to 4, twelve lengths from 1 to 1000 (crossing the old limit) compile at most 4 graphs,
and every output equals the uncompiled module's.
"""

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounter

from robust_attn import create

DIM, HEADS = 16, 2
LENGTHS = (1, 2, 3, 5, 9, 17, 33, 64, 65, 130, 257, 1000)
MAX_GRAPHS = 4
pytestmark = pytest.mark.filterwarnings("ignore::robust_attn.kernels.SparseFallbackWarning")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("dynamic", [None, True])
@pytest.mark.parametrize("preset", ["strided", "block_sparse"])
def test_compiled_sparse_presets_take_symbolic_lengths(preset, dynamic):
    module = create(preset, DIM, num_heads=HEADS)
    counter = CompileCounter()  # dynamo's eager backend, counting graphs
    compiled = torch.compile(module, fullgraph=True, dynamic=dynamic, backend=counter)
    generator = torch.Generator().manual_seed(0)
    with torch._dynamo.config.patch(recompile_limit=MAX_GRAPHS):
        for tokens in LENGTHS:
            x = torch.randn(1, tokens, DIM, generator=generator)
            torch.testing.assert_close(compiled(x), module(x), rtol=1e-5, atol=1e-6,
                                       msg=lambda m, n=tokens: f"N = {n}: {m}")
    assert counter.frame_count <= MAX_GRAPHS


@pytest.mark.parametrize("padded", [True, False])
def test_the_strided_kernel_equals_eager_at_every_residue_causal_and_not(padded):
    """The strided kernel, padded (one SDPA call, padded keys masked: what compiled code runs) or
    split (eager mode), against the eager kernel, forward and gradients."""
    from functools import partial

    from robust_attn.kernels import KERNELS
    from robust_attn.kernels.strided import strided_attention
    from robust_attn.problem import AttentionProblem
    from robust_attn.sparse import Causal, Strided

    runs = {"strided": partial(strided_attention, padded=padded), "eager": KERNELS["eager"].run}

    generator = torch.Generator().manual_seed(1)
    for pattern in (Strided(4), Strided(4) & Causal()):
        for tokens in range(1, 14):
            q, k, v = (torch.randn(2, 2, tokens, 3, generator=generator, requires_grad=True)
                       for _ in range(3))
            problem = AttentionProblem(q, k, v, 0.5, pattern=pattern)
            assert KERNELS["strided"].unsupported(problem, 0.0) is None
            grad = torch.randn(2, 2, tokens, 3, generator=generator)
            results = []
            for kernel in ("strided", "eager"):
                out = runs[kernel](problem, 0.0)
                results.append((out, *torch.autograd.grad(out, (q, k, v), grad)))
            for actual, expected in zip(*results, strict=True):
                torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
