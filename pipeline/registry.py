"""Load a teacher by id: the embedded ``digits`` model, the latency simulator, the random-weight
FLUX.1-dev / Qwen-Image stand-ins of the GPU scale benchmark, or a diffusers pipeline (FLUX /
Qwen-Image) named by hub id (``owner/name``) or local directory."""

from __future__ import annotations

from typing import Any

from arcflow.storage.errors import ArcflowError

from .teacher import Teacher

#: Random-weight teachers at the real sizes (pipeline/random_teachers.py; benchmarks only).
RANDOM_TEACHERS = ("random-flux-dev", "random-qwen-image")
EMBEDDED_TEACHERS = ("digits", "gpu-latency-sim", *RANDOM_TEACHERS)


def check_teacher_id(teacher_id: str) -> None:
    """Fail fast (before any cluster starts) on a teacher id nothing can load.

    Cheap: a local directory must hold a ``model_index.json`` naming a supported pipeline class; a
    hub-id-looking string (``owner/name``) is accepted here and resolved when the teacher loads.
    """
    if teacher_id in EMBEDDED_TEACHERS:
        return
    import os

    if os.path.isdir(teacher_id):
        from .diffusers_teachers import pipeline_class_name

        pipeline_class_name(teacher_id)
        return
    from .diffusers_teachers import looks_like_hub_id

    if not looks_like_hub_id(teacher_id):
        raise ArcflowError(
            f"unknown teacher {teacher_id!r}; available: {', '.join(EMBEDDED_TEACHERS)}, "
            "a diffusers hub id (e.g. black-forest-labs/FLUX.1-dev, Qwen/Qwen-Image) or a local pipeline directory"
        )


def is_diffusers_teacher(teacher_id: str) -> bool:
    """Whether ``teacher_id`` names a diffusers pipeline (not an embedded teacher)."""
    return teacher_id not in EMBEDDED_TEACHERS


#: ``teacher_options`` that only diffusers teachers understand.
DIFFUSERS_OPTIONS = ("height", "width", "torch_dtype", "guidance", "negative_prompt", "max_sequence_length")


def teacher_options_for_dataset(spec: Any, text_encoders: bool = False) -> dict[str, Any]:
    """The ``load_teacher`` options that rebuild a dataset's teacher for distillation / sampling.

    For a diffusers teacher: the generation's ``teacher_options`` (height, width, dtype, ...), the
    dataset's guidance (FLUX's embedded guidance is a network input the student must see too) and
    ``text_encoders`` (False: the student never encodes prompts). Embedded teachers need none.
    """
    recorded = dict((spec.extra or {}).get("generation", {}).get("teacher_options", {}) or {})
    if spec.teacher_id in RANDOM_TEACHERS:  # rebuilt from its options (size, seed, resolution)
        return {k: v for k, v in recorded.items() if k != "device"}
    if not is_diffusers_teacher(spec.teacher_id):
        return {}
    options = {k: v for k, v in recorded.items() if k in DIFFUSERS_OPTIONS}
    options["guidance"] = float(spec.guidance)
    options["text_encoders"] = text_encoders
    return options


def load_teacher(teacher_id: str, device: str = "cpu", **options: Any) -> Teacher:
    """Instantiate the teacher named ``teacher_id`` (``options`` go to its constructor)."""
    if teacher_id == "digits":
        from .digits import load_digits_teacher

        return load_digits_teacher(device=device, **options)
    if teacher_id == "gpu-latency-sim":
        from .latency_sim import LatencySimTeacher

        return LatencySimTeacher(device=device, **options)
    if teacher_id in RANDOM_TEACHERS:
        from .random_teachers import load_random_teacher

        return load_random_teacher(teacher_id, device=device, **options)
    check_teacher_id(teacher_id)
    from .diffusers_teachers import load_diffusers_teacher

    return load_diffusers_teacher(teacher_id, device=device, **options)
