"""The ArcFlow student, one package the way peft keeps one tuner in one folder.

``config`` (what a student is), ``head`` (the momentum output head), ``model`` (the module and
``build_student``), ``saving`` (the run directory: save, read, attach, load, merge, and the run's
scheduler). Built from a teacher's transformer: frozen, its output projection (``proj_out``, or its family's
head module) swapped for a :class:`MomentumHead`, LoRA adapters added through diffusers' ``add_adapter`` (peft underneath).

Names are imported from their module on first use, so reading a :class:`StudentConfig` (what the
CLI does before anything starts) does not load torch, peft or diffusers.
"""

from importlib import import_module
from typing import Any

_HOMES = {
    "config": ("ADAPTER_NAME", "HEAD_ATTRIBUTE", "TRAINABLE_MODES", "HeadSpec", "StudentConfig",
               "default_lora_targets", "lora_config_for"),
    "head": ("MomentumHead", "head_for", "soft_clamp"),
    "model": ("Student", "build_student", "get_head", "head_spec", "set_head", "transformer_class_name"),
    "saving": ("HEAD_FILE", "LORA_FILE", "STUDENT_CONFIG_FILE", "TRAINABLE_FILE", "attach_student", "check_teacher_revision", "load_scheduler",
               "load_student", "load_weights", "merge_lora", "read_student_config", "run_file", "run_weights",
               "save_student"),
}
_WHERE = {name: module for module, names in _HOMES.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
