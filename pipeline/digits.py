"""The embedded default teacher "digits": a tiny FLUX transformer over 8x8 handwritten digits.

Conditioning goes through exactly the inputs FLUX uses (``encoder_hidden_states``,
``pooled_projections``, ``txt_ids``, ``img_ids``, ``timestep`` = sigma); guidance is true CFG
against the empty prompt. Weights ship in ``pipeline/weights`` and ``arcflow train-teacher``
reproduces them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from arcflow.pipeline.digits_data import LATENT_SHAPE, latents_to_images
from arcflow.pipeline.digits_model import (
    VOCAB,
    DigitsTextEncoder,
    build_transformer,
    image_ids,
    text_ids,
    tokenize,
)
from arcflow.pipeline.digits_prompts import PROMPTS, check_digits_prompts
from arcflow.pipeline.teacher import Conditioning, Teacher
from arcflow.core.errors import ArcflowError

WEIGHTS_DIR = Path(__file__).parent / "weights"
TEACHER_FILE = "digits_teacher.safetensors"
TEACHER_CONFIG_FILE = "digits_teacher.json"
TEACHER_ID = "digits"


class DigitsTeacher(Teacher):
    """Tiny ``FluxTransformer2DModel`` + word-level text encoder, true CFG, latents ``(16, 4)``."""

    teacher_id = TEACHER_ID
    latent_shape = LATENT_SHAPE
    true_cfg = True

    def __init__(
        self,
        transformer: nn.Module,
        text_encoder: DigitsTextEncoder,
        *,
        revision: str,
        default_guidance: float,
        shift: float = 1.0,
    ) -> None:
        self._transformer = transformer
        self.text_encoder = text_encoder
        self.revision = revision
        self.default_guidance = float(default_guidance)
        self.shift = float(shift)

    @property
    def transformer(self) -> nn.Module:
        return self._transformer

    def validate_prompts(self, prompts: Sequence[str]) -> None:
        check_digits_prompts(prompts)

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> Conditioning:
        self.validate_prompts(prompts)
        ids = tokenize(prompts).to(self.device)
        embeds, pooled = self.text_encoder(ids)
        return {"prompt_embeds": embeds.to(self.dtype), "pooled_prompt_embeds": pooled.to(self.dtype)}

    def unconditional(self, cond: Conditioning) -> Conditioning:
        batch = cond["prompt_embeds"].shape[0]
        empty = self.encode_prompts([""])
        return {k: v.expand(batch, *v.shape[1:]) for k, v in empty.items()}

    def transformer_inputs(self, x: Tensor, sigma: Tensor, cond: Mapping[str, Tensor]) -> dict:
        sigma = torch.as_tensor(sigma, device=x.device).to(x.dtype).reshape(-1).expand(x.shape[0])
        return {
            "hidden_states": x,
            "encoder_hidden_states": cond["prompt_embeds"],
            "pooled_projections": cond["pooled_prompt_embeds"],
            "timestep": sigma,  # FluxTransformer2DModel multiplies by 1000, as FLUX pipelines expect
            "img_ids": image_ids().to(x.device, x.dtype),
            "txt_ids": text_ids().to(x.device, x.dtype),
            "return_dict": False,
        }

    def decode(self, latents: Tensor) -> Tensor:
        return latents_to_images(latents)

    def prompt_set(self) -> list[str]:
        return list(PROMPTS)


def file_revision(path: Path) -> str:
    """First 16 hex digits of the file's sha256 (the teacher's ``revision``)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def load_digits_teacher(
    weights_dir: str | Path | None = None, device: str | torch.device = "cpu"
) -> DigitsTeacher:
    """Load the shipped digits teacher (or one written by ``arcflow train-teacher --out DIR``)."""
    root = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    weights, config_path = root / TEACHER_FILE, root / TEACHER_CONFIG_FILE
    if not weights.is_file() or not config_path.is_file():
        raise ArcflowError(f"no digits teacher weights in {root} (expected {TEACHER_FILE} and {TEACHER_CONFIG_FILE})")
    config: dict[str, Any] = json.loads(config_path.read_text())
    if tuple(config["vocab"]) != VOCAB:
        raise ArcflowError(f"{config_path} was written for a different digits vocabulary")
    state = load_file(str(weights))
    transformer = build_transformer(config["transformer_config"])
    transformer.load_state_dict({k[len("transformer."):]: v for k, v in state.items() if k.startswith("transformer.")})
    text_encoder = DigitsTextEncoder(config["text_dim"])
    text_encoder.load_state_dict(
        {k[len("text_encoder."):]: v for k, v in state.items() if k.startswith("text_encoder.")}
    )
    for module in (transformer, text_encoder):
        module.requires_grad_(False).eval().to(device)
    return DigitsTeacher(
        transformer,
        text_encoder,
        revision=file_revision(weights),
        default_guidance=config["default_guidance"],
        shift=config["shift"],
    )
