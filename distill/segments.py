"""Where a student's segments begin and end on the teacher's recorded schedule.

A student with NFE = N splits raw time into N equal segments (docs/architecture.md, The method).
Where a boundary falls on a recorded step it is that step's recorded sigma; elsewhere it is the
teacher's shift warp of its raw time. Boundaries need not fall on recorded steps: the recorded
Euler path is linear in sigma between two steps, so the state at any sigma is exact (the stream,
:class:`~arcflow.storage.streaming.TrajectoryStream`, cuts the items at these sigmas).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from arcflow.pipeline.sigmas import shift_sigmas


def segment_step_indices(total_steps: int, nfe: int) -> list[int]:
    """Indices into a ``total_steps`` schedule where ``nfe`` equal raw-time segments begin and end,
    for NFEs that divide the steps (in-memory trajectories cut with
    :func:`~arcflow.distill.loss.segment_batch`); raises ``ValueError`` otherwise."""
    if nfe < 1:
        raise ValueError(f"NFE must be >= 1, got {nfe}")
    if total_steps % nfe:
        raise ValueError(f"NFE={nfe} does not divide the {total_steps} recorded steps")
    return [i * total_steps // nfe for i in range(nfe + 1)]


def segment_sigmas(recorded: Sequence[float], shift: float, nfe: int) -> list[float]:
    """The ``nfe + 1`` sigmas where ``nfe`` equal raw-time segments of a recorded schedule
    (``recorded``: its S+1 sigmas from 1 to 0, made by ``shift``) begin and end.

    Raises ``ValueError`` when a boundary falls between recorded steps of a schedule that no static
    shift describes (``shift`` NaN): its sigma there would be a guess.
    """
    if nfe < 1:
        raise ValueError(f"NFE must be >= 1, got {nfe}")
    steps = len(recorded) - 1
    out = []
    for b in range(nfe + 1):
        if (b * steps) % nfe == 0:
            out.append(float(recorded[b * steps // nfe]))
            continue
        if not math.isfinite(shift) or shift <= 0:
            raise ValueError(
                f"NFE={nfe} puts segment boundaries between the {steps} recorded steps, and this schedule has no "
                f"static shift to place them; choose an NFE that divides {steps}"
            )
        raw = torch.tensor(1.0 - b / nfe, dtype=torch.float64)
        out.append(float(shift_sigmas(raw, shift)))
    return out
