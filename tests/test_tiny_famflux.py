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
    save_tiny_flux2_klein_pipeline,
    save_tiny_flux_kontext_pipeline,
    tiny_flux2_klein_pipeline,
    tiny_flux_kontext_pipeline,
)
from tiny_pipelines import qwen_bpe_tokenizer

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


def _record(pipe, **kw):
    """Transformer kwargs (forward pre-hook), transformer outputs and scheduler.step arguments."""
    calls, outs, steps = [], [], []
    h1 = pipe.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(dict(k)) or None, with_kwargs=True)
    h2 = pipe.transformer.register_forward_hook(lambda m, a, k, o: outs.append(o[0]) or None, with_kwargs=True)
    step = pipe.scheduler.step
    pipe.scheduler.step = lambda mo, t, s, *a, **k: steps.append((mo, t, s)) or step(mo, t, s, *a, **k)
    try:
        images = pipe(**kw).images
    finally:
        h1.remove(), h2.remove()
        del pipe.scheduler.step
    return images, calls, outs, steps


def test_kontext_recorder_facts():
    """What a generic recorder relies on in FluxKontextPipeline: the noise's packed layout, the timestep
    (the scheduler's t / 1000) and the velocity (the output's first n tokens; the rest are the reference's)."""
    pipe = tiny_flux_kontext_pipeline()
    B, C, h = 2, 4, 16
    gens = [torch.Generator().manual_seed(i) for i in range(B)]
    latents, calls, outs, steps = _record(
        pipe, image=image(0), prompt=["a cat", "a dog"], num_inference_steps=2, generator=gens, output_type="latent",
        **KONTEXT_TINY_CALL,
    )
    noise = torch.cat([torch.randn((1, C, h, h), generator=torch.Generator().manual_seed(i)) for i in range(B)])
    packed = noise.view(B, C, h // 2, 2, h // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, (h // 2) ** 2, C * 4)
    assert torch.equal(steps[0][2], packed)
    assert len(calls) == len(steps) == 2
    for kw, out, (model_output, t, sample) in zip(calls, outs, steps):
        n = sample.shape[1]
        assert torch.equal(kw["timestep"], t.expand(B) / 1000)
        assert torch.equal(kw["hidden_states"][:, :n], sample) and kw["hidden_states"].shape[1] == 2 * n
        assert torch.equal(model_output, out[:, :n])
        assert kw["img_ids"].shape == (2 * n, 3) and kw["txt_ids"].ndim == 2  # shared ids, no batch dim
    assert torch.equal(pipe(image=image(0), prompt=["a cat", "a dog"], num_inference_steps=2, latents=packed,
                            output_type="latent", **KONTEXT_TINY_CALL).images, latents)


def test_klein_recorder_facts():
    pipe = tiny_flux2_klein_pipeline()
    B, Cp, hp = 2, 16, 8
    gens = [torch.Generator().manual_seed(i) for i in range(B)]
    fin = {}

    def keep(p, i, t, kw):
        fin["x"] = kw["latents"]
        return {}

    latents, calls, outs, steps = _record(
        pipe, prompt=["a cat", "a dog"], height=32, width=32, num_inference_steps=2, generator=gens,
        max_sequence_length=16, output_type="latent", callback_on_step_end=keep, image=image(0, (64, 64)),
    )
    noise = torch.cat([torch.randn((1, Cp, hp, hp), generator=torch.Generator().manual_seed(i)) for i in range(B)])
    assert torch.equal(steps[0][2], noise.reshape(B, Cp, hp * hp).permute(0, 2, 1))
    assert len(calls) == 2 * len(steps)  # base klein with guidance_scale 4: cond call, then uncond call
    for i, (model_output, t, sample) in enumerate(steps):
        n = sample.shape[1]
        cond, uncond = outs[2 * i][:, :n], outs[2 * i + 1][:, :n]
        assert torch.equal(calls[2 * i]["timestep"], t.expand(B) / 1000) and calls[2 * i]["guidance"] is None
        assert torch.allclose(model_output, uncond + 4.0 * (cond - uncond))
        assert calls[2 * i]["img_ids"].shape == (B, n + 256, 4)  # 64x64 reference -> 256 tokens
    # output_type="latent" is unpacked, de-normalized and unpatchified
    bn, x = pipe.vae.bn, fin["x"]
    z = x.permute(0, 2, 1).reshape(B, Cp, hp, hp)
    z = z * torch.sqrt(bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps) + bn.running_mean.view(1, -1, 1, 1)
    z = z.reshape(B, Cp // 4, 2, 2, hp, hp).permute(0, 1, 4, 2, 5, 3).reshape(B, Cp // 4, 2 * hp, 2 * hp)
    assert torch.allclose(z, latents, atol=1e-6)
