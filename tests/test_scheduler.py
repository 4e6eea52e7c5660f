"""ArcFlowScheduler: the diffusers scheduler equals the reference few-step sampler.

On the digits teacher a hand-written diffusers loop (transformer call -> ``scheduler.step``) and
``LoadedRun.sample_latents`` match ``reference_sampling.reference_sample``; on the tiny FLUX pipeline
the STOCK ``FluxPipeline.__call__`` with the scheduler swapped matches it in exactly NFE transformer
calls.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from arcflow.distill.runs import load_run
from arcflow.distill.arcflow_scheduler import ArcFlowScheduler
from arcflow.distill.student import StudentConfig, build_student, load_scheduler, load_student, save_student
from arcflow.pipeline.registry import load_teacher
from arcflow.core.errors import ArcflowError
from diffusers.schedulers.scheduling_utils import SCHEDULER_CONFIG_NAME
from tiny_pipelines import T5_LENGTH, save_tiny_flux_pipeline
from reference_sampling import reference_sample

DIGITS = ["a handwritten digit 3", "a handwritten digit 7", "a handwritten digit 0"]
FLUX_OPTS = dict(height=32, width=32, max_sequence_length=T5_LENGTH)
FLUX_PROMPTS = ["a photo of a cat", "a red car"]
SEGMENTS = [1.0, 0.62, 0.0]  # deliberately not the teacher's 2-step schedule

pytestmark = pytest.mark.usefixtures("one_thread")


def _save_trained_run(teacher, out, config, **extra):
    """A student with random non-zero trainable weights (LoRA B starts at zero), saved as a run."""
    student = build_student(teacher, config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in student.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    save_student(student, out, extra)
    return out


def _settings(scheduler):
    return {k: v for k, v in scheduler.config.items() if not k.startswith("_")}


def _count_calls(module):
    calls = []
    handle = module.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    teacher = load_teacher("digits")
    out = tmp_path_factory.mktemp("scheduler") / "run"
    return _save_trained_run(teacher, out, StudentConfig(momentum=True, k=3, lora_rank=2, weight_groups=2), segment_sigmas=SEGMENTS)


@pytest.fixture(scope="module")
def loaded(digits_run):
    return load_run(digits_run, merge_lora=False)


def test_a_diffusers_loop_over_step_matches_the_sampler_on_the_digits_teacher(digits_run, loaded):
    teacher, student = loaded.teacher, loaded.student
    scheduler = ArcFlowScheduler.from_pretrained(str(digits_run))
    assert scheduler.config.segment_sigmas == SEGMENTS and scheduler.nfe == 2
    cond, noise = teacher.encode_prompts(DIGITS), teacher.noise([0, 1, 2])
    with torch.no_grad():
        expected = reference_sample(student, noise, cond, sigmas=torch.tensor(SEGMENTS, dtype=torch.float64))
        scheduler.set_timesteps(2)
        x = scheduler.scale_model_input(noise * scheduler.init_noise_sigma)
        calls, hook = _count_calls(student.transformer)
        for sigma, t in zip(scheduler.sigmas, scheduler.timesteps):
            sigma = sigma.expand(x.shape[0])
            packed = student.transformer(**teacher.transformer_inputs(x, sigma, cond))[0]
            x = scheduler.step(packed, t, x).prev_sample
        hook.remove()
    assert len(calls) == 2 and x.shape == noise.shape
    assert (x - expected).abs().max() <= 1e-6
    # The run's own loop (what `arcflow sample` and `evaluate` use) is the same loop.
    assert (loaded.sample_latents(DIGITS, [0, 1, 2]) - expected).abs().max() <= 1e-6


def test_another_nfe_samples_on_the_teachers_schedule(loaded):
    teacher, student = loaded.teacher, loaded.student
    cond, noise = teacher.encode_prompts(DIGITS[:2]), teacher.noise([4, 5])
    for nfe in (1, 4):
        with torch.no_grad():
            expected = reference_sample(student, noise, cond, sigmas=teacher.sigmas(nfe))
        got = loaded.sample_latents(DIGITS[:2], [4, 5], nfe=nfe)
        assert (got - expected).abs().max() <= 1e-6
    assert loaded.scheduler.nfe == 2  # the run's scheduler is untouched


def test_config_round_trip_and_pipeline_style_set_timesteps(tmp_path):
    scheduler = ArcFlowScheduler(k=4, weight_groups=2, channels=16, momentum=False, segment_sigmas=[1.0, 0.7, 0.3, 0.0])
    scheduler.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / SCHEDULER_CONFIG_NAME).read_text())
    assert saved["_class_name"] == "ArcFlowScheduler" and saved["segment_sigmas"] == [1.0, 0.7, 0.3, 0.0]
    again = ArcFlowScheduler.from_pretrained(str(tmp_path))
    assert _settings(again) == _settings(scheduler)
    # What FluxPipeline passes: its own linspace sigmas and a resolution shift; ignored but for the count.
    again.set_timesteps(sigmas=np.linspace(1.0, 1 / 3, 3), mu=0.9, device="cpu")
    torch.testing.assert_close(again.timesteps, torch.tensor([1000.0, 700.0, 300.0]))
    assert again.sigmas.dtype == torch.float32 and again.order == 1 and again.init_noise_sigma == 1.0
    with pytest.raises(ValueError, match="num_inference_steps=3"):
        again.set_timesteps(28)
    other = ArcFlowScheduler.from_config(again.config, segment_sigmas=[1.0, 0.0])
    assert other.nfe == 1 and other.config.k == 4


def test_step_refuses_what_is_not_a_head_output():
    scheduler = ArcFlowScheduler(k=2, weight_groups=1, channels=4, segment_sigmas=[1.0, 0.5, 0.0])
    scheduler.set_timesteps(2)
    x = torch.zeros(1, 16, 4)
    with pytest.raises(ValueError, match="momentum head"):
        scheduler.step(torch.zeros(1, 16, 4), scheduler.timesteps[0], x)  # a plain velocity
    packed = torch.zeros(1, 16, 2 * 4 + 2 + 1)
    for t in scheduler.timesteps:
        x = scheduler.step(packed, t, x).prev_sample
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(packed, scheduler.timesteps[-1], x)
    with pytest.raises(ValueError, match="strictly decreasing"):
        ArcFlowScheduler(segment_sigmas=[1.0, 1.0, 0.0])


def test_load_scheduler_checks_the_run(digits_run, loaded, tmp_path):
    import shutil

    moved = tmp_path / "run"
    shutil.copytree(digits_run, moved)
    config = json.loads((moved / SCHEDULER_CONFIG_NAME).read_text())
    (moved / SCHEDULER_CONFIG_NAME).write_text(json.dumps({**config, "k": 5}))
    with pytest.raises(ArcflowError, match="does not fit the run's student"):
        load_scheduler(moved, loaded.record, loaded.teacher)
    (moved / SCHEDULER_CONFIG_NAME).write_text(json.dumps({**config, "segment_sigmas": [0.0, 1.0]}))
    with pytest.raises(ArcflowError, match=f"{SCHEDULER_CONFIG_NAME} is damaged: segment_sigmas must be"):
        load_scheduler(moved, loaded.record, loaded.teacher)
    (moved / SCHEDULER_CONFIG_NAME).write_text("{not json")
    with pytest.raises(ArcflowError, match=SCHEDULER_CONFIG_NAME):
        load_scheduler(moved, loaded.record, loaded.teacher)
    # A run saved before schedulers were exported: the record gives the same scheduler.
    (moved / SCHEDULER_CONFIG_NAME).unlink()
    assert _settings(load_scheduler(moved, loaded.record, loaded.teacher)) == _settings(loaded.scheduler)


# ----- the stock FluxPipeline ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return save_tiny_flux_pipeline(tmp_path_factory.mktemp("tiny-flux") / "pipe")


def test_the_stock_flux_pipeline_samples_the_run_in_nfe_calls(flux_dir, tmp_path):
    from arcflow.distill.interop import arcflow_pipeline
    from diffusers import FluxPipeline

    teacher = load_teacher(str(flux_dir), **FLUX_OPTS)
    sigmas = teacher.sigmas(2)
    run = _save_trained_run(teacher, tmp_path / "run", StudentConfig(momentum=True, k=4, lora_rank=4, lora_alpha=8.0),
                            teacher_options=dict(FLUX_OPTS), segment_sigmas=sigmas.tolist())
    reference = load_student(load_teacher(str(flux_dir), **FLUX_OPTS), run).eval()
    cond, noise = teacher.encode_prompts(FLUX_PROMPTS), teacher.noise([0, 1])
    with torch.no_grad():
        expected = reference_sample(reference, noise, cond, sigmas=sigmas)

    pipe = FluxPipeline.from_pretrained(str(flux_dir))
    arcflow_pipeline(pipe, run)
    assert isinstance(pipe.scheduler, ArcFlowScheduler)
    calls, hook = _count_calls(pipe.transformer)
    steps = []
    out = pipe(FLUX_PROMPTS, num_inference_steps=2, guidance_scale=teacher.default_guidance, latents=noise,
               max_sequence_length=T5_LENGTH, height=32, width=32, output_type="latent",
               callback_on_step_end=lambda p, i, t, kw: steps.append(i) or kw)
    hook.remove()
    assert len(calls) == 2 and steps == [0, 1]
    assert out.images.shape == expected.shape
    assert (out.images - expected).abs().max() <= 1e-6
    # Stock decode and output types on top of the same two calls.
    images = pipe(FLUX_PROMPTS[:1], num_inference_steps=2, guidance_scale=teacher.default_guidance,
                  latents=noise[:1], max_sequence_length=T5_LENGTH, height=32, width=32, output_type="pil").images
    assert len(images) == 1 and images[0].size == (32, 32)
    with pytest.raises(ValueError, match="num_inference_steps=2"):
        pipe(FLUX_PROMPTS, max_sequence_length=T5_LENGTH, height=32, width=32, output_type="latent")
