"""Diffusers teachers: FLUX.1-dev (``FluxPipeline``) and Qwen-Image (``QwenImagePipeline``).

Both load by hub id or local directory through one code path (:func:`load_diffusers_teacher`):
a hub id is first resolved to its local snapshot (``DiffusionPipeline.download``), then the
directory's ``model_index.json`` picks the pipeline class, which ``from_pretrained`` loads.

What each teacher reproduces from its pipeline's ``__call__`` (diffusers 0.42):

* prompts go through the pipeline's own ``encode_prompt`` once; the outputs are the conditioning
  the dataset stores (FLUX: ``prompt_embeds`` ``(B, 512, 4096)`` + ``pooled_prompt_embeds``
  ``(B, 768)``; ``text_ids`` are constant zeros and rebuilt; Qwen-Image: ``prompt_embeds``
  padded to ``max_sequence_length`` + ``prompt_embeds_mask`` (1 = real token));
* latents are the pipeline's packed 2x2-patch tokens, ``latent_shape = (tokens, channels)``, and
  the initial noise for seed ``s`` equals what the pipeline draws with
  ``torch.Generator().manual_seed(s)`` (float32, CPU);
* ``sigmas(steps)`` is the pipeline's scheduler schedule: ``set_timesteps(sigmas=linspace(1, 1/S, S),
  mu=calculate_shift(tokens, ...))``, then the trailing 0 (S+1 values). For the exponential dynamic
  shift FLUX and Qwen-Image use, ``exp(mu) / (exp(mu) + 1/t - 1)`` is exactly the static shift
  ``shift * t / (1 + (shift - 1) t)`` with ``shift = exp(mu)``, so :attr:`shift` is ``exp(mu)``
  at the teacher's resolution and ``shifted_schedule(S, teacher.shift)`` equals ``sigmas(S)`` up to
  float32 rounding; ``sigmas`` stays the reference;
* the network gets ``timestep = (sigma * 1000 in float32 -> model dtype) / 1000`` as the pipeline
  passes ``t / 1000``; the recording sampler's ``x - (s_j - s_{j+1}) u`` is the scheduler's
  ``step`` (``sample + (sigma_next - sigma) * model_output`` in float32);
* guidance: FLUX.1-dev is guidance-distilled (``guidance_embeds``): ONE evaluation per step with a
  ``guidance`` tensor; a FLUX checkpoint without guidance embedding uses true CFG against the
  negative prompt (as ``FluxPipeline``'s ``true_cfg_scale``). Qwen-Image uses true CFG (two halves
  in one batched forward) followed by the pipeline's norm rescale
  ``comb * ||cond|| / ||comb||`` over channels per token;
* ``decode`` unpacks and runs the VAE with the pipeline's scaling/shift (FLUX) or
  latents_mean/std (Qwen-Image) normalisation; images come back in [0, 1].

Options (``load_teacher(id, **options)`` / ``GenerationConfig.teacher_options``): ``height``,
``width`` (default: the pipeline's default, 1024), ``torch_dtype`` ("bfloat16", ...),
``guidance`` (FLUX embedded guidance used when a caller does not pass one, e.g. the student),
``negative_prompt`` (default ""), ``max_sequence_length``, ``text_encoders`` (False: do not load
them; the student never needs them), ``revision`` (hub revision), ``local_files_only``.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from arcflow.pipeline.teacher import Conditioning, Teacher
from arcflow.core.errors import ArcflowError, first_line, quote

#: Pipeline classes (``model_index.json`` ``_class_name``) a diffusers teacher can wrap.
SUPPORTED_PIPELINES = ("FluxPipeline", "QwenImagePipeline")
TORCH_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
#: Samples per VAE decode call.
DECODE_BATCH = 4


def looks_like_hub_id(teacher_id: str) -> bool:
    """``owner/name`` with hub-legal characters (and not an existing local path)."""
    return bool(_HUB_ID.match(teacher_id)) and not os.path.exists(teacher_id)


def pipeline_class_name(directory: str | os.PathLike) -> str:
    """``_class_name`` of a local pipeline directory; ``ArcflowError`` if it is not a supported one."""
    index = Path(directory) / "model_index.json"
    if not index.is_file():
        raise ArcflowError(f"{directory} is not a diffusers pipeline directory (no model_index.json)")
    try:
        name = json.loads(index.read_text()).get("_class_name")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise ArcflowError(f"{index} is not valid JSON: {exc}") from None
    if name not in SUPPORTED_PIPELINES:
        raise ArcflowError(
            f"{directory} holds a {name!r} pipeline; supported teachers: {', '.join(SUPPORTED_PIPELINES)}"
        )
    return name


def resolve_torch_dtype(value: Any) -> Optional[torch.dtype]:
    """``None``, a ``torch.dtype`` or a name ("bfloat16", "bf16", "float16", "float32")."""
    if value is None or isinstance(value, torch.dtype):
        return value
    key = str(value).lower().removeprefix("torch.")
    if key not in TORCH_DTYPES:
        raise ArcflowError(f"unknown torch dtype {quote(value)}; choose one of float32, float16, bfloat16")
    return TORCH_DTYPES[key]


def directory_revision(directory: str | os.PathLike) -> str:
    """Identifies the weights: the hub snapshot commit when the path is a hub-cache snapshot, else a
    sha256 over the transformer's config and weight files (contents when small, sizes otherwise)."""
    path = Path(directory).resolve()
    if path.parent.name == "snapshots":
        return path.name
    digest = hashlib.sha256()
    files = sorted(p for p in (path / "transformer").glob("*") if p.is_file())
    files.append(path / "model_index.json")
    small = sum(p.stat().st_size for p in files) < 256 * 2**20
    for p in files:
        digest.update(p.name.encode())
        digest.update(p.read_bytes() if small else str(p.stat().st_size).encode())
    return digest.hexdigest()[:16]


class DiffusersTeacher(Teacher):
    """Shared machinery of the diffusers teachers; subclasses add the family's conditioning."""

    #: The diffusers pipeline class this teacher wraps.
    pipeline_class: str = ""
    #: The pipelines run CFG only for guidance > 1.
    cfg_below_one = False

    def __init__(
        self,
        pipe: Any,
        *,
        teacher_id: str,
        revision: str,
        height: Optional[int] = None,
        width: Optional[int] = None,
        guidance: Optional[float] = None,
        negative_prompt: str = "",
        max_sequence_length: Optional[int] = None,
        negative_cond: Optional[Conditioning] = None,
    ) -> None:
        self.pipe = pipe
        self.teacher_id = teacher_id
        self.revision = revision
        vsf = int(pipe.vae_scale_factor)
        default = int(getattr(pipe, "default_sample_size", 128)) * vsf
        self.height = int(height) if height is not None else default
        self.width = int(width) if width is not None else default
        unit = vsf * 2
        if self.height < unit or self.width < unit or self.height % unit or self.width % unit:
            raise ArcflowError(
                f"height and width must be positive multiples of {unit} (VAE scale {vsf} x 2x2 packing), "
                f"got {self.height}x{self.width}"
            )
        self.vae_scale_factor = vsf
        self.grid = (self.height // unit, self.width // unit)  # packed token grid
        self.latent_shape = (self.grid[0] * self.grid[1], int(self.transformer.config.in_channels))
        self.negative_prompt = negative_prompt
        self.max_sequence_length = max_sequence_length
        self._negative = negative_cond
        self.mu = self._mu()
        self.shift = self._static_shift()
        self.default_guidance = float(guidance) if guidance is not None else self._default_guidance()

    # ----- schedule -------------------------------------------------------------------------
    def _mu(self) -> Optional[float]:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        cfg = self.pipe.scheduler.config
        if not cfg.get("use_dynamic_shifting", False):
            return None
        return float(
            calculate_shift(
                self.latent_shape[0],
                cfg.get("base_image_seq_len", 256),
                cfg.get("max_image_seq_len", 4096),
                cfg.get("base_shift", 0.5),
                cfg.get("max_shift", 1.15),
            )
        )

    def _static_shift(self) -> float:
        """The static shift equivalent to the scheduler's warp (NaN where none exists)."""
        cfg = self.pipe.scheduler.config
        exotic = any(
            cfg.get(k) for k in ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
                                 "use_beta_sigmas", "invert_sigmas", "stochastic_sampling")
        )
        if exotic:
            return float("nan")
        if self.mu is None:
            return float(cfg.get("shift", 1.0))
        if cfg.get("time_shift_type", "exponential") == "exponential":
            return math.exp(self.mu)
        return float(self.mu)  # linear: mu / (mu + 1/t - 1) is the static shift mu

    def scheduler(self, steps: int):
        """A fresh copy of the pipeline's scheduler set up exactly as the pipeline's ``__call__``."""
        from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps

        if steps < 1:
            raise ArcflowError(f"steps must be >= 1, got {steps}")
        sched = copy.deepcopy(self.pipe.scheduler)
        sigmas = np.linspace(1.0, 1 / steps, steps)
        if getattr(sched.config, "use_flow_sigmas", False):
            sigmas = None
        kwargs = {"mu": self.mu} if self.mu is not None else {}
        retrieve_timesteps(sched, steps, "cpu", sigmas=sigmas, **kwargs)
        return sched

    def sigmas(self, steps: int) -> Tensor:
        """The pipeline scheduler's ``steps + 1`` sigmas (float32 values as float64), ending in 0."""
        sig = self.scheduler(steps).sigmas.to(torch.float32).double()
        if sig.numel() != steps + 1 or float(sig[-1]) != 0.0:
            raise ArcflowError(f"the {self.teacher_id} scheduler does not give a {steps}-step schedule ending at 0")
        return sig

    # ----- latents ------------------------------------------------------------------------------
    @property
    def transformer(self) -> nn.Module:
        return self.pipe.transformer

    def noise(self, seeds: Sequence[int]) -> Tensor:
        """Per-seed packed noise, equal to the pipeline's ``prepare_latents`` with that seed."""
        tokens, channels = self.latent_shape
        h, w = 2 * self.grid[0], 2 * self.grid[1]
        out = []
        for s in seeds:
            gen = torch.Generator().manual_seed(int(s))
            z = torch.randn(self._noise_shape(channels // 4, h, w), generator=gen, dtype=torch.float32)
            out.append(self.pipe._pack_latents(z, 1, channels // 4, h, w)[0])
        return torch.stack(out).to(self.device)

    def _noise_shape(self, c: int, h: int, w: int) -> tuple[int, ...]:
        return (1, c, h, w)

    def timestep(self, sigma: Tensor, batch: int, dtype: torch.dtype) -> Tensor:
        """What the pipeline feeds as ``timestep``: ``t / 1000`` with ``t = sigma * 1000`` in float32."""
        n = float(self.pipe.scheduler.config.get("num_train_timesteps", 1000))
        t = torch.as_tensor(sigma, device=self.device).to(torch.float32).reshape(-1).expand(batch) * n
        return t.to(dtype) / n

    # ----- conditioning -------------------------------------------------------------------------
    def validate_prompts(self, prompts: Sequence[str]) -> None:
        for p in prompts:
            if not isinstance(p, str):
                raise ArcflowError(f"prompts must be strings, got {type(p).__name__}")

    def has_text_encoders(self) -> bool:
        return getattr(self.pipe, "text_encoder", None) is not None

    def _require_text_encoders(self) -> None:
        if not self.has_text_encoders():
            raise ArcflowError(
                f"teacher {self.teacher_id} was loaded without text encoders; it cannot encode prompts"
            )

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        self.validate_prompts(prompts)
        self._require_text_encoders()
        with torch.no_grad():
            return {k: v.to(self.device) for k, v in self._encode(list(prompts)).items()}

    def _encode(self, prompts: list[str]) -> Conditioning:
        raise NotImplementedError

    def negative_conditioning(self) -> Conditioning:
        """The negative prompt's conditioning (batch 1), encoded once and kept."""
        if self._negative is None:
            self._negative = self.encode_prompts([self.negative_prompt])
        return self._negative

    def unconditional(self, cond: Conditioning) -> Conditioning:
        batch = next(iter(cond.values())).shape[0]
        neg = self.negative_conditioning()
        return {k: neg[k].to(cond[k].device, cond[k].dtype).expand(batch, *neg[k].shape[1:]) for k in cond}

    def release_text_encoders(self) -> None:
        """Drop the text encoders (after caching the negative prompt if true CFG needs it)."""
        if self.true_cfg and self._negative is None and self.has_text_encoders():
            self.negative_conditioning()
        for name in ("text_encoder", "text_encoder_2"):
            if getattr(self.pipe, name, None) is not None:
                setattr(self.pipe, name, None)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ----- decode -------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        vae = self.pipe.vae
        if vae is None:
            raise ArcflowError(f"teacher {self.teacher_id} has no VAE to decode with")
        vae_device = next(vae.parameters()).device
        images = []
        for chunk in latents.split(DECODE_BATCH):
            z = self.pipe._unpack_latents(chunk.to(vae_device, vae.dtype), self.height, self.width, self.vae_scale_factor)
            images.append(self._vae_decode(z).float().cpu())
        return (torch.cat(images) / 2 + 0.5).clamp(0, 1)

    def _vae_decode(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What a dataset or run should record about this teacher's set-up."""
        return {
            "pipeline_class": self.pipeline_class,
            "height": self.height,
            "width": self.width,
            "mu": self.mu,
            "shift": self.shift,
            "true_cfg": self.true_cfg,
            "default_guidance": self.default_guidance,
        }


class FluxTeacher(DiffusersTeacher):
    """FLUX.1-dev (or any ``FluxPipeline``): embedded guidance, one evaluation per step.

    Conditioning: ``prompt_embeds`` ``(B, max_sequence_length, 4096)`` (T5, default length 512),
    ``pooled_prompt_embeds`` ``(B, 768)`` (CLIP). Without ``guidance_embeds`` in the transformer
    config the teacher runs true CFG against ``negative_prompt`` as ``FluxPipeline`` does with
    ``true_cfg_scale``.
    """

    pipeline_class = "FluxPipeline"

    def __init__(self, pipe: Any, **kwargs: Any) -> None:
        self.guidance_embeds = bool(pipe.transformer.config.get("guidance_embeds", False))
        self.true_cfg = not self.guidance_embeds
        super().__init__(pipe, **kwargs)
        if self.max_sequence_length is None:
            self.max_sequence_length = 512

    def _default_guidance(self) -> float:
        return 3.5 if self.guidance_embeds else 1.0

    def _encode(self, prompts: list[str]) -> Conditioning:
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length
        )
        return {"prompt_embeds": embeds.to(self.dtype), "pooled_prompt_embeds": pooled.to(self.dtype)}

    def transformer_inputs(self, x: Tensor, sigma: Tensor, cond: Mapping[str, Tensor], guidance: Optional[float] = None) -> dict:
        device, dtype = self.device, self.dtype
        batch = x.shape[0]
        embeds = cond["prompt_embeds"].to(device, dtype)
        kwargs = {
            "hidden_states": x.to(device, dtype),
            "timestep": self.timestep(sigma, batch, dtype),
            "pooled_projections": cond["pooled_prompt_embeds"].to(device, dtype),
            "encoder_hidden_states": embeds,
            "txt_ids": torch.zeros(embeds.shape[1], 3, device=device, dtype=dtype),
            "img_ids": self.pipe._prepare_latent_image_ids(batch, self.grid[0], self.grid[1], device, dtype),
            "return_dict": False,
        }
        if self.guidance_embeds:
            g = self.default_guidance if guidance is None else float(guidance)
            kwargs["guidance"] = torch.full([1], g, device=device, dtype=torch.float32).expand(batch)
        return kwargs

    def velocity(self, x: Tensor, sigma: Tensor, cond: Mapping[str, Tensor], guidance: float) -> Tensor:
        if self.guidance_embeds:  # guidance-distilled: the scale is an input, one evaluation
            return self.transformer(**self.transformer_inputs(x, sigma, cond, guidance))[0]
        if guidance <= 1.0:
            return self.conditional_velocity(x, sigma, cond)
        return super().velocity(x, sigma, cond, guidance)

    def _vae_decode(self, z: Tensor) -> Tensor:
        cfg = self.pipe.vae.config
        z = z / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        return self.pipe.vae.decode(z, return_dict=False)[0]


class QwenImageTeacher(DiffusersTeacher):
    """Qwen-Image: true CFG (cond + negative in one batched forward) with the pipeline's norm rescale.

    Conditioning: ``prompt_embeds`` ``(B, L, 3584)`` right-padded with zeros to
    ``L = max_sequence_length`` (default 512) and ``prompt_embeds_mask`` ``(B, L)`` (1 = token),
    so every sample has the same stored shape; the transformer masks the padding.
    """

    pipeline_class = "QwenImagePipeline"
    true_cfg = True

    def __init__(self, pipe: Any, **kwargs: Any) -> None:
        super().__init__(pipe, **kwargs)
        if self.max_sequence_length is None:
            self.max_sequence_length = 512

    def _default_guidance(self) -> float:
        return 4.0  # QwenImagePipeline's true_cfg_scale default

    def _encode(self, prompts: list[str]) -> Conditioning:
        embeds, mask = self.pipe.encode_prompt(
            prompt=prompts, device=self.device, max_sequence_length=self.max_sequence_length
        )
        return self.pad_conditioning(embeds, mask)

    def pad_conditioning(self, embeds: Tensor, mask: Optional[Tensor]) -> Conditioning:
        """Right-pad ``(B, L_b, D)`` embeddings (and their mask; None = all tokens) to the fixed length."""
        batch, length, dim = embeds.shape
        if mask is None:
            mask = torch.ones(batch, length, dtype=torch.long, device=embeds.device)
        full = int(self.max_sequence_length)
        if length > full:
            raise ArcflowError(f"prompt embeddings of length {length} exceed max_sequence_length {full}")
        pad = full - length
        embeds = torch.cat([embeds, embeds.new_zeros(batch, pad, dim)], 1)
        mask = torch.cat([mask, mask.new_zeros(batch, pad)], 1)
        return {"prompt_embeds": embeds.to(self.dtype), "prompt_embeds_mask": mask.to(self.dtype)}

    def _noise_shape(self, c: int, h: int, w: int) -> tuple[int, ...]:
        return (1, 1, c, h, w)  # the pipeline draws (B, 1, C, H, W) and packs it

    def transformer_inputs(self, x: Tensor, sigma: Tensor, cond: Mapping[str, Tensor]) -> dict:
        device, dtype = self.device, self.dtype
        batch = x.shape[0]
        return {
            "hidden_states": x.to(device, dtype),
            "timestep": self.timestep(sigma, batch, dtype),
            "guidance": None,
            "encoder_hidden_states_mask": cond["prompt_embeds_mask"].to(device) > 0.5,
            "encoder_hidden_states": cond["prompt_embeds"].to(device, dtype),
            "img_shapes": [[(1, self.grid[0], self.grid[1])]] * batch,
            "return_dict": False,
        }

    def velocity(self, x: Tensor, sigma: Tensor, cond: Mapping[str, Tensor], guidance: float) -> Tensor:
        """As ``QwenImagePipeline``: CFG only for guidance > 1, then rescale to the conditional norm."""
        if guidance <= 1.0:
            return self.conditional_velocity(x, sigma, cond)
        uncond = self.unconditional(dict(cond))
        both = {k: torch.cat([cond[k].to(uncond[k].device), uncond[k]]) for k in cond}
        u = self.conditional_velocity(torch.cat([x, x]), torch.cat([sigma, sigma]), both)
        u_cond, u_uncond = u.chunk(2)
        comb = u_uncond + guidance * (u_cond - u_uncond)
        cond_norm = torch.norm(u_cond, dim=-1, keepdim=True)
        comb_norm = torch.norm(comb, dim=-1, keepdim=True)
        return comb * (cond_norm / comb_norm)

    def _vae_decode(self, z: Tensor) -> Tensor:
        vae = self.pipe.vae
        cfg = vae.config
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(z.device, z.dtype)
        inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(z.device, z.dtype)
        z = z / inv_std + mean
        return vae.decode(z, return_dict=False)[0][:, :, 0]


TEACHER_CLASSES = {"FluxPipeline": FluxTeacher, "QwenImagePipeline": QwenImageTeacher}


def teacher_from_pipeline(pipe: Any, teacher_id: Optional[str] = None, revision: Optional[str] = None, **options: Any) -> DiffusersTeacher:
    """Wrap an already loaded ``FluxPipeline`` / ``QwenImagePipeline`` (e.g. a user's own ``pipe``)."""
    name = type(pipe).__name__
    if name not in TEACHER_CLASSES:
        raise ArcflowError(f"unsupported pipeline class {name}; supported: {', '.join(SUPPORTED_PIPELINES)}")
    source = teacher_id or str(pipe.config.get("_name_or_path", name))
    if revision is None:
        revision = directory_revision(source) if os.path.isdir(source) else "unknown"
    return TEACHER_CLASSES[name](pipe, teacher_id=source, revision=revision, **options)


def _resolve_directory(teacher_id: str, revision: Optional[str], local_files_only: bool) -> str:
    if os.path.isdir(teacher_id):
        return os.path.abspath(teacher_id)
    if not looks_like_hub_id(teacher_id):
        raise ArcflowError(f"teacher {quote(teacher_id)} is neither a local pipeline directory nor a hub id (owner/name)")
    from diffusers import DiffusionPipeline

    try:
        return str(DiffusionPipeline.download(teacher_id, revision=revision, local_files_only=local_files_only))
    except Exception as exc:  # noqa: BLE001 - hub/network errors come in many types
        first = first_line(exc)
        raise ArcflowError(f"could not fetch teacher {quote(teacher_id)} from the hub: {first}") from None


def load_diffusers_teacher(
    teacher_id: str,
    device: str | torch.device = "cpu",
    *,
    height: Optional[int] = None,
    width: Optional[int] = None,
    torch_dtype: Any = None,
    guidance: Optional[float] = None,
    negative_prompt: str = "",
    max_sequence_length: Optional[int] = None,
    text_encoders: bool = True,
    revision: Optional[str] = None,
    local_files_only: bool = False,
) -> DiffusersTeacher:
    """Load a FLUX / Qwen-Image teacher by hub id or local directory (see the module docstring)."""
    import diffusers

    directory = _resolve_directory(teacher_id, revision, local_files_only)
    class_name = pipeline_class_name(directory)
    dtype = resolve_torch_dtype(torch_dtype)
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    if not text_encoders:
        for name in ("text_encoder", "tokenizer") + (("text_encoder_2", "tokenizer_2") if class_name == "FluxPipeline" else ()):
            kwargs[name] = None
    try:
        with warnings.catch_warnings():  # diffusers >= 0.41 renames torch_dtype to dtype; both work
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = getattr(diffusers, class_name).from_pretrained(directory, **kwargs)
    except Exception as exc:  # noqa: BLE001
        first = first_line(exc)
        raise ArcflowError(f"could not load {class_name} from {directory}: {first}") from None
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.requires_grad_(False).eval()
    source = teacher_id if looks_like_hub_id(teacher_id) else directory
    return TEACHER_CLASSES[class_name](
        pipe,
        teacher_id=source,
        revision=directory_revision(directory),
        height=height,
        width=width,
        guidance=guidance,
        negative_prompt=negative_prompt,
        max_sequence_length=max_sequence_length,
    )
