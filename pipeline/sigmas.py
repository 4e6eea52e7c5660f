"""The teacher's sampling schedule: the time shift and its evenly spaced sigmas (docs/architecture.md, The method).

The teacher side owns it; a student samples on the segment boundaries its run recorded (see
:mod:`arcflow.distill.arcflow_scheduler`).
"""

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
