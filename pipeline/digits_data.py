"""The embedded teacher's data: scikit-learn's bundled 8x8 digits, a seeded held-out split, and
the pixel <-> packed-latent mapping (FLUX's 2x2 patch packing).

Images are ``(B, 1, 8, 8)`` float32 in [0, 1]. Latents are pixels mapped to [-1, 1] and packed
2x2 into ``(B, 16, 4)``: 16 tokens on a 4x4 grid, channel index ``dy * 2 + dx``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

IMAGE_SIZE = 8
PATCH = 2
GRID = IMAGE_SIZE // PATCH
LATENT_SHAPE = (GRID * GRID, PATCH * PATCH)
#: Fraction of the 1797 digits held out for evaluation (never trained on).
HELDOUT_FRACTION = 0.2
#: The split seed the shipped weights were trained with.
SPLIT_SEED = 0


@dataclass(frozen=True)
class DigitsSplit:
    """Train and held-out digits: images ``(N, 1, 8, 8)`` in [0, 1], labels ``(N,)`` int64."""

    train_images: Tensor
    train_labels: Tensor
    heldout_images: Tensor
    heldout_labels: Tensor


def digits_split(seed: int = SPLIT_SEED, heldout_fraction: float = HELDOUT_FRACTION) -> DigitsSplit:
    """Split scikit-learn's ``load_digits`` into train / held-out, stratified by label and seeded."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.from_numpy(data.images.astype(np.float32) / 16.0).unsqueeze(1)
    labels = torch.from_numpy(data.target.astype(np.int64))
    gen = torch.Generator().manual_seed(seed)
    held: list[Tensor] = []
    for digit in range(10):
        idx = torch.nonzero(labels == digit).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        held.append(idx[: round(len(idx) * heldout_fraction)])
    held_idx = torch.cat(held).sort().values
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[held_idx] = False
    return DigitsSplit(images[mask], labels[mask], images[held_idx], labels[held_idx])


def images_to_latents(images: Tensor) -> Tensor:
    """``(B, 1, 8, 8)`` in [0, 1] -> packed latents ``(B, 16, 4)`` in [-1, 1]."""
    b = images.shape[0]
    x = images * 2.0 - 1.0
    x = x.reshape(b, 1, GRID, PATCH, GRID, PATCH).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, GRID * GRID, PATCH * PATCH)


def latents_to_images(latents: Tensor) -> Tensor:
    """Packed latents ``(B, 16, 4)`` -> images ``(B, 1, 8, 8)`` in [0, 1] (clamped, float32, CPU)."""
    b = latents.shape[0]
    x = latents.detach().float().cpu().reshape(b, GRID, GRID, 1, PATCH, PATCH)
    x = x.permute(0, 3, 1, 4, 2, 5).reshape(b, 1, IMAGE_SIZE, IMAGE_SIZE)
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)
