"""The offline sub-step loss (DESIGN.md section 4): the teacher is never called.

For a (sample, segment) pair the student sees the teacher's recorded state at the segment start
and, from its single prediction, the exact average velocity over every recorded sub-step
``[s_j, s_{j+1}]`` of the segment is matched to the recorded velocity ``u_j`` by MSE weighted by
the sub-step length (weights sum to 1 over the segment).
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence, Union

import torch
from torch import Tensor

from .momentum import MomentumParams, average_velocities

#: Batch keys that are trajectory data.
TRAJECTORY_KEYS = ("x", "u", "sigmas")
#: Batch keys that are neither trajectory data nor conditioning (per-sample bookkeeping of the stream).
BOOKKEEPING_KEYS = ("sample_id", "seed", "guidance", "stream_pos")

# (x tokens (B, N, C), sigma (B,), cond) -> channels-first params; a Student or a DDP-wrapped one.
StudentModule = Callable[[Tensor, Tensor, Mapping[str, Tensor]], MomentumParams]


def batch_conditioning(batch: Mapping[str, object]) -> dict[str, Tensor]:
    """The conditioning in a batch: ``batch["cond"]`` if present, else every tensor entry that is
    not trajectory data or bookkeeping (:data:`TRAJECTORY_KEYS`, :data:`BOOKKEEPING_KEYS`)."""
    if "cond" in batch:
        return dict(batch["cond"])  # type: ignore[arg-type]
    skip = (*TRAJECTORY_KEYS, *BOOKKEEPING_KEYS)
    return {k: v for k, v in batch.items() if k not in skip and isinstance(v, Tensor)}


def _tensor(batch: Mapping[str, object], key: str) -> Tensor:
    value = batch.get(key)
    if not isinstance(value, Tensor):
        raise ValueError(f"batch[{key!r}] must be a tensor, got {type(value).__name__}")
    return value


def _device_of(student: StudentModule) -> torch.device:
    params = getattr(student, "parameters", None)
    first = next(params(), None) if params is not None else None
    return first.device if first is not None else torch.device("cpu")


def segment_loss(
    student: StudentModule,
    batch: Mapping[str, object],
    segment_bounds: Sequence[int],
    segment: Union[Tensor, int],
) -> tuple[Tensor, Tensor]:
    """Sub-step matching loss over one segment per sample, with ONE student forward for the batch.

    ``batch``: ``x`` ``(B, S+1, N, C)``, ``u`` ``(B, S, N, C)``, ``sigmas`` ``(S+1,)`` or
    ``(B, S+1)`` and the conditioning (see :func:`batch_conditioning`). ``segment_bounds``: recorded
    step indices of the segment ends (``[0, 25, 50]`` for 50 steps and NFE=2). ``segment``: one
    segment index per sample ``(B,)`` or one for all. Segments of different lengths are padded with
    zero-weight steps. Returns the mean loss over samples and a detached ``(num_segments,)`` tensor
    of per-segment mean losses (NaN for segments absent from the batch).
    """
    x, u, sigmas = (_tensor(batch, key) for key in TRAJECTORY_KEYS)
    batch_size, n_states = x.shape[:2]
    n_steps = n_states - 1
    if u.shape[:2] != (batch_size, n_steps) or u.shape[2:] != x.shape[2:]:
        raise ValueError(f"u must be (B, S, ...) = {(batch_size, n_steps, *x.shape[2:])}, got {tuple(u.shape)}")
    bounds = torch.as_tensor(list(segment_bounds), dtype=torch.long)
    if bounds.dim() != 1 or bounds.numel() < 2 or bool((bounds[1:] <= bounds[:-1]).any()):
        raise ValueError(f"segment_bounds must be increasing step indices, got {list(segment_bounds)}")
    if bounds[0] < 0 or bounds[-1] > n_steps:
        raise ValueError(f"segment_bounds {list(segment_bounds)} exceed the {n_steps} recorded steps")
    n_segments = bounds.numel() - 1
    seg = torch.as_tensor(segment, dtype=torch.long).to("cpu")
    seg = seg.expand(batch_size) if seg.dim() == 0 else seg
    if seg.shape != (batch_size,) or bool(((seg < 0) | (seg >= n_segments)).any()):
        raise ValueError(f"segment must be an int or (B,) indices in [0, {n_segments}), got {seg.tolist()}")

    sig = sigmas.to("cpu", torch.float32)
    sig = sig.unsqueeze(0).expand(batch_size, -1) if sig.dim() == 1 else sig
    if sig.shape != (batch_size, n_states):
        raise ValueError(f"sigmas must be (S+1,) or (B, S+1) with S+1={n_states}, got {tuple(sigmas.shape)}")

    # Per-sample step windows, padded to the longest segment in the batch.
    start, end = bounds[seg], bounds[seg + 1]
    lengths = end - start
    width = int(lengths.max())
    offsets = torch.arange(width + 1)
    state_idx = torch.minimum(start[:, None] + offsets, end[:, None])  # (B, width+1), padding repeats the end
    rows = torch.arange(batch_size)[:, None]
    window = sig[rows, state_idx]  # (B, width+1): padded sub-steps have zero length
    step_len = window[:, :-1] - window[:, 1:]
    seg_len = sig[torch.arange(batch_size), start] - sig[torch.arange(batch_size), end]
    if bool((seg_len <= 0).any()):
        raise ValueError("sigmas must decrease over every segment")
    weights = step_len / seg_len[:, None]  # (B, width), sums to 1 per sample

    device = _device_of(student)
    x_src = x[torch.arange(batch_size), start].to(device, torch.float32)  # (B, N, C)
    step_idx = torch.minimum(start[:, None] + offsets[:-1], torch.full_like(start[:, None], n_steps - 1))
    target = u[rows, step_idx].to(device, torch.float32)  # (B, width, N, C)
    s_src = window[:, 0].to(device)
    cond = {k: v.to(device) for k, v in batch_conditioning(batch).items()}

    params = student(x_src, s_src, cond)
    ubar = average_velocities(params, s_src, window.to(device))  # (B, width, C, N)
    err = (ubar.transpose(-1, -2) - target).pow(2).flatten(2).mean(dim=2)  # (B, width)
    per_sample = (err * weights.to(device)).sum(dim=1)
    loss = per_sample.mean()

    with torch.no_grad():
        seg_dev = seg.to(device)
        sums = torch.zeros(n_segments, device=device).index_add_(0, seg_dev, per_sample.detach().float())
        counts = torch.bincount(seg_dev, minlength=n_segments).float()
        per_segment = torch.where(counts > 0, sums / counts.clamp(min=1), torch.full_like(sums, float("nan")))
    return loss, per_segment
