"""FLUX.1 Kontext (FluxKontextPipeline, image edit) as an arcflow teacher, on the tiny pipeline of
tests/tiny_flux_family.py: the recorder reproduces the stock ``__call__`` (one reference image per
prompt, embedded guidance on and off, true CFG), the stored conditioning replays, the student's
2-step sampler on a stock pipeline equals arcflow's own, and what cannot be driven is refused."""

from __future__ import annotations

import re

import pytest
import torch

from arcflow.core.errors import ArcflowError
from arcflow.distill.student import load_student
from arcflow.pipeline.diffusers_teachers import teacher_from_pipeline
from arcflow.pipeline.edit_inputs import edit_prompt, load_image
from arcflow.pipeline.families import FluxFamily, family_for
from arcflow.pipeline.pipeline_capture import run_pipeline
from arcflow.pipeline.recording import sample_teacher
from cli_helpers import raises_one_line
from family_checks import assert_run_sampler_matches, cli_end_to_end, trained_student
from reference_sampling import reference_sample
from tiny_flux_family import KONTEXT_TINY_CALL, image, tiny_flux_kontext_components, tiny_flux_kontext_pipeline
from tiny_pipelines import T5_LENGTH

OPTS = dict(height=32, width=32, max_sequence_length=T5_LENGTH)
TEXTS = ["a photo of a cat", "a red car", "a small house"]
SEEDS = [0, 1, 2]
STEPS = 4
# Tiny models: one intra-op thread (a second one spin-waits on a busy machine; tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    """Two reference image files; the first is not the output size (the teacher resizes it)."""
    folder = tmp_path_factory.mktemp("kontext-refs")
    paths = []
    for i, size in enumerate([(40, 48), (32, 32)]):
        path = folder / f"ref{i}.png"
        image(i, size).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def prompts(refs):
    return [edit_prompt(TEXTS[0], [refs[0]]), edit_prompt(TEXTS[1], [refs[1]]), edit_prompt(TEXTS[2], [refs[0]])]


def _teacher(pipe=None, **extra):
    return teacher_from_pipeline(pipe or tiny_flux_kontext_pipeline(), teacher_id="tiny-kontext", revision="r0",
                                 **OPTS, **extra)


@pytest.fixture(scope="module")
def kontext():
    return _teacher()


def _generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _stock(pipe, refs, seeds, output_type="latent", **kw):
    """The stock __call__, one call per reference image (rows 0 and 2 share refs[0]), the reference
    resized to the output size by the caller."""
    out = {}
    for rows, path in (([0, 2], refs[0]), ([1], refs[1])):
        images = pipe(prompt=[TEXTS[r] for r in rows], image=load_image(path).resize((32, 32)),
                      generator=_generators([seeds[r] for r in rows]), num_inference_steps=STEPS,
                      max_sequence_length=T5_LENGTH, output_type=output_type, **KONTEXT_TINY_CALL, **kw).images
        out.update(zip(rows, images))
    return torch.stack([out[r] for r in range(len(seeds))])


def test_kontext_is_registered_as_a_flux_edit_family(kontext):
    family = family_for("FluxKontextPipeline")
    assert family is kontext.family and family.edit and isinstance(family, FluxFamily)
    assert kontext.latent_shape == (64, 16) and kontext.guidance_embeds and kontext.default_guidance == 3.5
    assert family.extra_call_kwargs(kontext.pipe, 32, 48) == {"max_area": 32 * 48, "_auto_resize": False}


@pytest.mark.parametrize("guidance", [3.5, 1.0])
def test_kontext_teacher_reproduces_the_pipeline(kontext, refs, prompts, guidance):
    x, u, sigmas, cond = kontext.record(prompts, SEEDS, STEPS, guidance)
    # Final latents == the stock call with per-seed generators (the scheduler layout is the pipeline's).
    expected = _stock(kontext.pipe, refs, SEEDS, guidance_scale=guidance)
    torch.testing.assert_close(x[:, -1], expected, rtol=0, atol=1e-5)
    # The noise is the pipeline's own draw (a stub call with the generators: its first sample).
    drawn = run_pipeline(kontext.pipe, dict(prompt=TEXTS[:1], image=load_image(refs[1]), generator=_generators([7]),
                                            num_inference_steps=1, max_sequence_length=T5_LENGTH, **KONTEXT_TINY_CALL),
                         "hidden_states", stub=True).states[0]
    assert torch.equal(kontext.noise([7]), drawn) and torch.equal(x[:, 0], kontext.noise(SEEDS))
    # The Euler chain is exact in float32.
    assert torch.equal(sigmas.double(), kontext.sigmas(STEPS))
    for j in range(STEPS):
        assert torch.equal(x[:, j + 1], x[:, j] - (sigmas[j] - sigmas[j + 1]) * u[:, j])
    # The reference tokens are stored; replay at recorded states gives the recorded velocity (the
    # guidance is embedded: one call, stored per sample).
    assert cond["reference_latents"].shape == (3, 64, 16) and kontext.layout["hidden_states"]["reference"] == "reference_latents"
    assert torch.equal(cond["reference_latents"][0], cond["reference_latents"][2])
    assert not torch.allclose(cond["reference_latents"][0], cond["reference_latents"][1])
    assert kontext.layout["img_ids"]["kind"] == "shared" and cond["img_ids"].shape == (3, 128, 3)
    assert torch.equal(cond["arg_guidance"], torch.full((3,), guidance))  # stored as arg_guidance
    with torch.no_grad():
        for j in (0, STEPS - 1):
            torch.testing.assert_close(kontext.conditional_velocity(x[:, j], sigmas[j].expand(3), cond), u[:, j],
                                       rtol=0, atol=1e-5)
    # encode_prompts (a stub call) gives the recorded conditioning (guidance: the teacher's default).
    encoded = kontext.encode_prompts(prompts)
    assert sorted(encoded) == sorted(cond)
    for k in cond:
        if k != "arg_guidance":
            torch.testing.assert_close(encoded[k].float(), cond[k], rtol=0, atol=1e-6)
    if guidance == 3.5:
        torch.testing.assert_close(sample_teacher(kontext, prompts, SEEDS, steps=STEPS, guidance=guidance), expected,
                                   rtol=0, atol=1e-5)
        images = kontext.decode(x[:, -1])
        torch.testing.assert_close(images, _stock(kontext.pipe, refs, SEEDS, output_type="pt", guidance_scale=guidance),
                                   rtol=0, atol=1e-5)
        assert images.shape == (3, 3, 32, 32)


def test_kontext_true_cfg_without_guidance_embedding(refs, prompts):
    """A Kontext transformer without guidance embedding: true CFG (cond call, then the negative
    prompt's), recorded through the pipeline's own __call__."""
    from diffusers import FluxKontextPipeline, FluxTransformer2DModel

    components = tiny_flux_kontext_components()
    cfg = dict(components["transformer"].config)
    components["transformer"] = FluxTransformer2DModel(**{**{k: v for k, v in cfg.items() if not k.startswith("_")},
                                                          "guidance_embeds": False}).eval()
    teacher = _teacher(FluxKontextPipeline(**components))
    assert teacher.true_cfg and teacher.default_guidance == 1.0
    x, u, sigmas, cond = teacher.record(prompts, SEEDS, STEPS, 4.0)
    expected = _stock(teacher.pipe, refs, SEEDS, true_cfg_scale=4.0, negative_prompt="")
    torch.testing.assert_close(x[:, -1], expected, rtol=0, atol=1e-5)
    assert "arg_guidance" not in cond
    x1, u1, s1, cond1 = teacher.record(prompts, SEEDS, STEPS, 1.0)
    torch.testing.assert_close(x1[:, -1], _stock(teacher.pipe, refs, SEEDS), rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(teacher.conditional_velocity(x1[:, 1], s1[1].expand(3), cond1), u1[:, 1], rtol=0, atol=1e-5)
    # CFG outside the pipeline's own sampler needs the negative's reference tokens: refused in one line.
    with pytest.raises(ArcflowError, match="edit pipelines") as info:
        teacher.velocity(x1[:, 1], s1[1].expand(3), cond1, 4.0)
    assert "\n" not in str(info.value)


def test_kontext_student_on_a_stock_pipeline(kontext, prompts, refs, tmp_path):
    from arcflow.distill.interop import arcflow_pipeline

    student = trained_student(_teacher(), tmp_path / "run", {"teacher_options": dict(OPTS)})
    wrapped = [n for n, m in student.transformer.named_modules() if hasattr(m, "lora_A")]
    assert len(wrapped) == 8 and "proj_out" not in wrapped
    assert all(re.fullmatch(kontext.family.lora_targets, n) for n in wrapped)
    assert type(student.transformer.proj_out).__name__ == "MomentumHead"

    reference_teacher = _teacher()
    cond = reference_teacher.encode_prompts(prompts)
    expected = reference_sample(load_student(reference_teacher, tmp_path / "run"), reference_teacher.noise(SEEDS), cond,
                                sigmas=reference_teacher.sigmas(2))
    generator = arcflow_pipeline(tiny_flux_kontext_pipeline(), tmp_path / "run")
    got = generator.latents(prompts, SEEDS)  # the stock __call__ with the ArcFlowScheduler, 2 calls
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(got, kontext.sample(prompts, SEEDS, 2), atol=1e-3)
    # arcflow's own run sampler (what `arcflow sample --adapter` runs) cuts the reference tokens too.
    assert_run_sampler_matches(reference_teacher, tmp_path / "run", reference_teacher.noise(SEEDS), cond, expected)
    # Calling the wrapper keeps the run's size (max_area / _auto_resize come with the call defaults).
    images = generator(TEXTS[1], image=load_image(refs[1]), output_type="pt").images
    assert images.shape == (1, 3, 32, 32)


def test_what_kontext_cannot_drive_is_one_line(kontext, refs):
    from diffusers import FlowMatchHeunDiscreteScheduler

    pipe = tiny_flux_kontext_pipeline()
    pipe.scheduler = FlowMatchHeunDiscreteScheduler.from_config(pipe.scheduler.config)
    message = raises_one_line(lambda: _teacher(pipe))
    assert "FluxKontextPipeline" in message and "FlowMatchHeunDiscreteScheduler" in message
    raises_one_line(lambda: kontext.encode_prompts([edit_prompt("a cat", refs)]), "exactly one reference image")
    assert "edits images" in raises_one_line(lambda: kontext.encode_prompts(["a cat"]))


@pytest.mark.slow  # ~1-2 minutes: local Ray clusters for generation and for Ray Train
def test_cli_end_to_end_on_a_tiny_kontext_directory(tmp_path):
    import json

    from tiny_flux_family import save_tiny_flux_kontext_pipeline

    pipe_dir = save_tiny_flux_kontext_pipeline(tmp_path / "kontext")
    (tmp_path / "refs").mkdir()
    for i in range(2):
        image(i, (40, 48)).save(tmp_path / "refs" / f"r{i}.png")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t, "image": f"refs/r{i % 2}.png"}) + "\n" for i, t in enumerate(TEXTS)))
    ds, run, _ = cli_end_to_end(tmp_path, pipe_dir, prompts,
                                sample=("--prompt", "a red car", "--image", str(tmp_path / "refs" / "r1.png")))
    record = json.loads((run / "arcflow_config.json").read_text())
    assert record["teacher_options"]["height"] == 32 and len(record["segment_sigmas"]) == 3
