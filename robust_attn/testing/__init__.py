"""Hypothesis strategies and assertions for users' own attention tests."""

from . import strategies
from .assertions import assert_no_entropy_collapse, assert_no_rank_collapse

__all__ = ["assert_no_entropy_collapse", "assert_no_rank_collapse", "strategies"]
