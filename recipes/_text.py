"""Character-level text: the Python standard library's own sources, read at run time.

Every Python install ships its standard library's ``.py`` files
(``sysconfig.get_paths()["stdlib"]``), so this corpus needs no download and is
never committed. Deterministic for a given Python version: the top-level
``*.py`` files of that folder, sorted by name, concatenated (each followed by a
newline) until ``max_chars`` characters; the first ``1 - eval_share`` of the
text is the training split, the rest the eval split (contiguous, so eval text
comes from files the model never trained on, except one straddling file).

Characters: code points below 128 are their own token; every other character
is token 0 (NUL, which Python sources do not contain). Vocabulary 128. The
text's SHA-256 goes into results, so runs on another Python version are told apart.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

VOCAB = 128


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The top-level ``*.py`` files of the standard library, sorted by name."""
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else Path(root)
    files = sorted(root.glob("*.py"))
    if not files:
        raise FileNotFoundError(f"no *.py files in {root}: is the standard library installed?")
    return files


def encode(text: str) -> Tensor:
    """int64 tokens: the code point below 128, else 0."""
    codes = torch.tensor(list(text.encode("utf-32-le")), dtype=torch.uint8).view(torch.int32)
    return torch.where(codes < VOCAB, codes, 0).long()


@dataclass(frozen=True)
class TextCorpus:
    """Train and eval tokens of the standard library's text, and what identifies it."""

    train: Tensor
    eval: Tensor
    sha256: str
    files: int

    @classmethod
    def stdlib(cls, max_chars: int = 2_000_000, eval_share: float = 0.1,
               root: Path | None = None) -> TextCorpus:
        if max_chars < 1000:
            raise ValueError(f"max_chars={max_chars}: need at least 1000 characters")
        if not 0 < eval_share < 1:
            raise ValueError(f"eval_share={eval_share}: expected a share in (0, 1)")
        parts, total, used = [], 0, 0
        for path in stdlib_files(root):
            parts.append(path.read_text(encoding="utf-8", errors="replace") + "\n")
            total += len(parts[-1])
            used += 1
            if total >= max_chars:
                break
        text = "".join(parts)[:max_chars]
        tokens = encode(text)
        split = int(len(tokens) * (1 - eval_share))
        return cls(tokens[:split], tokens[split:], hashlib.sha256(text.encode()).hexdigest(),
                   used)

    def unigram_entropy(self) -> float:
        """Entropy (nats/char) of the training split's character frequencies: the loss of a
        model that ignores the context."""
        counts = torch.bincount(self.train, minlength=VOCAB).double()
        p = counts[counts > 0] / counts.sum()
        return float(-(p * p.log()).sum())

    @staticmethod
    def batch(tokens: Tensor, batch: int, length: int, generator: torch.Generator) -> Tensor:
        """(batch, length) windows at offsets drawn uniformly from ``generator``."""
        if len(tokens) <= length:
            raise ValueError(f"length={length}: the split has only {len(tokens)} tokens")
        starts = torch.randint(0, len(tokens) - length, (batch,), generator=generator)
        return torch.stack([tokens[s:s + length] for s in starts.tolist()])

    def eval_batches(self, count: int, length: int, seed: int) -> Tensor:
        """A fixed eval set: ``count`` windows of the eval split drawn with ``seed``."""
        return self.batch(self.eval, count, length, torch.Generator().manual_seed(seed))
