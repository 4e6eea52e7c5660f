"""Diffusers teachers: any supported flow-matching pipeline, driven through its own ``__call__``.

Every teacher loads by hub id or local directory through one code path (:func:`load_diffusers_teacher`):
a hub id is first resolved to its local snapshot (``DiffusionPipeline.download``), then the
directory's ``model_index.json`` picks the pipeline class, which ``from_pretrained`` loads.

:class:`DiffusersTeacher` records, samples and encodes by calling the pipeline itself
(pipeline/pipeline_capture.py): the latents, the schedule, CFG, reference images and the
conditioning are the pipeline's. What differs between pipeline classes is small and lives in
pipeline/families.py (timestep mapping, output sign and reference tokens, head module, noise
layout, decode, default LoRA targets).

Options (``load_teacher(id, **options)`` / ``GenerationConfig.teacher_options``): ``height``,
``width`` (default: the pipeline's default), ``torch_dtype`` ("bfloat16", ...), ``guidance``
(used when a caller does not pass one, e.g. the student), ``negative_prompt`` (default ""),
``max_sequence_length``, ``text_encoders`` (False: do not load them; the student never needs
them), ``conditioning_layout`` (how stored conditioning replays; datasets record it),
``call_options`` (more ``__call__`` arguments passed on every call, JSON values),
``revision`` (hub revision), ``local_files_only``.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import os
import re
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn

from tqdm.auto import tqdm

from arcflow.core.errors import ArcflowError, clip, first_line, json_object, quote

from .call_options import check_call_options
from .conditioning_layout import REFERENCE_KEY, Layout, replay, split_call, stored_key
from .edit_inputs import check_prompt_length, load_image, parse_prompt
from .families import Family, family_for
from .pipeline_capture import optional_kwargs, run_pipeline
from .recording import chunks, pad
from .teacher import Conditioning, Teacher

#: Steps at which a teacher's static ``shift`` is quoted (schedules whose mu depends on the step
#: count, FLUX.2's, use it; the sampler itself always uses the pipeline's schedule for its steps).
REFERENCE_STEPS = 50
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
        raise ArcflowError(f"{clip(directory)} is not a diffusers pipeline directory (no model_index.json)")
    name = json_object(index.read_bytes(), index).get("_class_name")
    if not isinstance(name, str):
        raise ArcflowError(f"{index} names no pipeline class (_class_name)")
    family_for(name)
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
    """Any diffusers flow-matching pipeline as a teacher, driven through its own ``__call__``.

    Sampling and recording call the pipeline (``output_type="latent"``) with a
    :class:`~arcflow.pipeline.pipeline_capture.StepRecorder` in place of its scheduler; encoding
    prompts calls it with the transformer stubbed out. The conditional transformer call's arguments
    become the stored conditioning (:mod:`~arcflow.pipeline.conditioning_layout`), and
    :meth:`transformer_inputs` replays them for the student. What differs between pipeline classes
    is the :class:`~arcflow.pipeline.families.Family`.
    """

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
        conditioning_layout: Optional[Layout] = None,
        call_options: Optional[Mapping[str, Any]] = None,
        family: Optional[Family] = None,
    ) -> None:
        self.pipe = pipe
        self.pipeline_class = type(pipe).__name__
        self.family = family or family_for(self.pipeline_class)
        self.call_options = check_call_options(type(pipe), call_options)
        check_drivable(pipe, self.family, self.call_options)
        self.teacher_id = teacher_id
        self.revision = revision
        default = self.family.default_size(pipe)
        self.height = int(height) if height is not None else default
        self.width = int(width) if width is not None else default
        unit = self.family.size_unit(pipe)
        if self.height < unit or self.width < unit or self.height % unit or self.width % unit:
            raise ArcflowError(
                f"height and width must be positive multiples of {unit} for a {self.pipeline_class}, "
                f"got {self.height}x{self.width}"
            )
        self.grid = self.family.grid(pipe, self.height, self.width)
        self.latent_shape = tuple(self.family.latent_shape(pipe, self.height, self.width))
        self.guidance_embeds = self.family.embedded_guidance(pipe)
        self.true_cfg = not self.guidance_embeds
        self.cfg_below_one = self.family.cfg_below_one
        self.negative_prompt = negative_prompt
        self.max_sequence_length = max_sequence_length
        self.layout: Optional[Layout] = dict(conditioning_layout) if conditioning_layout else None
        self._negative: Optional[Conditioning] = None
        self._reference_tokens: Optional[int] = None
        self.mu = self.family.mu(pipe, self.latent_shape[0], REFERENCE_STEPS)
        self.shift = self.family.static_shift(pipe, self.mu)
        self.default_guidance = float(guidance) if guidance is not None else self.family.default_guidance(pipe)

    # ----- schedule -------------------------------------------------------------------------
    def scheduler(self, steps: int) -> Any:
        """A copy of the pipeline's scheduler set up for ``steps`` as its ``__call__`` does."""
        if steps < 1:
            raise ArcflowError(f"steps must be >= 1, got {steps}")
        sched = copy.deepcopy(self.pipe.scheduler)
        self.family.set_timesteps(self.pipe, sched, steps, self.latent_shape[0])
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
        """Per-seed noise in the scheduler's layout, equal to what the pipeline draws for that seed."""
        out = [self.family.noise(self.pipe, self.latent_shape, self.grid, int(s)) for s in seeds]
        return torch.stack(out).to(self.device)

    # ----- calling the pipeline ---------------------------------------------------------------
    def validate_prompts(self, prompts: Sequence[str]) -> None:
        for p in prompts:
            if not isinstance(p, str):
                raise ArcflowError(f"prompts must be strings, got {type(p).__name__}")
        for p in prompts:
            check_prompt_length(parse_prompt(p)[0], "prompt")
        edits = [bool(parse_prompt(p)[1]) for p in prompts]
        if self.family.edit and not all(edits):
            raise ArcflowError(
                f"a {self.pipeline_class} edits images: every prompt needs one "
                "(a JSON Lines prompts file with \"image\", or sample --image)"
            )
        if not (self.family.edit or self.family.images_optional) and any(edits):
            raise ArcflowError(f"a {self.pipeline_class} takes no reference images; drop \"image\" from the prompts")

    def has_text_encoders(self) -> bool:
        return getattr(self.pipe, "text_encoder", None) is not None

    def prompt_kwargs(self, texts: list[str]) -> dict[str, Any]:
        """How prompts reach ``__call__`` (benchmarks' stand-in teachers pass embeddings instead)."""
        if not self.has_text_encoders():
            raise ArcflowError(f"teacher {self.teacher_id} was loaded without text encoders; it cannot encode prompts")
        return {"prompt": texts}

    def _call_kwargs(self, texts: list[str], images: list[str], latents: Tensor, steps: int, guidance: float) -> dict:
        kwargs = {
            **self.prompt_kwargs(texts),
            "height": self.height,
            "width": self.width,
            "num_inference_steps": steps,
            "latents": self.family.latents_argument(latents.to(self.device), self.grid),
            "output_type": "latent",
            **self.family.guidance_kwargs(self.pipe, guidance, self.negative_prompt),
            **self.family.extra_call_kwargs(self.pipe, self.height, self.width),
        }
        extra = {"max_sequence_length": self.max_sequence_length}
        if images:
            extra["image"] = self.family.prepare_images([load_image(p) for p in images], self.height, self.width)
        kwargs.update(optional_kwargs(self.pipe, extra))
        kwargs.update(self.call_options)
        if "negative_prompt_embeds" in kwargs:  # a subclass passing embeddings sets the negative too
            kwargs.pop("negative_prompt", None)
        return self.family.complete_call(kwargs, len(texts))

    def _groups(self, prompts: Sequence[str]) -> list[tuple[list[int], list[str], list[str]]]:
        """Rows sharing one reference-image set, called together (at most the family's
        ``max_prompts_per_call`` per call): ``(indices, texts, images)``."""
        groups: dict[tuple[str, ...], tuple[list[int], list[str]]] = {}
        for i, p in enumerate(prompts):
            text, images = parse_prompt(p)
            rows, texts = groups.setdefault(tuple(images), ([], []))
            rows.append(i)
            texts.append(text)
        size = self.family.max_prompts_per_call
        return [(rows[i:i + (size or len(rows))], texts[i:i + (size or len(rows))], list(images))
                for images, (rows, texts) in groups.items() for i in range(0, len(rows), size or len(rows))]

    def _run(self, prompts: Sequence[str], latents: Tensor, steps: int, guidance: float, *, stub: bool = False,
             record: bool = True):
        """Call the pipeline per image group; yields ``(rows, capture)``."""
        self.validate_prompts(prompts)
        for rows, texts, images in self._groups(prompts):
            kwargs = self._call_kwargs(texts, images, latents[rows], steps, guidance)
            yield rows, run_pipeline(self.pipe, kwargs, self.family.latent_arg, stub=stub, record=record)

    def _conditioning(self, capture: Any, batch: int) -> Conditioning:
        """Stored tensors of the conditional call (and the layout, checked against the teacher's)."""
        call = self.family.normalize_call(self, self.family.conditional_call(capture.calls, batch))
        tensors, layout = split_call(call, batch, self.latent_shape[0], self.family.latent_arg,
                                     self.family.timestep_arg, self.dtype, self.family.shared_args)
        if self.layout is None:
            self.layout = layout
        elif layout != self.layout:
            raise ArcflowError(
                f"the {self.pipeline_class} conditioning changed shape between calls "
                f"({sorted(layout)} vs {sorted(self.layout)}); reference images must all give the same token count"
            )
        if REFERENCE_KEY in tensors:  # every prompt's reference tokens are stored in one array
            tokens = int(tensors[REFERENCE_KEY].shape[1])
            if self._reference_tokens is None:
                self._reference_tokens = tokens
            elif tokens != self._reference_tokens:
                raise ArcflowError(
                    f"the {self.pipeline_class} reference images give {tokens} tokens here and {self._reference_tokens} "
                    "before; every prompt needs as many reference images"
                )
        return tensors

    def _tokens(self, latents: Tensor) -> Tensor:
        """Scheduler-layout latents of the pipeline -> arcflow's layout (the family's)."""
        return self.family.tokens(latents, self.grid)

    def _check_schedule(self, sigmas: list[float], steps: int) -> None:
        expected = self.sigmas(steps).tolist()
        if len(sigmas) != len(expected) or any(abs(a - b) > 1e-6 for a, b in zip(sigmas, expected)):
            raise ArcflowError(f"the {self.pipeline_class} ran sigmas {sigmas[:3]}..., arcflow expected {expected[:3]}...")

    def _chunk_runs(self, prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance: Optional[float],
                    micro_batch: Optional[int], progress: bool, record: bool):
        """The pipeline over ``prompts`` / ``seeds`` in micro-batches of exactly ``micro_batch`` rows
        (the last padded, as the built-in sampler does: pipeline/recording.py); yields per chunk
        ``(start, stop, padded rows, (rows, capture) pairs)``, each call's step count checked."""
        g = self.default_guidance if guidance is None else float(guidance)
        noise = self.noise(seeds)

        def checked(runs):
            for rows, capture in runs:
                if capture.steps != steps:
                    raise ArcflowError(f"the {self.pipeline_class} made {capture.steps} scheduler steps, not {steps}")
                yield rows, capture

        for start, stop in tqdm(chunks(len(prompts), micro_batch), desc="teacher sampling", unit="chunk",
                                disable=None if progress else True):
            padded = pad(list(prompts[start:stop]), micro_batch)
            yield start, stop, len(padded), checked(self._run(padded, pad(noise[start:stop], micro_batch), steps, g,
                                                              record=record))

    def record(self, prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance: Optional[float] = None,
               micro_batch: Optional[int] = None, progress: bool = False) -> tuple[Tensor, Tensor, Tensor, Conditioning]:
        """The pipeline's own sampler over ``prompts`` / ``seeds``, every state and velocity kept.

        Returns ``x`` ``[B, S+1, *latent]``, ``u`` ``[B, S, *latent]``, ``sigmas`` ``[S+1]`` and the
        conditioning (float32, CPU), with the format's Euler relation exact in float32.
        """
        xs, us, conds = [], [], []
        sigmas: list[float] = []
        for start, stop, size, runs in self._chunk_runs(prompts, seeds, steps, guidance, micro_batch, progress, True):
            x = torch.empty((size, steps + 1, *self.latent_shape))
            u = torch.empty((size, steps, *self.latent_shape))
            cond: dict[str, Tensor] = {}
            for rows, capture in runs:
                sigmas = capture.sigmas
                x[rows] = torch.stack([self._tokens(t) for t in capture.states], 1).reshape(
                    len(rows), steps + 1, *self.latent_shape).cpu()
                u[rows] = torch.stack([self._tokens(t) for t in capture.velocities], 1).reshape(
                    len(rows), steps, *self.latent_shape).cpu()
                for k, v in self._conditioning(capture, len(rows)).items():
                    cond.setdefault(k, torch.empty((size, *v.shape[1:]), dtype=torch.float32))[rows] = v.float().cpu()
            self._check_schedule(sigmas, steps)
            n = stop - start
            xs.append(x[:n])
            us.append(u[:n])
            conds.append({k: v[:n] for k, v in cond.items()})
        return (torch.cat(xs), torch.cat(us), torch.tensor(sigmas, dtype=torch.float32),
                {k: torch.cat([c[k] for c in conds]) for k in conds[0]})

    def sample(self, prompts: Sequence[str], seeds: Sequence[int], steps: int, guidance: Optional[float] = None,
               micro_batch: Optional[int] = None, progress: bool = False) -> Tensor:
        """Final latents ``[B, *latent]`` (scheduler layout, float32) of the pipeline's own call with
        whatever scheduler it holds: the teacher's, or a student's ``ArcFlowScheduler``."""
        out = torch.empty((len(prompts), *self.latent_shape))
        for start, stop, size, runs in self._chunk_runs(prompts, seeds, steps, guidance, micro_batch, progress, False):
            final = torch.empty((size, *self.latent_shape))
            for rows, capture in runs:
                final[rows] = self._tokens(capture.final).reshape(len(rows), *self.latent_shape).cpu()
            out[start:stop] = final[: stop - start]
        return out

    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        """The stored conditioning of ``prompts``: the pipeline prepares it, the transformer never runs."""
        prompts = list(prompts)
        latents = self.noise([0] * len(prompts))
        out: dict[str, Tensor] = {}
        # Two steps, not one: a one-step schedule is degenerate for some schedulers (shift_terminal).
        for rows, capture in self._run(prompts, latents, 2, self.default_guidance, stub=True):
            for k, v in self._conditioning(capture, len(rows)).items():
                out.setdefault(k, torch.empty((len(prompts), *v.shape[1:]), dtype=v.dtype, device=self.device))[rows] = v
        return out

    # ----- the network --------------------------------------------------------------------------
    def transformer_inputs(self, x: Tensor, sigma: Tensor, cond: Mapping[str, Tensor]) -> dict:
        """Keyword arguments of the conditional transformer call at latents ``x`` and per-sample ``sigma``."""
        layout = self._layout_for(cond)
        guidance = layout.get(self.family.guidance_arg, {})
        if guidance.get("kind") == "batched" and stored_key(layout, self.family.guidance_arg) not in cond:
            cond = {**cond, stored_key(layout, self.family.guidance_arg): torch.full((x.shape[0],), self.default_guidance)}
        timestep = self.family.timestep(self.pipe, torch.as_tensor(sigma, device=self.device).reshape(-1).expand(x.shape[0]),
                                        self.dtype)
        kwargs = replay(layout, x, timestep, cond, self.dtype, self.device,
                        lambda hidden: self.family.latent_input(hidden, self.grid))
        return self.family.replayed(kwargs)

    def _layout_for(self, cond: Mapping[str, Tensor]) -> Layout:
        """The teacher's layout; else an older dataset's (by its keys); else one learnt from the
        pipeline on an empty prompt (text-to-image pipelines with their text encoders)."""
        if self.layout is None:
            legacy = self.family.legacy_layout(self, cond)
            if legacy is not None:
                return legacy
            if self.family.edit or not self.has_text_encoders():
                raise ArcflowError(f"no conditioning layout for this {self.pipeline_class} teacher; "
                                   "load it with the dataset's or run's conditioning_layout option")
            self.encode_prompts([""])
        return self.layout

    def network_output(self, output: Any, tokens: int) -> Tensor:
        """The transformer's output for the sample's own tokens (reference tokens cut off)."""
        return self.family.network_output(output, tokens)

    def conditional_velocity(self, x: Tensor, sigma: Tensor, cond: Mapping[str, Tensor]) -> Tensor:
        out = self.transformer(**self.transformer_inputs(x, sigma, cond))
        return self.family.velocity(self.network_output(out, x.shape[1]))

    def velocity(self, x: Tensor, sigma: Tensor, cond: Mapping[str, Tensor], guidance: float,
                 plain_cfg: bool = False) -> Tensor:
        """The guided velocity as the pipeline computes it: embedded guidance as an input, true CFG
        (guidance > 1) from the conditional and negative-prompt calls combined as the family does
        (``plain_cfg``: as ``uncond + g (cond - uncond)``, without e.g. Qwen-Image's norm rescale)."""
        if self.guidance_embeds:
            key = stored_key(self._layout_for(cond), self.family.guidance_arg)
            cond = {**cond, key: torch.full((x.shape[0],), float(guidance), device=self.device)}
            return self.conditional_velocity(x, sigma, cond)
        if guidance <= 1.0:
            return self.conditional_velocity(x, sigma, cond)
        uncond = self.unconditional(dict(cond))
        both = {k: torch.cat([cond[k].to(self.device), uncond[k].to(self.device)]) for k in cond}
        u = self.conditional_velocity(torch.cat([x, x]), torch.cat([sigma, sigma]), both)
        u_cond, u_uncond = u.chunk(2)
        if plain_cfg:
            return u_uncond + guidance * (u_cond - u_uncond)
        return self.family.combine(u_cond, u_uncond, guidance)

    def negative_conditioning(self) -> Conditioning:
        """The negative prompt's conditioning (batch 1), prepared once and kept."""
        if self._negative is None:
            if self.family.edit:
                raise ArcflowError(f"true CFG outside the {self.pipeline_class}'s own sampler is not supported for edit pipelines")
            self._negative = self.encode_prompts([self.negative_prompt])
        return self._negative

    def unconditional(self, cond: Conditioning) -> Conditioning:
        """``cond`` with its per-sample (text) tensors replaced by the negative prompt's."""
        batch = next(iter(cond.values())).shape[0]
        neg = self.negative_conditioning()
        layout = self.layout or {}
        text = {stored_key(layout, arg) for arg, e in layout.items()
                if e["kind"] == "batched" and arg != self.family.guidance_arg}
        out = dict(cond)
        for k, v in neg.items():
            if k in text:
                out[k] = v.to(cond[k].device, cond[k].dtype).expand(batch, *v.shape[1:])
        return out

    def release_text_encoders(self) -> None:
        """Drop the text encoders (after caching the negative prompt if true CFG needs it)."""
        if self.true_cfg and self._negative is None and self.has_text_encoders() and not self.family.edit:
            self.negative_conditioning()
        for name in text_component_names(self.pipe.config):
            if getattr(self.pipe, name, None) is not None:
                setattr(self.pipe, name, None)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ----- decode -------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        vae = getattr(self.pipe, "vae", None)
        if vae is None:
            raise ArcflowError(f"teacher {self.teacher_id} has no VAE to decode with")
        vae_device = next(vae.parameters()).device
        images = []
        for chunk in latents.split(DECODE_BATCH):
            images.append(self.family.decode(self.pipe, chunk.to(vae_device, vae.dtype), self.grid).float().cpu())
        return (torch.cat(images) / 2 + 0.5).clamp(0, 1)


def check_drivable(pipe: Any, family: Family, call_options: Optional[Mapping[str, Any]] = None) -> None:
    """``ArcflowError`` naming the class unless arcflow can drive ``pipe``: a deterministic
    flow-matching Euler scheduler and a linear output projection where the family expects it."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    name = type(pipe).__name__
    scheduler = getattr(pipe, "scheduler", None)
    if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        raise ArcflowError(f"arcflow cannot drive a {name}: its scheduler is a {type(scheduler).__name__}, "
                           "not a FlowMatchEulerDiscreteScheduler")
    if scheduler.config.get("stochastic_sampling", False):
        raise ArcflowError(f"arcflow cannot drive a {name}: its scheduler samples stochastically (stochastic_sampling)")
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        raise ArcflowError(f"arcflow cannot drive a {name}: it has no transformer")
    try:
        head = transformer.get_submodule(family.head_module)
    except AttributeError:
        head = None
    if not isinstance(head, nn.Linear) and type(head).__name__ != "MomentumHead":
        raise ArcflowError(f"arcflow cannot drive a {name}: its transformer has no linear output projection "
                           f"{family.head_module!r} to replace")
    reason = family.undrivable(pipe, dict(call_options or {}))
    if reason:
        raise ArcflowError(f"arcflow cannot drive a {name}: {reason}")


def text_component_names(config: Mapping[str, Any]) -> list[str]:
    """A pipeline's text-side components (encoders, tokenizers, processors) by their config names."""
    return [k for k in config if k.startswith(("text_encoder", "tokenizer")) or k == "processor"]


def teacher_from_pipeline(pipe: Any, teacher_id: Optional[str] = None, revision: Optional[str] = None, **options: Any) -> DiffusersTeacher:
    """Wrap an already loaded pipeline (e.g. a user's own ``pipe``) of a supported class."""
    name = type(pipe).__name__
    family_for(name)
    source = teacher_id or str(pipe.config.get("_name_or_path", name))
    if revision is None:
        revision = directory_revision(source) if os.path.isdir(source) else "unknown"
    return DiffusersTeacher(pipe, teacher_id=source, revision=revision, **options)


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
    conditioning_layout: Optional[Layout] = None,
    call_options: Optional[Mapping[str, Any]] = None,
    revision: Optional[str] = None,
    local_files_only: bool = False,
) -> DiffusersTeacher:
    """Load a teacher by hub id or local pipeline directory (see the module docstring)."""
    import diffusers

    directory = _resolve_directory(teacher_id, revision, local_files_only)
    class_name = pipeline_class_name(directory)
    dtype = resolve_torch_dtype(torch_dtype)
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    if not text_encoders:
        index = Path(directory) / "model_index.json"
        for name in text_component_names(json_object(index.read_bytes(), index)):
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
    return DiffusersTeacher(
        pipe,
        teacher_id=source,
        revision=directory_revision(directory),
        height=height,
        width=width,
        guidance=guidance,
        negative_prompt=negative_prompt,
        max_sequence_length=max_sequence_length,
        conditioning_layout=conditioning_layout,
        call_options=call_options,
    )
