"""Stock diffusers interop: turn a ``FluxPipeline`` / ``QwenImagePipeline`` plus an arcflow run
directory into a 2-NFE generator, and keep other LoRAs working alongside.

    from diffusers import FluxPipeline
    from arcflow.distill.interop import arcflow_pipeline

    pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev", torch_dtype=torch.bfloat16).to("cuda")
    gen = arcflow_pipeline(pipe, "runs/flux-k8")          # LoRA via pipe.load_lora_weights, head swapped
    images = gen(["a red fox in the snow"], seeds=[0])     # (B, 3, H, W) in [0, 1], 2 network calls

    pipe.load_lora_weights("my-style-lora", adapter_name="style")   # any diffusers-format LoRA
    gen.set_adapters({"style": 0.8})                        # arcflow stays at weight 1.0

What happens: the run's ``pytorch_lora_weights.safetensors`` is loaded with the pipeline's own
``load_lora_weights`` (adapter ``"arcflow"``; rank/alpha come from the file's
``lora_adapter_metadata``), the transformer's top-level ``proj_out`` is swapped for the trained
:class:`~arcflow.distill.student.MomentumHead` (the original is kept; :meth:`ArcflowPipeline.remove`
puts it back and deletes the adapter), and sampling runs the analytic momentum integral of
:meth:`~arcflow.distill.student.Student.sample` over the run's recorded segment sigmas (or the
pipeline scheduler's ``nfe``-step schedule at the requested resolution), decoding through the
pipeline's VAE. Prompts are encoded with the pipeline's own ``encode_prompt``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from arcflow.storage.errors import ArcflowError

from .runs import segment_sigmas
from .student import (
    HEAD_ATTRIBUTE,
    MomentumHead,
    Student,
    StudentConfig,
    attach_student,
    read_student_config,
)

logger = logging.getLogger(__name__)

#: Adapter name the arcflow LoRA gets inside the pipeline.
ARCFLOW_ADAPTER = "arcflow"


class ArcflowPipeline:
    """A stock pipeline running as an ArcFlow few-step generator (see the module docstring)."""

    def __init__(self, pipe: Any, student: Student, record: Mapping[str, Any], original_head: nn.Module, adapter_name: Optional[str]):
        self.pipe = pipe
        self.student = student
        self.teacher = student.teacher
        self.record = dict(record)
        self.adapter_name = adapter_name
        self._original_head = original_head
        self._extra_adapters: dict[str, float] = {}

    @property
    def nfe(self) -> int:
        return int(self.student.config.nfe)

    def segment_sigmas(self, nfe: Optional[int] = None) -> Tensor:
        """Segment boundaries: the run's recorded ones for its own NFE, else the scheduler's schedule."""
        return segment_sigmas(self.record, self.teacher, nfe or self.nfe)

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
        self._extra_adapters = dict(others)

    @torch.no_grad()
    def latents(self, prompts: Sequence[str], seeds: Sequence[int], nfe: Optional[int] = None) -> Tensor:
        """Final packed latents ``(B, tokens, channels)``: ``nfe`` network calls."""
        if len(prompts) != len(seeds):
            raise ArcflowError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
        cond = self.teacher.encode_prompts(list(prompts))
        noise = self.teacher.noise(list(seeds))
        sigmas = self.segment_sigmas(nfe)
        return self.student.sample(noise, cond, nfe=len(sigmas) - 1, sigmas=sigmas)

    @torch.no_grad()
    def __call__(self, prompts: Union[str, Sequence[str]], seeds: Optional[Sequence[int]] = None, nfe: Optional[int] = None) -> Tensor:
        """Images ``(B, 3, H, W)`` in [0, 1] (float32, CPU); ``seeds`` default to ``0..B-1``."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        seeds = list(range(len(prompts))) if seeds is None else list(seeds)
        return self.teacher.decode(self.latents(prompts, seeds, nfe))

    def remove(self) -> Any:
        """Restore the pipeline: original ``proj_out`` back, the arcflow adapter deleted."""
        setattr(self.pipe.transformer, HEAD_ATTRIBUTE, self._original_head)
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
) -> ArcflowPipeline:
    """Turn a stock ``FluxPipeline`` / ``QwenImagePipeline`` into an ArcFlow few-step generator.

    ``height``/``width`` default to the resolution the run was trained at (its teacher options).
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
    try:
        proj = attach_student(transformer, run, config, adapter_name=adapter_name)
    except ArcflowError as exc:
        if isinstance(getattr(transformer, HEAD_ATTRIBUTE), MomentumHead):
            raise ArcflowError(f"{exc}; call .remove() on the previous generator") from None
        raise
    used_adapter = adapter_name if config.trainable == "lora+heads" else None
    student = Student(teacher, transformer, config)
    return ArcflowPipeline(pipe, student, record, proj, used_adapter)


def load_arcflow_generator(
    run_dir: Union[str, os.PathLike], device: str = "cpu", torch_dtype: Any = None
) -> ArcflowPipeline:
    """Load the run's own teacher pipeline (hub id or directory from ``arcflow_config.json``, with
    its recorded resolution / guidance options) and wrap it with :func:`arcflow_pipeline`.

    What ``arcflow sample --adapter RUN`` needs for a diffusers teacher."""
    from arcflow.pipeline.registry import load_teacher

    record = read_student_config(run_dir)
    options = dict(record.get("teacher_options", {}) or {})
    options.pop("text_encoders", None)
    if torch_dtype is not None:
        options["torch_dtype"] = torch_dtype
    teacher = load_teacher(record["teacher"]["id"], device=device, **options)
    return arcflow_pipeline(teacher.pipe, run_dir, strict_revision=True)
