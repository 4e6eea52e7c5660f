"""Evaluation metrics shared by the teacher benchmark and student evaluation."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def _as_float64(feats: Tensor | np.ndarray) -> np.ndarray:
    arr = feats.detach().cpu().numpy() if isinstance(feats, Tensor) else np.asarray(feats)
    arr = arr.astype(np.float64).reshape(arr.shape[0], -1)
    if arr.shape[0] < 2:
        raise ValueError("the Frechet distance needs at least 2 samples per set")
    return arr


def _sqrtm_psd(mat: np.ndarray) -> np.ndarray:
    vals, vecs = np.linalg.eigh((mat + mat.T) / 2.0)
    return (vecs * np.sqrt(np.clip(vals, 0.0, None))) @ vecs.T


def frechet_distance(feats_a: Tensor | np.ndarray, feats_b: Tensor | np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``(N, D)`` (float64).

    ``|mu_a - mu_b|^2 + tr(Ca + Cb - 2 (Ca^1/2 Cb Ca^1/2)^1/2)``; the symmetric form with
    eigen-decompositions of PSD matrices avoids the complex results of a general ``sqrtm``.
    """
    a, b = _as_float64(feats_a), _as_float64(feats_b)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = _sqrtm_psd(cov_a)
    cross = _sqrtm_psd(root_a @ cov_b @ root_a)
    value = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(cross))
    return max(value, 0.0)


def velocity_cosines(u: Tensor) -> Tensor:
    """Cosine between consecutive velocities per sample: ``u [B, S, ...]`` -> ``[B, S-1]``."""
    flat = u.detach().double().flatten(2)
    return torch.nn.functional.cosine_similarity(flat[:, 1:], flat[:, :-1], dim=-1)
