"""Families whose pipelines step channels-first latents ``(B, C, H, W)`` (SD3, Z-Image).

arcflow keeps every teacher's latents as tokens ``(N, C)`` per sample (datasets, the loss, the
momentum math). For these pipelines a token is one latent PIXEL: ``N = H * W`` in row-major order,
``C`` the latent channels (:func:`to_tokens` / :func:`from_tokens`, plain reshapes).

Their transformers un-patchify after the output projection (``hidden -> p*p*C`` reshaped with the
transformer's ``out_channels``), so the momentum head predicts per pixel: it covers ``p*p``
output positions (:meth:`PixelFamily.head_positions`) and, while it is in place, the transformer's
``out_channels`` is the head's packed width (distill/student/model.py ``set_head``). The
transformer's output is then a per-pixel map of packed momentum parameters, read back as tokens by
:meth:`PixelFamily.network_output`; the ArcFlowScheduler reads the pipeline's channels-first
``sample`` and ``model_output`` the same way (``latent_layout="channels_first"``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .family_base import Family
from .teacher import transformer_output


def to_tokens(z: Tensor) -> Tensor:
    """``(B, C, H, W)`` -> ``(B, H*W, C)``: one token per latent pixel, row-major."""
    return z.flatten(2).transpose(1, 2)


def from_tokens(x: Tensor, grid: tuple[int, int]) -> Tensor:
    """Inverse of :func:`to_tokens` for an ``H x W`` latent grid."""
    b, n, c = x.shape
    return x.transpose(1, 2).reshape(b, c, grid[0], grid[1])


class PixelFamily(Family):
    """Base of the channels-first families (see the module docstring)."""

    latent_layout = "channels_first"
    packed = False

    # ----- latents -----------------------------------------------------------------------------
    def grid(self, pipe: Any, height: int, width: int) -> tuple[int, int]:
        """The latent grid: one VAE latent pixel per ``vae_scale_factor`` image pixels."""
        vsf = int(pipe.vae_scale_factor)
        return height // vsf, width // vsf

    def latent_shape(self, pipe: Any, height: int, width: int) -> tuple[int, ...]:
        h, w = self.grid(pipe, height, width)
        return (h * w, int(pipe.transformer.config.in_channels))

    def noise(self, pipe: Any, shape: tuple[int, ...], grid: tuple[int, int], seed: int) -> Tensor:
        """``randn((1, C, H, W))`` with the seed's generator (diffusers' ``randn_tensor`` per sample), as tokens."""
        z = torch.randn((1, shape[1], *grid), generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
        return to_tokens(z)[0]

    def tokens(self, latents: Tensor, grid: tuple[int, int]) -> Tensor:
        return to_tokens(latents)

    def to_pipeline_latents(self, x: Tensor, grid: tuple[int, int], pipe: Any = None) -> Tensor:
        return from_tokens(x, grid)

    def latents_argument(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        return from_tokens(x, grid)

    def mu(self, pipe: Any, tokens: int, steps: int) -> Any:
        """The dynamic-shift ``mu`` of the transformer's sequence length (latent pixels / p*p)."""
        patch = int(getattr(pipe.transformer.config, "patch_size", 2) or 2)
        return super().mu(pipe, tokens // (patch * patch), steps)

    # ----- network -----------------------------------------------------------------------------
    def latent_input(self, hidden: Tensor, grid: tuple[int, int]) -> Any:
        return from_tokens(hidden, grid)

    def network_output(self, output: Any, tokens: int) -> Tensor:
        """The transformer's channels-first output ``(B, C', H, W)`` as tokens ``(B, H*W, C')``."""
        return to_tokens(transformer_output(output))

    def head_positions(self, transformer: Any) -> int:
        patch = int(transformer.config.patch_size)
        return patch * patch

    def decode(self, pipe: Any, latents: Tensor, grid: tuple[int, int]) -> Tensor:
        """``vae.decode(z / scaling_factor + shift_factor)`` of the channels-first latents."""
        vae = pipe.vae
        cfg = vae.config
        z = from_tokens(latents, grid).to(vae.dtype) / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        return vae.decode(z, return_dict=False)[0]
