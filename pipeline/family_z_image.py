"""``ZImagePipeline`` (Z-Image-Turbo / Z-Image) as an arcflow family.

What differs from FLUX (pipeline/families.py), all from the pipeline's own code:

* latents are channels-first float32 ``(B, C, H, W)`` (pipeline/family_pixels.py keeps one token
  per latent pixel); the transformer takes them as a LIST of per-sample ``(C, 1, H, W)`` tensors
  and returns such a list, un-patchified after its output projection ``all_final_layer.2-1.linear``;
* the timestep argument is ``(1000 - t) / 1000 = 1 - sigma``;
* the scheduler steps with the NEGATED transformer output (``output_sign = -1``): the momentum
  head is initialised from the negated projection so it predicts the velocity itself;
* the captions are a list of variable-length ``(L_i, D)`` tensors: stored padded to
  ``max_sequence_length`` with their lengths (``cap_lengths``) and rebuilt as the list on replay;
* CFG (``guidance_scale > 0``) is one batched call, conditional half FIRST, combined as
  ``pos + s * (pos - neg)``: arcflow's guidance ``w`` is ``s + 1`` (``w = 1``: no CFG).
  ``cfg_normalization`` / ``cfg_truncation`` keep the pipeline's defaults (off).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from arcflow.core.errors import ArcflowError

from .family_pixels import PixelFamily, to_tokens
from .teacher import transformer_output

#: Z-Image's text length when the caller sets none (its pipeline's default).
Z_IMAGE_MAX_SEQUENCE_LENGTH = 512
#: The (patch, frame patch) the pipeline always runs (its transformer's default ``forward`` arguments).
PATCH, FRAME_PATCH = 2, 1


class ZImageFamily(PixelFamily):
    """Z-Image: true CFG through ``guidance_scale`` (arcflow guidance minus one), negative prompt "" by default."""

    name = "z-image"
    pipeline_classes = ("ZImagePipeline",)
    transformer_class = "ZImageTransformer2DModel"
    lora_targets = r"(layers|noise_refiner)\.\d+\.feed_forward\.w[123]|t_embedder\.mlp\.[02]"
    head_module = f"all_final_layer.{PATCH}-{FRAME_PATCH}.linear"
    output_sign = -1
    latent_arg = "x"
    timestep_arg = "t"

    def embedded_guidance(self, pipe: Any) -> bool:
        return False

    def default_guidance(self, pipe: Any) -> float:
        return 6.0  # ZImagePipeline's guidance_scale default 5.0 (Z-Image-Turbo: pass guidance 1)

    def guidance_kwargs(self, pipe: Any, guidance: float, negative_prompt: str) -> dict[str, Any]:
        return {"guidance_scale": max(float(guidance) - 1.0, 0.0), "negative_prompt": negative_prompt}

    def combine(self, cond: Tensor, uncond: Tensor, guidance: float) -> Tensor:
        """The pipeline's ``pos + s * (pos - neg)`` with ``s = guidance - 1`` (signs commute with it)."""
        return cond + (guidance - 1.0) * (cond - uncond)

    def complete_call(self, kwargs: dict[str, Any], batch: int) -> dict[str, Any]:
        """One negative prompt per prompt (the pipeline wants a list as long as the prompts'; it
        rewrites both lists in place, so each call gets its own)."""
        negative = kwargs.get("negative_prompt")
        if isinstance(negative, str):
            kwargs = {**kwargs, "negative_prompt": [negative] * batch}
        if isinstance(kwargs.get("prompt"), list):
            kwargs = {**kwargs, "prompt": list(kwargs["prompt"])}
        return kwargs

    def default_size(self, pipe: Any) -> int:
        return 1024  # ZImagePipeline's height/width default

    # ----- schedule ----------------------------------------------------------------------------
    def set_timesteps(self, pipe: Any, scheduler: Any, steps: int, tokens: int) -> None:
        """As ``__call__`` does: ``sigmas = linspace(1, 1/steps, steps)`` (torch's) and the resolution's ``mu``."""
        from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps

        sigmas = torch.linspace(1.0, 1.0 / steps, steps).tolist()
        mu = self.mu(pipe, tokens, steps)
        retrieve_timesteps(scheduler, steps, "cpu", sigmas=sigmas, **({"mu": mu} if mu is not None else {}))

    # ----- the pipeline's transformer calls ------------------------------------------------------
    def conditional_call(self, calls: list[dict[str, Any]], batch: int) -> dict[str, Any]:
        """The first step's call; with CFG it holds ``[cond..., neg...]``: its first half."""
        call = super().conditional_call(calls, batch)

        def first_half(value: Any) -> Any:
            if isinstance(value, list) and len(value) == 2 * batch:
                return value[:batch]
            if isinstance(value, Tensor) and value.dim() and value.shape[0] == 2 * batch:
                return value[:batch]
            return value

        return {k: first_half(v) for k, v in call.items()}

    def normalize_call(self, teacher: Any, call: dict[str, Any]) -> dict[str, Any]:
        """Captions right-padded to ``max_sequence_length`` as one ``(B, L, D)`` tensor, with their
        lengths (``cap_lengths``), so every row has one shape; :meth:`replayed` undoes it."""
        caps = list(call["cap_feats"])
        full = int(teacher.max_sequence_length or Z_IMAGE_MAX_SEQUENCE_LENGTH)
        longest = max(c.shape[0] for c in caps)
        if longest > full:
            raise ArcflowError(f"caption embeddings of length {longest} exceed max_sequence_length {full}")
        padded = torch.stack([torch.cat([c, c.new_zeros(full - c.shape[0], *c.shape[1:])]) for c in caps])
        lengths = torch.tensor([c.shape[0] for c in caps], dtype=torch.long, device=padded.device)
        return {**call, "cap_feats": padded, "cap_lengths": lengths}

    def replayed(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        out = dict(kwargs)
        lengths = out.pop("cap_lengths").tolist()
        caps = out["cap_feats"]
        out["cap_feats"] = [caps[i, : int(n)] for i, n in enumerate(lengths)]
        return out

    # ----- network -----------------------------------------------------------------------------
    def timestep(self, pipe: Any, sigma: Tensor, dtype: torch.dtype) -> Tensor:
        """``(1000 - t) / 1000`` with the scheduler's float32 ``t = sigma * 1000``."""
        n = float(pipe.scheduler.config.get("num_train_timesteps", 1000))
        return (n - sigma.to(torch.float32) * n) / n

    def latent_input(self, hidden: Tensor, grid: tuple[int, int]) -> Any:
        """Tokens -> the list of per-sample ``(C, 1, H, W)`` the transformer takes."""
        return list(super().latent_input(hidden, grid).unsqueeze(2).unbind(0))

    def network_output(self, output: Any, tokens: int) -> Tensor:
        """The transformer's list of ``(C', 1, H, W)`` as tokens ``(B, H*W, C')``."""
        return to_tokens(torch.stack(list(transformer_output(output))).squeeze(2))

    def velocity(self, network_output: Tensor) -> Tensor:
        """The scheduler steps with the negated output (the model predicts ``x0 - noise``)."""
        return -network_output

    def head_positions(self, transformer: Any) -> int:
        return PATCH * PATCH * FRAME_PATCH
