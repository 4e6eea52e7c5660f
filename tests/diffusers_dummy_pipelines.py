"""The pipelines of diffusers' OWN pipeline tests (``get_dummy_components()``), built offline.

A user or reviewer who checks arcflow with "someone else's" tiny pipelines will most likely copy
the dummy components of diffusers' test suite. This module rebuilds them: the transformer, VAE and
scheduler of each class with exactly the configuration values of the diffusers test file named on
its builder (diffusers' tests at the commit read for this, huggingface/diffusers 58eb52c0), written
here as our own builder code. What diffusers' tests download from the hub (the
``hf-internal-testing/tiny-random-*`` tokenizers, the tiny T5 config, the Qwen2-VL processor)
cannot be fetched here, so the text side is substituted with local tiny tokenizers / encoders
(tests/tiny_pipelines.py, tests/tiny_qwen_family.py): where diffusers' test gives the text
encoder's config inline (CLIP, Qwen3, Qwen2.5-VL), its sizes are kept and only the vocabulary and
special-token ids follow the local tokenizer; the hub-hosted T5 config becomes a local T5 whose
width is the transformer's ``joint_attention_dim``.

``DUMMY_CASES`` lists, per pipeline class, the builder, an image size that fits the dummy VAE and
patch size, and the stock ``__call__`` arguments that reproduce arcflow's default guidance.

Known mismatch: diffusers' ``Flux2KleinPipeline`` dummy text encoder is a 2-layer Qwen3 of width
16 (= the transformer's ``joint_attention_dim``), which its test drives with the call argument
``text_encoder_out_layers=(1,)``; the pipeline's default stacks hidden states 9, 18 and 27 (real
klein checkpoints), and no 16-wide ``joint_attention_dim`` is three stacked layers wide.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from tiny_pipelines import WORDS, qwen_bpe_tokenizer, qwen_word_tokenizer, word_tokenizer
from tiny_qwen_family import tiny_qwen_tokenizer, tiny_qwen_vl_processor

DIFFUSERS_COMMIT = "58eb52c0803ea9af3abec60841c2a093bdf1f951"
T5_LENGTH = 77  # the local T5 tokenizer's model_max_length (the pipelines pass their own max_sequence_length)


# ----------------------------------------------------------------------------- shared text pieces
def _clip_config():
    """The CLIP text config that diffusers' FLUX / Kontext / SD3 tests give inline (kept as is:
    vocab 1000 covers the local word tokenizer's ids)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, hidden_size=32, intermediate_size=37, layer_norm_eps=1e-05,
        num_attention_heads=4, num_hidden_layers=5, pad_token_id=1, vocab_size=1000, hidden_act="gelu",
        projection_dim=32,
    )


def _local_t5(d_model: int):
    """Stand-in for ``hf-internal-testing/tiny-random-t5`` (hub-hosted): a 5-layer T5 encoder of width
    ``d_model`` (the transformer's ``joint_attention_dim``) over the local word vocabulary."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=len(WORDS) + 4, d_model=d_model, d_kv=8, d_ff=37, num_layers=5, num_heads=4,
            relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=3,
        )
    )


def _small_kl_vae(latent_channels: int):
    """The one-level AutoencoderKL (VAE scale 1) of diffusers' FLUX / Kontext / SD3 tests."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035,
    )


# ----------------------------------------------------------------------------- FLUX.1 / Kontext
def flux_components() -> dict[str, Any]:
    """tests/pipelines/flux/test_pipeline_flux.py (and test_pipeline_flux_kontext.py, whose dummy
    components are the same): a 1+1-block FluxTransformer2DModel without guidance embedding
    (patch 1, 4 input channels, 2 heads of 16, joint/pooled dim 32, rope axes 4+4+8), a one-level
    AutoencoderKL with ONE latent channel, the default FlowMatchEulerDiscreteScheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(_clip_config())
    torch.manual_seed(0)
    text_encoder_2 = _local_t5(32)
    torch.manual_seed(0)
    vae = _small_kl_vae(latent_channels=1)
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "text_encoder": text_encoder.eval(),
        "text_encoder_2": text_encoder_2.eval(),
        "tokenizer": word_tokenizer(77, bos_eos=True),
        "tokenizer_2": word_tokenizer(T5_LENGTH, bos_eos=False),
        "transformer": transformer.eval(),
        "vae": vae.eval(),
        "image_encoder": None,
        "feature_extractor": None,
    }


def flux_pipeline():
    from diffusers import FluxPipeline

    return FluxPipeline(**flux_components())


def flux_kontext_pipeline():
    from diffusers import FluxKontextPipeline

    return FluxKontextPipeline(**flux_components())


# ----------------------------------------------------------------------------- FLUX.2 [klein]
def flux2_klein_pipeline():
    """tests/pipelines/flux2/test_pipeline_flux2_klein.py: a 1+1-block Flux2Transformer2DModel
    (patch 1, 4 input channels, 2 heads of 16, joint dim 16, timestep-guidance channels 256, rope
    axes 4x4, no guidance embedding), a one-level AutoencoderKLFlux2 with one latent channel, the
    default scheduler, and their 2-layer Qwen3ForCausalLM of width 16 (vocabulary: the local BPE
    tokenizer's). See the module docstring: it needs ``text_encoder_out_layers=(1,)``."""
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, timestep_guidance_channels=256,
        axes_dims_rope=[4, 4, 4, 4], guidance_embeds=False,
    )
    tokenizer = qwen_bpe_tokenizer()
    torch.manual_seed(0)
    text_encoder = Qwen3ForCausalLM(
        Qwen3Config(
            intermediate_size=16, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
            vocab_size=len(tokenizer), max_position_embeddings=512,
        )
    )
    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(
        sample_size=32, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), block_out_channels=(4,), layers_per_block=1, latent_channels=1,
        norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
    )
    return Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder=text_encoder.eval(), tokenizer=tokenizer,
        transformer=transformer.eval(), vae=vae.eval(),
    )


# ----------------------------------------------------------------------------- Qwen-Image / EditPlus
def _qwen_transformer_vae_scheduler() -> dict[str, Any]:
    """The transformer, VAE and scheduler that diffusers' tests/pipelines/qwenimage/test_qwenimage.py
    and test_qwenimage_edit_plus.py share: a 2-block QwenImageTransformer2DModel (patch 2, 16 input
    / 4 output channels, 3 heads of 16, joint dim 16, rope axes 8+4+4), a three-level
    AutoencoderKLQwenImage (base dim 24, z dim 4, VAE scale 4, identity latent statistics), the
    default scheduler."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel

    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=3,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
    )
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage(
        base_dim=4 * 6, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True],
        latents_mean=[0.0] * 4, latents_std=[1.0] * 4,
    )
    torch.manual_seed(0)
    scheduler = FlowMatchEulerDiscreteScheduler()
    return {"transformer": transformer.eval(), "vae": vae.eval(), "scheduler": scheduler}


def _qwen_vl_text_encoder(tokenizer):
    """Their Qwen2.5-VL sizes (text: width 16, 2 layers, 2 heads / 2 KV heads, mrope 1+1+2; vision:
    2 blocks of width 16, 2 heads, out 16) with the local tokenizer's vocabulary and special ids."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {s: tokenizer.convert_tokens_to_ids(s) for s in
           ("<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")}
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
            rope_parameters=dict(rope_type="default", rope_theta=1000000.0, mrope_section=[1, 1, 2]),
            vocab_size=len(tokenizer), bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def qwen_image_pipeline():
    """tests/pipelines/qwenimage/test_qwenimage.py (see :func:`_qwen_transformer_vae_scheduler`), with
    the local Qwen tokenizer and their text-encoder sizes."""
    from diffusers import QwenImagePipeline

    tokenizer = tiny_qwen_tokenizer()
    return QwenImagePipeline(**_qwen_transformer_vae_scheduler(), tokenizer=tokenizer,
                             text_encoder=_qwen_vl_text_encoder(tokenizer))


def qwen_image_edit_plus_pipeline():
    """tests/pipelines/qwenimage/test_qwenimage_edit_plus.py: Qwen-Image's dummy pieces plus a
    Qwen2-VL processor (local: tests/tiny_qwen_family.tiny_qwen_vl_processor). Call it inside
    ``tiny_qwen_family.tiny_edit_plus_sizes()`` (the stock pipeline VAE-encodes references at ~1 MP)."""
    from diffusers import QwenImageEditPlusPipeline

    tokenizer = tiny_qwen_tokenizer()
    return QwenImageEditPlusPipeline(**_qwen_transformer_vae_scheduler(), tokenizer=tokenizer,
                                     text_encoder=_qwen_vl_text_encoder(tokenizer),
                                     processor=tiny_qwen_vl_processor(tokenizer))


# ----------------------------------------------------------------------------- SD3
def sd3_pipeline():
    """tests/pipelines/stable_diffusion_3/test_pipeline_stable_diffusion_3.py: a 1-block
    SD3Transformer2DModel (sample size 32, PATCH 1, 4 channels, 4 heads of 8, caption projection and
    joint dim 32, pooled dim 64), two CLIPTextModelWithProjection of their config (projection 32
    each = pooled 64), a one-level AutoencoderKL with 4 latent channels (VAE scale 1), the default
    scheduler; T5 local (width 32)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModelWithProjection(_clip_config())
    torch.manual_seed(0)
    text_encoder_2 = CLIPTextModelWithProjection(_clip_config())
    torch.manual_seed(0)
    text_encoder_3 = _local_t5(32)
    torch.manual_seed(0)
    vae = _small_kl_vae(latent_channels=4)
    return StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(), text_encoder_3=text_encoder_3.eval(),
        tokenizer=word_tokenizer(77, bos_eos=True), tokenizer_2=word_tokenizer(77, bos_eos=True),
        tokenizer_3=word_tokenizer(T5_LENGTH, bos_eos=False), transformer=transformer.eval(), vae=vae.eval(),
        image_encoder=None, feature_extractor=None,
    )


# ----------------------------------------------------------------------------- Z-Image
def z_image_pipeline():
    """tests/pipelines/z_image/test_z_image.py: a ZImageTransformer2DModel (patch 2, 16 channels,
    width 32, 2 heads, 2 layers + 1 refiner, caption dim 16, rope axes 8+4+4 over 256/32/32) with
    its ``torch.empty`` pad tokens set to ones as their test does, a two-level AutoencoderKL (32/64
    channels, 16 latent channels, 32 groups, FLUX's scaling/shift), the default scheduler, and their
    2-layer Qwen3Model of width 16 (vocabulary: the local word tokenizer's)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(0)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1,
        n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0,
        axes_dims=[8, 4, 4], axes_lens=[256, 32, 32],
    )
    with torch.no_grad():
        transformer.x_pad_token.fill_(1.0)
        transformer.cap_pad_token.fill_(1.0)
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], block_out_channels=[32, 64], layers_per_block=1,
        latent_channels=16, norm_num_groups=32, sample_size=32, scaling_factor=0.3611, shift_factor=0.1159,
    )
    torch.manual_seed(0)
    scheduler = FlowMatchEulerDiscreteScheduler()
    tokenizer = qwen_word_tokenizer(512)
    torch.manual_seed(0)
    text_encoder = Qwen3Model(
        Qwen3Config(
            hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
            vocab_size=len(tokenizer), max_position_embeddings=512,
        )
    )
    return ZImagePipeline(transformer=transformer.eval(), vae=vae.eval(), scheduler=scheduler,
                          text_encoder=text_encoder.eval(), tokenizer=tokenizer)


# ----------------------------------------------------------------------------- the cases
@dataclass(frozen=True)
class DummyCase:
    """One pipeline class: its builder, a size that fits the dummy VAE / patch, how many reference
    images a prompt has (0: text-to-image), and the stock ``__call__`` arguments that match
    arcflow's default guidance for it."""

    name: str
    build: Callable[[], Any]
    size: int
    images: int = 0
    call: dict[str, Any] = field(default_factory=dict)
    one_prompt_per_call: bool = False
    #: The pipeline wants one negative prompt per prompt (a list), not one string (Z-Image).
    negative_per_prompt: bool = False
    #: arcflow's ``call_options`` teacher option (``--call-option``): further ``__call__`` arguments.
    call_options: dict[str, Any] = field(default_factory=dict)


DUMMY_CASES: dict[str, DummyCase] = {
    "FluxPipeline": DummyCase("FluxPipeline", flux_pipeline, 16, call=dict(true_cfg_scale=1.0)),
    "FluxKontextPipeline": DummyCase("FluxKontextPipeline", flux_kontext_pipeline, 16, images=1,
                                     call=dict(true_cfg_scale=1.0, max_area=16 * 16, _auto_resize=False)),
    # diffusers' klein test passes text_encoder_out_layers=(1,): its 2-layer text encoder has no layer 27.
    "Flux2KleinPipeline": DummyCase("Flux2KleinPipeline", flux2_klein_pipeline, 16,
                                    call=dict(guidance_scale=4.0, text_encoder_out_layers=(1,)),
                                    call_options={"text_encoder_out_layers": [1]}),
    "QwenImagePipeline": DummyCase("QwenImagePipeline", qwen_image_pipeline, 32,
                                   call=dict(true_cfg_scale=4.0, negative_prompt="")),
    "QwenImageEditPlusPipeline": DummyCase("QwenImageEditPlusPipeline", qwen_image_edit_plus_pipeline, 32, images=2,
                                           call=dict(true_cfg_scale=4.0, negative_prompt=""), one_prompt_per_call=True),
    "StableDiffusion3Pipeline": DummyCase("StableDiffusion3Pipeline", sd3_pipeline, 16,
                                          call=dict(guidance_scale=7.0, negative_prompt="")),
    "ZImagePipeline": DummyCase("ZImagePipeline", z_image_pipeline, 16, call=dict(guidance_scale=5.0, negative_prompt=""),
                                negative_per_prompt=True),
}


def save_dummy_pipeline(name: str, directory: str | os.PathLike) -> Path:
    """``save_pretrained`` the dummy pipeline of class ``name`` to ``directory``."""
    out = Path(directory)
    pipe = DUMMY_CASES[name].build()
    pipe.save_pretrained(str(out))
    return out
