"""Attention health metrics: pure functions from attention tensors to per-map statistics.

Attention weights ``probs`` and logits are (..., Nq, Nk) (rows are queries);
tokens ``x`` are (..., N, C). Leading dims are kept in the output. Reductions run
in float32, or float64 for float64 input.
"""

from .entropy import attention_entropy
from .logits import max_attention_logit
from .rank_collapse import effective_rank, token_cosine_similarity, token_residual
from .sinks import sink_mass, sink_rate, sink_score
from .sparsity import attention_sparsity
from .spectral import attention_spectral_gap

__all__ = [
    "attention_entropy",
    "attention_sparsity",
    "attention_spectral_gap",
    "effective_rank",
    "max_attention_logit",
    "sink_mass",
    "sink_rate",
    "sink_score",
    "token_cosine_similarity",
    "token_residual",
]
