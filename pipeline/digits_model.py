"""Networks of the embedded teacher: a tiny ``FluxTransformer2DModel`` and its word-level text encoder.

The text encoder stands in for FLUX's T5 + CLIP: a fixed vocabulary, token + position embeddings
(``prompt_embeds`` -> ``encoder_hidden_states``) and their mean over non-padding tokens
(``pooled_prompt_embeds`` -> ``pooled_projections``). Its tables ship with the teacher's weights.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from diffusers import FluxTransformer2DModel
from torch import Tensor, nn

from arcflow.pipeline.digits_data import GRID, LATENT_SHAPE
from arcflow.pipeline.digits_prompts import normalize_prompt

PAD, BOS = "<pad>", "<bos>"
VOCAB: tuple[str, ...] = (PAD, BOS, "a", "handwritten", "digit", *(str(d) for d in range(10)))
#: Tokens per prompt: ``<bos> a handwritten digit N``.
MAX_TOKENS = 5
TEXT_DIM = 32

TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": LATENT_SHAPE[1],
    "num_layers": 2,
    "num_single_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 4,
    "joint_attention_dim": TEXT_DIM,
    "pooled_projection_dim": TEXT_DIM,
    "guidance_embeds": False,
    "axes_dims_rope": (4, 6, 6),
}


def tokenize(prompts: Sequence[str]) -> Tensor:
    """Word-level token ids ``(B, MAX_TOKENS)``: ``<bos>``, the words, then ``<pad>``."""
    index = {w: i for i, w in enumerate(VOCAB)}
    rows = []
    for prompt in prompts:
        words = normalize_prompt(prompt).split()
        if len(words) > MAX_TOKENS - 1 or any(w not in index for w in words):
            raise ValueError(f"prompt outside the digits vocabulary: {prompt!r}")
        ids = [index[BOS], *(index[w] for w in words)]
        rows.append(ids + [index[PAD]] * (MAX_TOKENS - len(ids)))
    return torch.tensor(rows, dtype=torch.long)


class DigitsTextEncoder(nn.Module):
    """Token + position embeddings; pooled output is the mean over non-padding tokens."""

    def __init__(self, dim: int = TEXT_DIM) -> None:
        super().__init__()
        self.token = nn.Embedding(len(VOCAB), dim)
        self.position = nn.Parameter(torch.zeros(MAX_TOKENS, dim))
        nn.init.normal_(self.token.weight, std=1.0)
        nn.init.normal_(self.position, std=0.1)

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Token ids ``(B, L)`` -> ``(prompt_embeds (B, L, D), pooled_prompt_embeds (B, D))``."""
        emb = self.token(ids)
        keep = (ids != VOCAB.index(PAD)).unsqueeze(-1).to(emb.dtype)
        pooled = (emb * keep).sum(1) / keep.sum(1)
        return emb + self.position, pooled


def build_transformer(config: dict[str, Any] | None = None) -> FluxTransformer2DModel:
    """A freshly initialized tiny FLUX transformer (the digits teacher's architecture)."""
    cfg = dict(TRANSFORMER_CONFIG if config is None else config)
    cfg["axes_dims_rope"] = tuple(cfg["axes_dims_rope"])
    return FluxTransformer2DModel(**cfg)


def image_ids() -> Tensor:
    """FLUX ``img_ids`` ``(16, 3)``: ``(0, row, col)`` of each packed token."""
    ids = torch.zeros(GRID, GRID, 3)
    ids[..., 1] = torch.arange(GRID).unsqueeze(1)
    ids[..., 2] = torch.arange(GRID).unsqueeze(0)
    return ids.reshape(GRID * GRID, 3)


def text_ids() -> Tensor:
    """FLUX ``txt_ids`` ``(MAX_TOKENS, 3)``: all zeros, as FLUX pipelines pass them."""
    return torch.zeros(MAX_TOKENS, 3)
