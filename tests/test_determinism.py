"""Determinism: under torch.use_deterministic_algorithms(True), two runs from one seed agree bit for
bit (outputs, gradients, parameters and buffers), in training mode with dropout, on every preset;
and no operation on the CPU raises "does not have a deterministic implementation"."""

from contextlib import contextmanager

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from robust_attn import create, list_variants
from robust_attn.testing import strategies as ras

STEPS = 2
DTYPES = st.sampled_from([torch.float32, torch.bfloat16])
DROPOUT = {"attn_drop": 0.1, "proj_drop": 0.1}


@contextmanager
def deterministic_algorithms():
    previous = (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def _training_run(variant: str, shape: ras.AttentionShape, seed: int, causal: bool,
                  dropout_seed: int, dtype: torch.dtype = torch.float32) -> list:
    """Everything a short training run produces, from weights and data drawn from ``seed`` and
    dropout from ``dropout_seed``: per step the output and the gradients, then the final
    parameters and buffers (sigma_reparam's u, v among them)."""
    torch.manual_seed(seed)
    module = create(variant, shape.dim, num_heads=shape.heads, dtype=dtype, **DROPOUT).train()
    x = torch.randn(shape.batch, shape.tokens, shape.dim, dtype=dtype)
    torch.manual_seed(dropout_seed)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    produced = []
    for _ in range(STEPS):
        out = module(x, is_causal=causal)
        (out.square().mean() + module.auxiliary_loss()).backward()
        produced += [out.detach(), *(p.grad.clone() for p in module.parameters())]
        optimizer.step()
        optimizer.zero_grad()
    return produced + [value.clone() for value in module.state_dict().values()]


def _identical(first: list, second: list) -> bool:
    return len(first) == len(second) and all(map(torch.equal, first, second))


@pytest.mark.filterwarnings("ignore::robust_attn.kernels.SparseFallbackWarning")  # small N
@pytest.mark.parametrize("variant", list_variants())
@given(data=st.data(), seed=ras.seeds, causal=st.booleans(), dtype=DTYPES)
def test_two_runs_from_one_seed_are_bit_identical(variant, data, seed, causal, dtype):
    shape = data.draw(ras.attention_shapes(max_tokens=17, variant=variant))
    with deterministic_algorithms():
        assert _identical(_training_run(variant, shape, seed, causal, seed, dtype),
                          _training_run(variant, shape, seed, causal, seed, dtype))


@pytest.mark.filterwarnings("ignore::robust_attn.kernels.SparseFallbackWarning")
@pytest.mark.parametrize("variant", list_variants())
def test_the_runs_are_random_where_they_should_be(variant):
    """The identity above is not trivial: dropout draws, so other draws give another run."""
    shape = ras.AttentionShape(batch=2, tokens=8, heads=2, head_dim=8)
    with deterministic_algorithms():
        assert not _identical(_training_run(variant, shape, 0, False, dropout_seed=0),
                              _training_run(variant, shape, 0, False, dropout_seed=1))
