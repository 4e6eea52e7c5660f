"""The reference few-step sampler the product's ``ArcFlowScheduler`` is tested against.

A direct loop over the exact momentum integral, one network call per segment, written without any
diffusers machinery (tested itself against RK4 in test_sampler.py).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import torch
from torch import Tensor

from arcflow.distill.momentum import MomentumParams, integrate

# (x at the segment start, its sigma as a (B,) tensor, conditioning) -> momentum parameters.
MomentumPredictor = Callable[[Tensor, Tensor, Any], MomentumParams]


def sample_few_step(
    predict: MomentumPredictor,
    noise: Tensor,
    cond: Any = None,
    *,
    sigmas: Tensor,
) -> Tensor:
    """Integrate from ``noise`` (at ``sigmas[0]``) to ``sigmas[-1]`` over the decreasing segment
    boundaries ``sigmas`` (NFE + 1 values, e.g. the teacher's ``sigmas(nfe)``).

    Each segment makes exactly one call to ``predict`` at its start and moves along the closed-form
    momentum flow to its end. ``noise`` is laid out as the predictor expects (channels first:
    ``(B, C, *rest)``).
    """
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    if sigmas.dim() != 1 or sigmas.numel() < 2:
        raise ValueError("sigmas must be a 1-d tensor of at least two segment boundaries")
    if not bool((sigmas[:-1] > sigmas[1:]).all()):
        raise ValueError("segment boundaries must be strictly decreasing")
    x = noise
    batch = noise.shape[0]
    for s_start, s_end in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        s_vec = torch.full((batch,), s_start, dtype=torch.float32, device=noise.device)
        params = predict(x, s_vec, cond)
        x = integrate(x, params, s_start, s_start, s_end)
    return x


@torch.no_grad()
def reference_sample(
    student: Any, noise: Tensor, cond: Mapping[str, Tensor], nfe: Optional[int] = None, sigmas: Optional[Tensor] = None
) -> Tensor:
    """A student's few-step sample ``(B, N, C)`` from ``noise`` ``(B, N, C)``: the segments are the
    teacher's ``sigmas(nfe)`` (default: the student's NFE) unless ``sigmas`` are given."""

    def predict(x_cf: Tensor, sigma: Tensor, c: Mapping[str, Tensor]) -> MomentumParams:
        return student(x_cf.transpose(1, 2).contiguous(), sigma, c)

    if sigmas is None:
        sigmas = student.teacher.sigmas(nfe or student.config.nfe)
    return sample_few_step(predict, noise.transpose(1, 2), cond, sigmas=sigmas).transpose(1, 2).contiguous()
