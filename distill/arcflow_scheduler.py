"""ArcFlow sampling as a diffusers scheduler: a stock pipeline's own loop runs the student.

The transformer of a student returns its momentum head's PACKED output (``proj_out`` is the
:class:`~arcflow.distill.student.head.MomentumHead`), so whatever a pipeline hands :meth:`ArcFlowScheduler.step`
as ``model_output`` is one segment's momentum parameters for the packed latent tokens ``(B, N, C)``
the pipeline passes as ``sample``. ``step`` unpacks it and moves the latents along the exact
momentum integral (:func:`~arcflow.distill.momentum.integrate`) from the segment's start to its end.

The segment boundaries are the run's (``segment_sigmas``, recorded at training), not the pipeline's:
:meth:`ArcFlowScheduler.set_timesteps` ignores the ``sigmas``/``mu`` a pipeline derives for its
teacher schedule and refuses a step count other than the run's NFE (``ValueError``, as diffusers'
schedulers do), since a student distilled for 2 segments has no meaningful 28-step schedule.
``from_config(config, segment_sigmas=...)`` gives a scheduler on other boundaries (what
``arcflow sample --nfe`` uses).

Pipelines whose scheduler steps channels-first latents ``(B, C, H, W)`` (SD3, Z-Image) record
``latent_layout="channels_first"``: ``sample`` is then ``(B, C, *rest)`` and ``model_output`` the
per-pixel head output ``(B, width, *rest)`` (the transformer un-patchifies it), read as tokens in
row-major pixel order. ``output_sign=-1`` undoes a pipeline that negates the transformer output
before ``step`` (Z-Image).

The run directory holds it as ``scheduler_config.json`` (written by
:func:`~arcflow.distill.student.save_student`, read back by
:func:`~arcflow.distill.student.load_scheduler`), so ``ArcFlowScheduler.from_pretrained(run_dir)``
works as for any diffusers scheduler. This module is config + math only.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput
from torch import Tensor

from .momentum import integrate, packed_width, unpack_momentum

#: How ``step`` reads ``sample``: packed tokens ``(B, N, C)`` or channels-first ``(B, C, *rest)``.
LATENT_LAYOUTS = ("tokens", "channels_first")


class ArcFlowScheduler(SchedulerMixin, ConfigMixin):
    """Few-step ArcFlow sampling: one network call per segment, the exact momentum integral between.

    Config: the head's shape (``k``, ``weight_groups``, latent ``channels``, ``momentum``) to unpack
    ``model_output``, and the ``segment_sigmas`` (NFE + 1 decreasing values) to integrate over.
    ``timesteps`` are ``segment_sigmas[:-1] * num_train_timesteps`` like the flow-matching schedulers,
    which is what FLUX/Qwen-Image pipelines feed the transformer (divided by 1000).
    """

    _compatibles: list[str] = []
    order = 1

    @register_to_config
    def __init__(
        self,
        k: int = 8,
        weight_groups: int = 1,
        channels: int = 64,
        momentum: bool = True,
        segment_sigmas: Sequence[float] = (1.0, 0.5, 0.0),
        num_train_timesteps: int = 1000,
        latent_layout: str = "tokens",
        output_sign: int = 1,
    ) -> None:
        if latent_layout not in LATENT_LAYOUTS:
            raise ValueError(f"latent_layout must be one of {', '.join(LATENT_LAYOUTS)}, got {latent_layout!r}")
        if output_sign not in (1, -1):
            raise ValueError(f"output_sign must be 1 or -1, got {output_sign!r}")
        if k < 1 or weight_groups < 1 or channels < 1 or channels % weight_groups:
            raise ValueError(
                f"ArcFlowScheduler needs k >= 1 and weight_groups dividing channels, got k={k}, "
                f"weight_groups={weight_groups}, channels={channels}"
            )
        bounds = [float(s) for s in segment_sigmas]
        if (len(bounds) < 2 or not all(math.isfinite(b) for b in bounds)
                or any(a <= b for a, b in zip(bounds, bounds[1:])) or bounds[0] > 1 or bounds[-1] < 0):
            raise ValueError(f"segment_sigmas must be at least 2 strictly decreasing values in [0, 1], got {bounds[:8]}")
        # Python floats (float64) for the integral, as the reference sampler uses them.
        self._bounds = bounds
        self.init_noise_sigma = 1.0
        self.num_inference_steps = len(bounds) - 1
        self._step_index: Optional[int] = None
        self._begin_index: Optional[int] = None
        self._set_schedule(None)

    @property
    def nfe(self) -> int:
        """Network calls per sample: the number of segments."""
        return len(self._bounds) - 1

    @property
    def step_index(self) -> Optional[int]:
        """Index of the segment the next :meth:`step` integrates (None before the first step)."""
        return self._step_index

    @property
    def begin_index(self) -> Optional[int]:
        """First segment index, set by the pipeline through :meth:`set_begin_index`."""
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        self._begin_index = begin_index

    def _set_schedule(self, device: Union[str, torch.device, None]) -> None:
        self.sigmas = torch.tensor(self._bounds, dtype=torch.float32, device=device)
        self.timesteps = self.sigmas[:-1] * self.config.num_train_timesteps
        self._step_index = None
        self._begin_index = None

    def set_timesteps(
        self,
        num_inference_steps: Optional[int] = None,
        device: Union[str, torch.device, None] = None,
        sigmas: Optional[Sequence[float]] = None,
        mu: Optional[float] = None,
    ) -> None:
        """Set up the run's segments on ``device``.

        ``sigmas`` and ``mu`` (what FLUX/Qwen-Image pipelines pass for their teacher schedule) are
        ignored except for their count: the student integrates over the boundaries it was trained
        on. A step count other than the NFE is a ``ValueError``.
        """
        requested = num_inference_steps
        if requested is None:
            requested = len(sigmas) if sigmas is not None else self.nfe
        if requested != self.nfe:
            raise ValueError(
                f"this ArcFlow student samples in exactly {self.nfe} steps (its segments are fixed by "
                f"training); call the pipeline with num_inference_steps={self.nfe}, not {requested}"
            )
        self.num_inference_steps = self.nfe
        self._set_schedule(device)

    def scale_model_input(self, sample: Tensor, timestep: Optional[Union[float, Tensor]] = None) -> Tensor:
        """Flow-matching models take the latents as they are."""
        return sample

    def index_for_timestep(self, timestep: Union[float, Tensor]) -> int:
        """The segment whose start is ``timestep``."""
        t = torch.as_tensor(timestep, dtype=self.timesteps.dtype, device=self.timesteps.device).reshape(-1)[:1]
        match = (self.timesteps == t).nonzero()
        if not len(match):
            raise ValueError(f"timestep {float(t)} is not a segment start of this scheduler ({self.timesteps.tolist()})")
        return int(match[0])

    def step(
        self,
        model_output: Tensor,
        timestep: Union[float, Tensor],
        sample: Tensor,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> Union[SchedulerOutput, tuple[Tensor]]:
        """Move ``sample`` ``(B, N, C)`` (``(B, C, *rest)`` channels-first) from the current segment's
        start to its end.

        ``model_output`` is the head's packed ``(B, N, width)`` (``(B, width, *rest)``) output at the segment start; the
        result has ``sample``'s layout and dtype (the integral itself runs in float32). Extra
        arguments other pipelines pass (``generator``, ...) are accepted: the step is deterministic.
        """
        if self._step_index is None:
            self._step_index = self._begin_index if self._begin_index is not None else self.index_for_timestep(timestep)
        i = self._step_index
        if i >= self.nfe:
            raise ValueError(f"step() called more than {self.nfe} times; call set_timesteps() before sampling again")
        cfg = self.config
        width = packed_width(cfg.k, cfg.channels, cfg.weight_groups, cfg.momentum)
        if cfg.latent_layout == "channels_first":
            if sample.dim() < 3 or sample.shape[1] != cfg.channels:
                raise ValueError(f"sample must be channels-first latents (B, {cfg.channels}, ...), got {tuple(sample.shape)}")
            expected = (sample.shape[0], width, *sample.shape[2:])
        else:
            if sample.dim() != 3 or sample.shape[-1] != cfg.channels:
                raise ValueError(f"sample must be packed latents (B, tokens, {cfg.channels}), got {tuple(sample.shape)}")
            expected = (*sample.shape[:2], width)
        if tuple(model_output.shape) != expected:
            raise ValueError(
                f"model_output {tuple(model_output.shape)} is not an ArcFlow head output {expected}: "
                f"is the transformer's output projection the run's momentum head?"
            )
        if cfg.output_sign != 1:
            model_output = -model_output
        s_start, s_end = self._bounds[i], self._bounds[i + 1]
        if cfg.latent_layout == "channels_first":
            tokens = model_output.flatten(2).transpose(1, 2)
            params = unpack_momentum(tokens, cfg.k, cfg.channels, cfg.weight_groups, cfg.momentum)
            x = integrate(sample.flatten(2), params, s_start, s_start, s_end).reshape(sample.shape)
        else:
            params = unpack_momentum(model_output, cfg.k, cfg.channels, cfg.weight_groups, cfg.momentum)
            # The head is channels-first over tokens: integrate (B, C, N), hand back (B, N, C).
            x = integrate(sample.transpose(1, 2), params, s_start, s_start, s_end).transpose(1, 2).contiguous()
        self._step_index = i + 1
        return SchedulerOutput(prev_sample=x) if return_dict else (x,)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
