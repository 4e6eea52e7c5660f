"""``StableDiffusion3Pipeline`` (SD3 / SD3.5 large, medium, large-turbo) as an arcflow family.

What differs from FLUX (pipeline/families.py), all from the pipeline's own code:

* latents are channels-first ``(B, C, H, W)`` (no packing; pipeline/family_pixels.py keeps them as
  one token per latent pixel) and the transformer un-patchifies after ``proj_out``;
* the timestep argument is the raw scheduler ``t = sigma * 1000`` (no ``/ 1000``);
* true CFG (``guidance_scale > 1``) is ONE batched call ``cat([uncond, cond])``: the conditional
  call is the second half of the first step's call;
* the schedule passes ``sigmas=None``: the scheduler spaces timesteps between its shifted
  ``sigma_max`` and ``sigma_min`` and shifts again, which is no static shift of equal raw-time
  steps (``static_shift`` is NaN: segment boundaries fall on recorded steps).

Skip-layer guidance (``skip_guidance_layers``) is never passed by arcflow.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from .family_pixels import PixelFamily


class StableDiffusion3Family(PixelFamily):
    """SD3 / SD3.5: CFG through ``guidance_scale`` (on above 1) and a negative prompt ("" by default)."""

    name = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    transformer_class = "SD3Transformer2DModel"
    lora_targets = (
        r"transformer_blocks\.\d+\.(ff|ff_context)\.net\.(0\.proj|2)"
        r"|time_text_embed\.timestep_embedder\.linear_[12]"
    )

    def embedded_guidance(self, pipe: Any) -> bool:
        return False

    def default_guidance(self, pipe: Any) -> float:
        return 7.0  # StableDiffusion3Pipeline's guidance_scale default

    def guidance_kwargs(self, pipe: Any, guidance: float, negative_prompt: str) -> dict[str, Any]:
        return {"guidance_scale": guidance, "negative_prompt": negative_prompt}

    def size_unit(self, pipe: Any) -> int:
        return int(pipe.vae_scale_factor) * int(pipe.transformer.config.patch_size)

    # ----- schedule ----------------------------------------------------------------------------
    def mu(self, pipe: Any, tokens: int, steps: int) -> Optional[float]:
        """The pipeline's ``mu`` (only with ``use_dynamic_shifting``; its max_shift default is 1.16)."""
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        cfg = pipe.scheduler.config
        if not cfg.get("use_dynamic_shifting", None):
            return None
        patch = int(pipe.transformer.config.patch_size)
        return float(calculate_shift(tokens // (patch * patch), cfg.get("base_image_seq_len", 256),
                                     cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5),
                                     cfg.get("max_shift", 1.16)))

    def static_shift(self, pipe: Any, mu: Optional[float]) -> float:
        return float("nan")

    def set_timesteps(self, pipe: Any, scheduler: Any, steps: int, tokens: int) -> None:
        """As ``__call__`` does: ``sigmas=None`` and ``mu`` only with dynamic shifting."""
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import retrieve_timesteps

        mu = self.mu(pipe, tokens, steps)
        retrieve_timesteps(scheduler, steps, "cpu", sigmas=None, **({"mu": mu} if mu is not None else {}))

    # ----- the pipeline's transformer calls ------------------------------------------------------
    def conditional_call(self, calls: list[dict[str, Any]], batch: int) -> dict[str, Any]:
        """The first step's first call; with CFG it is ``cat([uncond, cond])``: its second half."""
        call = super().conditional_call(calls, batch)
        if call["hidden_states"].shape[0] == batch:
            return call
        return {k: v[batch:] if isinstance(v, Tensor) and v.dim() and v.shape[0] == 2 * batch else v
                for k, v in call.items()}

    # ----- network -----------------------------------------------------------------------------
    def timestep(self, pipe: Any, sigma: Tensor, dtype: torch.dtype) -> Tensor:
        """The scheduler's ``t = sigma * 1000`` in float32, as the pipeline passes it."""
        n = float(pipe.scheduler.config.get("num_train_timesteps", 1000))
        return sigma.to(torch.float32) * n
