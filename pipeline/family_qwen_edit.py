"""Qwen-Image-Edit-2509 / -2511 (``QwenImageEditPlusPipeline``): image editing with one or more
reference images per prompt.

The transformer, latents, timestep, CFG (true CFG through ``true_cfg_scale`` and a negative
prompt, rescaled to the conditional velocity's norm per token), decode and LoRA targets are
Qwen-Image's (:class:`QwenImageEditPlusFamily` subclasses
:class:`~arcflow.pipeline.family_base.QwenImageFamily`). What differs:

* every reference image is VAE-encoded and its tokens are appended to the latent argument
  (``cat([latents, image_latents], 1)``); the recorder stores them as ``reference_latents`` and
  the velocity is the first N tokens (the base class cuts the rest off). ``img_shapes`` lists the
  target grid and then one grid per reference image. Edit-2511's ``zero_cond_t`` (reference tokens
  modulated at timestep 0) happens inside the transformer: the call is the same;
* the pipeline resizes each reference image to the area ``VAE_IMAGE_SIZE`` (1024**2) at the
  IMAGE's aspect ratio, whatever the output size; arcflow hands it every image already resized to
  the OUTPUT's aspect ratio at that area (:meth:`QwenImageEditPlusFamily.prepare_images`), so
  the pipeline sizes every image alike and every prompt of a dataset with as many images has as
  many reference tokens. The vision-language condition image (384**2 area) is the pipeline's own resize of it;
* the images also enter the prompt: the Qwen2.5-VL text encoder sees them, so the text embeddings
  depend on the images and their length on the image count. The pipeline does not truncate them;
  arcflow pads them to ``max_sequence_length`` (default 1024, the pipeline's bound) with a mask;
* ``__call__`` takes one prompt per call (``batch_size > 1`` raises): the teacher calls it once per
  prompt (:attr:`~arcflow.pipeline.family_base.Family.max_prompts_per_call`).

True CFG outside the pipeline's own sampler (the teacher's ``velocity`` at guidance > 1) would need
the negative prompt encoded with each sample's images; it is refused (the recorded velocities
already carry the pipeline's CFG).
"""

from __future__ import annotations

import math
from typing import Any, Optional

from .family_base import QwenImageFamily

#: The pipeline's bound on ``max_sequence_length``, arcflow's default text length for it.
QWEN_EDIT_MAX_SEQUENCE_LENGTH = 1024
#: diffusers' ``VAE_IMAGE_SIZE`` of the EditPlus pipeline module when it cannot be read.
DEFAULT_VAE_IMAGE_AREA = 1024 * 1024


def vae_image_area() -> int:
    """The pixel area the pipeline VAE-encodes each reference image at (its module's ``VAE_IMAGE_SIZE``)."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as module

    return int(getattr(module, "VAE_IMAGE_SIZE", DEFAULT_VAE_IMAGE_AREA))


def area_dimensions(area: int, ratio: float) -> tuple[int, int]:
    """``(width, height)`` of about ``area`` pixels at ``ratio`` = width / height, multiples of 32
    (as the pipeline computes its image sizes)."""
    width = math.sqrt(area * ratio)
    height = width / ratio
    return round(width / 32) * 32, round(height / 32) * 32


class QwenImageEditPlusFamily(QwenImageFamily):
    """``QwenImageEditPlusPipeline`` (Qwen-Image-Edit-2509 / -2511): Qwen-Image plus one or more
    reference images per prompt (see the module docstring)."""

    name = "qwen-image-edit-plus"
    pipeline_classes = ("QwenImageEditPlusPipeline",)
    edit = True
    max_prompts_per_call = 1
    default_text_length = QWEN_EDIT_MAX_SEQUENCE_LENGTH

    def prepare_images(self, images: list[Any], height: int, width: int) -> Any:
        """Each image resized to the output's aspect ratio at the pipeline's VAE area, so the
        reference token count depends only on the output size and the image count."""
        from PIL import Image

        size = area_dimensions(vae_image_area(), width / height)
        return [im if im.size == size else im.resize(size, Image.Resampling.LANCZOS) for im in images]

    def legacy_layout(self, teacher: Any, cond: Any) -> Optional[dict[str, dict[str, Any]]]:
        return None  # no edit dataset predates recorded layouts

    def undrivable(self, pipe: Any, call_options: dict[str, Any]) -> Optional[str]:
        if pipe.transformer.config.get("guidance_embeds", False):
            return "its transformer embeds guidance (guidance_embeds), which the Qwen-Image families do not drive"
        return None
