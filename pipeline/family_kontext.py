"""FLUX.1 Kontext (``FluxKontextPipeline``): image editing with one reference image per prompt.

The transformer is FLUX.1's ``FluxTransformer2DModel`` and the latents, timestep, guidance, decode
and LoRA targets are FLUX.1's (:class:`~arcflow.pipeline.family_base.FluxFamily`). What differs:

* the reference image's VAE tokens are appended to the latent argument (the recorder stores them
  as ``reference_latents``; the velocity is the first N tokens, the base class cuts them off);
* ``__call__`` rescales ``height`` x ``width`` to the area ``max_area`` (default 1024**2) and, with
  ``_auto_resize=True`` (its default), the reference image to the nearest of its ~1 MP preferred
  resolutions. arcflow asks for exactly the teacher's ``height`` x ``width``
  (``max_area=height*width``, ``_auto_resize=False``) and hands the reference resized to that size,
  so every prompt of a dataset has as many reference tokens as latent tokens.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

from torch import Tensor

from arcflow.core.errors import ArcflowError

from .family_base import FluxFamily


class FluxKontextFamily(FluxFamily):
    """``FluxKontextPipeline``: FLUX.1 plus one reference image per prompt (see the module docstring)."""

    name = "flux-kontext"
    pipeline_classes = ("FluxKontextPipeline",)
    edit = True

    def extra_call_kwargs(self, pipe: Any, height: int, width: int) -> dict[str, Any]:
        # max_area = height*width keeps the requested size (K: width = round(sqrt(max_area * w/h)));
        # no snapping of the reference to the preferred ~1 MP resolutions.
        return {"max_area": int(height) * int(width), "_auto_resize": False}

    def prepare_images(self, images: list[Any], height: int, width: int) -> Any:
        if len(images) != 1:
            raise ArcflowError(f"a FluxKontextPipeline edits with exactly one reference image per prompt, got {len(images)}")
        return images[0].convert("RGB").resize((int(width), int(height)))

    def legacy_layout(self, teacher: Any, cond: Mapping[str, Tensor]) -> Optional[dict[str, dict[str, Any]]]:
        return None  # no Kontext dataset predates recorded layouts
