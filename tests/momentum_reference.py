"""Independent NumPy reference for the momentum velocity field (no arcflow imports)."""

import numpy as np


def reference_velocity(v, logits, log_gammas, s_src, s):
    """v: (B, K, C, N); logits: (B, K, G, N); log_gammas: (B, K-1, G, N). Returns (B, C, N)."""
    b, k, c, n = v.shape
    g_groups = logits.shape[2]
    w = np.exp(logits - logits.max(axis=1, keepdims=True))
    w = w / w.sum(axis=1, keepdims=True)
    g = np.concatenate([np.zeros_like(logits[:, :1]), log_gammas], axis=1)
    out = np.zeros((b, c, n))
    per_group = c // g_groups
    for ch in range(c):
        grp = ch // per_group
        for comp in range(k):
            out[:, ch] += w[:, comp, grp] * v[:, comp, ch] * np.exp(g[:, comp, grp] * (s_src - s))
    return out


def quadrature_displacement(v, logits, log_gammas, s_src, s_a, s_b, nodes=96, panels=8):
    """Composite Gauss-Legendre quadrature of the velocity from s_b to s_a (float64)."""
    xs, ws = np.polynomial.legendre.leggauss(nodes)
    edges = np.linspace(s_b, s_a, panels + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        half, mid = (hi - lo) / 2, (hi + lo) / 2
        for x, w in zip(xs, ws):
            total = total + w * half * reference_velocity(v, logits, log_gammas, s_src, mid + half * x)
    return total
