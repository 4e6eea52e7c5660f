"""The interface every teacher implements: the embedded digits model and the diffusers teachers.

Latents are laid out as the teacher's transformer consumes them (for FLUX-family models: packed
2x2-patch tokens, per-sample shape ``(num_tokens, channels)``). Conditioning is a dict of
batch-first tensors holding exactly what the transformer needs besides the latent and the time
(prompt embeddings, pooled embeddings, ...). That dict is what the trajectory dataset stores, so a
student can be trained without ever running a text encoder.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from arcflow.pipeline.sigmas import shifted_schedule

Conditioning = dict[str, Tensor]


def velocity_evaluations(true_cfg: bool, guidance: float, cfg_below_one: bool = True) -> int:
    """Network evaluations per sample in one guided velocity: 2 where true CFG runs (guidance != 1,
    or only guidance > 1 for teachers that skip CFG below 1: ``cfg_below_one=False``), else 1."""
    if not true_cfg or guidance == 1.0 or (guidance < 1.0 and not cfg_below_one):
        return 1
    return 2


def transformer_output(out: Any) -> Tensor:
    """The tensor a transformer call returns: item 0 of a ``return_dict=False`` tuple, else ``.sample``."""
    return out[0] if isinstance(out, (tuple, list)) else out.sample


class Teacher(ABC):
    """A flow-matching teacher: ``dx/ds = u(x, s)`` integrated from s=1 (noise) to s=0 (data)."""

    #: Short identifier written into datasets and student configs ("digits", a hub id, a path).
    teacher_id: str
    #: Identifies the exact weights (a content hash or a hub revision).
    revision: str
    #: Per-sample latent shape, e.g. ``(16, 4)`` for 16 packed tokens of 4 channels.
    latent_shape: tuple[int, ...]
    #: Time shift of the teacher's schedule (docs/architecture.md, The method).
    shift: float
    #: Classifier-free guidance scale used when the user gives none.
    default_guidance: float
    #: Whether guidance > 1 runs true CFG (two halves in one batched forward) or embedded guidance.
    true_cfg: bool = True
    #: Whether a guidance below 1 still runs CFG (the digits teacher) or the conditional velocity alone.
    cfg_below_one: bool = True

    @property
    @abstractmethod
    def transformer(self) -> nn.Module:
        """The denoiser network a student adapts (frozen by the student, wrapped with LoRA)."""

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    def sigmas(self, steps: int) -> Tensor:
        """The ``steps + 1`` sigmas of the teacher's sampler, 1 -> 0 (float64)."""
        return shifted_schedule(steps, self.shift)

    def noise(self, seeds: Sequence[int]) -> Tensor:
        """Initial latents, one generator per seed, so a sample does not depend on its batch."""
        out = [
            torch.randn(self.latent_shape, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float32)
            for s in seeds
        ]
        return torch.stack(out).to(self.device)

    @abstractmethod
    def validate_prompts(self, prompts: Sequence[str]) -> None:
        """Raise ``ArcflowError`` (one line) for a prompt the teacher cannot condition on."""

    @abstractmethod
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """Encode prompts once into the transformer's conditioning tensors (batch-first)."""

    @abstractmethod
    def unconditional(self, cond: Conditioning) -> Conditioning:
        """The negative / empty-prompt conditioning matching ``cond``'s batch, for CFG."""

    @abstractmethod
    def transformer_inputs(self, x: Tensor, sigma: Tensor, cond: Mapping[str, Tensor]) -> dict:
        """Keyword arguments for ``transformer(**kwargs)`` at latents ``x`` and per-sample ``sigma``.

        Shared by the teacher and the student so both feed the network identically.
        """

    def conditional_velocity(self, x: Tensor, sigma: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        """One network evaluation: the velocity for ``cond`` (no guidance)."""
        return transformer_output(self.transformer(**self.transformer_inputs(x, sigma, cond)))

    def velocity(self, x: Tensor, sigma: Tensor, cond: Mapping[str, Tensor], guidance: float,
                 plain_cfg: bool = False) -> Tensor:
        """The guided velocity ``u(x, sigma, cond, guidance)``.

        With true CFG and guidance != 1 the conditional and unconditional halves run as ONE batched
        forward (2 network evaluations per step: "50x2"); with guidance == 1 it is the conditional
        velocity alone. The halves combine as ``uncond + g (cond - uncond)`` here whatever
        ``plain_cfg`` says (a pipeline teacher combines them as its pipeline does unless it is set).
        """
        if not self.true_cfg or guidance == 1.0:
            return self.conditional_velocity(x, sigma, cond)
        uncond = self.unconditional(dict(cond))
        both = {k: torch.cat([cond[k], uncond[k]]) for k in cond}
        u = self.conditional_velocity(torch.cat([x, x]), torch.cat([sigma, sigma]), both)
        u_cond, u_uncond = u.chunk(2)
        return u_uncond + guidance * (u_cond - u_uncond)

    def velocity_evaluations(self, guidance: float) -> int:
        """Network evaluations per sample that :meth:`velocity` costs at ``guidance``."""
        return velocity_evaluations(self.true_cfg, guidance, self.cfg_below_one)

    def network_output(self, output: Any, tokens: int) -> Tensor:
        """The transformer call's output tensor for the sample's own ``tokens`` (a student's head
        output is read through this too)."""
        return transformer_output(output)

    def record(self, prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance: float | None = None,
               micro_batch: int | None = None, progress: bool = False) -> tuple[Tensor, Tensor, Tensor, Conditioning]:
        """This teacher's sampler over ``prompts`` / ``seeds`` with every state kept: ``x``
        ``[B, S+1, *latent]``, ``u`` ``[B, S, *latent]``, ``sigmas`` ``[S+1]`` and the conditioning."""
        from .recording import record_trajectories

        cond = self.encode_prompts(list(prompts))
        x, u, sigmas = record_trajectories(self, cond, self.noise(seeds), steps, guidance,
                                           micro_batch=micro_batch, progress=progress)
        return x, u, sigmas, cond

    def sample(self, prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance: float | None = None,
               micro_batch: int | None = None, progress: bool = False) -> Tensor:
        """Final latents ``[B, *latent]`` of this teacher's sampler, one seed per prompt."""
        from .recording import euler_sample

        return euler_sample(self, prompts, seeds, steps, guidance, micro_batch=micro_batch, progress=progress)

    @abstractmethod
    def decode(self, latents: Tensor) -> Tensor:
        """Latents -> images ``(B, C, H, W)`` in [0, 1] (float32, CPU)."""

    def prompt_set(self) -> list[str]:
        """The teacher's own prompts, used when the user gives no prompts file."""
        from arcflow.core.errors import ArcflowError, quote

        raise ArcflowError(f"teacher {quote(self.teacher_id)} has no built-in prompt set; give prompts "
                           "(--prompts FILE, or sample --prompt)")
