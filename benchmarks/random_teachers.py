"""Random-weight FLUX.1-dev / Qwen-Image teachers at the real sizes, for GPU scale measurements.

``random-flux-dev`` and ``random-qwen-image`` are the real diffusers transformer classes with the
published configurations (FLUX.1-dev: 19 double + 38 single blocks, 24 heads x 128, T5 512x4096 +
pooled 768, embedded guidance; Qwen-Image: 60 blocks, 24 heads x 128, 3584-dim text, true CFG) and
the real scheduler configurations, driven through their pipelines' ``__call__`` by the same
:class:`DiffusersTeacher` code the hub models use. Their weights are random: they cost the same
compute and memory per call as the real ones and nothing else about them is meaningful. No file
is read or written: the model is built on the meta device, allocated with ``to_empty`` on the
target device and filled in place.

Prompts are "encoded" into random embeddings of the stored shapes, seeded by the prompt text, so
every sample is reproducible. ``reduced=True`` swaps in a few narrow blocks (same classes and code
paths) so the whole measurement runs on a CPU in seconds.

Not part of the product's teacher registry: the builder gets them as ``RandomTeacherFactory(id)``.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import ray.cloudpickle
import torch
from torch import nn

from arcflow.pipeline.diffusers_teachers import DiffusersTeacher, resolve_torch_dtype

# This module is not installed: Ray ships its classes to the workers by value, so they need no
# benchmarks/ directory on their import path.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

#: Published transformer configurations (diffusers config fields).
FLUX_DEV_CONFIG: dict[str, Any] = dict(
    patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
    attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
    guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)
QWEN_IMAGE_CONFIG: dict[str, Any] = dict(
    patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56),
)
#: The reduced stand-ins for CPU smoke runs: same classes, a few narrow blocks.
REDUCED_OVERRIDES: dict[str, dict[str, Any]] = {
    "flux": dict(num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                 joint_attention_dim=64, pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)),
    "qwen": dict(num_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64,
                 axes_dims_rope=(4, 6, 6)),
}
#: The hub models' scheduler configurations (FlowMatchEulerDiscreteScheduler).
FLUX_SCHEDULER_CONFIG: dict[str, Any] = dict(
    base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, num_train_timesteps=1000,
    shift=3.0, use_dynamic_shifting=True,
)
QWEN_SCHEDULER_CONFIG: dict[str, Any] = dict(
    base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, num_train_timesteps=1000,
    shift=1.0, time_shift_type="exponential", use_dynamic_shifting=True,
)
TEACHER_FAMILIES = {"random-flux-dev": "flux", "random-qwen-image": "qwen"}
#: Stored text tokens per prompt (the teachers' default max_sequence_length).
TEXT_TOKENS = 512


def transformer_config(family: str, reduced: bool) -> dict[str, Any]:
    """The diffusers config of ``family`` ("flux" / "qwen"), full size or reduced."""
    base = FLUX_DEV_CONFIG if family == "flux" else QWEN_IMAGE_CONFIG
    return {**base, **(REDUCED_OVERRIDES[family] if reduced else {})}


@torch.no_grad()
def random_transformer(family: str, reduced: bool, device: str | torch.device, dtype: torch.dtype, seed: int,
                       weight_scale: float = 1.0) -> nn.Module:
    """The family's transformer with random weights, allocated directly on ``device`` in ``dtype``.

    Matrices get ``N(0, weight_scale^2 / fan_in)`` (unit-variance activations through every linear
    layer), norm scales 1 and biases 0, so the residual stream and the velocity stay O(1) over a
    whole trajectory instead of growing block by block.
    """
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel

    cls = FluxTransformer2DModel if family == "flux" else QwenImageTransformer2DModel
    with init_empty_weights():  # parameters on meta; plain tensors (rope tables) stay real
        model = cls(**transformer_config(family, reduced))
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    model.to(dtype).to_empty(device=device)
    for name, b in model.named_buffers():
        b.copy_(buffers[name])
    gen = torch.Generator(device=device)
    for i, (name, p) in enumerate(model.named_parameters()):
        if p.dim() >= 2:
            gen.manual_seed(seed * 1_000_003 + i)
            p.normal_(0.0, weight_scale / p[0].numel() ** 0.5, generator=gen)
        elif name.endswith("weight"):
            p.fill_(1.0)
        else:
            p.zero_()
    return model.requires_grad_(False).eval()


def _pipeline(family: str, transformer: nn.Module) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, QwenImagePipeline

    if family == "flux":
        return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG), vae=None,
                            text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                            transformer=transformer)
    return QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_SCHEDULER_CONFIG), vae=None,
                             text_encoder=None, tokenizer=None, transformer=transformer)


def _prompt_seed(prompt: str) -> int:
    return int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "little") % 2**63


class RandomTeacher(DiffusersTeacher):
    """A random-weight FLUX.1-dev (embedded guidance 3.5) or Qwen-Image (true CFG, scale 4) teacher
    driven through its pipeline's ``__call__``, prompts passed as random embeddings (seeded by the
    prompt) of the real encoders' shapes, since there are no text encoders."""

    def has_text_encoders(self) -> bool:
        return True

    def _embed(self, prompts: Sequence[str], pooled: bool) -> list[torch.Tensor]:
        cfg = self.transformer.config
        embeds, pools = [], []
        for prompt in prompts:
            gen = torch.Generator().manual_seed(_prompt_seed(prompt))
            embeds.append(torch.randn(self.max_sequence_length, cfg.joint_attention_dim, generator=gen))
            if pooled:
                pools.append(torch.randn(cfg.pooled_projection_dim, generator=gen))
        out = [torch.stack(embeds).to(self.device, self.dtype)]
        return out + ([torch.stack(pools).to(self.device, self.dtype)] if pooled else [])

    def prompt_kwargs(self, texts: list[str]) -> dict[str, Any]:
        if self.pipeline_class == "FluxPipeline":
            embeds, pooled = self._embed(texts, pooled=True)
            return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        (embeds,) = self._embed(texts, pooled=False)
        (negative,) = self._embed([self.negative_prompt] * len(texts), pooled=False)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=self.device)
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask,
                "negative_prompt_embeds": negative, "negative_prompt_embeds_mask": mask}

    def prompt_set(self) -> list[str]:
        return [f"random prompt {i}" for i in range(64)]


def load_random_teacher(
    teacher_id: str,
    device: str | torch.device = "cpu",
    *,
    height: int = 1024,
    width: int = 1024,
    torch_dtype: Any = "bfloat16",
    seed: int = 0,
    reduced: bool = False,
    text_tokens: int = TEXT_TOKENS,
    weight_scale: float = 1.0,
    transformer: Optional[nn.Module] = None,
) -> RandomTeacher:
    """A random-weight teacher (see the module docstring); ``transformer`` reuses an already built
    one (e.g. the same weights at another resolution)."""
    family = TEACHER_FAMILIES[teacher_id]
    dtype = resolve_torch_dtype(torch_dtype)
    if transformer is None:
        transformer = random_transformer(family, reduced, device, dtype, seed, weight_scale)
    size = "reduced" if reduced else "full"
    return RandomTeacher(_pipeline(family, transformer), teacher_id=teacher_id,
               revision=f"random-{family}-{size}-seed{seed}-scale{weight_scale:g}", height=height, width=width,
               max_sequence_length=text_tokens)


@dataclass(frozen=True)
class RandomTeacherFactory:
    """``load_random_teacher`` as a ``TeacherFactory`` (``GenerationConfig(teacher=...)``); the
    options (size, seed, resolution) come through ``teacher_options``."""

    teacher_id: str

    def __call__(self, *, device: str, **options: Any) -> RandomTeacher:
        return load_random_teacher(self.teacher_id, device, **options)
