"""Using a finished distill run: load its teacher and student, and sample from it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from arcflow.core.errors import ArcflowError

from .arcflow_scheduler import ArcFlowScheduler
from .student import Student, check_teacher_revision, load_scheduler, load_student, read_student_config
from .student import merge_lora as fuse_lora


@dataclass
class LoadedRun:
    """A run directory's teacher (with the options it was trained at), student, scheduler and record."""

    teacher: Any
    student: Student
    scheduler: ArcFlowScheduler
    record: dict[str, Any]

    @property
    def nfe(self) -> int:
        return self.scheduler.nfe

    @torch.no_grad()
    def sample_latents(self, prompts: Sequence[str], seeds: Sequence[int], nfe: Optional[int] = None) -> Tensor:
        """Final latents for ``prompts`` from per-sample ``seeds``: ``nfe`` network calls in all.

        The run's own scheduler for its NFE; for another ``nfe`` the same scheduler on the
        teacher's ``sigmas(nfe)``. The loop is a diffusers denoising loop over ``scheduler.step``.
        """
        scheduler = self.scheduler
        if nfe is not None and nfe != self.nfe:
            scheduler = ArcFlowScheduler.from_config(scheduler.config, segment_sigmas=self.teacher.sigmas(nfe).tolist())
        cond = self.teacher.encode_prompts(list(prompts))
        return sample_latents(self.student, scheduler, self.teacher.noise(list(seeds)), cond)


@torch.no_grad()
def sample_latents(student: Student, scheduler: ArcFlowScheduler, noise: Tensor, cond: Any) -> Tensor:
    """The scheduler's loop over a student: one transformer call per segment, ``scheduler.step``
    doing the exact momentum integral (what a diffusers pipeline's ``__call__`` does).

    ``noise`` and the result are arcflow's token layout ``(B, N, C)``, and the step gets the head's
    packed tokens (the teacher's ``network_output``), whatever layout and sign the run's scheduler
    reads in its pipeline (``latent_layout`` / ``output_sign``)."""
    teacher, x = student.teacher, noise
    if scheduler.config.get("latent_layout", "tokens") != "tokens" or scheduler.config.get("output_sign", 1) != 1:
        scheduler = ArcFlowScheduler.from_config(scheduler.config, latent_layout="tokens", output_sign=1)
    scheduler.set_timesteps(device=x.device)
    for sigma, t in zip(scheduler.sigmas[:-1], scheduler.timesteps):
        inputs = teacher.transformer_inputs(x, sigma.expand(x.shape[0]), cond)
        out = teacher.network_output(student.transformer(**inputs), x.shape[1])  # edit pipelines: reference tokens cut
        x = scheduler.step(out, t, x, return_dict=False)[0]
    return x


def load_run_teacher(run_dir: Union[str, os.PathLike], device: str = "cpu") -> tuple[dict[str, Any], Any]:
    """The run's saved record and the teacher it was distilled from (same resolution/options).

    Cheap next to loading the student: callers use it to check their input (prompts) before paying
    for the student, so a bad input fails before anything is built or logged.
    """
    from arcflow.pipeline.registry import load_teacher

    record = read_student_config(run_dir)
    saved = record.get("teacher")
    teacher_id = saved.get("id") if isinstance(saved, dict) else None
    if not teacher_id or "student" not in record:
        raise ArcflowError(f"{run_dir} has an incomplete arcflow_config.json (no teacher id or student config)")
    check_teacher_revision(run_dir, record)
    try:
        teacher = load_teacher(teacher_id, device=device, **(record.get("teacher_options") or {}))
    except TypeError as exc:  # options the teacher does not take: a tampered or foreign config
        raise ArcflowError(f"{run_dir}/arcflow_config.json names teacher options {teacher_id!r} does not take ({exc})") from None
    return record, teacher


def load_run(
    run_dir: Union[str, os.PathLike], device: str = "cpu", merge_lora: bool = True, teacher: Any = None
) -> LoadedRun:
    """Load the teacher a run was distilled from (same resolution/options) and the student on it.

    ``teacher`` reuses one already loaded with :func:`load_run_teacher` (the student checks its
    revision). ``merge_lora`` fuses the LoRA deltas into the base weights (diffusers' ``fuse_lora``) so a
    student call costs exactly one teacher call plus the head: the speed-up is then the NFE ratio.
    """
    if teacher is None:
        record, teacher = load_run_teacher(run_dir, device=device)
    else:
        record = read_student_config(run_dir)
    scheduler = load_scheduler(run_dir, record, teacher)
    student = load_student(teacher, run_dir).eval()
    if merge_lora:
        fuse_lora(student)
    return LoadedRun(teacher=teacher, student=student, scheduler=scheduler, record=record)
