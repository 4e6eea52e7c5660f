"""The ArcFlow student, one package the way peft keeps one tuner in one folder.

``config`` (what a student is), ``head`` (the momentum output head), ``model`` (the module and
``build_student``), ``saving`` (the run directory: save, read, attach, load, merge). Built from a
teacher's transformer: frozen, its ``proj_out`` swapped for a :class:`MomentumHead`, LoRA adapters
added through diffusers' ``add_adapter`` (peft underneath).
"""

from .config import (
    ADAPTER_NAME,
    DEFAULT_LORA_TARGETS,
    HEAD_ATTRIBUTE,
    TRAINABLE_MODES,
    StudentConfig,
    default_lora_targets,
    lora_config_for,
)
from .head import MomentumHead, head_for, soft_clamp
from .model import Student, build_student, transformer_class_name
from .saving import (
    CONFIG_FILE,
    HEAD_FILE,
    LORA_FILE,
    TRAINABLE_FILE,
    attach_student,
    load_student,
    merge_lora,
    read_student_config,
    run_file,
    save_student,
)

__all__ = [
    "ADAPTER_NAME", "CONFIG_FILE", "DEFAULT_LORA_TARGETS", "HEAD_ATTRIBUTE", "HEAD_FILE", "LORA_FILE",
    "TRAINABLE_FILE", "TRAINABLE_MODES", "MomentumHead", "Student", "StudentConfig", "attach_student",
    "build_student", "default_lora_targets", "head_for", "load_student", "lora_config_for", "merge_lora",
    "read_student_config", "run_file", "save_student", "soft_clamp", "transformer_class_name",
]
