"""Tiny, randomly initialized FLUX-family diffusers pipelines built offline (no hub, no download).

``tiny_flux_kontext_pipeline()``: a real ``FluxKontextPipeline`` (image edit) reusing the tiny CLIP/T5,
word-level tokenizers and 2-level VAE of :mod:`tests.tiny_pipelines`, with a 1+1-block
``FluxTransformer2DModel`` (guidance embedding, like FLUX.1-Kontext-dev). Kontext rescales the
output size to ``max_area`` (default 1024**2) and, with ``_auto_resize=True`` (the default), the
input image to one of its ~1 MP preferred resolutions: tiny calls must pass
``max_area=height*width`` and ``_auto_resize=False`` (see :data:`KONTEXT_TINY_CALL`).

``tiny_flux2_klein_pipeline()``: a real ``Flux2KleinPipeline`` (FLUX.2 [klein]) with a tiny
28-layer ``Qwen3ForCausalLM`` (the pipeline stacks hidden states 9, 18 and 27 by default), a
byte-level BPE ``Qwen2TokenizerFast`` trained in memory with the ``tokenizers`` library plus a
Qwen3-style chat template, a 2-level ``AutoencoderKLFlux2`` (VAE scale 2, 4 latent channels, so
2x2-patchified latents have 16 channels; its BatchNorm running statistics are randomized so the
latent normalization is not an identity) and a 1+1-block ``Flux2Transformer2DModel`` without
guidance embedding (like the klein checkpoints). ``is_distilled=False`` (a "base" klein: real
CFG with ``guidance_scale`` > 1, one cond and one uncond transformer call per step).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from tiny_pipelines import FLUX_SCHEDULER_CONFIG, TEXT_DIM, qwen_bpe_tokenizer, tiny_flux_components

# Keyword arguments every tiny Kontext call needs so that height/width and the input image are not
# rescaled to ~1 megapixel.
KONTEXT_TINY_CALL: dict[str, Any] = dict(height=32, width=32, max_area=32 * 32, _auto_resize=False)

QWEN3_LAYERS = 28  # Flux2KleinPipeline reads hidden_states[9], [18], [27]
QWEN3_HIDDEN = 16
KLEIN_MAX_SEQUENCE_LENGTH = 32  # a fast value for tests; the pipeline default (512) works too
LATENT_CHANNELS = 4


def image(seed: int = 0, size: tuple[int, int] = (32, 32)):
    """A deterministic random RGB ``PIL.Image`` (``size`` = (width, height)) for edit pipelines."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8), mode="RGB")


# --------------------------------------------------------------------------------------------------
# FLUX.1 Kontext
# --------------------------------------------------------------------------------------------------


def tiny_flux_kontext_components(seed: int = 0) -> dict[str, Any]:
    # FluxPipeline's tiny components are exactly FluxKontextPipeline's (same classes and keys;
    # Kontext's transformer is a FluxTransformer2DModel with guidance embedding too).
    components = tiny_flux_components(seed)
    components["image_encoder"] = None
    components["feature_extractor"] = None
    return components


def tiny_flux_kontext_pipeline(seed: int = 0):
    from diffusers import FluxKontextPipeline

    return FluxKontextPipeline(**tiny_flux_kontext_components(seed))


def save_tiny_flux_kontext_pipeline(directory: str | os.PathLike, seed: int = 0) -> Path:
    """``save_pretrained`` a tiny FluxKontextPipeline to ``directory``."""
    out = Path(directory)
    tiny_flux_kontext_pipeline(seed).save_pretrained(str(out))
    return out


# --------------------------------------------------------------------------------------------------
# FLUX.2 [klein]
# --------------------------------------------------------------------------------------------------


def tiny_flux2_klein_components(seed: int = 0) -> dict[str, Any]:
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = qwen_bpe_tokenizer()
    torch.manual_seed(seed)
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            vocab_size=len(tokenizer), hidden_size=QWEN3_HIDDEN, intermediate_size=32,
            num_hidden_layers=QWEN3_LAYERS, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
            max_position_embeddings=1024, tie_word_embeddings=True, rope_theta=1_000_000.0,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
        )
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLFlux2(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=LATENT_CHANNELS, norm_num_groups=8,
        sample_size=32, use_quant_conv=True, use_post_quant_conv=True,
    )
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():  # non-trivial latent normalization (the real one is far from mean 0 / var 1)
        vae.bn.running_mean.copy_(0.2 * torch.randn(vae.bn.running_mean.shape, generator=g))
        vae.bn.running_var.copy_(0.5 + torch.rand(vae.bn.running_var.shape, generator=g))
    torch.manual_seed(seed + 3)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=4 * LATENT_CHANNELS, out_channels=None, num_layers=1, num_single_layers=1,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=3 * QWEN3_HIDDEN,
        timestep_guidance_channels=32, mlp_ratio=3.0, axes_dims_rope=(2, 2, 2, 2), rope_theta=2000,
        guidance_embeds=False,
    )
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
        "vae": vae.eval(),
        "text_encoder": text_encoder.eval(),
        "tokenizer": tokenizer,
        "transformer": transformer.eval(),
    }


def tiny_flux2_klein_pipeline(seed: int = 0, is_distilled: bool = False):
    from diffusers import Flux2KleinPipeline

    return Flux2KleinPipeline(**tiny_flux2_klein_components(seed), is_distilled=is_distilled)


def save_tiny_flux2_klein_pipeline(directory: str | os.PathLike, seed: int = 0, is_distilled: bool = False) -> Path:
    """``save_pretrained`` a tiny Flux2KleinPipeline to ``directory``."""
    out = Path(directory)
    tiny_flux2_klein_pipeline(seed, is_distilled=is_distilled).save_pretrained(str(out))
    return out


__all__ = [
    "KLEIN_MAX_SEQUENCE_LENGTH",
    "KONTEXT_TINY_CALL",
    "TEXT_DIM",
    "image",
    "save_tiny_flux2_klein_pipeline",
    "save_tiny_flux_kontext_pipeline",
    "tiny_flux2_klein_components",
    "tiny_flux2_klein_pipeline",
    "tiny_flux_kontext_components",
    "tiny_flux_kontext_pipeline",
]
