"""Tiny, randomly initialized ``StableDiffusion3Pipeline`` and ``ZImagePipeline`` built offline.

``tiny_sd3_pipeline()``: a real SD3.5-style ``StableDiffusion3Pipeline``: two
``CLIPTextModelWithProjection`` (hidden 16, projection 16 each, so pooled = 32) and a
``T5EncoderModel`` (d_model 32) from tiny configs, word-level tokenizers (``tiny_pipelines.word_tokenizer``;
CLIP tokenizers with model_max_length 16, which the pipeline uses as its CLIP length), a 2-level
``AutoencoderKL`` (VAE scale 2, 4 latent channels) and a 2-block ``SD3Transformer2DModel``
(patch 2, qk_norm rms_norm like SD3.5, block 0 with dual attention like SD3.5-medium). 32x32 images
are 4x16x16 latents = 8x8 tokens of patch 2. Scheduler: SD3.5's (shift 3.0, no dynamic shifting).

``tiny_z_image_pipeline()``: a real ``ZImagePipeline``: a 2-layer ``Qwen3Model`` text encoder
(hidden 32) and a word-level tokenizer with Qwen's special tokens and a Qwen3-style chat template
(``apply_chat_template(..., add_generation_prompt=True, enable_thinking=True)`` works), a 2-level
``AutoencoderKL`` (VAE scale 2; the pipeline's image processor uses 2*2 = 4) and a tiny
``ZImageTransformer2DModel`` (dim 32, 2 heads of 16 = axes_dims 4+6+6, 1 refiner layer, 2 main
layers, patch 2, 4 latent channels). 32x32 images are 4x16x16 latents = 64 image tokens.
Scheduler: Z-Image-Turbo's (shift 3.0, no dynamic shifting).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from tiny_pipelines import WORDS, qwen_word_tokenizer, word_tokenizer

# stabilityai/stable-diffusion-3.5-large (and -medium) scheduler/scheduler_config.json
SD3_SCHEDULER_CONFIG: dict[str, Any] = dict(
    base_image_seq_len=256, base_shift=0.5, invert_sigmas=False, max_image_seq_len=4096, max_shift=1.15,
    num_train_timesteps=1000, shift=3.0, shift_terminal=None, use_beta_sigmas=False,
    use_dynamic_shifting=False, use_exponential_sigmas=False, use_karras_sigmas=False,
)
# Tongyi-MAI/Z-Image-Turbo scheduler/scheduler_config.json
Z_IMAGE_SCHEDULER_CONFIG: dict[str, Any] = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)

SD3_CLIP_DIM = 16  # hidden = projection size of each CLIP; pooled_projections = 2 * 16
SD3_T5_DIM = 32  # joint_attention_dim
SD3_CLIP_LENGTH = 16  # tokenizer.model_max_length = the pipeline's CLIP sequence length
SD3_T5_LENGTH = 16  # pass as max_sequence_length (the pipeline default is 256)
QWEN_DIM = 32  # cap_feat_dim
Z_IMAGE_LENGTH = 32  # pass as max_sequence_length (the pipeline default is 512)


def tiny_vae(seed: int, scaling_factor: float, shift_factor: float):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8,
        sample_size=32, scaling_factor=scaling_factor, shift_factor=shift_factor,
        use_quant_conv=False, use_post_quant_conv=False,
    ).eval()


# --------------------------------------------------------------------------------------------- SD3
def tiny_sd3_components(seed: int = 0) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    vocab = len(WORDS) + 4

    def clip(s: int):
        torch.manual_seed(s)
        return CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=vocab, hidden_size=SD3_CLIP_DIM, intermediate_size=37, num_attention_heads=4,
                num_hidden_layers=2, max_position_embeddings=77, projection_dim=SD3_CLIP_DIM,
                bos_token_id=2, eos_token_id=2, pad_token_id=0,  # eos_token_id == 2: legacy argmax pooling
            )
        ).eval()

    text_encoder, text_encoder_2 = clip(seed), clip(seed + 1)
    torch.manual_seed(seed + 2)
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=vocab, d_model=SD3_T5_DIM, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=3,
        )
    ).eval()
    vae = tiny_vae(seed + 3, scaling_factor=1.5305, shift_factor=0.0609)  # SD3's VAE constants
    torch.manual_seed(seed + 4)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=SD3_T5_DIM, caption_projection_dim=32,
        pooled_projection_dim=2 * SD3_CLIP_DIM, pos_embed_max_size=16, dual_attention_layers=(0,),
        qk_norm="rms_norm",
    ).eval()
    return {
        "transformer": transformer,
        "scheduler": FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER_CONFIG),
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": word_tokenizer(SD3_CLIP_LENGTH, bos_eos=True),
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": word_tokenizer(SD3_CLIP_LENGTH, bos_eos=True),
        "text_encoder_3": t5,
        "tokenizer_3": word_tokenizer(SD3_T5_LENGTH, bos_eos=False),
        "image_encoder": None,
        "feature_extractor": None,
    }


def tiny_sd3_pipeline(seed: int = 0):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(**tiny_sd3_components(seed))


def save_tiny_sd3_pipeline(directory: str | os.PathLike, seed: int = 0) -> Path:
    """``save_pretrained`` a tiny StableDiffusion3Pipeline to ``directory``."""
    out = Path(directory)
    tiny_sd3_pipeline(seed).save_pretrained(str(out))
    return out


# ----------------------------------------------------------------------------------------- Z-Image
def tiny_z_image_components(seed: int = 0) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    tokenizer = qwen_word_tokenizer(Z_IMAGE_LENGTH)
    torch.manual_seed(seed)
    text_encoder = Qwen3Model(
        Qwen3Config(
            vocab_size=len(tokenizer), hidden_size=QWEN_DIM, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
            pad_token_id=0, bos_token_id=0, eos_token_id=2, tie_word_embeddings=False,
        )
    ).eval()
    vae = tiny_vae(seed + 1, scaling_factor=0.3611, shift_factor=0.1159)  # the FLUX VAE that Z-Image uses
    torch.manual_seed(seed + 2)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=QWEN_DIM, rope_theta=256.0,
        t_scale=1000.0, axes_dims=[4, 6, 6], axes_lens=[1024, 64, 64],
    ).eval()
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(**Z_IMAGE_SCHEDULER_CONFIG),
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "transformer": transformer,
    }


def tiny_z_image_pipeline(seed: int = 0):
    from diffusers import ZImagePipeline

    return ZImagePipeline(**tiny_z_image_components(seed))


def save_tiny_z_image_pipeline(directory: str | os.PathLike, seed: int = 0) -> Path:
    """``save_pretrained`` a tiny ZImagePipeline to ``directory``."""
    out = Path(directory)
    tiny_z_image_pipeline(seed).save_pretrained(str(out))
    return out
