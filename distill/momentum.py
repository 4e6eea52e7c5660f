"""The ArcFlow momentum parameterization and its exact integral (docs/architecture.md, The method).

A student call at a segment start ``s_src`` predicts, for every latent position:

* ``velocities`` ``v_k``: shape ``(B, K, C, *rest)``;
* ``logits`` (mixture weights ``pi = softmax(logits)`` over K): shape ``(B, K, G, *rest)``, where the
  G weight groups split the C channels into equal consecutive blocks (G=1 shares one weight across
  all channels, G=C gives one weight per channel);
* ``log_gammas`` ``g_k`` for components 1..K-1: shape ``(B, K-1, G, *rest)``; component 0 has
  ``g_0 = 0`` (a constant velocity).

Inside the segment ``v(s) = sum_k pi_k v_k exp(g_k (s_src - s))``. Moving from ``s_a`` down to
``s_b`` (``d = s_a - s_b``) is exact in closed form:

    x(s_b) = x(s_a) - sum_k pi_k v_k exp(g_k (s_src - s_a)) d phi(g_k d),  phi(z) = expm1(z) / z.

A student's head returns the three as one packed tensor per token (:func:`packed_width` wide);
:func:`unpack_momentum` lays it out as :class:`MomentumParams`.

All arithmetic runs in float32 (float64 stays float64) whatever the input dtype, so a bf16 network
cannot lose the integral's precision. Sigmas may be Python floats, 0-d tensors or per-sample
tensors of shape ``(B,)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
from torch import Tensor

SigmaLike = Union[float, Tensor]

# Below this |z| phi uses its Taylor series: the truncation error (z^4/120) is under 1e-14 there,
# and the series has clean gradients where expm1(z)/z would divide 0 by 0.
_PHI_SERIES_BELOW = 1e-3


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the integral is computed in: float64 stays, everything else becomes float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def phi(z: Tensor) -> Tensor:
    """``expm1(z) / z`` with ``phi(0) = 1``, exact near 0 and with finite gradients everywhere."""
    small = z.abs() < _PHI_SERIES_BELOW
    z_safe = torch.where(small, torch.ones_like(z), z)
    direct = torch.expm1(z_safe) / z_safe
    series = 1.0 + z * (0.5 + z * (1.0 / 6.0 + z * (1.0 / 24.0)))
    return torch.where(small, series, direct)


@dataclass
class MomentumParams:
    """One student prediction for a segment (see the module docstring for shapes)."""

    velocities: Tensor
    logits: Tensor
    log_gammas: Tensor

    def __post_init__(self) -> None:
        v, w, g = self.velocities, self.logits, self.log_gammas
        if v.dim() < 3:
            raise ValueError(f"velocities must be (B, K, C, ...), got shape {tuple(v.shape)}")
        batch, k, channels = v.shape[:3]
        rest = tuple(v.shape[3:])
        if w.shape[:2] != (batch, k) or tuple(w.shape[3:]) != rest:
            raise ValueError(f"logits shape {tuple(w.shape)} does not match velocities {tuple(v.shape)}")
        groups = w.shape[2]
        if groups < 1 or channels % groups:
            raise ValueError(f"{groups} weight groups do not divide {channels} channels")
        if tuple(g.shape) != (batch, k - 1, groups, *rest):
            raise ValueError(
                f"log_gammas must have shape {(batch, k - 1, groups, *rest)}, got {tuple(g.shape)}"
            )

    def weights(self) -> Tensor:
        """Mixture weights ``pi``, shape ``(B, K, G, *rest)``, in the math dtype."""
        logits = self.logits.to(math_dtype(self.velocities.dtype))
        return torch.softmax(logits, dim=1)

    def all_log_gammas(self) -> Tensor:
        """``g`` for all K components (component 0 is 0), shape ``(B, K, G, *rest)``."""
        g = self.log_gammas.to(math_dtype(self.velocities.dtype))
        zero = torch.zeros_like(g[:, :1]) if g.shape[1] else torch.zeros_like(self.weights()[:, :1])
        return torch.cat([zero, g], dim=1)


def packed_width(k: int, channels: int, groups: int, momentum: bool) -> int:
    """Per-token width of a head's packed output: ``K*C + K*G + (K-1)*G`` (no log-gammas without momentum)."""
    return k * channels + k * groups + ((k - 1) * groups if momentum else 0)


def unpack_momentum(packed: Tensor, k: int, channels: int, groups: int, momentum: bool) -> MomentumParams:
    """A head's packed ``(B, N, width)`` output -> channels-first params: velocities ``(B, K, C, N)``,
    logits ``(B, K, G, N)``, log-gammas ``(B, K-1, G, N)`` (all 0 without momentum).

    A function of the head's shape alone (the student's head packs this way), so a scheduler can
    unpack what the transformer returns.
    """
    batch, tokens = packed.shape[:2]
    n_v, n_w = k * channels, k * groups
    v = packed[..., :n_v].reshape(batch, tokens, k, channels).permute(0, 2, 3, 1)
    w = packed[..., n_v : n_v + n_w].reshape(batch, tokens, k, groups).permute(0, 2, 3, 1)
    if momentum and k > 1:
        gam = packed[..., n_v + n_w :].reshape(batch, tokens, k - 1, groups).permute(0, 2, 3, 1)
    else:
        gam = packed.new_zeros(batch, k - 1, groups, tokens)
    return MomentumParams(velocities=v, logits=w, log_gammas=gam)


def _as_sigma(sigma: SigmaLike, like: Tensor, extra_dims: int) -> Tensor:
    """Turn a float / 0-d / (B,) sigma into a tensor broadcastable against ``(B, extra...)``."""
    s = torch.as_tensor(sigma, dtype=like.dtype, device=like.device)
    if s.dim() == 0:
        return s
    if s.dim() != 1 or s.shape[0] != like.shape[0]:
        raise ValueError(f"sigma must be a scalar or shape (B,) with B={like.shape[0]}, got {tuple(s.shape)}")
    return s.reshape(-1, *([1] * extra_dims))


def _mix(velocities: Tensor, coeffs: Tensor) -> Tensor:
    """``sum_k coeffs_k * v_k`` for velocities ``(B, K, C, *rest)`` and coeffs ``(B, K, G, *rest)``."""
    v = velocities.to(coeffs.dtype)
    batch, k, channels = v.shape[:3]
    rest = v.shape[3:]
    groups = coeffs.shape[2]
    v = v.reshape(batch, k, groups, channels // groups, *rest)
    c = coeffs.unsqueeze(3)
    return (c * v).sum(dim=1).reshape(batch, channels, *rest)


def velocity_at(params: MomentumParams, s_src: SigmaLike, s: SigmaLike) -> Tensor:
    """The student's velocity ``v(s)`` inside the segment, shape ``(B, C, *rest)``."""
    pi = params.weights()
    g = params.all_log_gammas()
    extra = pi.dim() - 1
    tau = _as_sigma(s_src, pi, extra) - _as_sigma(s, pi, extra)
    return _mix(params.velocities, pi * torch.exp(g * tau))


def displacement(params: MomentumParams, s_src: SigmaLike, s_a: SigmaLike, s_b: SigmaLike) -> Tensor:
    """Exact ``x(s_a) - x(s_b)`` for the momentum flow, shape ``(B, C, *rest)``."""
    pi = params.weights()
    g = params.all_log_gammas()
    extra = pi.dim() - 1
    src, a, b = (_as_sigma(s, pi, extra) for s in (s_src, s_a, s_b))
    d = a - b
    coeffs = pi * torch.exp(g * (src - a)) * d * phi(g * d)
    return _mix(params.velocities, coeffs)


def integrate(x: Tensor, params: MomentumParams, s_src: SigmaLike, s_a: SigmaLike, s_b: SigmaLike) -> Tensor:
    """Move ``x`` (at ``s_a``) to ``s_b`` along the momentum flow; returns ``x``'s dtype."""
    return (x.to(math_dtype(x.dtype)) - displacement(params, s_src, s_a, s_b)).to(x.dtype)


def average_velocities(params: MomentumParams, s_src: SigmaLike, sigmas: Tensor) -> Tensor:
    """Exact mean velocity over each sub-step ``[sigmas[j], sigmas[j+1]]``.

    ``sigmas`` is ``(J+1,)`` (shared) or ``(B, J+1)`` (per sample), decreasing. Returns
    ``(B, J, C, *rest)`` with ``ubar_j = (x(s_j) - x(s_{j+1})) / (s_j - s_{j+1})``, computed without
    dividing by the step length (so zero-length steps give the instantaneous velocity).
    """
    pi = params.weights()
    g = params.all_log_gammas()
    batch = pi.shape[0]
    extra = pi.dim() - 1
    sig = torch.as_tensor(sigmas, dtype=pi.dtype, device=pi.device)
    if sig.dim() == 1:
        sig = sig.unsqueeze(0).expand(batch, -1)
    if sig.dim() != 2 or sig.shape[0] != batch or sig.shape[1] < 2:
        raise ValueError(f"sigmas must be (J+1,) or (B, J+1) with J >= 1, got {tuple(sigmas.shape)}")
    src = _as_sigma(s_src, pi, extra)
    shape = (batch, sig.shape[1] - 1) + (1,) * extra  # (B, J, 1, ..., 1)
    starts = sig[:, :-1].reshape(shape)
    lengths = (sig[:, :-1] - sig[:, 1:]).reshape(shape)
    src = src.unsqueeze(1) if src.dim() else src
    # (B, J, K, G, *rest): one coefficient set per sub-step.
    pi_j, g_j = pi.unsqueeze(1), g.unsqueeze(1)
    coeffs = pi_j * torch.exp(g_j * (src - starts)) * phi(g_j * lengths)
    n_steps = coeffs.shape[1]
    flat = coeffs.flatten(0, 1)  # (B*J, K, G, *rest)
    v = params.velocities
    v_rep = v.unsqueeze(1).expand(batch, n_steps, *v.shape[1:]).flatten(0, 1)
    out = _mix(v_rep, flat)
    return out.reshape(batch, n_steps, *out.shape[1:])
