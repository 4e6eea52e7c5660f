"""Watching a diffusers pipeline's own ``__call__``: what its scheduler steps and what its
transformer is called with (docs/architecture.md, Teachers).

Every flow-matching pipeline prepares its latents and conditioning, runs its transformer (CFG,
reference-image tokens, embedded guidance as it sees fit) and hands the final velocity to
``scheduler.step(model_output, t, sample)``. :class:`StepRecorder` stands in for the scheduler and
keeps each ``(sample, sigma, model_output)``; a forward pre-hook on the transformer keeps the
arguments of the calls of the first step (the conditioning). :func:`run_pipeline` does both around
one ``pipe(**kwargs)`` call.

With ``stub=True`` the transformer is not run: its forward returns zeros shaped like its latent
input and the call stops at the first ``step``. That costs only the pipeline's preparation (prompt
encoding, reference-image encoding, the schedule), and is how a teacher encodes prompts.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn


class _StopPipeline(Exception):
    """Raised by the recorder to end a stub call at its first scheduler step."""


class StepRecorder:
    """A transparent proxy of a flow-matching scheduler that records every ``step``.

    Attribute reads and writes go to the wrapped scheduler, so the pipeline configures and queries
    it as usual. ``states`` holds ``x_0`` then the float32 Euler chain ``x_{j+1} = x_j - (s_j -
    s_{j+1}) u_j`` (the very update ``FlowMatchEulerDiscreteScheduler.step`` makes in float32);
    ``velocities`` the ``model_output`` of each step; ``sigmas`` the step's start sigmas and the
    last end sigma.
    """

    def __init__(self, inner: Any, stop_at_first_step: bool = False, record: bool = True) -> None:
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_stop", stop_at_first_step)
        object.__setattr__(self, "_record", record)
        object.__setattr__(self, "states", [])
        object.__setattr__(self, "velocities", [])
        object.__setattr__(self, "sigmas", [])
        object.__setattr__(self, "steps", 0)
        object.__setattr__(self, "final", None)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._inner, name, value)

    def step(self, model_output: Tensor, timestep: Any, sample: Tensor, *args: Any, **kwargs: Any) -> Any:
        inner = self._inner
        if self._stop:
            index = inner.step_index if inner.step_index is not None else (inner.begin_index or 0)
            self.states.append(sample.detach().to(torch.float32).clone())
            self.sigmas.append(float(inner.sigmas[index]))
            raise _StopPipeline
        out = inner.step(model_output, timestep, sample, *args, **kwargs)
        object.__setattr__(self, "steps", self.steps + 1)
        prev = out[0] if isinstance(out, tuple) else out.prev_sample
        object.__setattr__(self, "final", prev.detach().to(torch.float32).clone())
        if not self._record:  # any scheduler (the ArcFlowScheduler too): only the result is kept
            return out
        index = inner.step_index - 1
        s, s_next = inner.sigmas[index], inner.sigmas[index + 1]
        u = model_output.detach().to(torch.float32)
        x = self.states[-1] if self.states else sample.detach().to(torch.float32).clone()
        if not self.states:
            self.states.append(x)
            self.sigmas.append(float(s))
        # The scheduler's own float32 update (sample + (s_next - s) * u), kept in float32 even where
        # the pipeline rounds its latents to a lower dtype between steps.
        self.states.append(x + (s_next.to(torch.float32) - s.to(torch.float32)) * u)
        self.velocities.append(u.clone())
        self.sigmas.append(float(s_next))
        return out


@dataclass
class Capture:
    """What one watched pipeline call saw."""

    #: Arguments (bound by name) of each transformer call made before the first scheduler step.
    calls: list[dict[str, Any]] = field(default_factory=list)
    states: list[Tensor] = field(default_factory=list)
    velocities: list[Tensor] = field(default_factory=list)
    sigmas: list[float] = field(default_factory=list)
    #: The last latents a scheduler step returned (float32), the pipeline's final sample.
    final: Any = None
    #: Scheduler steps made.
    steps: int = 0
    #: The pipeline's return value (None for a stub call).
    output: Any = None


def _latent_like(value: Any) -> Any:
    if isinstance(value, Tensor):
        return torch.zeros_like(value)
    if isinstance(value, (list, tuple)):
        return [_latent_like(v) for v in value]
    raise TypeError(f"cannot stub a transformer output for a latent input of type {type(value).__name__}")


def run_pipeline(pipe: Any, kwargs: dict[str, Any], latent_arg: str, *, stub: bool = False, record: bool = True) -> Capture:
    """Call ``pipe(**kwargs)`` watching its scheduler and transformer (see the module docstring);
    ``record=False`` keeps only the final sample (for a scheduler that is not Euler's)."""
    transformer: nn.Module = pipe.transformer
    signature = inspect.signature(transformer.forward)
    capture = Capture()
    recorder = StepRecorder(pipe.scheduler, stop_at_first_step=stub, record=record)

    def pre_hook(module: nn.Module, args: tuple, kw: dict) -> None:
        if recorder.steps == 0 and not recorder.states:  # still inside the first step
            bound = signature.bind(*args, **kw)
            capture.calls.append(dict(bound.arguments))

    def stub_forward(*args: Any, **kw: Any) -> Any:
        bound = signature.bind(*args, **kw).arguments
        zeros = _latent_like(bound[latent_arg])
        return (zeros,)

    handle = transformer.register_forward_pre_hook(pre_hook, with_kwargs=True)
    original = pipe.scheduler
    # arcflow shows its own progress; the pipeline's per-call bar stays quiet meanwhile.
    bar_config = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(**{**bar_config, "disable": True})
    pipe.scheduler = recorder
    if stub:
        transformer.forward = stub_forward
    try:
        with torch.no_grad():
            capture.output = pipe(**kwargs)
    except _StopPipeline:
        pass
    finally:
        handle.remove()
        pipe.scheduler = original
        pipe.set_progress_bar_config(**bar_config)
        if stub:
            del transformer.forward
    capture.states = recorder.states
    capture.velocities = recorder.velocities
    capture.sigmas = recorder.sigmas
    capture.final = recorder.final
    capture.steps = recorder.steps
    return capture


def optional_kwargs(pipe: Any, candidates: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``candidates`` that ``pipe.__call__`` accepts by name."""
    params = inspect.signature(type(pipe).__call__).parameters
    return {k: v for k, v in candidates.items() if k in params and v is not None}
