"""The recording sampler: the teacher's Euler integration from s=1 to s=0, keeping every state and
every guided velocity it used (docs/architecture.md, Offline distillation and Format).

Bit-identical samples whatever batch they land in: the initial noise comes from one generator per
seed (``Teacher.noise``), and the network always runs on micro-batches of exactly ``micro_batch``
samples (the last one padded by repeating its final sample). CPU GEMM kernels pick their blocking
from the matrix shape, so a 3-sample batch and a 40-sample batch can round a row differently
(~1e-7); with one fixed shape every row goes through the same kernels, and a sample's result does
not depend on its neighbours or its position. ``micro_batch=None`` turns this off (one forward per
step over the whole batch), e.g. on GPUs where throughput matters more.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

# Teachers (pipeline/teacher.py) use these functions as their default samplers, so this module
# takes any teacher by duck type rather than importing the interface.
Teacher = Any
Conditioning = dict[str, Tensor]
from arcflow.core.errors import ArcflowError

#: Samples per network call; the CPU batch-invariance unit (see module docstring).
MICRO_BATCH = 16


def chunks(batch: int, micro_batch: int | None) -> list[tuple[int, int]]:
    """``(start, stop)`` spans of ``micro_batch`` rows (one span when None)."""
    size = batch if micro_batch is None else micro_batch
    return [(start, min(start + size, batch)) for start in range(0, batch, size)]


def pad(t: Any, size: int | None) -> Any:
    """``t`` (a tensor or list) padded to ``size`` rows by repeating its last row."""
    if size is None or len(t) == size:
        return t
    if isinstance(t, list):
        return t + t[-1:] * (size - len(t))
    return torch.cat([t, t[-1:].expand(size - t.shape[0], *t.shape[1:])])


@torch.no_grad()
def _integrate(
    teacher: Teacher,
    cond: Mapping[str, Tensor],
    noise: Tensor,
    sigmas: Tensor,
    guidance: float,
    micro_batch: int | None,
    record: bool,
    progress: bool,
) -> tuple[list[Tensor], list[Tensor]]:
    """Euler-integrate each micro-batch; returns per-chunk ``x`` and ``u`` (or final ``x`` only)."""
    steps = len(sigmas) - 1
    xs, us = [], []
    device, dtype = teacher.device, teacher.dtype
    sig = sigmas.to(device)
    spans = chunks(noise.shape[0], micro_batch)
    for start, stop in tqdm(spans, desc="teacher sampling", unit="chunk", disable=None if progress else True):
        n = stop - start
        chunk_cond = {k: pad(v[start:stop], micro_batch).to(device, dtype) for k, v in cond.items()}
        x = pad(noise[start:stop], micro_batch).to(device, torch.float32)
        traj, vel = [x], []
        for j in range(steps):
            s = sig[j].expand(x.shape[0])
            u = teacher.velocity(x.to(dtype), s, chunk_cond, guidance).to(torch.float32)
            x = x - (sig[j] - sig[j + 1]) * u  # float32, exactly the update a reader re-derives
            if record:
                traj.append(x)
                vel.append(u)
        if record:
            xs.append(torch.stack(traj, 1)[:n].cpu())
            us.append(torch.stack(vel, 1)[:n].cpu())
        else:
            xs.append(x[:n].cpu())
    return xs, us


def _check(teacher: Teacher, cond: Mapping[str, Tensor], noise: Tensor, steps: int) -> None:
    if steps < 1:
        raise ArcflowError(f"steps must be >= 1, got {steps}")
    if tuple(noise.shape[1:]) != tuple(teacher.latent_shape):
        raise ArcflowError(f"noise has per-sample shape {tuple(noise.shape[1:])}, teacher wants {teacher.latent_shape}")
    for key, value in cond.items():
        if value.shape[0] != noise.shape[0]:
            raise ArcflowError(f"conditioning {key!r} has batch {value.shape[0]}, noise has {noise.shape[0]}")


def record_trajectories(
    teacher: Teacher,
    cond: Conditioning,
    noise: Tensor,
    steps: int = 50,
    guidance: float | None = None,
    *,
    micro_batch: int | None = MICRO_BATCH,
    progress: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Run the teacher's Euler sampler and keep everything.

    Returns ``x`` ``[B, S+1, *latent]`` (``x[:, 0]`` is the noise), ``u`` ``[B, S, *latent]`` (the
    guided velocity used for each step) and ``sigmas`` ``[S+1]``, all float32 on CPU, with
    ``x[:, j+1] == x[:, j] - (sigmas[j] - sigmas[j+1]) * u[:, j]`` bit for bit in float32.
    ``guidance`` defaults to the teacher's ``default_guidance``.
    """
    _check(teacher, cond, noise, steps)
    g = teacher.default_guidance if guidance is None else float(guidance)
    sigmas = teacher.sigmas(steps).to(torch.float32)
    xs, us = _integrate(teacher, cond, noise, sigmas, g, micro_batch, record=True, progress=progress)
    return torch.cat(xs), torch.cat(us), sigmas


def sample_teacher(
    teacher: Teacher,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int = 50,
    guidance: float | None = None,
    *,
    micro_batch: int | None = MICRO_BATCH,
    progress: bool = False,
) -> Tensor:
    """Final latents ``[B, *latent]`` of the teacher's own sampler (a diffusers teacher's is its
    pipeline's ``__call__``), one seed per prompt.

    ``steps=2`` is the plain few-step Euler baseline (the same sampler with fewer steps).
    """
    if len(prompts) != len(seeds):
        raise ArcflowError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    if steps < 1:
        raise ArcflowError(f"steps must be >= 1, got {steps}")
    return teacher.sample(list(prompts), list(seeds), steps, guidance, micro_batch=micro_batch, progress=progress)


def euler_sample(
    teacher: Teacher,
    prompts: Sequence[str],
    seeds: Sequence[int],
    steps: int,
    guidance: float | None = None,
    *,
    micro_batch: int | None = MICRO_BATCH,
    progress: bool = False,
) -> Tensor:
    """The built-in Euler sampler over a teacher's :meth:`~Teacher.velocity` (final latents only)."""
    cond = teacher.encode_prompts(prompts)
    noise = teacher.noise(seeds)
    _check(teacher, cond, noise, steps)
    g = teacher.default_guidance if guidance is None else float(guidance)
    sigmas = teacher.sigmas(steps).to(torch.float32)
    xs, _ = _integrate(teacher, cond, noise, sigmas, g, micro_batch, record=False, progress=progress)
    return torch.cat(xs)
