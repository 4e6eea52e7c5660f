"""FLUX.2 [klein] (Flux2KleinPipeline) as an arcflow teacher, on the tiny pipeline of
tests/tiny_flux_family.py: the recorder reproduces the stock ``__call__`` (text-to-image with CFG on
and off, the step-distilled variant, and with reference images), its unpacked de-normalized
``output_type="latent"`` and decode, the step-count-dependent schedule; the stored conditioning
replays; the student's 2-step sampler on a stock pipeline equals arcflow's own; refusals are one line."""

from __future__ import annotations

import re

import pytest
import torch

from arcflow.distill.student import load_student
from arcflow.pipeline.diffusers_teachers import teacher_from_pipeline
from arcflow.pipeline.edit_inputs import edit_prompt, load_image
from arcflow.pipeline.families import family_for
from arcflow.pipeline.pipeline_capture import run_pipeline
from cli_helpers import raises_one_line
from family_checks import assert_run_sampler_matches, cli_end_to_end, trained_student
from reference_sampling import reference_sample
from tiny_flux_family import KLEIN_MAX_SEQUENCE_LENGTH, image, tiny_flux2_klein_pipeline

TEXTS = ["a photo of a cat", "a red car", "a small house"]
SEEDS = [0, 1, 2]
STEPS = 4
# Tiny models: one intra-op thread (a second one spin-waits on a busy machine; tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def _opts(size):
    return dict(height=size, width=size, max_sequence_length=KLEIN_MAX_SEQUENCE_LENGTH)


def _teacher(size=32, pipe=None, **extra):
    return teacher_from_pipeline(pipe or tiny_flux2_klein_pipeline(), teacher_id="tiny-klein", revision="r0",
                                 **_opts(size), **extra)


@pytest.fixture(scope="module")
def klein():
    return _teacher()


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("klein-refs")
    paths = []
    for i, size in enumerate([(64, 64), (96, 72)]):
        path = folder / f"ref{i}.png"
        image(i, size).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def ref_prompts(refs):
    """Two reference images per prompt (rows 0 and 2 share an ordered pair)."""
    return [edit_prompt(TEXTS[0], refs), edit_prompt(TEXTS[1], refs[::-1]), edit_prompt(TEXTS[2], refs)]


def _generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _stock(pipe, seeds, size=32, groups=None, output_type="latent", **kw):
    """The stock __call__; ``groups``: ``[(rows, [reference paths])]`` (default: all rows, no image)."""
    groups = groups or [(list(range(len(seeds))), [])]
    out = {}
    for rows, paths in groups:
        extra = {"image": [load_image(p).resize((size, size)) for p in paths]} if paths else {}
        images = pipe(prompt=[TEXTS[r] for r in rows], generator=_generators([seeds[r] for r in rows]), height=size,
                      width=size, num_inference_steps=STEPS, max_sequence_length=KLEIN_MAX_SEQUENCE_LENGTH,
                      output_type=output_type, **extra, **kw).images
        out.update(zip(rows, images))
    return torch.stack([out[r] for r in range(len(seeds))])


def _check_record(teacher, prompts, guidance, expected_latents):
    """Final latents (through to_pipeline_latents), noise, Euler chain, schedule; returns the record."""
    x, u, sigmas, cond = teacher.record(prompts, SEEDS, STEPS, guidance)
    got = teacher.family.to_pipeline_latents(x[:, -1], teacher.grid, teacher.pipe)
    torch.testing.assert_close(got, expected_latents, rtol=0, atol=1e-5)
    assert torch.equal(x[:, 0], teacher.noise(SEEDS))
    assert torch.equal(sigmas.double(), teacher.sigmas(STEPS))
    for j in range(STEPS):
        assert torch.equal(x[:, j + 1], x[:, j] - (sigmas[j] - sigmas[j + 1]) * u[:, j])
    return x, u, sigmas, cond


def test_klein_family_schedule_and_noise(klein):
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    assert family_for("Flux2KleinPipeline") is klein.family
    assert klein.latent_shape == (64, 16) and klein.true_cfg and klein.default_guidance == 4.0
    # mu depends on the step count: each schedule is the pipeline's own for its steps.
    for steps in (2, 4):
        assert klein.family.mu(klein.pipe, 64, steps) == compute_empirical_mu(64, steps)
        ran = run_pipeline(klein.pipe, dict(prompt=TEXTS[:1], height=32, width=32, num_inference_steps=steps,
                                            max_sequence_length=KLEIN_MAX_SEQUENCE_LENGTH, generator=_generators([7])),
                           "hidden_states", stub=True)
        assert ran.sigmas[0] == float(klein.sigmas(steps)[0])
        torch.testing.assert_close(klein.scheduler(steps).sigmas.double(), klein.sigmas(steps), rtol=0, atol=0)
        # The noise is the pipeline's own draw (the stub call's first sample).
        assert torch.equal(klein.noise([7]), ran.states[0])
    assert not torch.allclose(klein.sigmas(2)[1], torch.tensor(0.5, dtype=torch.float64))
    # latents= takes the 4-D patchified noise.
    x = klein.noise([3, 4])
    assert klein.family.latents_argument(x, klein.grid).shape == (2, 16, 8, 8)


@pytest.mark.parametrize("guidance", [4.0, 1.0])
def test_klein_text_to_image_reproduces_the_pipeline(klein, guidance):
    prompts = list(TEXTS)
    expected = _stock(klein.pipe, SEEDS, guidance_scale=guidance)
    assert expected.shape == (3, 4, 16, 16)  # output_type="latent": unpacked, de-normalized
    x, u, sigmas, cond = _check_record(klein, prompts, guidance, expected)
    assert klein.layout["txt_ids"]["kind"] == "shared" and klein.layout["img_ids"]["kind"] == "shared"
    assert cond["encoder_hidden_states"].shape == (3, KLEIN_MAX_SEQUENCE_LENGTH, 48)
    with torch.no_grad():
        u_cond = klein.conditional_velocity(x[:, 1], sigmas[1].expand(3), cond)
        u_guided = klein.velocity(x[:, 1], sigmas[1].expand(3), cond, guidance)
    torch.testing.assert_close(u_guided, u[:, 1], rtol=0, atol=1e-5)  # CFG with the "" negative, as the pipeline
    if guidance == 1.0:
        torch.testing.assert_close(u_cond, u[:, 1], rtol=0, atol=1e-5)
    encoded = klein.encode_prompts(prompts)
    assert sorted(encoded) == sorted(cond)
    for k in cond:
        torch.testing.assert_close(encoded[k].float(), cond[k], rtol=0, atol=1e-6)
    if guidance == 4.0:
        torch.testing.assert_close(klein.sample(prompts, SEEDS, STEPS, guidance), x[:, -1], rtol=0, atol=1e-5)
        images = klein.decode(x[:, -1])
        torch.testing.assert_close(images, _stock(klein.pipe, SEEDS, output_type="pt", guidance_scale=guidance),
                                   rtol=0, atol=1e-5)
        assert images.shape == (3, 3, 32, 32)


def test_distilled_klein_is_one_call_per_step():
    teacher = _teacher(pipe=tiny_flux2_klein_pipeline(is_distilled=True))
    assert teacher.default_guidance == 1.0
    expected = _stock(teacher.pipe, SEEDS)  # guidance_scale (4.0 by default) is ignored
    calls = []
    hook = teacher.transformer.register_forward_pre_hook(lambda m, a, kw: calls.append(1), with_kwargs=True)
    try:
        x, u, sigmas, cond = _check_record(teacher, list(TEXTS), None, expected)
    finally:
        hook.remove()
    assert len(calls) == STEPS
    with torch.no_grad():
        torch.testing.assert_close(teacher.conditional_velocity(x[:, 2], sigmas[2].expand(3), cond), u[:, 2], rtol=0, atol=1e-5)


def test_klein_with_reference_images_reproduces_the_pipeline(refs, ref_prompts):
    teacher = _teacher(64)
    groups = [([0, 2], refs), ([1], refs[::-1])]
    expected = _stock(teacher.pipe, SEEDS, 64, groups, guidance_scale=4.0)
    x, u, sigmas, cond = _check_record(teacher, ref_prompts, 4.0, expected)
    assert cond["reference_latents"].shape == (3, 2 * 256, 16) and cond["img_ids"].shape == (3, 3 * 256, 4)
    assert torch.equal(cond["reference_latents"][0], cond["reference_latents"][2])
    assert torch.equal(cond["reference_latents"][0, :256], cond["reference_latents"][1, 256:])
    x1, u1, s1, cond1 = _check_record(teacher, ref_prompts, 1.0, _stock(teacher.pipe, SEEDS, 64, groups, guidance_scale=1.0))
    with torch.no_grad():
        torch.testing.assert_close(teacher.conditional_velocity(x1[:, 1], s1[1].expand(3), cond1), u1[:, 1], rtol=0, atol=1e-5)
    encoded = teacher.encode_prompts(ref_prompts)
    for k in cond:
        torch.testing.assert_close(encoded[k].float(), cond[k], rtol=0, atol=1e-6)
    torch.testing.assert_close(teacher.decode(x[:, -1]), _stock(teacher.pipe, SEEDS, 64, groups, output_type="pt",
                                                               guidance_scale=4.0), rtol=0, atol=1e-5)


@pytest.mark.parametrize("with_refs", [False, True])
def test_klein_student_on_a_stock_pipeline(with_refs, ref_prompts, tmp_path):
    from arcflow.distill.interop import arcflow_pipeline

    size = 64 if with_refs else 32
    prompts = ref_prompts if with_refs else list(TEXTS)
    teacher = _teacher(size)
    student = trained_student(teacher, tmp_path / "run", {"teacher_options": _opts(size)})
    wrapped = [n for n, m in student.transformer.named_modules() if hasattr(m, "lora_A")]
    assert len(wrapped) == 7 and "proj_out" not in wrapped
    assert all(re.fullmatch(teacher.family.lora_targets, n) for n in wrapped)
    assert not any("to_qkv_mlp_proj" in n for n in wrapped)
    assert type(student.transformer.proj_out).__name__ == "MomentumHead"

    reference_teacher = _teacher(size)
    cond = reference_teacher.encode_prompts(prompts)
    expected = reference_sample(load_student(reference_teacher, tmp_path / "run"), reference_teacher.noise(SEEDS), cond,
                                sigmas=reference_teacher.sigmas(2))
    generator = arcflow_pipeline(tiny_flux2_klein_pipeline(), tmp_path / "run")
    got = generator.latents(prompts, SEEDS)  # the stock __call__ with the ArcFlowScheduler: 2 calls, no CFG
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(got, teacher.sample(prompts, SEEDS, 2, 1.0), atol=1e-3)
    # arcflow's own run sampler (what `arcflow sample --adapter` runs) cuts the reference tokens too.
    assert_run_sampler_matches(reference_teacher, tmp_path / "run", reference_teacher.noise(SEEDS), cond, expected)
    if not with_refs:
        images = generator(TEXTS[0], output_type="pt").images
        assert images.shape == (1, 3, 32, 32)


def test_what_klein_cannot_drive_is_one_line(klein, refs):
    from diffusers import FlowMatchHeunDiscreteScheduler

    pipe = tiny_flux2_klein_pipeline()
    pipe.scheduler = FlowMatchHeunDiscreteScheduler.from_config(pipe.scheduler.config)
    message = raises_one_line(lambda: _teacher(pipe=pipe))
    assert "Flux2KleinPipeline" in message and "FlowMatchHeunDiscreteScheduler" in message
    assert "at least 64 px" in raises_one_line(lambda: klein.encode_prompts([edit_prompt("a cat", refs[:1])]))
    assert "no negative prompt" in raises_one_line(lambda: _teacher(negative_prompt="blurry").encode_prompts(["a cat"]))
    mixed = _teacher(64)
    assert "changed shape" in raises_one_line(lambda: mixed.encode_prompts(["a cat", edit_prompt("a dog", refs[:1])]))
    assert "as many reference images" in raises_one_line(
        lambda: _teacher(64).encode_prompts([edit_prompt("a cat", refs), edit_prompt("a dog", refs[:1])]))


@pytest.mark.slow  # ~1-2 minutes: local Ray clusters for generation and for Ray Train
@pytest.mark.parametrize("with_refs", [False, True])
def test_cli_end_to_end_on_a_tiny_klein_directory(with_refs, tmp_path):
    import json

    from tiny_flux_family import save_tiny_flux2_klein_pipeline

    pipe_dir = save_tiny_flux2_klein_pipeline(tmp_path / "klein")
    size = "64" if with_refs else "32"
    if with_refs:
        (tmp_path / "refs").mkdir()
        image(0, (64, 64)).save(tmp_path / "refs" / "r0.png")
        image(1, (96, 72)).save(tmp_path / "refs" / "r1.png")
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": t, "image": ["refs/r0.png", "refs/r1.png"]}) + "\n" for t in TEXTS))
        image_args = ["--image", str(tmp_path / "refs" / "r0.png"), "--image", str(tmp_path / "refs" / "r1.png")]
    else:
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("\n".join(TEXTS) + "\n")
        image_args = []
    ds, run, _ = cli_end_to_end(tmp_path, pipe_dir, prompts, size=(size, size),
                                sample=("--prompt", "a red car", *image_args))
    record = json.loads((run / "arcflow_config.json").read_text())
    assert record["teacher_options"]["height"] == int(size) and len(record["segment_sigmas"]) == 3
