"""Hypothesis strategies and assertions for users' own attention tests."""

from . import strategies

__all__ = ["strategies"]
