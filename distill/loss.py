"""The offline sub-step loss (docs/architecture.md, Offline distillation): the teacher is never called.

For a (sample, segment) item the student sees the teacher's recorded state at the segment start
and, from its single prediction, the exact average velocity over every recorded sub-step
``[s_j, s_{j+1}]`` of the segment is matched to the recorded velocity ``u_j`` by MSE weighted by
the sub-step length (weights sum to 1 over the segment). The stream
(``arcflow.storage.streaming.TrajectoryStream`` with the segment bounds) cuts the items.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from .momentum import MomentumParams, average_velocities

#: Batch keys that are segment data (``arcflow.storage.streaming.TrajectoryStream`` items).
TRAJECTORY_KEYS = ("x", "sigma", "sigmas", "u", "weights", "segment")
#: Batch keys that are neither segment data nor conditioning (bookkeeping and evaluation extras).
BOOKKEEPING_KEYS = ("sample_id", "seed", "guidance", "stream_pos", "noise", "final")

# (x tokens (B, N, C), sigma (B,), cond) -> channels-first params; a Student or a DDP-wrapped one.
StudentModule = Callable[[Tensor, Tensor, Mapping[str, Tensor]], MomentumParams]


def batch_conditioning(batch: Mapping[str, object]) -> dict[str, Tensor]:
    """The conditioning in a batch: ``batch["cond"]`` if present, else every tensor entry that is
    not segment data or bookkeeping (:data:`TRAJECTORY_KEYS`, :data:`BOOKKEEPING_KEYS`)."""
    if "cond" in batch:
        return dict(batch["cond"])  # type: ignore[arg-type]
    skip = (*TRAJECTORY_KEYS, *BOOKKEEPING_KEYS)
    return {k: v for k, v in batch.items() if k not in skip and isinstance(v, Tensor)}


def segment_loss(student: StudentModule, batch: Mapping[str, Tensor], num_segments: int) -> tuple[Tensor, Tensor]:
    """Sub-step matching loss over a batch of (sample, segment) items, with ONE student forward.

    ``batch`` (collated stream items, already on the student's device): ``x`` ``(B, N, C)`` the
    segment-start states, ``sigma`` ``(B,)``, ``sigmas`` ``(B, W+1)`` the sub-step sigmas, ``u``
    ``(B, W, N, C)`` the recorded velocities, ``weights`` ``(B, W)`` (sub-step length over segment
    length, zero on padding), ``segment`` ``(B,)`` and the conditioning (see
    :func:`batch_conditioning`). Nothing here moves data between host and device or waits on it.
    Returns the mean loss over items and a detached ``(num_segments,)`` tensor of per-segment mean
    losses (NaN for segments absent from the batch).
    """
    x, sigma, window, target, weights, segment = (batch[k] for k in TRAJECTORY_KEYS)
    params = student(x.float(), sigma.float(), batch_conditioning(batch))
    ubar = average_velocities(params, sigma.float(), window.float())  # (B, W, C, N)
    err = (ubar.transpose(-1, -2) - target.float()).pow(2).flatten(2).mean(dim=2)  # (B, W)
    per_item = (err * weights.float()).sum(dim=1)
    loss = per_item.mean()

    with torch.no_grad():
        sums = torch.zeros(num_segments, device=per_item.device).index_add_(0, segment, per_item.detach().float())
        counts = torch.zeros(num_segments, device=per_item.device).index_add_(0, segment, torch.ones_like(sums[segment]))
        per_segment = torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, float("nan")))
    return loss, per_segment


def segment_batch(
    x: Tensor, u: Tensor, sigmas: Tensor, segment_bounds: Sequence[int], segment: Tensor, cond: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Cut a batch of (sample, segment) items out of whole trajectories held in memory (``x``
    ``(B, S+1, ...)``, ``u`` ``(B, S, ...)``, ``sigmas`` ``(S+1,)``), in the layout the stream
    yields from storage: for a teacher run in memory (tests, benchmarks) instead of a dataset."""
    device = x.device
    bounds = torch.as_tensor(segment_bounds, dtype=torch.long, device=device)
    seg = torch.as_tensor(segment, dtype=torch.long, device=device).expand(x.shape[0])
    start, end = bounds[seg], bounds[seg + 1]
    width = max(b - a for a, b in zip(segment_bounds, segment_bounds[1:]))
    offsets = torch.arange(width + 1, device=device)
    rows = torch.arange(x.shape[0], device=device)[:, None]
    window = sigmas.float().to(device)[torch.minimum(start[:, None] + offsets, end[:, None])]  # (B, W+1)
    steps = torch.minimum(start[:, None] + offsets[:-1], end[:, None] - 1)
    valid = (start[:, None] + offsets[:-1]) < end[:, None]
    target = u[rows, steps] * valid.reshape(*valid.shape, *([1] * (u.dim() - 2)))
    weights = (window[:, :-1] - window[:, 1:]) / (window[:, :1] - window[:, -1:])
    return {"x": x[rows[:, 0], start], "sigma": window[:, 0], "sigmas": window, "u": target,
            "weights": weights, "segment": seg, **cond}
