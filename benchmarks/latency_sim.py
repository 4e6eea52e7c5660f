"""A GPU-latency simulator teacher for scaling benchmarks and fault-injection tests.

It is NOT a model of anything: every network evaluation sleeps a fixed time (as a GPU call would
keep the worker busy without using its CPU) and returns a cheap deterministic velocity. It lets the
Ray builder's scaling be measured on a 2-core machine.

Not part of the product's teacher registry: pass the class itself as the teacher (it is a
``TeacherFactory``), e.g. ``GenerationConfig(teacher=LatencySimTeacher, teacher_options={"latency_s": 0.05})``.
"""

from __future__ import annotations

import sys
import time
from typing import Mapping, Sequence

import ray.cloudpickle
import torch
from torch import Tensor, nn

from arcflow.pipeline.teacher import Conditioning, Teacher
from arcflow.core.errors import ArcflowError

# This module is not installed: Ray ships its classes to the workers by value, so they need no
# benchmarks/ directory on their import path.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class LatencySimTeacher(Teacher):
    """Sleeps ``latency_s`` per batched network evaluation; latent (16, 4), one class-id prompt."""

    teacher_id = "gpu-latency-sim"
    revision = "sim-v1"
    latent_shape = (16, 4)
    shift = 1.0
    default_guidance = 2.0

    def __init__(self, latency_s: float = 0.01, device: str = "cpu") -> None:
        self.latency_s = float(latency_s)
        self._net = nn.Linear(4, 4).to(device)
        with torch.no_grad():
            self._net.weight.copy_(torch.eye(4) * -0.5)
            self._net.bias.zero_()
        self._net.requires_grad_(False)

    @property
    def transformer(self) -> nn.Module:
        return self._net

    def prompt_set(self) -> list[str]:
        return [f"class {i}" for i in range(10)]

    def validate_prompts(self, prompts: Sequence[str]) -> None:
        known = set(self.prompt_set())
        bad = [p for p in prompts if p not in known]
        if bad:
            raise ArcflowError(f"unknown prompt {bad[0]!r}; the latency simulator understands 'class 0'..'class 9'")

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        self.validate_prompts(prompts)
        ids = torch.tensor([float(p.split()[-1]) for p in prompts], device=self.device)
        return {"class_embed": ids[:, None].repeat(1, 4)}

    def unconditional(self, cond: Conditioning) -> Conditioning:
        return {k: torch.zeros_like(v) for k, v in cond.items()}

    def transformer_inputs(self, x: Tensor, sigma: Tensor, cond: Mapping[str, Tensor]) -> dict:
        return {"input": x + 0.1 * cond["class_embed"][:, None, :] * sigma[:, None, None]}

    def conditional_velocity(self, x: Tensor, sigma: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        time.sleep(self.latency_s)
        return self._net(**self.transformer_inputs(x, sigma, cond))

    def decode(self, latents: Tensor) -> Tensor:
        img = latents.reshape(latents.shape[0], 4, 4, 2, 2).permute(0, 1, 3, 2, 4).reshape(-1, 1, 8, 8)
        return ((img.float().cpu() + 1) / 2).clamp(0, 1)
