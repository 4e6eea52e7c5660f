"""The momentum output head that replaces a transformer's final projection (docs/architecture.md, The method).

Per latent token the head maps the transformer's last hidden state to K velocities (C channels
each), K mixture logits per weight group and K-1 log-momentum factors per weight group. Its output
is one packed tensor ``(B, N, K*C + K*G + (K-1)*G)`` so the transformer's own forward returns it;
:meth:`MomentumHead.unpack` lays it out as :class:`~arcflow.distill.momentum.MomentumParams`.

A transformer that un-patchifies after its projection (SD3, Z-Image: ``hidden -> p*p*C`` then a
reshape with its ``out_channels``) gets a head with ``positions = p*p``: one packed set per output
position, ordered ``(position, packed)``, so the transformer's own un-patchify (with
``out_channels`` set to the packed width) yields per-pixel packed maps.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..momentum import MomentumParams, packed_width, unpack_momentum

#: Range of the initial momentum factors gamma_k = exp(g_k) of components 1..K-1.
INITIAL_GAMMA_RANGE = (0.2, 4.0)
#: Relative scale of the noise added to velocity heads 1..K-1 at init (component 0 stays exact).
INIT_NOISE_SCALE = 1e-3


def soft_clamp(x: Tensor, bound: float) -> Tensor:
    """``bound * tanh(x / bound)``: the identity near 0, never beyond ``+-bound``."""
    return bound * torch.tanh(x / bound)


class MomentumHead(nn.Module):
    """Linear heads: hidden -> velocities ``(K*C)``, logits ``(K*G)``, log-gammas ``((K-1)*G)``.

    With ``momentum=False`` there is no log-gamma projection and every log-gamma is exactly 0.
    """

    def __init__(
        self,
        hidden: int,
        channels: int,
        k: int,
        groups: int = 1,
        momentum: bool = True,
        log_gamma_bound: float = 6.0,
        positions: int = 1,
    ) -> None:
        super().__init__()
        if positions < 1:
            raise ValueError(f"positions must be >= 1, got {positions}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if groups < 1 or channels % groups:
            raise ValueError(f"weight_groups={groups} must divide the {channels} latent channels")
        widest = max(abs(math.log(g)) for g in INITIAL_GAMMA_RANGE)
        if log_gamma_bound <= widest:
            raise ValueError(f"log_gamma_bound must exceed {widest:.3f} (the initial range), got {log_gamma_bound}")
        self.hidden, self.channels, self.k, self.groups = hidden, channels, k, groups
        self.momentum = momentum
        self.log_gamma_bound = float(log_gamma_bound)
        self.positions = positions
        self.velocity = nn.Linear(hidden, positions * k * channels)
        self.logits = nn.Linear(hidden, positions * k * groups)
        self.log_gamma = nn.Linear(hidden, positions * (k - 1) * groups) if momentum and k > 1 else None

    @property
    def out_features(self) -> int:
        """Width of the packed output per token (per output position)."""
        return packed_width(self.k, self.channels, self.groups, self.momentum)

    @torch.no_grad()
    def init_from_projection(self, proj: nn.Linear, generator: torch.Generator | None = None, sign: int = 1) -> None:
        """Start from the teacher's output projection ``proj`` (hidden -> C, or hidden -> P*C ordered
        ``(position, channel)``); ``sign=-1`` where the scheduler's velocity is the negated output.

        Every velocity head copies ``proj``; heads 1..K-1 get a little noise to break symmetry (head 0
        stays exact, so K=1 reproduces the teacher). Logits start at zero (uniform mixture); log-gamma
        weights start at zero with biases placing ``exp(g)`` evenly in log space over
        :data:`INITIAL_GAMMA_RANGE` after the soft clamp.
        """
        if proj.in_features != self.hidden or proj.out_features != self.positions * self.channels:
            raise ValueError(
                f"projection {proj.in_features}->{proj.out_features} does not match head "
                f"{self.hidden}->{self.positions * self.channels}"
            )
        if self.positions > 1 or sign != 1:
            self._init_per_position(proj, generator, sign)
            return
        w = proj.weight.to(self.velocity.weight.dtype)
        b = proj.bias.to(w.dtype) if proj.bias is not None else w.new_zeros(self.channels)
        weight = w.repeat(self.k, 1)
        bias = b.repeat(self.k)
        if self.k > 1:
            extra = (self.k - 1) * self.channels
            noise_w = torch.randn((extra, self.hidden), generator=generator).to(weight)
            noise_b = torch.randn((extra,), generator=generator).to(bias)
            weight[self.channels :] += INIT_NOISE_SCALE * w.float().std().to(w.dtype) * noise_w
            bias[self.channels :] += INIT_NOISE_SCALE * b.float().abs().mean().to(b.dtype) * noise_b
        self.velocity.weight.copy_(weight)
        self.velocity.bias.copy_(bias)
        self.logits.weight.zero_()
        self.logits.bias.zero_()
        if self.log_gamma is not None:
            lo, hi = (math.log(g) for g in INITIAL_GAMMA_RANGE)
            # One momentum component sits at the geometric middle of the range.
            if self.k > 2:
                targets = torch.linspace(lo, hi, self.k - 1, dtype=torch.float64)
            else:
                targets = torch.tensor([(lo + hi) / 2], dtype=torch.float64)
            # Inverse of the soft clamp, so the clamped output starts exactly at the targets.
            pre = self.log_gamma_bound * torch.atanh(targets / self.log_gamma_bound)
            self.log_gamma.weight.zero_()
            self.log_gamma.bias.copy_(pre.repeat_interleave(self.groups).to(self.log_gamma.bias))

    def _initial_log_gammas(self) -> Tensor:
        """Pre-clamp log-gamma biases placing ``exp(g)`` evenly in log space (``(K-1,)``, float64)."""
        lo, hi = (math.log(g) for g in INITIAL_GAMMA_RANGE)
        if self.k > 2:
            targets = torch.linspace(lo, hi, self.k - 1, dtype=torch.float64)
        else:
            targets = torch.tensor([(lo + hi) / 2], dtype=torch.float64)
        return self.log_gamma_bound * torch.atanh(targets / self.log_gamma_bound)

    @torch.no_grad()
    def _init_per_position(self, proj: nn.Linear, generator: torch.Generator | None, sign: int) -> None:
        """:meth:`init_from_projection` for ``positions`` output positions (and/or a sign): the
        same rule per position."""
        p, k, c, g, hidden = self.positions, self.k, self.channels, self.groups, self.hidden
        w = (sign * proj.weight).to(self.velocity.weight.dtype).reshape(p, 1, c, hidden)
        b = (sign * proj.bias).to(w.dtype) if proj.bias is not None else w.new_zeros(p * c)
        b = b.reshape(p, 1, c)
        weight = w.repeat(1, k, 1, 1)
        bias = b.repeat(1, k, 1)
        if k > 1:
            noise_w = torch.randn((p, k - 1, c, hidden), generator=generator).to(weight)
            noise_b = torch.randn((p, k - 1, c), generator=generator).to(bias)
            weight[:, 1:] += INIT_NOISE_SCALE * w.float().std().to(w.dtype) * noise_w
            bias[:, 1:] += INIT_NOISE_SCALE * b.float().abs().mean().to(b.dtype) * noise_b
        self.velocity.weight.copy_(weight.reshape(p * k * c, hidden))
        self.velocity.bias.copy_(bias.reshape(p * k * c))
        self.logits.weight.zero_()
        self.logits.bias.zero_()
        if self.log_gamma is not None:
            pre = self._initial_log_gammas().repeat_interleave(g).repeat(p)
            self.log_gamma.weight.zero_()
            self.log_gamma.bias.copy_(pre.to(self.log_gamma.bias))

    def forward(self, hidden_states: Tensor) -> Tensor:
        """Packed ``(..., positions * out_features)``, ordered ``(position, packed)``; log-gammas
        are already soft-clamped."""
        h = hidden_states.to(self.velocity.weight.dtype)
        parts = [self.velocity(h), self.logits(h)]
        if self.log_gamma is not None:
            parts.append(soft_clamp(self.log_gamma(h), self.log_gamma_bound))
        if self.positions == 1:
            return torch.cat(parts, dim=-1)
        lead = h.shape[:-1]
        out = torch.cat([part.reshape(*lead, self.positions, -1) for part in parts], dim=-1)
        return out.reshape(*lead, self.positions * self.out_features)

    def unpack(self, packed: Tensor) -> MomentumParams:
        """``(B, N, out_features)`` -> channels-first params (see :func:`~arcflow.distill.momentum.unpack_momentum`)."""
        return unpack_momentum(packed, self.k, self.channels, self.groups, self.momentum)


def head_for(projection: nn.Linear, k: int, groups: int, momentum: bool, log_gamma_bound: float,
             positions: int = 1) -> MomentumHead:
    """An (uninitialized) head shaped to replace ``projection`` (``positions`` output positions of
    ``out_features / positions`` channels each), on its device, in float32."""
    if projection.out_features % positions:
        raise ValueError(f"{positions} output positions do not divide the projection's {projection.out_features} outputs")
    return MomentumHead(
        projection.in_features,
        projection.out_features // positions,
        k=k,
        groups=groups,
        momentum=momentum,
        log_gamma_bound=log_gamma_bound,
        positions=positions,
    ).to(device=projection.weight.device)
