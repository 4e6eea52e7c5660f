"""The tiny FLUX-family pipelines of tests/tiny_flux_family.py are real, runnable, saveable diffusers
pipelines: FluxKontextPipeline (edit, with an input image) and Flux2KleinPipeline (text-to-image and
with reference images), each called with a text prompt, decoding to images, and round-tripping
through save_pretrained / from_pretrained with identical latents."""

from __future__ import annotations

import torch
from PIL import Image

from tiny_flux_family import (
    KLEIN_MAX_SEQUENCE_LENGTH,
    KONTEXT_TINY_CALL,
    image,
    qwen_bpe_tokenizer,
    save_tiny_flux2_klein_pipeline,
    save_tiny_flux_kontext_pipeline,
    tiny_flux2_klein_pipeline,
    tiny_flux_kontext_pipeline,
)

PROMPT = "a photo of a red cat on the sky"
STEPS = 4


def _gen():
    return torch.Generator().manual_seed(0)


def _kontext(pipe, **kw):
    args = dict(image=image(0), prompt=PROMPT, num_inference_steps=STEPS, generator=_gen(), **KONTEXT_TINY_CALL)
    args.update(kw)
    return pipe(**args).images


def _klein(pipe, **kw):
    args = dict(
        prompt=PROMPT, height=32, width=32, num_inference_steps=STEPS, generator=_gen(),
        max_sequence_length=KLEIN_MAX_SEQUENCE_LENGTH,
    )
    args.update(kw)
    return pipe(**args).images


def test_kontext_runs_with_an_image_and_decodes():
    from diffusers import FluxKontextPipeline

    pipe = tiny_flux_kontext_pipeline()
    assert type(pipe) is FluxKontextPipeline
    latents = _kontext(pipe, output_type="latent")
    assert latents.shape == (1, 64, 16)  # packed: 32x32 image -> 16x16 latents -> 8x8 tokens of 4*4 channels
    assert torch.isfinite(latents).all()
    assert torch.equal(latents, _kontext(pipe, output_type="latent"))  # deterministic
    # the image conditions the result
    assert not torch.allclose(latents, _kontext(pipe, image=image(1), output_type="latent"))
    pt = _kontext(pipe, output_type="pt")
    assert pt.shape == (1, 3, 32, 32) and 0.0 <= pt.min() and pt.max() <= 1.0
    pil = _kontext(pipe, output_type="pil")
    assert isinstance(pil[0], Image.Image) and pil[0].size == (32, 32)


def test_kontext_save_load_round_trip(tmp_path):
    from diffusers import DiffusionPipeline, FluxKontextPipeline

    pipe = tiny_flux_kontext_pipeline()
    save_tiny_flux_kontext_pipeline(tmp_path / "kontext")
    loaded = DiffusionPipeline.from_pretrained(str(tmp_path / "kontext"))
    assert type(loaded) is FluxKontextPipeline
    assert torch.equal(_kontext(pipe, output_type="latent"), _kontext(loaded, output_type="latent"))


def test_qwen_tokenizer_applies_the_chat_template():
    from transformers import Qwen2TokenizerFast

    tok = qwen_bpe_tokenizer()
    assert isinstance(tok, Qwen2TokenizerFast)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "a cat"}], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert text == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    ids = tok(text).input_ids
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.decode(ids) == text


def test_klein_text_to_image_and_decode():
    from diffusers import Flux2KleinPipeline

    pipe = tiny_flux2_klein_pipeline()
    assert type(pipe) is Flux2KleinPipeline
    latents = _klein(pipe, output_type="latent")
    # Flux2Klein returns UNPACKED, de-normalized VAE latents (B, 4, H/2, W/2) for output_type="latent"
    assert latents.shape == (1, 4, 16, 16)
    assert torch.isfinite(latents).all()
    assert torch.equal(latents, _klein(pipe, output_type="latent"))
    # default max_sequence_length (512) and CFG off work too
    assert _klein(pipe, output_type="latent", max_sequence_length=512, guidance_scale=1.0).shape == (1, 4, 16, 16)
    pt = _klein(pipe, output_type="pt")
    assert pt.shape == (1, 3, 32, 32) and 0.0 <= pt.min() and pt.max() <= 1.0
    pil = _klein(pipe, output_type="pil")
    assert isinstance(pil[0], Image.Image) and pil[0].size == (32, 32)


def test_klein_with_reference_images():
    pipe = tiny_flux2_klein_pipeline()
    ref = image(0, (64, 64))  # the pipeline refuses reference images under 64 px a side
    plain = _klein(pipe, output_type="latent")
    edited = _klein(pipe, image=ref, output_type="latent")
    assert edited.shape == plain.shape and not torch.allclose(edited, plain)
    two = _klein(pipe, image=[ref, image(1, (64, 96))], output_type="latent")
    assert two.shape == plain.shape and not torch.allclose(two, edited)
    # without height/width the output takes the (first) reference image's size
    pil = pipe(image=ref, prompt=PROMPT, num_inference_steps=2, generator=_gen(), max_sequence_length=16).images
    assert pil[0].size == (64, 64)


def test_klein_save_load_round_trip(tmp_path):
    from diffusers import DiffusionPipeline, Flux2KleinPipeline

    pipe = tiny_flux2_klein_pipeline()
    save_tiny_flux2_klein_pipeline(tmp_path / "klein")
    loaded = DiffusionPipeline.from_pretrained(str(tmp_path / "klein"))
    assert type(loaded) is Flux2KleinPipeline and loaded.config.is_distilled is False
    assert torch.equal(loaded.vae.bn.running_var, pipe.vae.bn.running_var)
    assert torch.equal(_klein(pipe, output_type="latent"), _klein(loaded, output_type="latent"))
    ref = image(0, (64, 64))
    assert torch.equal(_klein(pipe, image=ref, output_type="latent"), _klein(loaded, image=ref, output_type="latent"))
    # the prompt path (chat template + tokenizer) survives the round trip
    assert loaded.tokenizer.chat_template == pipe.tokenizer.chat_template
