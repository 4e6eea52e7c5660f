"""FLUX.2 [klein] (``Flux2KleinPipeline``): text-to-image, optionally with reference images.

What differs from FLUX.1 (pipeline/family_base.py, :class:`FluxFamily`):

* the noise is drawn already 2x2-patchified, ``(B, 4c, h, w)``, and packed row-major into tokens
  ``(B, h*w, 4c)`` (no second patchify); ``latents=`` takes that 4-D noise, not the tokens
  (:meth:`latents_argument`);
* ``output_type="latent"`` returns the latents unpacked, de-normalized with the VAE's BatchNorm
  statistics and unpatchified, ``(B, c, 2h, 2w)`` (:meth:`to_pipeline_latents`); :meth:`decode`
  does the same and runs the VAE;
* the schedule's ``mu`` depends on the token count AND the step count (diffusers'
  ``compute_empirical_mu``); the sigmas are FLUX's ``linspace(1, 1/n, n)``;
* CFG is true CFG with ``guidance_scale`` (> 1, base models; step-distilled models ignore it),
  two separate calls per step, the conditional first, the negative prompt always "";
* text and position ids carry a batch axis of identical rows (the transformer uses row 0): they
  are stored without it, as shared tensors (:meth:`normalize_call`);
* reference images (a list, shared by every prompt of a call) add their tokens after the
  sample's; they are resized to the teacher's size, which must then be at least 64 px a side.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from arcflow.core.errors import ArcflowError

from .family_base import Family

#: The pipeline refuses reference images smaller than this on either side.
MIN_REFERENCE_SIDE = 64


class Flux2KleinFamily(Family):
    """``Flux2KleinPipeline`` (see the module docstring)."""

    name = "flux2-klein"
    pipeline_classes = ("Flux2KleinPipeline",)
    transformer_class = "Flux2Transformer2DModel"
    # The double blocks' MLPs, the single blocks' fused attention-output + MLP-out projection, and
    # the timestep embedding; the single blocks' fused QKV + MLP-in projection is left alone.
    lora_targets = (
        r"transformer_blocks\.\d+\.(ff|ff_context)\.(linear_in|linear_out)"
        r"|single_transformer_blocks\.\d+\.attn\.to_out"
        r"|time_guidance_embed\.timestep_embedder\.linear_[12]"
    )
    shared_args = ("txt_ids", "img_ids")
    images_optional = True

    def undrivable(self, pipe: Any, call_options: dict[str, Any]) -> Optional[str]:
        """A text encoder too shallow for the hidden states ``__call__`` stacks
        (``text_encoder_out_layers``: the call option if given, else the default (9, 18, 27))."""
        import inspect

        encoder = getattr(pipe, "text_encoder", None)
        param = inspect.signature(type(pipe).__call__).parameters.get("text_encoder_out_layers")
        layers = getattr(getattr(encoder, "config", None), "num_hidden_layers", None)
        if encoder is None or param is None or not isinstance(layers, int):
            return None
        stacked = tuple(call_options.get("text_encoder_out_layers") or param.default or ())
        if stacked and layers < max(stacked):
            return (f"its text encoder has {layers} layers, and __call__ stacks hidden states {stacked} "
                    "(text_encoder_out_layers; set others with --call-option text_encoder_out_layers=[...])")
        return None

    # ----- guidance ----------------------------------------------------------------------------
    def embedded_guidance(self, pipe: Any) -> bool:
        return False

    def default_guidance(self, pipe: Any) -> float:
        return 1.0 if pipe.config.get("is_distilled", False) else 4.0

    def guidance_kwargs(self, pipe: Any, guidance: float, negative_prompt: str) -> dict[str, Any]:
        if negative_prompt:
            raise ArcflowError(f"a {type(pipe).__name__} takes no negative prompt (its CFG always uses \"\"); "
                               f"drop negative_prompt {negative_prompt!r}")
        return {"guidance_scale": guidance}

    # ----- latents -----------------------------------------------------------------------------
    def noise(self, pipe: Any, shape: tuple[int, ...], grid: tuple[int, int], seed: int) -> Tensor:
        tokens, channels = shape
        z = torch.randn((1, channels, *grid), generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
        return z.reshape(1, channels, tokens).permute(0, 2, 1)[0]

    def latents_argument(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        b, _, c = x.shape
        return x.permute(0, 2, 1).reshape(b, c, *grid)

    def _denormalized(self, pipe: Any, x: Tensor, grid: tuple[int, int]) -> Tensor:
        vae = pipe.vae
        b, _, cp = x.shape
        h, w = grid
        z = x.permute(0, 2, 1).reshape(b, cp, h, w)
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(z.device, z.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(z.device, z.dtype)
        z = z * std + mean
        return z.reshape(b, cp // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, cp // 4, 2 * h, 2 * w)

    def to_pipeline_latents(self, x: Tensor, grid: tuple[int, int], pipe: Any = None) -> Tensor:
        if pipe is None:
            raise ArcflowError("FLUX.2 latents are de-normalized with the pipeline's VAE statistics: pass pipe")
        return self._denormalized(pipe, x, grid)

    def decode(self, pipe: Any, latents: Tensor, grid: tuple[int, int]) -> Tensor:
        return pipe.vae.decode(self._denormalized(pipe, latents, grid), return_dict=False)[0]

    # ----- schedule ----------------------------------------------------------------------------
    def mu(self, pipe: Any, tokens: int, steps: int) -> Optional[float]:
        from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

        return float(compute_empirical_mu(image_seq_len=tokens, num_steps=steps))

    # ----- the pipeline's transformer calls ------------------------------------------------------
    def normalize_call(self, teacher: Any, call: dict[str, Any]) -> dict[str, Any]:
        """Position ids without their batch axis (identical rows; the transformer reads row 0)."""
        out = dict(call)
        for name in self.shared_args:
            ids = out.get(name)
            if isinstance(ids, Tensor) and ids.dim() == 3:
                out[name] = ids[0]
        return out

    def prepare_images(self, images: list[Any], height: int, width: int) -> Any:
        if min(height, width) < MIN_REFERENCE_SIDE:
            raise ArcflowError(f"a Flux2KleinPipeline takes reference images of at least {MIN_REFERENCE_SIDE} px a side; "
                               f"they are resized to the teacher's {height}x{width}")
        return [im.convert("RGB").resize((int(width), int(height))) for im in images]
