"""What stays per pipeline family (docs/architecture.md, Teachers): small and explicit.

Everything else a diffusers teacher does goes through the pipeline's own ``__call__``
(pipeline/diffusers_teachers.py, watched by pipeline/pipeline_capture.py). A :class:`Family` says,
for its pipeline classes:

* the layout of the latents the scheduler steps (``latent_shape``), how the pipeline draws the
  noise for a seed (``noise``) and how final latents become images (``decode``);
* how sigma becomes the transformer's timestep argument (``timestep``) and how the transformer's
  output becomes the scheduler's velocity (``velocity``: reference tokens cut, sign);
* which ``__call__`` argument carries the guidance scale, whether it is embedded guidance or true
  CFG, and how CFG combines the two halves (``combine``);
* which module is the output projection a momentum head replaces (``head_module``) and the
  default LoRA targets.

The code here reproduces the pipelines' latent packing with plain reshapes; no private diffusers
helper is called. Tests check each family against its stock pipeline (tests/test_family_*.py, with
tests/family_checks.py).

The registry of families (``ALL_FAMILIES``, :func:`family_for`) is pipeline/families.py; the base
class lives here so that a family in its own module (pipeline/family_<name>.py) can subclass it
without an import cycle.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import numpy as np

import torch
from torch import Tensor

from arcflow.core.errors import ArcflowError

from .teacher import transformer_output


def pack_2x2(z: Tensor) -> Tensor:
    """``(B, C, 2h, 2w)`` -> ``(B, h*w, 4C)``: 2x2 patches as tokens, channels-major within a token."""
    b, c, hh, ww = z.shape
    h, w = hh // 2, ww // 2
    return z.view(b, c, h, 2, w, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, c * 4)


def unpack_2x2(x: Tensor, h: int, w: int) -> Tensor:
    """Inverse of :func:`pack_2x2` for an ``h x w`` token grid."""
    b, _, c4 = x.shape
    c = c4 // 4
    return x.view(b, h, w, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, 2 * h, 2 * w)


def exponential_shift_mu(tokens: int, config: Any) -> Optional[float]:
    """The ``mu`` FLUX-style pipelines pass to ``set_timesteps`` (diffusers' public ``calculate_shift``)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    if not config.get("use_dynamic_shifting", False):
        return None
    return float(calculate_shift(tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                                 config.get("base_shift", 0.5), config.get("max_shift", 1.15)))


class Family:
    """Base: a FLUX-like packed-token family (override what differs)."""

    #: Short name (presets, docs).
    name: str = ""
    #: diffusers pipeline class names this family drives.
    pipeline_classes: tuple[str, ...] = ()
    #: diffusers class name of the family's transformer (default LoRA targets are looked up by it).
    transformer_class: str = ""
    #: peft target regex (full match) of the default LoRA; never the head module.
    lora_targets: str = ""
    #: Dotted path of the output projection the momentum head replaces.
    head_module: str = "proj_out"
    #: +1, or -1 where the pipeline steps with the negated transformer output (the momentum head
    #: then predicts the velocity, and the ArcFlowScheduler negates what the pipeline hands it back).
    output_sign: int = 1
    #: The ArcFlowScheduler's ``latent_layout``: how the pipeline's scheduler sample is laid out
    #: ("tokens" ``(B, N, C)``, or "channels_first" ``(B, C, H, W)``).
    latent_layout: str = "tokens"
    #: Name of the transformer's latent, timestep and embedded-guidance arguments.
    latent_arg: str = "hidden_states"
    timestep_arg: str = "timestep"
    guidance_arg: str = "guidance"
    #: Transformer arguments that are shared tensors without a batch axis.
    shared_args: tuple[str, ...] = ()
    #: Whether the pipeline edits: every prompt needs reference images (``image=``).
    edit: bool = False
    #: Whether a text-to-image pipeline also takes reference images (FLUX.2): prompts with and
    #: without images are both accepted (``edit`` stays False: text prompts need none).
    images_optional: bool = False
    #: Whether CFG runs only for guidance > 1 (every diffusers pipeline here) or also below.
    cfg_below_one: bool = False
    #: Noise is drawn per sample in this shape's layout with the channels of ``latent_channels``.
    packed: bool = True
    #: Most prompts one ``__call__`` takes (None: any number; the teacher splits larger groups).
    max_prompts_per_call: Optional[int] = None

    def undrivable(self, pipe: Any, call_options: dict[str, Any]) -> Optional[str]:
        """Why this family cannot drive ``pipe`` called with ``call_options`` beyond the generic
        checks (None: it can)."""
        return None

    # ----- guidance ----------------------------------------------------------------------------
    def embedded_guidance(self, pipe: Any) -> bool:
        """Guidance is a transformer input (one evaluation per step) rather than true CFG."""
        return bool(pipe.transformer.config.get("guidance_embeds", False))

    def default_guidance(self, pipe: Any) -> float:
        raise NotImplementedError

    def guidance_kwargs(self, pipe: Any, guidance: float, negative_prompt: str) -> dict[str, Any]:
        """The ``__call__`` arguments that set the guidance scale."""
        raise NotImplementedError

    def combine(self, cond: Tensor, uncond: Tensor, guidance: float) -> Tensor:
        """True CFG of the two velocities, as the pipeline does it."""
        return uncond + guidance * (cond - uncond)

    # ----- latents -----------------------------------------------------------------------------
    def default_size(self, pipe: Any) -> int:
        return int(getattr(pipe, "default_sample_size", 128)) * int(pipe.vae_scale_factor)

    def size_unit(self, pipe: Any) -> int:
        """Height and width must be multiples of this."""
        return int(pipe.vae_scale_factor) * 2

    def grid(self, pipe: Any, height: int, width: int) -> tuple[int, int]:
        unit = self.size_unit(pipe)
        return height // unit, width // unit

    def latent_shape(self, pipe: Any, height: int, width: int) -> tuple[int, ...]:
        h, w = self.grid(pipe, height, width)
        return (h * w, int(pipe.transformer.config.in_channels))

    def noise(self, pipe: Any, shape: tuple[int, ...], grid: tuple[int, int], seed: int) -> Tensor:
        """One sample's noise, as the pipeline draws it with ``torch.Generator().manual_seed(seed)``."""
        tokens, channels = shape
        z = torch.randn((1, channels // 4, 2 * grid[0], 2 * grid[1]), generator=torch.Generator().manual_seed(seed),
                        dtype=torch.float32)
        return pack_2x2(z)[0]

    def tokens(self, latents: Tensor, grid: tuple[int, int]) -> Tensor:
        """The pipeline scheduler's latents (a sample, a velocity) -> arcflow's ``(B, *latent_shape)``
        layout (the same here)."""
        return latents

    def to_pipeline_latents(self, x: Tensor, grid: tuple[int, int], pipe: Any = None) -> Tensor:
        """Scheduler-layout latents -> what ``output_type="latent"`` returns (the same here; ``pipe``
        for families whose output is de-normalized with the VAE's statistics)."""
        return x

    def decode(self, pipe: Any, latents: Tensor, grid: tuple[int, int]) -> Tensor:
        raise NotImplementedError

    # ----- schedule ----------------------------------------------------------------------------
    def mu(self, pipe: Any, tokens: int, steps: int) -> Optional[float]:
        return exponential_shift_mu(tokens, pipe.scheduler.config)

    def static_shift(self, pipe: Any, mu: Optional[float]) -> float:
        """The static shift equal to the scheduler's warp (NaN where none exists)."""
        cfg = pipe.scheduler.config
        if any(cfg.get(k) for k in ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
                                    "use_beta_sigmas", "invert_sigmas", "stochastic_sampling")):
            return float("nan")
        if mu is None:
            return float(cfg.get("shift", 1.0))
        if cfg.get("time_shift_type", "exponential") == "exponential":
            return math.exp(mu)
        return float(mu)

    def set_timesteps(self, pipe: Any, scheduler: Any, steps: int, tokens: int) -> None:
        """Set ``scheduler`` up for ``steps`` as the pipeline's ``__call__`` does (FLUX-style:
        ``sigmas = linspace(1, 1/steps, steps)`` and the resolution's ``mu``)."""
        from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps

        sigmas = None if scheduler.config.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / steps, steps)
        mu = self.mu(pipe, tokens, steps)
        retrieve_timesteps(scheduler, steps, "cpu", sigmas=sigmas, **({"mu": mu} if mu is not None else {}))

    # ----- the pipeline's transformer calls ------------------------------------------------------
    def conditional_call(self, calls: list[dict[str, Any]], batch: int) -> dict[str, Any]:
        """The conditional call among the first step's calls (here: the first; CFG's negative
        call comes after it)."""
        if not calls:
            raise ArcflowError("the pipeline never called its transformer")
        return calls[0]

    def normalize_call(self, teacher: Any, call: dict[str, Any]) -> dict[str, Any]:
        """Make the call's shapes independent of the batch (e.g. pad text to a fixed length)."""
        return call

    def extra_call_kwargs(self, pipe: Any, height: int, width: int) -> dict[str, Any]:
        """More ``__call__`` arguments the family needs to sample at ``height`` x ``width``."""
        return {}

    def complete_call(self, kwargs: dict[str, Any], batch: int) -> dict[str, Any]:
        """The ``__call__`` arguments for ``batch`` prompts, last touches (e.g. one negative prompt
        per prompt where the pipeline wants a list; the same here)."""
        return kwargs

    def latents_argument(self, x: Tensor, grid: tuple[int, int]) -> Tensor:
        """Scheduler-layout latents -> the ``latents=`` argument ``__call__`` takes (the same here)."""
        return x

    def prepare_images(self, images: list[Any], height: int, width: int) -> Any:
        """Reference images as ``__call__`` takes them, resized to the output size so every prompt
        of a dataset has the same number of reference tokens."""
        return [im.resize((width, height)) for im in images]

    def legacy_layout(self, teacher: Any, cond: Mapping[str, Tensor]) -> Optional[dict[str, dict[str, Any]]]:
        """How datasets written before layouts were recorded replay (FLUX / Qwen-Image only; None
        when ``cond`` is not such a dataset's)."""
        return None

    # ----- network -----------------------------------------------------------------------------
    def timestep(self, pipe: Any, sigma: Tensor, dtype: torch.dtype) -> Tensor:
        """What the pipeline feeds as timestep: ``t.to(latents dtype) / 1000`` with ``t = sigma * 1000``."""
        n = float(pipe.scheduler.config.get("num_train_timesteps", 1000))
        return (sigma.to(torch.float32) * n).to(dtype) / n

    def latent_input(self, hidden: Tensor, grid: tuple[int, int]) -> Any:
        """The latent argument (``hidden``, arcflow's layout, reference tokens appended) as the
        transformer takes it (the same tensor here)."""
        return hidden

    def replayed(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The replayed conditional call's keyword arguments as the transformer takes them (undoes
        what :meth:`normalize_call` did for storage; the same here)."""
        return kwargs

    def head_positions(self, transformer: Any) -> int:
        """Output positions per token the head projection covers (1: it returns packed tokens)."""
        return 1

    def network_output(self, output: Any, tokens: int) -> Tensor:
        """The transformer's output for the sample's own tokens (reference tokens cut off)."""
        return transformer_output(output)[:, :tokens]

    def velocity(self, network_output: Tensor) -> Tensor:
        """:meth:`network_output` -> the velocity the scheduler steps with (the same here)."""
        return network_output


class FluxFamily(Family):
    """``FluxPipeline`` (FLUX.1-dev / schnell / Krea): embedded guidance when the transformer has
    ``guidance_embeds``, else true CFG through ``true_cfg_scale`` and a negative prompt."""

    name = "flux"
    pipeline_classes = ("FluxPipeline",)
    transformer_class = "FluxTransformer2DModel"
    lora_targets = (
        r"transformer_blocks\.\d+\.(ff|ff_context)\.net\.(0\.proj|2)"
        r"|single_transformer_blocks\.\d+\.(proj_mlp|proj_out)"
        r"|time_text_embed\.timestep_embedder\.linear_[12]"
    )
    shared_args = ("txt_ids", "img_ids")

    def default_guidance(self, pipe: Any) -> float:
        return 3.5 if self.embedded_guidance(pipe) else 1.0

    def guidance_kwargs(self, pipe: Any, guidance: float, negative_prompt: str) -> dict[str, Any]:
        if self.embedded_guidance(pipe):
            return {"guidance_scale": guidance}
        return {"true_cfg_scale": guidance, "negative_prompt": negative_prompt}

    def legacy_layout(self, teacher: Any, cond: Mapping[str, Tensor]) -> Optional[dict[str, dict[str, Any]]]:
        """FLUX datasets of format v2 before layouts: T5 ``prompt_embeds`` and CLIP
        ``pooled_prompt_embeds``; the ids are the pipeline's (zeros for text, row/column per token)."""
        if set(cond) - {"guidance"} != {"prompt_embeds", "pooled_prompt_embeds"}:
            return super().legacy_layout(teacher, cond)
        h, w = teacher.grid
        ids = torch.zeros(h, w, 3)
        ids[..., 1] = torch.arange(h)[:, None]
        ids[..., 2] = torch.arange(w)[None, :]
        layout: dict[str, dict[str, Any]] = {
            "hidden_states": {"kind": "latent"},
            "timestep": {"kind": "timestep"},
            "pooled_projections": {"kind": "batched", "dtype": "model", "key": "pooled_prompt_embeds"},
            "encoder_hidden_states": {"kind": "batched", "dtype": "model", "key": "prompt_embeds"},
            "txt_ids": {"kind": "tensor", "dtype": "model", "value": torch.zeros(cond["prompt_embeds"].shape[1], 3)},
            "img_ids": {"kind": "tensor", "dtype": "model", "value": ids.reshape(h * w, 3)},
        }
        if self.embedded_guidance(teacher.pipe):
            layout["guidance"] = {"kind": "batched", "dtype": "float32"}
        layout["return_dict"] = {"kind": "constant", "value": False}
        return layout

    def decode(self, pipe: Any, latents: Tensor, grid: tuple[int, int]) -> Tensor:
        cfg = pipe.vae.config
        z = unpack_2x2(latents, *grid) / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        return pipe.vae.decode(z, return_dict=False)[0]


#: Qwen-Image's text length when the caller sets none (its pipeline's default).
QWEN_MAX_SEQUENCE_LENGTH = 512


class QwenImageFamily(Family):
    """``QwenImagePipeline``: true CFG through ``true_cfg_scale`` (negative prompt "" by default),
    rescaled to the conditional velocity's norm per token."""

    name = "qwen-image"
    pipeline_classes = ("QwenImagePipeline",)
    transformer_class = "QwenImageTransformer2DModel"
    #: Text length rows are padded to when the teacher sets no ``max_sequence_length``.
    default_text_length = QWEN_MAX_SEQUENCE_LENGTH
    lora_targets = (
        r"transformer_blocks\.\d+\.(img_mlp|txt_mlp)\.net\.(0\.proj|2)"
        r"|time_text_embed\.timestep_embedder\.linear_[12]"
    )

    def default_guidance(self, pipe: Any) -> float:
        return 4.0  # QwenImagePipeline's true_cfg_scale default

    def guidance_kwargs(self, pipe: Any, guidance: float, negative_prompt: str) -> dict[str, Any]:
        return {"true_cfg_scale": guidance, "negative_prompt": negative_prompt}

    def combine(self, cond: Tensor, uncond: Tensor, guidance: float) -> Tensor:
        comb = uncond + guidance * (cond - uncond)
        return comb * (torch.norm(cond, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))

    def embedded_guidance(self, pipe: Any) -> bool:
        return False

    def normalize_call(self, teacher: Any, call: dict[str, Any]) -> dict[str, Any]:
        """Text right-padded to ``max_sequence_length`` with an explicit mask (the pipeline trims to
        the batch's longest prompt and drops an all-ones mask), so every row has one shape."""
        embeds = call["encoder_hidden_states"]
        mask = call.get("encoder_hidden_states_mask")
        batch, length, dim = embeds.shape
        if mask is None:
            mask = torch.ones(batch, length, dtype=torch.long, device=embeds.device)
        full = int(teacher.max_sequence_length or self.default_text_length)
        if length > full:
            raise ArcflowError(f"prompt embeddings of length {length} exceed max_sequence_length {full}")
        pad = full - length
        return {**call, "encoder_hidden_states": torch.cat([embeds, embeds.new_zeros(batch, pad, dim)], 1),
                "encoder_hidden_states_mask": torch.cat([mask, mask.new_zeros(batch, pad)], 1)}

    def legacy_layout(self, teacher: Any, cond: Mapping[str, Tensor]) -> Optional[dict[str, dict[str, Any]]]:
        """Qwen-Image datasets before layouts: padded ``prompt_embeds`` and ``prompt_embeds_mask``."""
        if set(cond) != {"prompt_embeds", "prompt_embeds_mask"}:
            return super().legacy_layout(teacher, cond)
        return {
            "hidden_states": {"kind": "latent"},
            "timestep": {"kind": "timestep"},
            "guidance": {"kind": "constant", "value": None},
            "encoder_hidden_states_mask": {"kind": "batched", "dtype": "bool", "key": "prompt_embeds_mask"},
            "encoder_hidden_states": {"kind": "batched", "dtype": "model", "key": "prompt_embeds"},
            "img_shapes": {"kind": "per_sample", "value": [[1, *teacher.grid]]},
            "attention_kwargs": {"kind": "constant", "value": None},
            "return_dict": {"kind": "constant", "value": False},
        }

    def decode(self, pipe: Any, latents: Tensor, grid: tuple[int, int]) -> Tensor:
        vae = pipe.vae
        cfg = vae.config
        z = unpack_2x2(latents, *grid).unsqueeze(2)  # (B, C, 1, H, W)
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(z.device, z.dtype)
        std = torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(z.device, z.dtype)
        return vae.decode(z * std + mean, return_dict=False)[0][:, :, 0]
