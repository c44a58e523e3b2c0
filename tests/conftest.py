"""Hypothesis profiles: 'ci' (quick, the default) and 'thorough' (ROBUST_ATTN_PROFILE=thorough)."""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=12, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough", max_examples=200, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("ROBUST_ATTN_PROFILE", "ci"))

# The tests' problems are small: one intra-op thread avoids OpenMP's cost of splitting tiny
# ops, which made them 3 to 15 times slower on 2 cores shared with another process.
torch.set_num_threads(1)

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _probe_off_and_seeded():
    """Every test starts with the global probe off and a fixed seed."""
    from robust_attn import set_probe_enabled

    set_probe_enabled(False)
    torch.manual_seed(0)
    yield
    set_probe_enabled(False)
