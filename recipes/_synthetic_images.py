"""A learnable image classification task generated on the fly: oriented sine gratings.

Image i has class c = i mod C and shows, over a (S, S) pixel grid with
coordinates u, v in [0, 1),

    g(u, v) = 1/2 + a/2 sin(2 pi f_c (u cos theta + v sin theta) + phi)
    theta   = pi c / C + jitter,   f_c = 2 + 2 (c mod 3) cycles per image

tinted by a random colour and plus Gaussian pixel noise, clipped to [0, 1].
Orientation and frequency identify the class; phase phi, contrast a, colour,
orientation jitter (up to a quarter of the gap between classes) and noise
vary per image. Every image is drawn from its own generator, seeded by (seed,
i), so the dataset is deterministic, needs no storage and gives any rank or
resumed run the same image for the same index. Pixels are in [0, 1] (no
normalisation), as adversarial training wants them.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils.data import Dataset


class SyntheticGratings(Dataset):
    """``length`` images of ``num_classes`` classes at ``image_size`` pixels (see module docstring).

    ``offset`` shifts the indices, so that a held-out split (another offset) never
    repeats a training image.
    """

    def __init__(self, length: int, num_classes: int = 10, image_size: int = 32,
                 noise: float = 0.1, seed: int = 0, offset: int = 0):
        self.length, self.num_classes, self.image_size = length, num_classes, image_size
        self.noise, self.seed, self.offset = noise, seed, offset
        grid = torch.arange(image_size, dtype=torch.float32) / image_size
        self._v, self._u = torch.meshgrid(grid, grid, indexing="ij")

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        label = index % self.num_classes
        generator = torch.Generator().manual_seed(
            self.seed * 1_000_003 + self.offset + index)
        phase, contrast, jitter = torch.rand(3, generator=generator)
        theta = math.pi * (label + (jitter.item() - 0.5) / 2) / self.num_classes
        frequency = 2 + 2 * (label % 3)
        wave = torch.sin(2 * math.pi * frequency * (self._u * math.cos(theta)
                                                     + self._v * math.sin(theta))
                         + 2 * math.pi * phase)
        grating = 0.5 + 0.5 * (0.4 + 0.6 * contrast) * wave
        colour = 0.4 + 0.6 * torch.rand(3, 1, 1, generator=generator)
        noise = self.noise * torch.randn(3, self.image_size, self.image_size, generator=generator)
        return (grating * colour + noise).clamp(0, 1), label
