"""StableDiffusion3Pipeline (SD3 / SD3.5) as a teacher, its student and stock-diffusers interop, offline.

On the tiny SD3.5-style pipeline of tests/tiny_sd3_zimage.py (2 CLIP + T5, 4x16x16 latents, patch 2):
the teacher reproduces the stock ``__call__`` (guidance on and off), keeps its channels-first latents
as one token per latent pixel, and a per-pixel momentum head on ``proj_out`` samples in the STOCK
pipeline with the ArcFlowScheduler exactly as arcflow's own sampler does.
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
from tiny_sd3_zimage import SD3_T5_LENGTH, save_tiny_sd3_pipeline, tiny_sd3_pipeline

OPTS = dict(height=32, width=32, max_sequence_length=SD3_T5_LENGTH)
PROMPTS = ["a photo of a cat", "a red car"]


def _pipe():
    pipe = tiny_sd3_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.fixture(scope="module")
def sd3():
    return teacher_from_pipeline(_pipe(), teacher_id="tiny-sd3", revision="r0", **OPTS)


def _stock(pipe, guidance, output_type="latent", seeds=(0, 1)):
    return pipe(PROMPTS, height=32, width=32, num_inference_steps=4, guidance_scale=guidance,
                max_sequence_length=SD3_T5_LENGTH, generator=_generators(seeds), output_type=output_type).images


def test_sd3_family_is_registered(sd3):
    family = FAMILIES["StableDiffusion3Pipeline"]
    assert family_for_transformer("SD3Transformer2DModel") is family and sd3.family is family
    # One token per latent pixel (16x16 latents of 4 channels); true CFG with the pipeline's default 7.
    assert sd3.latent_shape == (256, 4) and sd3.grid == (16, 16)
    assert sd3.true_cfg and sd3.default_guidance == 7.0


@pytest.mark.parametrize("guidance", [7.0, 1.0])
def test_sd3_teacher_reproduces_the_pipeline(sd3, guidance):
    x, u, sigmas, cond = sd3.record(PROMPTS, [0, 1], 4, guidance)
    out = _stock(sd3.pipe, guidance)
    torch.testing.assert_close(sd3.family.to_pipeline_latents(x[:, -1], sd3.grid), out, rtol=0, atol=1e-5)
    torch.testing.assert_close(sample_teacher(sd3, PROMPTS, [0, 1], steps=4, guidance=guidance), x[:, -1],
                               rtol=0, atol=1e-5)
    # The recorded chain is the scheduler's float32 Euler update, exactly.
    for j in range(4):
        assert torch.equal(x[:, j + 1], x[:, j] - (sigmas[j] - sigmas[j + 1]) * u[:, j])
    # The schedule is the pipeline's own (sigmas=None: timesteps spaced between the shifted ends).
    assert torch.allclose(sigmas.double(), sd3.sigmas(4)) and abs(float(sigmas[3]) - 0.0089286) < 1e-6
    # The conditional call is the second half of the batched [uncond, cond] call.
    assert cond["encoder_hidden_states"].shape == (2, 16 + SD3_T5_LENGTH, 32) and cond["pooled_projections"].shape == (2, 32)
    enc = sd3.encode_prompts(PROMPTS)
    assert set(enc) == set(cond) and all(torch.equal(enc[k].float(), cond[k]) for k in cond)
    with torch.no_grad():
        if guidance == 1.0:  # replaying the stored conditioning is the recorded velocity
            got = sd3.conditional_velocity(x[:, 1], sigmas[1].expand(2), cond)
        else:  # arcflow's CFG (conditional + negative prompt, combined) is the pipeline's
            got = sd3.velocity(x[:, 1], sigmas[1].expand(2), cond, guidance)
    torch.testing.assert_close(got, u[:, 1], rtol=0, atol=1e-5)


def test_sd3_noise_and_decode(sd3):
    noise = sd3.noise([0, 1])
    drawn = torch.cat([torch.randn((1, 4, 16, 16), generator=g) for g in _generators([0, 1])])
    assert torch.equal(sd3.family.to_pipeline_latents(noise, sd3.grid), drawn)
    latents = sample_teacher(sd3, PROMPTS, [0, 1], steps=4, guidance=7.0)
    images = sd3.decode(latents)
    assert images.shape == (2, 3, 32, 32)
    torch.testing.assert_close(images, _stock(sd3.pipe, 7.0, output_type="pt"), rtol=0, atol=1e-5)


# ----- student ------------------------------------------------------------------------------------
def test_sd3_student_head_is_per_pixel(sd3):
    student = build_student(sd3, StudentConfig(momentum=True, k=4, lora_rank=2))
    wrapped = [n for n, m in student.transformer.named_modules() if hasattr(m, "lora_A")]
    assert len(wrapped) == 8 and not any(n.startswith(("proj_out", "norm_out", "context_embedder")) for n in wrapped)
    head = student.transformer.proj_out
    assert type(head).__name__ == "MomentumHead" and head.positions == 4 and head.channels == 4
    # The teacher's transformer is untouched; the student's un-patchifies to the packed width.
    assert isinstance(sd3.transformer.proj_out, torch.nn.Linear) and sd3.transformer.out_channels == 4
    assert student.transformer.out_channels == head.out_features == 4 * 4 + 4 + 3
    # K=1 at init is the teacher's Euler step (guidance 1).
    k1 = build_student(sd3, StudentConfig(momentum=True, k=1, lora_rank=2))
    cond, noise = sd3.encode_prompts(PROMPTS), sd3.noise([5, 6])
    with torch.no_grad():
        euler = noise - sd3.velocity(noise, torch.ones(2), cond, 1.0)
    torch.testing.assert_close(reference_sample(k1, noise, cond, nfe=1), euler, rtol=0, atol=1e-5)


def test_sd3_run_samples_in_the_stock_pipeline(sd3, tmp_path):
    from arcflow.distill.interop import arcflow_pipeline

    record = {"teacher_options": dict(OPTS), "segment_sigmas": sd3.sigmas(2).tolist()}
    student = trained_student(sd3, tmp_path / "run", record)
    scheduler = json.loads((tmp_path / "run" / "scheduler_config.json").read_text())
    assert scheduler["latent_layout"] == "channels_first" and scheduler["output_sign"] == 1
    cond, noise = sd3.encode_prompts(PROMPTS), sd3.noise([0, 1])
    expected = reference_sample(load_student(sd3, tmp_path / "run"), noise, cond, sigmas=sd3.sigmas(2))
    live = reference_sample(student, noise, cond, sigmas=sd3.sigmas(2))
    torch.testing.assert_close(expected, live, rtol=0, atol=0)
    # arcflow's own scheduler loop (`arcflow sample`) on the run's scheduler: the same samples.
    assert_run_sampler_matches(sd3, tmp_path / "run", noise, cond, expected)
    generator = arcflow_pipeline(_pipe(), tmp_path / "run")
    torch.testing.assert_close(generator.latents(PROMPTS, [0, 1]), expected, rtol=0, atol=1e-5)
    images = generator(PROMPTS, output_type="pt").images  # the stock __call__ with the run's defaults
    assert images.shape == (2, 3, 32, 32) and 0 <= float(images.min()) and float(images.max()) <= 1
    restored = generator.remove()
    assert isinstance(restored.transformer.proj_out, torch.nn.Linear) and restored.transformer.out_channels == 4
    assert type(restored.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    torch.testing.assert_close(_stock(restored, 1.0), _stock(_pipe(), 1.0), rtol=0, atol=0)


def test_sd3_with_another_scheduler_is_refused():
    from diffusers import FlowMatchHeunDiscreteScheduler

    pipe = _pipe()
    pipe.scheduler = FlowMatchHeunDiscreteScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(ArcflowError, match="StableDiffusion3Pipeline.*FlowMatchHeunDiscreteScheduler") as info:
        teacher_from_pipeline(pipe, teacher_id="tiny-sd3", revision="r0", **OPTS)
    assert "\n" not in str(info.value)
    with pytest.raises(ArcflowError, match="multiples of 4"):
        teacher_from_pipeline(_pipe(), teacher_id="tiny-sd3", revision="r0", height=30, width=32)


# ----- the CLI end to end on a saved pipeline directory ------------------------------------------
@pytest.mark.slow  # local Ray clusters for generation and training
def test_cli_end_to_end_on_a_tiny_sd3_directory(tmp_path):
    directory = save_tiny_sd3_pipeline(tmp_path / "pipe")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\na red car\na small house\n")
    ds, run, _ = cli_end_to_end(tmp_path, directory, prompts, generate=("--guidance", "1.0"))
    spec = json.loads((ds / "dataset.json").read_text())
    assert spec["latent_shape"] == [256, 4]
    record = json.loads((run / "arcflow_config.json").read_text())
    assert record["transformer_class"] == "SD3Transformer2DModel" and len(record["segment_sigmas"]) == 3
