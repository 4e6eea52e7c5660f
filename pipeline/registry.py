"""Load a teacher by id: the embedded ``digits`` model, the latency simulator, or (later) diffusers."""

from __future__ import annotations

from typing import Any

from arcflow.storage.errors import ArcflowError

from .teacher import Teacher

EMBEDDED_TEACHERS = ("digits", "gpu-latency-sim")


def check_teacher_id(teacher_id: str) -> None:
    """Fail fast (before any cluster starts) on a teacher id nothing can load."""
    if teacher_id not in EMBEDDED_TEACHERS:
        raise ArcflowError(f"unknown teacher {teacher_id!r}; available: {', '.join(EMBEDDED_TEACHERS)}")


def load_teacher(teacher_id: str, device: str = "cpu", **options: Any) -> Teacher:
    """Instantiate the teacher named ``teacher_id`` (``options`` go to its constructor)."""
    if teacher_id == "digits":
        from .digits import load_digits_teacher

        return load_digits_teacher(device=device, **options)
    if teacher_id == "gpu-latency-sim":
        from .latency_sim import LatencySimTeacher

        return LatencySimTeacher(device=device, **options)
    check_teacher_id(teacher_id)
    raise AssertionError("unreachable")
