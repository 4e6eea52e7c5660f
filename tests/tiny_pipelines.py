"""Tiny, randomly initialized diffusers pipelines built offline (no hub, no download).

``tiny_flux_pipeline()``: a real ``FluxPipeline`` with every component tiny: CLIPTextModel and
T5EncoderModel from small configs, word-level tokenizers built with the ``tokenizers`` library and
wrapped in ``PreTrainedTokenizerFast``, a 2-level ``AutoencoderKL`` (VAE scale 2, so 32x32 images
are 16x16 latents = 8x8 packed tokens of 16 channels), a 1+1-block ``FluxTransformer2DModel`` with
guidance embedding (like FLUX.1-dev) and FLUX.1-dev's scheduler config.

``tiny_qwen_image_pipeline()``: a ``QwenImagePipeline`` whose transformer and VAE are tiny and real,
but WITHOUT a text encoder / tokenizer (Qwen2.5-VL plus its chat-template tokenizer is not built
here); its teacher is driven with stored (synthetic) ``prompt_embeds``.

The Qwen3 text pieces shared by tests/tiny_flux_family.py (FLUX.2 [klein]) and tests/tiny_sd3_zimage.py
(Z-Image): Qwen's special tokens, a Qwen3-style chat template, and two tokenizers that use them
(:func:`qwen_bpe_tokenizer`, byte-level BPE; :func:`qwen_word_tokenizer`, word-level).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

WORDS = (
    "a photo of cat dog tree red blue green small big house car on the in with and "
    "painting sketch sky river mountain"
).split()

FLUX_SCHEDULER_CONFIG: dict[str, Any] = dict(
    base_image_seq_len=256,
    base_shift=0.5,
    max_image_seq_len=4096,
    max_shift=1.15,
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
)
TEXT_DIM = 32
T5_LENGTH = 16  # max_sequence_length for the tiny teacher


def word_tokenizer(max_length: int, bos_eos: bool):
    """A ``PreTrainedTokenizerFast`` over :data:`WORDS` (+ specials), built in memory."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate(specials + list(WORDS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos_eos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", special_tokens=[("<s>", vocab["<s>"]), ("</s>", vocab["</s>"])]
        )
    else:
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=max_length,
    )


# ----------------------------------------------------------- Qwen3 text (FLUX.2 [klein], Z-Image)
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
# A compact Qwen3-style template: user/assistant turns, and with ``enable_thinking=False`` the empty
# think block that Qwen3's own template emits (Flux2KleinPipeline passes enable_thinking=False,
# ZImagePipeline enable_thinking=True).
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


def qwen_bpe_tokenizer():
    """A byte-level BPE ``Qwen2TokenizerFast`` (vocab: 256 bytes + merges learnt on :data:`WORDS` +
    Qwen's special tokens), trained in memory with the ``tokenizers`` library, with a chat template."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=256 + len(QWEN_SPECIALS) + 64,
        special_tokens=QWEN_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [" ".join(WORDS), *WORDS, *(f"a {w}" for w in WORDS), "user assistant"]
    bpe.train_from_iterator(corpus, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Qwen2TokenizerFast(
        vocab=model["vocab"],
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=QWEN_SPECIALS[1:],
        model_max_length=512,
    )
    tok.chat_template = QWEN3_CHAT_TEMPLATE
    return tok


def qwen_word_tokenizer(max_length: int = 32):
    """A word-level ``PreTrainedTokenizerFast`` over :data:`WORDS` with Qwen's special tokens and the chat
    template (ZImagePipeline's tokenizer)."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "user", "assistant", "system"] + list(WORDS)
    vocab = {w: i for i, w in enumerate(QWEN_SPECIALS + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in QWEN_SPECIALS])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        model_max_length=max_length,
        padding_side="right",
    )
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


def tiny_flux_components(seed: int = 0) -> dict[str, Any]:
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    vocab = len(WORDS) + 4
    torch.manual_seed(seed)
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab, hidden_size=TEXT_DIM, intermediate_size=37, num_attention_heads=4,
            num_hidden_layers=2, max_position_embeddings=77, projection_dim=TEXT_DIM,
            bos_token_id=2, eos_token_id=2, pad_token_id=0,  # eos_token_id == 2: legacy argmax pooling
        )
    )
    torch.manual_seed(seed + 1)
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=vocab, d_model=TEXT_DIM, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=3,
        )
    )
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=8,
        sample_size=32, scaling_factor=0.3611, shift_factor=0.1159,
        use_quant_conv=False, use_post_quant_conv=False,
    )
    torch.manual_seed(seed + 3)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=16, out_channels=None, num_layers=1, num_single_layers=1,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=TEXT_DIM, guidance_embeds=True, axes_dims_rope=(2, 2, 4),
    )
    return {
        "scheduler": FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
        "vae": vae.eval(),
        "text_encoder": clip.eval(),
        "tokenizer": word_tokenizer(77, bos_eos=True),
        "text_encoder_2": t5.eval(),
        "tokenizer_2": word_tokenizer(T5_LENGTH, bos_eos=False),
        "transformer": transformer.eval(),
    }


def tiny_flux_pipeline(seed: int = 0):
    from diffusers import FluxPipeline

    return FluxPipeline(**tiny_flux_components(seed))


def save_tiny_flux_pipeline(directory: str | os.PathLike, seed: int = 0) -> Path:
    """``save_pretrained`` a tiny FluxPipeline to ``directory`` (safetensors, model_index.json)."""
    out = Path(directory)
    tiny_flux_pipeline(seed).save_pretrained(str(out))
    return out


def tiny_qwen_image_components(seed: int = 0) -> dict[str, Any]:
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageTransformer2DModel,
    )

    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=TEXT_DIM, axes_dims_rope=(2, 2, 4),
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLQwenImage(
        base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
        latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.8, 1.2, 1.0],
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_image_seq_len=256, base_shift=0.5, invert_sigmas=False, max_image_seq_len=8192, max_shift=0.9,
        num_train_timesteps=1000, shift=1.0, shift_terminal=None, stochastic_sampling=False,
        time_shift_type="exponential", use_beta_sigmas=False, use_dynamic_shifting=True,
        use_exponential_sigmas=False, use_karras_sigmas=False,
    )  # Qwen/Qwen-Image's scheduler config
    return {"scheduler": scheduler, "vae": vae.eval(), "text_encoder": None, "tokenizer": None, "transformer": transformer.eval()}


def tiny_qwen_image_pipeline(seed: int = 0):
    from diffusers import QwenImagePipeline

    return QwenImagePipeline(**tiny_qwen_image_components(seed))
