"""The families arcflow drives, by pipeline class (docs/architecture.md, Teachers).

The :class:`Family` base and the FLUX / Qwen-Image examples are in pipeline/family_base.py; further
families live in their own modules (pipeline/family_<name>.py) and are registered here.
"""

from __future__ import annotations

from typing import Any, Optional

from arcflow.core.errors import ArcflowError, clip

from .family_base import Family, FluxFamily, QwenImageFamily
from .family_flux2 import Flux2KleinFamily
from .family_kontext import FluxKontextFamily
from .family_qwen_edit import QwenImageEditPlusFamily
from .family_sd3 import StableDiffusion3Family
from .family_z_image import ZImageFamily

#: Every family arcflow drives (one instance each).
ALL_FAMILIES: tuple[Family, ...] = (
    FluxFamily(), FluxKontextFamily(), Flux2KleinFamily(), QwenImageFamily(), QwenImageEditPlusFamily(),
    StableDiffusion3Family(), ZImageFamily(),
)
#: The families by pipeline class name.
FAMILIES: dict[str, Family] = {cls: family for family in ALL_FAMILIES for cls in family.pipeline_classes}


def supported_pipelines() -> list[str]:
    return sorted(FAMILIES)


def family_for_transformer(transformer_class: str) -> Optional[Family]:
    """The family whose transformer class is ``transformer_class`` (None if no family has it)."""
    for family in ALL_FAMILIES:
        if family.transformer_class == transformer_class:
            return family
    return None


def lora_targets_for(transformer_class: str) -> Optional[str]:
    """The default LoRA targets of the family whose transformer class is ``transformer_class``."""
    for family in ALL_FAMILIES:
        if family.transformer_class == transformer_class:
            return family.lora_targets
    return None


def family_for(class_name: str) -> Family:
    """The family of a pipeline class, or ``ArcflowError`` naming the class and why."""
    if class_name in FAMILIES:
        return FAMILIES[class_name]
    raise ArcflowError(
        f"arcflow cannot drive a {clip(class_name)}: {refusal_reason(class_name)}; "
        f"supported pipelines: {', '.join(supported_pipelines())}"
    )


def refusal_reason(class_name: str) -> str:
    """Why a pipeline class cannot be a teacher (its scheduler family, or no adapter)."""
    import diffusers

    cls = getattr(diffusers, class_name, None)
    if cls is None:
        return "it is not a diffusers pipeline class"
    text = " ".join(str(p.annotation) for p in _init_parameters(cls))
    if "FlowMatch" not in text:
        return "it is not a flow-matching pipeline (its scheduler is not a FlowMatchEulerDiscreteScheduler)"
    return "it has no arcflow family adapter yet (timestep mapping, output projection, noise layout)"


def _init_parameters(cls: Any) -> list[Any]:
    import inspect

    try:
        return list(inspect.signature(cls.__init__).parameters.values())
    except (TypeError, ValueError):
        return []
