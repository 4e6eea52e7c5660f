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
#: ``relative`` init: scale of the noise on velocity heads 1..K-1 (component 0 stays exact).
INIT_NOISE_SCALE = 1e-3
#: ``official`` init: standard deviation of the noise on every velocity component's bias
#: (pnotp/ArcFlow ``ArcFluxTransformer2DModel.init_weights``).
OFFICIAL_BIAS_NOISE_STD = 0.05
#: Channels of one latent channel in a packed token: 2x2 pixels, channel-major (FLUX-style packing).
PACKED_PATCH = 4


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
        if log_gamma_bound < 0 or 0 < log_gamma_bound <= widest:
            raise ValueError(f"log_gamma_bound must be 0 (none) or exceed {widest:.3f} (the initial range), got {log_gamma_bound}")
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
    def init_from_projection(self, proj: nn.Linear, generator: torch.Generator | None = None, sign: int = 1,
                             mode: str = "relative", patch: int = 1) -> None:
        """Start from the teacher's output projection ``proj`` (hidden -> C, or hidden -> P*C ordered
        ``(position, channel)``); ``sign=-1`` where the scheduler's velocity is the negated output.

        Every velocity head copies ``proj``, then ``mode`` breaks the symmetry: ``relative`` adds
        noise (1e-3 of the weights' std and the biases' mean magnitude) to heads 1..K-1, so head 0
        stays exact and K=1 reproduces the teacher; ``official`` adds N(0, 0.05^2) to the bias of
        every head, one draw per head and latent channel shared by that channel's pixels (the
        ``patch`` consecutive channels of a packed token, and all output positions). Logits start at
        zero (uniform mixture); log-gamma weights at zero with biases placing ``exp(g)`` evenly in
        log space over :data:`INITIAL_GAMMA_RANGE` (after the soft clamp).
        """
        p, k, c, g, hidden = self.positions, self.k, self.channels, self.groups, self.hidden
        if proj.in_features != hidden or proj.out_features != p * c:
            raise ValueError(f"projection {proj.in_features}->{proj.out_features} does not match head {hidden}->{p * c}")
        if c % patch:
            raise ValueError(f"{patch} channels per latent channel do not divide the {c} channels")
        w = (sign * proj.weight).to(self.velocity.weight.dtype).reshape(p, 1, c, hidden)
        b = (sign * proj.bias).to(w.dtype) if proj.bias is not None else w.new_zeros(p * c)
        b = b.reshape(p, 1, c)
        weight = w.repeat(1, k, 1, 1)
        bias = b.repeat(1, k, 1)
        if mode == "official":
            noise = torch.randn((k, c // patch), generator=generator) * OFFICIAL_BIAS_NOISE_STD
            bias += noise.repeat_interleave(patch, dim=1).to(bias)
        elif mode != "relative":
            raise ValueError(f"unknown head init {mode!r}")
        elif k > 1:
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

    def _initial_log_gammas(self) -> Tensor:
        """Pre-clamp log-gamma biases placing ``exp(g)`` evenly in log space (``(K-1,)``, float64)."""
        lo, hi = (math.log(g) for g in INITIAL_GAMMA_RANGE)
        if self.k > 2:
            targets = torch.linspace(lo, hi, self.k - 1, dtype=torch.float64)
        else:  # one momentum component: at the geometric middle of the range
            targets = torch.tensor([(lo + hi) / 2], dtype=torch.float64)
        if not self.log_gamma_bound:
            return targets
        # Inverse of the soft clamp, so the clamped output starts exactly at the targets.
        return self.log_gamma_bound * torch.atanh(targets / self.log_gamma_bound)

    def forward(self, hidden_states: Tensor) -> Tensor:
        """Packed ``(..., positions * out_features)``, ordered ``(position, packed)``; log-gammas
        are already soft-clamped (unless the bound is 0)."""
        h = hidden_states.to(self.velocity.weight.dtype)
        parts = [self.velocity(h), self.logits(h)]
        if self.log_gamma is not None:
            log_gamma = self.log_gamma(h)
            parts.append(soft_clamp(log_gamma, self.log_gamma_bound) if self.log_gamma_bound else log_gamma)
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
