"""A k-th order Markov chain over V tokens: a language-modelling task with a known optimal loss.

    P(x_t | x_<t) = T[x_(t-k) .. x_(t-1)]        (a row of T: a distribution over V tokens)

Each of T's V^k rows is drawn once from Dirichlet(alpha, ..., alpha) (seeded),
so small alpha gives peaked, learnable rows. Sequences start from the chain's
stationary distribution pi over k-grams, so every target x_t with t >= k has
the same law and the best expected loss (nats per token) is the entropy rate
(Cover & Thomas, "Elements of Information Theory", Theorem 4.2.4):

    H = sum_s pi(s) H(T[s]) = - sum_s pi(s) sum_x T[s, x] log T[s, x]

pi is the fixed point of pi'(s_2 .. s_k, x) = sum_(s_1) pi(s_1 .. s_k) T[s_1 .. s_k, x],
found by power iteration (the chain is irreducible and aperiodic: every entry
of T is positive). A model sees the whole past, and the past beyond k tokens
carries no information, so no model beats H; ``nll`` gives the true model's
loss on given tokens, the floor on that very sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class MarkovChain:
    """Transition rows ``transitions`` (V^k, V), float64; k-gram s = sum_i x_i V^(k-1-i)."""

    transitions: Tensor
    vocab: int
    order: int

    @classmethod
    def random(cls, vocab: int, order: int, alpha: float, seed: int) -> MarkovChain:
        concentration = torch.full((vocab ** order, vocab), alpha, dtype=torch.float64)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            transitions = torch.distributions.Dirichlet(concentration).sample()
        return cls(transitions, vocab, order)

    def _next_state(self, state: Tensor, token: Tensor) -> Tensor:
        return (state * self.vocab) % (self.vocab ** self.order) + token

    def stationary(self, iterations: int = 10_000, tolerance: float = 1e-13) -> Tensor:
        """pi over the V^k k-grams, by power iteration."""
        states = torch.arange(self.vocab ** self.order)
        successors = self._next_state(states[:, None], torch.arange(self.vocab)[None, :])
        pi = torch.full((self.vocab ** self.order,), 1.0 / self.vocab ** self.order,
                        dtype=torch.float64)
        for _ in range(iterations):
            updated = torch.zeros_like(pi).index_add_(
                0, successors.flatten(), (pi[:, None] * self.transitions).flatten())
            if (updated - pi).abs().max() < tolerance:
                return updated
            pi = updated
        return pi

    def entropy_rate(self) -> float:
        """H = sum_s pi(s) H(T[s]) in nats per token."""
        row_entropy = -(self.transitions * self.transitions.log()).sum(dim=-1)
        return float((self.stationary() * row_entropy).sum())

    def sample(self, batch: int, length: int, generator: torch.Generator) -> Tensor:
        """(batch, length) tokens, the first k-gram drawn from pi."""
        state = torch.multinomial(self.stationary(), batch, replacement=True, generator=generator)
        digits = [(state // self.vocab ** (self.order - 1 - i)) % self.vocab
                  for i in range(self.order)]
        cumulative = self.transitions.cumsum(dim=-1)
        uniforms = torch.rand(batch, length - self.order, generator=generator, dtype=torch.float64)
        tokens = digits
        for t in range(length - self.order):
            row = cumulative[state]
            token = torch.searchsorted(row, uniforms[:, t:t + 1] * row[:, -1:]).squeeze(1)
            token = token.clamp(max=self.vocab - 1)
            tokens.append(token)
            state = self._next_state(state, token)
        return torch.stack(tokens, dim=1)

    def nll(self, tokens: Tensor) -> Tensor:
        """-log P(x_t | x_(t-k) .. x_(t-1)) for every target t >= k: (batch, length - k)."""
        state = torch.zeros_like(tokens[:, 0])
        for i in range(self.order):
            state = self._next_state(state, tokens[:, i])
        losses = []
        for t in range(self.order, tokens.shape[1]):
            losses.append(-self.transitions[state, tokens[:, t]].log())
            state = self._next_state(state, tokens[:, t])
        return torch.stack(losses, dim=1)
