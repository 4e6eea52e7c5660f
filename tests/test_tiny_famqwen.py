"""The tiny Qwen-Image family builders (tests/tiny_qwen_family.py) give working stock pipelines:
QwenImagePipeline with a real tiny Qwen2.5-VL text encoder + tokenizer, and QwenImageEditPlusPipeline
with one or several reference images; both run from text prompts, decode, and round-trip through
save_pretrained / from_pretrained to the same latents."""

from __future__ import annotations

import pytest
import torch

from tiny_qwen_family import (
    EDIT_TEMPLATE,
    T2I_TEMPLATE,
    save_tiny_qwen_image_edit_plus_pipeline,
    save_tiny_qwen_image_te_pipeline,
    tiny_edit_plus_sizes,
    tiny_image,
    tiny_qwen_image_edit_plus_pipeline,
    tiny_qwen_image_te_pipeline,
    tiny_qwen_tokenizer,
)

STEPS = 4


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _gen():
    return torch.Generator().manual_seed(0)


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_tokenizer_drops_exactly_the_system_prefix():
    tok = tiny_qwen_tokenizer()
    for template, drop in ((T2I_TEMPLATE, 34), (EDIT_TEMPLATE, 64)):
        ids = tok(template.format("a red cat")).input_ids
        kept = tok.convert_ids_to_tokens(ids[drop:])
        assert kept[:3] == ["a", "Ġred", "Ġcat"], kept
        assert tok.convert_ids_to_tokens(ids[drop - 3 : drop]) == ["<|im_start|>", "user", "Ċ"]


def test_qwen_image_text_prompt_latent_and_decode():
    pipe = _quiet(tiny_qwen_image_te_pipeline())
    kw = dict(num_inference_steps=STEPS, height=32, width=32)
    lat = pipe(prompt="a red cat", output_type="latent", generator=_gen(), **kw).images
    assert lat.shape == (1, 64, 16) and torch.isfinite(lat).all()
    again = pipe(prompt="a red cat", output_type="latent", generator=_gen(), **kw).images
    assert torch.equal(lat, again)
    other = pipe(prompt="a blue dog", output_type="latent", generator=_gen(), **kw).images
    assert not torch.allclose(lat, other)  # the text encoder conditions the transformer
    img = pipe(prompt="a red cat", output_type="pt", generator=_gen(), **kw).images
    assert img.shape == (1, 3, 32, 32)
    pil = pipe(
        prompt=["a red cat", "a big house on the river"], negative_prompt=[" ", " "], true_cfg_scale=4.0,
        output_type="pil", generator=_gen(), **kw,
    ).images
    assert len(pil) == 2 and pil[0].size == (32, 32)


def test_qwen_image_save_load_round_trip(tmp_path):
    from diffusers import DiffusionPipeline, QwenImagePipeline

    pipe = _quiet(tiny_qwen_image_te_pipeline())
    save_tiny_qwen_image_te_pipeline(tmp_path / "qwen")
    loaded = _quiet(DiffusionPipeline.from_pretrained(str(tmp_path / "qwen")))
    assert isinstance(loaded, QwenImagePipeline)
    kw = dict(prompt="a red cat", num_inference_steps=STEPS, height=32, width=32, output_type="latent")
    assert torch.equal(pipe(generator=_gen(), **kw).images, loaded(generator=_gen(), **kw).images)


@pytest.mark.parametrize("zero_cond_t", [False, True])
def test_edit_plus_one_and_two_images(zero_cond_t):
    pipe = _quiet(tiny_qwen_image_edit_plus_pipeline(zero_cond_t=zero_cond_t))
    kw = dict(prompt="a red cat", num_inference_steps=STEPS, height=32, width=32)
    with tiny_edit_plus_sizes():
        one = pipe(image=tiny_image(0), output_type="latent", generator=_gen(), **kw).images
        two = pipe(image=[tiny_image(0), tiny_image(1, (48, 32))], output_type="latent", generator=_gen(), **kw).images
        other = pipe(image=tiny_image(2), output_type="latent", generator=_gen(), **kw).images
        img = pipe(
            image=tiny_image(0), negative_prompt=" ", true_cfg_scale=4.0, output_type="pt", generator=_gen(), **kw
        ).images
        pil = pipe(image=tiny_image(0), output_type="pil", generator=_gen(), **kw).images
    assert one.shape == two.shape == (1, 64, 16)
    assert not torch.allclose(one, two) and not torch.allclose(one, other)  # the reference images condition it
    assert img.shape == (1, 3, 32, 32) and pil[0].size == (32, 32)


def test_edit_plus_save_load_round_trip(tmp_path):
    from diffusers import DiffusionPipeline, QwenImageEditPlusPipeline

    pipe = _quiet(tiny_qwen_image_edit_plus_pipeline())
    save_tiny_qwen_image_edit_plus_pipeline(tmp_path / "edit")
    loaded = _quiet(DiffusionPipeline.from_pretrained(str(tmp_path / "edit")))
    assert isinstance(loaded, QwenImageEditPlusPipeline)
    kw = dict(
        image=[tiny_image(0), tiny_image(1)], prompt="a red cat", num_inference_steps=STEPS, height=32, width=32,
        output_type="latent",
    )
    with tiny_edit_plus_sizes():
        assert torch.equal(pipe(generator=_gen(), **kw).images, loaded(generator=_gen(), **kw).images)
