"""Load a teacher by id: the embedded ``digits`` model or a diffusers flow-matching pipeline
(pipeline/families.py lists the classes) named by hub id (``owner/name``) or local directory.

Only these ids reach the product (the CLI's ``--teacher``): a string can never name code to import.
Stand-in teachers (the GPU-latency simulator, random-weight FLUX / Qwen-Image) live with the
benchmarks and reach ``load_teacher`` from Python only, as a :class:`TeacherFactory` object.
"""

from __future__ import annotations

from typing import Any, Mapping, Protocol, Sequence, Union

from arcflow.core.errors import ArcflowError, quote
from arcflow.storage.format import GENERATION_KEY, LAYOUT_KEY

from .teacher import Teacher

EMBEDDED_TEACHERS = ("digits",)


class TeacherFactory(Protocol):
    """Builds a teacher the registry does not know (Python API only; pickled to Ray workers).

    A ``Teacher`` subclass whose constructor takes ``device`` and its options qualifies as it is.
    """

    teacher_id: str

    def __call__(self, *, device: str, **options: Any) -> Teacher: ...


#: What ``load_teacher`` (and ``GenerationConfig.teacher``) accepts: a registry id or a factory.
TeacherSource = Union[str, TeacherFactory]


def teacher_name(teacher: TeacherSource) -> str:
    """The id a teacher source records in datasets: the string itself or the factory's ``teacher_id``."""
    return teacher if isinstance(teacher, str) else teacher.teacher_id


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
            f"unknown teacher {quote(teacher_id)}; available: {', '.join(EMBEDDED_TEACHERS)}, "
            "a diffusers hub id (e.g. black-forest-labs/FLUX.1-dev, Qwen/Qwen-Image) or a local pipeline directory"
        )


def check_prompts(teacher: TeacherSource, prompts: Sequence[str]) -> None:
    """Refuse, before any cluster starts and without loading the teacher, prompts an embedded
    teacher does not understand (the workers check again with the teacher itself)."""
    if teacher == "digits":
        from .digits_prompts import check_digits_prompts

        check_digits_prompts(prompts)


def is_diffusers_teacher(teacher_id: str) -> bool:
    """Whether ``teacher_id`` names a diffusers pipeline (not an embedded teacher)."""
    return teacher_id not in EMBEDDED_TEACHERS


#: ``teacher_options`` that only diffusers teachers understand.
DIFFUSERS_OPTIONS = ("height", "width", "torch_dtype", "guidance", "negative_prompt", "max_sequence_length",
                     "conditioning_layout", "call_options")


def option_flags(options: Mapping[str, Any]) -> str:
    """The CLI flags that give teacher ``options`` (``call_options`` by ``--call-option``)."""
    return ", ".join("--" + k.replace("_", "-").removesuffix("s" if k == "call_options" else "") for k in options)


def check_teacher_options(teacher_id: str, options: Mapping[str, Any]) -> None:
    """Refuse, in one line naming the flags, diffusers-only ``options`` for an embedded teacher, and
    call options a local pipeline directory's class does not take as given (before any weight loads)."""
    misplaced = {k: v for k, v in options.items() if k in DIFFUSERS_OPTIONS and v is not None}
    if misplaced and not is_diffusers_teacher(teacher_id):
        raise ArcflowError(f"{option_flags(misplaced)} apply to diffusers teachers only, not to {quote(teacher_id)}")
    import os

    if options.get("call_options") and os.path.isdir(teacher_id):
        import diffusers

        from .call_options import check_call_options
        from .diffusers_teachers import pipeline_class_name

        check_call_options(getattr(diffusers, pipeline_class_name(teacher_id)), options["call_options"])


def require_prompts(teacher_id: str, given: bool, flag: str) -> None:
    """Only embedded teachers have a prompt set of their own: a diffusers teacher without prompts
    (``flag``) is one line, before anything loads; an id nothing can load is named as such first."""
    check_teacher_id(teacher_id)
    if not given and is_diffusers_teacher(teacher_id):
        raise ArcflowError(f"{flag} is required for teacher {quote(teacher_id)}: only embedded teachers "
                           f"({', '.join(EMBEDDED_TEACHERS)}) have a prompt set of their own")


def teacher_options_for_dataset(spec: Any, text_encoders: bool = False) -> dict[str, Any]:
    """The ``load_teacher`` options that rebuild a dataset's teacher for distillation / sampling.

    For a diffusers teacher: the generation's ``teacher_options`` (height, width, dtype, ...), the
    dataset's guidance (FLUX's embedded guidance is a network input the student must see too) and
    ``text_encoders`` (False: the student never encodes prompts). Embedded teachers need none.
    """
    if not is_diffusers_teacher(spec.teacher_id):
        return {}
    recorded = dict((spec.extra or {}).get(GENERATION_KEY, {}).get("teacher_options", {}) or {})
    options = {k: v for k, v in recorded.items() if k in DIFFUSERS_OPTIONS}
    options["guidance"] = float(spec.guidance)
    options["text_encoders"] = text_encoders
    if (spec.extra or {}).get(LAYOUT_KEY):
        options["conditioning_layout"] = spec.extra[LAYOUT_KEY]
    return options


def local_revision(teacher_id: str, weights_dir: Any = None) -> str | None:
    """A teacher's ``revision`` as known WITHOUT loading it: the digits weights' hash, a local pipeline
    directory's (``directory_revision``); None for a hub id (known once its snapshot is fetched) or a
    directory that is not a pipeline (loading it refuses it)."""
    from pathlib import Path

    if teacher_id == "digits":
        from .digits import TEACHER_FILE, WEIGHTS_DIR, file_revision

        weights = Path(weights_dir or WEIGHTS_DIR) / TEACHER_FILE
        return file_revision(weights) if weights.is_file() else None
    if not (Path(teacher_id) / "model_index.json").is_file():
        return None
    from .diffusers_teachers import directory_revision

    return directory_revision(teacher_id)


def load_teacher(teacher: TeacherSource, device: str = "cpu", **options: Any) -> Teacher:
    """Instantiate the teacher ``teacher`` names, or that a factory builds (``options`` go to its
    constructor)."""
    if not isinstance(teacher, str):
        return teacher(device=device, **options)
    teacher_id = teacher
    if teacher_id == "digits":
        from .digits import load_digits_teacher

        return load_digits_teacher(device=device, **options)
    check_teacher_id(teacher_id)
    from .diffusers_teachers import load_diffusers_teacher

    return load_diffusers_teacher(teacher_id, device=device, **options)
