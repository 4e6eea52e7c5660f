"""Using a finished distill run: load its teacher and student, and sample from it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from arcflow.storage.errors import ArcflowError

from .student import Student, load_student, read_student_config
from .student import merge_lora as fuse_lora


def segment_sigmas(record: dict[str, Any], teacher: Any, nfe: int) -> Tensor:
    """A run's recorded segment boundaries for its own NFE; for another NFE the teacher's schedule."""
    recorded = record.get("segment_sigmas")
    if recorded is not None and len(recorded) == nfe + 1:
        return torch.tensor(recorded, dtype=torch.float64)
    return teacher.sigmas(nfe)


@dataclass
class LoadedRun:
    """A run directory's teacher (with the options it was trained at), student and saved record."""

    teacher: Any
    student: Student
    record: dict[str, Any]

    @property
    def nfe(self) -> int:
        return int(self.record.get("nfe", self.student.config.nfe))

    def segment_sigmas(self, nfe: Optional[int] = None) -> Tensor:
        """The recorded segment boundaries the student was trained on (else the teacher's schedule)."""
        return segment_sigmas(self.record, self.teacher, nfe or self.nfe)

    @torch.no_grad()
    def sample_latents(self, prompts: Sequence[str], seeds: Sequence[int], nfe: Optional[int] = None) -> Tensor:
        """Final latents for ``prompts`` from per-sample ``seeds``: ``nfe`` network calls in all."""
        cond = self.teacher.encode_prompts(list(prompts))
        sigmas = self.segment_sigmas(nfe)
        return self.student.sample(self.teacher.noise(list(seeds)), cond, nfe=len(sigmas) - 1, sigmas=sigmas)


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
    student = load_student(teacher, run_dir).eval()
    if merge_lora:
        fuse_lora(student)
    return LoadedRun(teacher=teacher, student=student, record=record)
