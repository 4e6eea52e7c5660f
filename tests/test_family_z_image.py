"""ZImagePipeline (Z-Image-Turbo / Z-Image) as a teacher, its student and stock-diffusers interop, offline.

On the tiny Z-Image pipeline of tests/tiny_sd3_zimage.py (Qwen3 text encoder, 4x16x16 latents, patch 2):
the teacher reproduces the stock ``__call__`` (guidance on and off), keeps its channels-first latents
as one token per latent pixel, stores the variable-length captions padded with their lengths, and a
per-pixel momentum head on ``all_final_layer.2-1.linear`` (initialised from the NEGATED projection:
the pipeline steps with the negated output) samples in the STOCK pipeline with the ArcFlowScheduler
exactly as arcflow's own sampler does.
"""

from __future__ import annotations

import json

import pytest
import torch

from arcflow.core.errors import ArcflowError
from arcflow.distill.student import StudentConfig, build_student, load_student
from arcflow.pipeline.diffusers_teachers import teacher_from_pipeline
from arcflow.pipeline.families import FAMILIES, family_for_transformer
from arcflow.pipeline.recording import sample_teacher
from family_checks import assert_run_sampler_matches, cli_end_to_end, trained_student
from reference_sampling import reference_sample
from tiny_sd3_zimage import Z_IMAGE_LENGTH, save_tiny_z_image_pipeline, tiny_z_image_pipeline

OPTS = dict(height=32, width=32, max_sequence_length=Z_IMAGE_LENGTH)
PROMPTS = ["a photo of a cat", "a red car"]


def _pipe():
    pipe = tiny_z_image_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.fixture(scope="module")
def zi():
    return teacher_from_pipeline(_pipe(), teacher_id="tiny-z-image", revision="r0", **OPTS)


def _stock(pipe, guidance, output_type="latent", seeds=(0, 1)):
    """The stock call at arcflow guidance ``guidance`` (the pipeline's ``guidance_scale`` is one less)."""
    return pipe(list(PROMPTS), height=32, width=32, num_inference_steps=4, guidance_scale=guidance - 1.0,
                max_sequence_length=Z_IMAGE_LENGTH, generator=_generators(seeds), output_type=output_type).images


def test_z_image_family_is_registered(zi):
    family = FAMILIES["ZImagePipeline"]
    assert family_for_transformer("ZImageTransformer2DModel") is family and zi.family is family
    # One token per latent pixel (16x16 latents of 4 channels); true CFG, the pipeline's default
    # guidance_scale 5 is arcflow's 6 (pos + 5 (pos - neg) = neg + 6 (pos - neg)).
    assert zi.latent_shape == (256, 4) and zi.grid == (16, 16)
    assert zi.true_cfg and zi.default_guidance == 6.0 and zi.shift == 3.0
    assert zi.family.guidance_kwargs(zi.pipe, 1.0, "")["guidance_scale"] == 0.0


@pytest.mark.parametrize("guidance", [6.0, 1.0])
def test_z_image_teacher_reproduces_the_pipeline(zi, guidance):
    x, u, sigmas, cond = zi.record(PROMPTS, [0, 1], 4, guidance)
    out = _stock(zi.pipe, guidance)
    torch.testing.assert_close(zi.family.to_pipeline_latents(x[:, -1], zi.grid), out, rtol=0, atol=1e-5)
    torch.testing.assert_close(sample_teacher(zi, PROMPTS, [0, 1], steps=4, guidance=guidance), x[:, -1],
                               rtol=0, atol=1e-5)
    # The recorded chain is the scheduler's float32 Euler update, exactly.
    for j in range(4):
        assert torch.equal(x[:, j + 1], x[:, j] - (sigmas[j] - sigmas[j + 1]) * u[:, j])
    # The pipeline's schedule: linspace(1, 1/4, 4) shifted by 3.
    assert torch.allclose(sigmas.double(), zi.sigmas(4)) and sigmas.tolist() == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0])
    # The conditional call is the first half of the batched [cond, neg] call; captions padded with lengths.
    assert cond["cap_feats"].shape == (2, Z_IMAGE_LENGTH, 32) and cond["cap_lengths"].tolist() == [10, 8]
    assert zi.layout["cap_lengths"] == {"kind": "batched", "dtype": "int64"} and zi.layout["x"] == {"kind": "latent"}
    assert cond["cap_feats"][1, 8:].abs().sum() == 0
    enc = zi.encode_prompts(PROMPTS)
    assert set(enc) == set(cond) and all(torch.equal(enc[k].float(), cond[k]) for k in cond)
    with torch.no_grad():
        if guidance == 1.0:  # replaying the stored conditioning is the recorded velocity
            got = zi.conditional_velocity(x[:, 1], sigmas[1].expand(2), cond)
        else:  # arcflow's CFG (conditional + negative prompt, combined) is the pipeline's
            got = zi.velocity(x[:, 1], sigmas[1].expand(2), cond, guidance)
    torch.testing.assert_close(got, u[:, 1], rtol=0, atol=1e-5)


def test_z_image_noise_and_decode(zi):
    noise = zi.noise([0, 1])
    drawn = torch.cat([torch.randn((1, 4, 16, 16), generator=g) for g in _generators([0, 1])])
    assert torch.equal(zi.family.to_pipeline_latents(noise, zi.grid), drawn)
    latents = sample_teacher(zi, PROMPTS, [0, 1], steps=4, guidance=6.0)
    images = zi.decode(latents)
    assert images.shape == (2, 3, 32, 32)
    torch.testing.assert_close(images, _stock(zi.pipe, 6.0, output_type="pt"), rtol=0, atol=1e-5)


def test_z_image_prompt_lists_are_not_rewritten(zi):
    """The pipeline rewrites its prompt lists in place (chat template); arcflow's calls keep the
    caller's list and a second call encodes the same text."""
    prompts = list(PROMPTS)
    first = zi.encode_prompts(prompts)
    assert prompts == PROMPTS
    second = zi.encode_prompts(prompts)
    assert all(torch.equal(first[k], second[k]) for k in first)


# ----- student ------------------------------------------------------------------------------------
def test_z_image_student_head_is_per_pixel_and_signed(zi):
    student = build_student(zi, StudentConfig(momentum=True, k=4, lora_rank=2))
    wrapped = [n for n, m in student.transformer.named_modules() if hasattr(m, "lora_A")]
    assert len(wrapped) == 11 and not any(n.startswith(("all_final_layer", "all_x_embedder", "cap_embedder", "context_refiner"))
                                          for n in wrapped)
    head = student.transformer.all_final_layer["2-1"].linear
    assert student.head is head
    assert type(head).__name__ == "MomentumHead" and head.positions == 4 and head.channels == 4
    # Velocity component 0 is the NEGATED projection (the velocity, not the model's x0 - noise).
    proj = zi.transformer.all_final_layer["2-1"].linear
    assert torch.equal(head.velocity.weight.view(4, 4, 4, 32)[:, 0], -proj.weight.view(4, 4, 32))
    # The teacher's transformer is untouched; the student's un-patchifies to the packed width.
    assert isinstance(proj, torch.nn.Linear) and zi.transformer.out_channels == 4
    assert student.transformer.out_channels == head.out_features == 4 * 4 + 4 + 3
    # K=1 at init is the teacher's Euler step (guidance 1).
    k1 = build_student(zi, StudentConfig(momentum=True, k=1, lora_rank=2))
    cond, noise = zi.encode_prompts(PROMPTS), zi.noise([5, 6])
    with torch.no_grad():
        euler = noise - zi.velocity(noise, torch.ones(2), cond, 1.0)
    torch.testing.assert_close(reference_sample(k1, noise, cond, nfe=1), euler, rtol=0, atol=1e-5)


def test_z_image_run_samples_in_the_stock_pipeline(zi, tmp_path):
    from arcflow.distill.interop import arcflow_pipeline

    record = {"teacher_options": dict(OPTS), "segment_sigmas": zi.sigmas(2).tolist()}
    student = trained_student(zi, tmp_path / "run", record)
    scheduler = json.loads((tmp_path / "run" / "scheduler_config.json").read_text())
    assert scheduler["latent_layout"] == "channels_first" and scheduler["output_sign"] == -1
    cond, noise = zi.encode_prompts(PROMPTS), zi.noise([0, 1])
    expected = reference_sample(load_student(zi, tmp_path / "run"), noise, cond, sigmas=zi.sigmas(2))
    live = reference_sample(student, noise, cond, sigmas=zi.sigmas(2))
    torch.testing.assert_close(expected, live, rtol=0, atol=0)
    # arcflow's own scheduler loop (`arcflow sample`) on the run's scheduler: the same samples.
    assert_run_sampler_matches(zi, tmp_path / "run", noise, cond, expected)
    generator = arcflow_pipeline(_pipe(), tmp_path / "run")
    torch.testing.assert_close(generator.latents(PROMPTS, [0, 1]), expected, rtol=0, atol=1e-5)
    images = generator(PROMPTS, output_type="pt").images  # the stock __call__ with the run's defaults
    assert images.shape == (2, 3, 32, 32) and 0 <= float(images.min()) and float(images.max()) <= 1
    restored = generator.remove()
    assert isinstance(restored.transformer.all_final_layer["2-1"].linear, torch.nn.Linear)
    assert restored.transformer.out_channels == 4
    assert type(restored.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    torch.testing.assert_close(_stock(restored, 1.0), _stock(_pipe(), 1.0), rtol=0, atol=0)


def test_z_image_that_cannot_be_driven_is_refused():
    from diffusers import FlowMatchHeunDiscreteScheduler

    pipe = _pipe()
    pipe.scheduler = FlowMatchHeunDiscreteScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ArcflowError, match="ZImagePipeline.*FlowMatchHeunDiscreteScheduler") as info:
        teacher_from_pipeline(pipe, teacher_id="tiny-z-image", revision="r0", **OPTS)
    assert "\n" not in str(info.value)
    with pytest.raises(ArcflowError, match="multiples of 4"):
        teacher_from_pipeline(_pipe(), teacher_id="tiny-z-image", revision="r0", height=30, width=32)
    # A transformer without the (2, 1) patch output layer the pipeline always runs.
    pipe = _pipe()
    del pipe.transformer.all_final_layer["2-1"]
    with pytest.raises(ArcflowError, match="ZImagePipeline.*'all_final_layer.2-1.linear'"):
        teacher_from_pipeline(pipe, teacher_id="tiny-z-image", revision="r0", **OPTS)


# ----- the CLI end to end on a saved pipeline directory ------------------------------------------
@pytest.mark.slow  # local Ray clusters for generation and training
def test_cli_end_to_end_on_a_tiny_z_image_directory(tmp_path):
    directory = save_tiny_z_image_pipeline(tmp_path / "pipe")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\na red car\na small house\n")
    ds, run, _ = cli_end_to_end(tmp_path, directory, prompts, generate=("--guidance", "1.0"))
    spec = json.loads((ds / "dataset.json").read_text())
    assert spec["latent_shape"] == [256, 4]
    record = json.loads((run / "arcflow_config.json").read_text())
    assert record["transformer_class"] == "ZImageTransformer2DModel" and len(record["segment_sigmas"]) == 3
