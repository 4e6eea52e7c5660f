"""Time shift and segment boundaries shared by the teacher schedule and the few-step student."""

from __future__ import annotations

import torch
from torch import Tensor


def shift_sigmas(raw: Tensor, shift: float) -> Tensor:
    """Warp raw time ``r`` in [0, 1] to sigma: ``s = shift * r / (1 + (shift - 1) * r)``."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift * raw / (1.0 + (shift - 1.0) * raw)


def shifted_schedule(steps: int, shift: float, dtype: torch.dtype = torch.float64) -> Tensor:
    """``steps + 1`` sigmas from 1 to 0, equal in raw time, warped by ``shift``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    raw = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return shift_sigmas(raw, shift).to(dtype)


def segment_step_indices(total_steps: int, nfe: int) -> list[int]:
    """Indices into a ``total_steps`` schedule where ``nfe`` equal raw-time segments begin and end.

    Raises ``ValueError`` when the boundaries do not fall on recorded steps (for example NFE=3 on
    a 50-step schedule), because the offline loss needs whole recorded sub-steps per segment.
    """
    if nfe < 1:
        raise ValueError(f"NFE must be >= 1, got {nfe}")
    if total_steps % nfe:
        raise ValueError(
            f"NFE={nfe} does not divide the {total_steps} recorded steps; "
            f"choose an NFE that divides {total_steps}"
        )
    return [i * total_steps // nfe for i in range(nfe + 1)]
