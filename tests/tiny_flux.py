"""A tiny randomly initialized FLUX-architecture teacher for fast tests (no weights, no download)."""

from __future__ import annotations

import hashlib
from typing import Any, Mapping, Optional, Sequence

import torch
from arcflow.pipeline.teacher import Conditioning, Teacher
from diffusers import FluxTransformer2DModel
from torch import Tensor, nn

TINY_CONFIG: dict[str, Any] = dict(
    patch_size=1,
    in_channels=4,
    out_channels=None,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    guidance_embeds=False,
    axes_dims_rope=(2, 2, 4),
)

# The real FLUX.1-dev transformer config (instantiate on the meta device only).
FLUX_DEV_CONFIG: dict[str, Any] = dict(
    patch_size=1,
    in_channels=64,
    out_channels=None,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)

TEXT_TOKENS = 3


def _grid_ids(height: int, width: int) -> Tensor:
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    return ids.reshape(height * width, 3)


class TinyFluxTeacher(Teacher):
    """A seeded random ``FluxTransformer2DModel``: 16 tokens (a 4x4 grid) of 4 channels.

    Conditioning is ``prompt_embeds`` ``(B, 3, 32)`` and ``pooled_prompt_embeds`` ``(B, 32)``;
    prompts are embedded by a hash-seeded random projection. ``config``/``grid`` let tests build a
    FLUX.1-dev sized transformer on the meta device through the same class.
    """

    teacher_id = "tiny-flux"
    shift = 1.0
    default_guidance = 1.0
    true_cfg = True

    def __init__(self, seed: int = 0, config: Optional[Mapping[str, Any]] = None, grid: tuple[int, int] = (4, 4)):
        cfg = dict(TINY_CONFIG if config is None else config)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self._transformer = FluxTransformer2DModel(**cfg)
        self._transformer.eval()
        self._guidance_embeds = bool(cfg["guidance_embeds"])
        self.revision = f"seed-{seed}"
        self.latent_shape = (grid[0] * grid[1], cfg["in_channels"])
        self.text_dim = cfg["joint_attention_dim"]
        self.pooled_dim = cfg["pooled_projection_dim"]
        self._grid = grid

    @property
    def transformer(self) -> nn.Module:
        return self._transformer

    def validate_prompts(self, prompts: Sequence[str]) -> None:
        return None

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        embeds, pooled = [], []
        for prompt in prompts:
            seed = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:4], "little")
            gen = torch.Generator().manual_seed(seed)
            embeds.append(torch.randn(TEXT_TOKENS, self.text_dim, generator=gen))
            pooled.append(torch.randn(self.pooled_dim, generator=gen))
        return {"prompt_embeds": torch.stack(embeds), "pooled_prompt_embeds": torch.stack(pooled)}

    def unconditional(self, cond: Conditioning) -> Conditioning:
        return {k: torch.zeros_like(v) for k, v in cond.items()}

    def transformer_inputs(self, x: Tensor, sigma: Tensor, cond: Mapping[str, Tensor]) -> dict:
        dtype, device = self.dtype, self.device
        batch = x.shape[0]
        kwargs = dict(
            hidden_states=x.to(device=device, dtype=dtype),
            encoder_hidden_states=cond["prompt_embeds"].to(device=device, dtype=dtype),
            pooled_projections=cond["pooled_prompt_embeds"].to(device=device, dtype=dtype),
            timestep=torch.as_tensor(sigma, device=device, dtype=dtype).expand(batch),
            img_ids=_grid_ids(*self._grid).to(device=device, dtype=dtype),
            txt_ids=torch.zeros(TEXT_TOKENS, 3, device=device, dtype=dtype),
            return_dict=False,
        )
        if self._guidance_embeds:
            kwargs["guidance"] = torch.full((batch,), 3.5, device=device, dtype=dtype)
        return kwargs

    def decode(self, latents: Tensor) -> Tensor:
        height, width = self._grid
        images = latents.float().cpu().reshape(latents.shape[0], height, width, -1).permute(0, 3, 1, 2)
        return ((images.clamp(-1, 1) + 1) / 2)[:, :3]

    def euler_trajectories(self, noise: Tensor, cond: Conditioning, steps: int) -> tuple[Tensor, Tensor, Tensor]:
        """The teacher's Euler trajectory (guidance 1): ``x`` ``(B, S+1, N, C)``, ``u`` ``(B, S, N, C)``,
        ``sigmas`` ``(S+1,)``, as the trajectory dataset stores them."""
        sigmas = self.sigmas(steps).float()
        xs, us = [noise], []
        x = noise
        with torch.no_grad():
            for j in range(steps):
                s = torch.full((x.shape[0],), float(sigmas[j]))
                u = self.velocity(x, s, cond, guidance=1.0).float()
                x = x - (sigmas[j] - sigmas[j + 1]) * u
                xs.append(x)
                us.append(u)
        return torch.stack(xs, dim=1), torch.stack(us, dim=1), sigmas
