"""Stock diffusers interop: a supported pipeline (pipeline/families.py) carrying an arcflow run
samples with its OWN ``__call__`` in NFE network calls, and other LoRAs keep working alongside.

    from diffusers import FluxPipeline
    from arcflow.distill.interop import arcflow_pipeline

    pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", torch_dtype=torch.bfloat16).to("cuda")
    gen = arcflow_pipeline(pipe, "runs/flux-k8")   # LoRA + momentum head on pipe.transformer, ArcFlowScheduler
    image = pipe("a red fox in the snow", num_inference_steps=2, guidance_scale=3.5).images[0]
    image = gen("a red fox in the snow").images[0]  # the same, with the run's steps/size/guidance as defaults

    pipe.load_lora_weights("my-style-lora", adapter_name="style")   # any diffusers-format LoRA
    gen.set_adapters({"style": 0.8})                        # arcflow stays at weight 1.0

What happens: :func:`~arcflow.distill.student.attach_student` loads the run's
``pytorch_lora_weights.safetensors`` with diffusers' ``load_lora_adapter`` (adapter ``"arcflow"``;
rank/alpha come from the file's ``lora_adapter_metadata``), the transformer's top-level
``proj_out`` (or the family's head module) is swapped for the trained
:class:`~arcflow.distill.student.MomentumHead`, and ``pipe.scheduler`` becomes the run's
:class:`~arcflow.distill.arcflow_scheduler.ArcFlowScheduler` (``scheduler_config.json``), whose ``step``
does the exact momentum integral over the run's recorded segment sigmas. Prompt encoding, latents,
callbacks, VAE decode and output types are the pipeline's. The originals are kept:
:meth:`ArcFlowPipeline.remove` puts head and scheduler back and deletes the adapter.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from arcflow.core.errors import ArcflowError

from .student import (
    MomentumHead,
    StudentConfig,
    attach_student,
    check_teacher_revision,
    get_head,
    head_spec,
    load_scheduler,
    read_student_config,
    set_head,
)

logger = logging.getLogger(__name__)

#: Adapter name the arcflow LoRA gets inside the pipeline.
ARCFLOW_ADAPTER = "arcflow"


class ArcFlowPipeline:
    """A stock pipeline carrying a run (see the module docstring); calling it calls the pipeline
    with the run's defaults (steps = NFE, its resolution, guidance and text length)."""

    def __init__(
        self,
        pipe: Any,
        teacher: Any,
        record: Mapping[str, Any],
        originals: tuple[nn.Module, Any],
        adapter_name: Optional[str],
    ) -> None:
        self.pipe = pipe
        self.teacher = teacher
        self.record = dict(record)
        self.adapter_name = adapter_name
        self._original_head, self._original_scheduler = originals

    @property
    def nfe(self) -> int:
        return self.pipe.scheduler.nfe

    def call_defaults(self) -> dict[str, Any]:
        """What ``pipe(...)`` needs to sample as the run was trained: its NFE, resolution and text
        length; no true CFG (the student's one call per segment already carries the guidance) and,
        for guidance-embedding FLUX, the guidance the data was recorded with."""
        from arcflow.pipeline.pipeline_capture import optional_kwargs

        teacher = self.teacher
        defaults: dict[str, Any] = {
            "num_inference_steps": self.nfe,
            "height": teacher.height,
            "width": teacher.width,
            **teacher.family.guidance_kwargs(self.pipe, self.guidance, teacher.negative_prompt),
            **teacher.family.extra_call_kwargs(self.pipe, teacher.height, teacher.width),
        }
        defaults.update(optional_kwargs(self.pipe, {"max_sequence_length": teacher.max_sequence_length}))
        defaults.update(teacher.call_options)
        return defaults

    @property
    def guidance(self) -> float:
        """The guidance the student samples with: embedded guidance as recorded, else 1 (no CFG)."""
        return self.teacher.default_guidance if self.teacher.guidance_embeds else 1.0

    def __call__(self, prompt: Union[str, Sequence[str], None] = None, **kwargs: Any) -> Any:
        """``pipe(prompt, **kwargs)`` with :meth:`call_defaults` filled in; returns the pipeline's output."""
        return self.pipe(prompt=prompt, **{**self.call_defaults(), **kwargs})  # by name: an edit pipeline's first argument is the image

    @torch.no_grad()
    def latents(self, prompts: Sequence[str], seeds: Sequence[int]) -> Tensor:
        """Final latents (scheduler layout) from per-seed noise (as ``arcflow sample`` draws it):
        the stock call with ``output_type="latent"``, NFE network calls. Edit prompts carry their
        reference images (pipeline/edit_inputs.py)."""
        if len(prompts) != len(seeds):
            raise ArcflowError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
        return self.teacher.sample(list(prompts), list(seeds), self.nfe, self.guidance)

    def set_adapters(self, others: Mapping[str, float], arcflow_weight: float = 1.0) -> None:
        """Activate the arcflow adapter plus ``others`` ({adapter name: weight}) on the transformer."""
        names, weights = [], []
        if self.adapter_name is not None:
            names.append(self.adapter_name)
            weights.append(float(arcflow_weight))
        for name, weight in others.items():
            names.append(name)
            weights.append(float(weight))
        self.pipe.set_adapters(names, weights)

    def remove(self) -> Any:
        """Restore the pipeline: original ``proj_out`` and scheduler back, the arcflow adapter deleted."""
        transformer = self.pipe.transformer
        set_head(transformer, head_spec(transformer), self._original_head)
        self.pipe.scheduler = self._original_scheduler
        if self.adapter_name is not None:
            self.pipe.delete_adapters(self.adapter_name)
        return self.pipe


def arcflow_pipeline(
    pipe: Any,
    run_dir: Union[str, os.PathLike],
    *,
    height: Optional[int] = None,
    width: Optional[int] = None,
    adapter_name: str = ARCFLOW_ADAPTER,
    strict_revision: bool = False,
) -> ArcFlowPipeline:
    """Load a run onto a stock pipeline of the run's class: LoRA, momentum head and
    ``pipe.scheduler = ArcFlowScheduler`` from the run directory, in place.

    ``height``/``width`` (the returned wrapper's call defaults) default to the resolution the run
    was trained at (its teacher options).
    The run must have been trained on this pipeline's transformer; a teacher revision mismatch is
    logged (``strict_revision=True`` makes it an error). The pipeline is modified in place.
    """
    from arcflow.pipeline.diffusers_teachers import teacher_from_pipeline

    run = Path(run_dir)
    record = read_student_config(run)
    config = StudentConfig.from_dict(record["student"])
    transformer = pipe.transformer
    expected = record.get("transformer_class")
    if expected is not None and expected != type(transformer).__name__:
        raise ArcflowError(f"run {run} was trained on a {expected}, the pipeline has a {type(transformer).__name__}")
    options = dict(record.get("teacher_options", {}) or {})
    options.pop("torch_dtype", None)
    options.pop("text_encoders", None)
    if height is not None:
        options["height"] = height
    if width is not None:
        options["width"] = width
    teacher_info = record.get("teacher", {})
    teacher = teacher_from_pipeline(pipe, teacher_id=teacher_info.get("id"), revision=None, **options)
    saved = teacher_info.get("revision")
    if saved is not None and saved != teacher.revision:
        message = f"run {run} was trained on teacher revision {saved}, the pipeline is {teacher.revision}"
        if strict_revision:
            raise ArcflowError(message)
        logger.warning(message)
    scheduler = load_scheduler(run, record, teacher)
    try:
        proj = attach_student(transformer, run, config, adapter_name=adapter_name)
    except ArcflowError as exc:
        if isinstance(get_head(transformer, head_spec(transformer).path), MomentumHead):
            raise ArcflowError(f"{exc}; call .remove() on the previous generator") from None
        raise
    used_adapter = adapter_name if config.trainable == "lora+heads" else None
    original_scheduler, pipe.scheduler = pipe.scheduler, scheduler
    return ArcFlowPipeline(pipe, teacher, record, (proj, original_scheduler), used_adapter)


def load_arcflow_generator(
    run_dir: Union[str, os.PathLike], device: str = "cpu", torch_dtype: Any = None
) -> ArcFlowPipeline:
    """Load the run's own teacher pipeline (hub id or directory from ``arcflow_config.json``, with
    its recorded resolution / guidance options) and wrap it with :func:`arcflow_pipeline`.

    What ``arcflow sample --adapter RUN`` needs for a diffusers teacher."""
    from arcflow.pipeline.registry import load_teacher

    record = read_student_config(run_dir)
    check_teacher_revision(run_dir, record)
    options = dict(record.get("teacher_options", {}) or {})
    options.pop("text_encoders", None)
    if torch_dtype is not None:
        options["torch_dtype"] = torch_dtype
    teacher = load_teacher(record["teacher"]["id"], device=device, **options)
    return arcflow_pipeline(teacher.pipe, run_dir, strict_revision=True)
