"""Using a finished distill run: load its teacher and student, and sample from it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor

from .student import Student, load_student, read_student_config


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
        nfe = nfe or self.nfe
        recorded = self.record.get("segment_sigmas")
        if recorded is not None and len(recorded) == nfe + 1:
            return torch.tensor(recorded, dtype=torch.float64)
        return self.teacher.sigmas(nfe)

    @torch.no_grad()
    def sample_latents(self, prompts: Sequence[str], seeds: Sequence[int], nfe: Optional[int] = None) -> Tensor:
        """Final latents for ``prompts`` from per-sample ``seeds``: ``nfe`` network calls in all."""
        cond = self.teacher.encode_prompts(list(prompts))
        sigmas = self.segment_sigmas(nfe)
        return self.student.sample(self.teacher.noise(list(seeds)), cond, nfe=len(sigmas) - 1, sigmas=sigmas)


def load_run(run_dir: Union[str, os.PathLike], device: str = "cpu", merge_lora: bool = True) -> LoadedRun:
    """Load the teacher a run was distilled from (same resolution/options) and the student on it.

    ``merge_lora`` folds the LoRA deltas into the base weights (peft's own merge) so a student
    call costs exactly one teacher call plus the head: the speed-up is then the NFE ratio.
    """
    from arcflow.pipeline.registry import load_teacher

    record = read_student_config(run_dir)
    teacher = load_teacher(record["teacher"]["id"], device=device, **record.get("teacher_options", {}))
    student = load_student(teacher, run_dir).eval()
    if merge_lora and student.has_lora:
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in student.transformer.modules():
            if isinstance(module, BaseTunerLayer):
                module.merge()
    return LoadedRun(teacher=teacher, student=student, record=record)
