"""QwenImageEditPlusPipeline (Qwen-Image-Edit-2509 / -2511: one or more reference images per prompt)
on the generic recorder, with its tiny Qwen2.5-VL text encoder (tests/tiny_qwen_family.py).

Edit prompts are the canonical strings of pipeline/edit_inputs.py (text + image paths). Every test
runs inside ``tiny_edit_plus_sizes()``: the pipeline VAE-encodes each reference at the module
constant ``VAE_IMAGE_SIZE`` (1024**2 pixels; far too slow for the tiny VAE on CPU), patched here to
32*32 (16x16 latents = 64 reference tokens per image). The family reads the constant; it never
patches it.
"""

from __future__ import annotations

import re

import pytest
import torch

from arcflow.core.errors import ArcflowError
from arcflow.distill.student import load_student
from arcflow.pipeline.diffusers_teachers import teacher_from_pipeline
from arcflow.pipeline.edit_inputs import edit_prompt, load_image
from arcflow.pipeline.families import QwenImageEditPlusFamily, family_for
from arcflow.pipeline.family_qwen_edit import area_dimensions
from arcflow.pipeline.recording import sample_teacher
from cli_helpers import raises_one_line
from family_checks import assert_run_sampler_matches, cli_end_to_end, trained_student
from reference_sampling import reference_sample
from tiny_qwen_family import tiny_edit_plus_sizes, tiny_image, tiny_qwen_image_edit_plus_pipeline

HEIGHT, WIDTH, TEXT = 32, 48, 64
OPTS = dict(height=HEIGHT, width=WIDTH, max_sequence_length=TEXT)
TEXTS = ["make the cat red", "a big house on the river", "paint the sky blue"]
SEEDS = [0, 1, 2]
STEPS = 4
TOKENS = 96  # 8 x 12 latent tokens of the 32x48 output
REF_TOKENS = 64  # per reference image: 32x32 pixels at the patched VAE area


@pytest.fixture(scope="module", autouse=True)
def _tiny_sizes():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    with tiny_edit_plus_sizes():
        yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Reference image files: a, b, c at the size the family hands the pipeline (32x32), d, e not."""
    folder = tmp_path_factory.mktemp("refs")
    sizes = {"a": (32, 32), "b": (32, 32), "c": (32, 32), "d": (40, 24), "e": (64, 96)}
    paths = {}
    for i, (name, size) in enumerate(sizes.items()):
        paths[name] = str(folder / f"{name}.png")
        tiny_image(10 + i, size).save(paths[name])
    return paths


@pytest.fixture(scope="module")
def prompts(images):
    """Two reference images per prompt; the first two prompts share theirs."""
    sets = [[images["a"], images["b"]], [images["a"], images["b"]], [images["c"], images["a"]]]
    return [edit_prompt(t, s) for t, s in zip(TEXTS, sets)]


def edit_pipe(seed: int = 0, zero_cond_t: bool = False):
    pipe = tiny_qwen_image_edit_plus_pipeline(seed, zero_cond_t=zero_cond_t)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def teacher():
    return teacher_from_pipeline(edit_pipe(), teacher_id="tiny-qwen-edit-plus", revision="r0", **OPTS)


def _stock(pipe, prompts, seeds, guidance, output_type="latent"):
    """The stock pipeline, one prompt per call (it takes no more), the image files as given."""
    from arcflow.pipeline.edit_inputs import parse_prompt

    out = []
    for p, s in zip(prompts, seeds):
        text, paths = parse_prompt(p)
        out.append(pipe(image=[load_image(q) for q in paths], prompt=text, negative_prompt="", true_cfg_scale=guidance,
                        height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, generator=[torch.Generator().manual_seed(s)],
                        output_type=output_type).images)
    return torch.cat(out)


def test_the_family_is_registered_and_its_noise_is_the_pipelines_draw(teacher):
    assert isinstance(family_for("QwenImageEditPlusPipeline"), QwenImageEditPlusFamily)
    assert teacher.family.edit and teacher.family.max_prompts_per_call == 1 and teacher.true_cfg
    assert teacher.latent_shape == (TOKENS, 16) and teacher.default_guidance == 4.0
    gens = [torch.Generator().manual_seed(s) for s in (3, 5)]
    drawn, _ = teacher.pipe.prepare_latents(None, 2, 4, HEIGHT, WIDTH, torch.float32, torch.device("cpu"), gens)
    assert torch.equal(teacher.noise([3, 5]), drawn)


@pytest.mark.parametrize("guidance,zero_cond_t", [(1.0, False), (4.0, False), (1.0, True)],
                         ids=["2509-cfg-off", "2509-cfg-on", "2511-cfg-off"])
def test_recording_reproduces_the_pipeline(prompts, guidance, zero_cond_t, teacher):
    if zero_cond_t:  # Edit-2511: reference tokens modulated at timestep 0 inside the transformer
        teacher = teacher_from_pipeline(edit_pipe(zero_cond_t=True), teacher_id="tiny-2511", revision="r0", **OPTS)
    x, u, sigmas, cond = teacher.record(prompts, SEEDS, STEPS, guidance)
    stock = _stock(teacher.pipe, prompts, SEEDS, guidance)
    assert x.shape == (3, STEPS + 1, TOKENS, 16)
    torch.testing.assert_close(x[:, -1], stock, rtol=0, atol=1e-5)
    torch.testing.assert_close(sample_teacher(teacher, prompts, SEEDS, steps=STEPS, guidance=guidance), stock,
                               rtol=0, atol=1e-5)
    assert torch.equal(x[:, 0], teacher.noise(SEEDS)) and torch.equal(sigmas.double(), teacher.sigmas(STEPS))
    for j in range(STEPS):
        assert torch.equal(x[:, j + 1], x[:, j] - (sigmas[j] - sigmas[j + 1]) * u[:, j]), j
    # The stored conditioning: both reference images' tokens once per row, the text (which the
    # VL encoder conditioned on the images) padded with a mask, the target + reference grids.
    assert cond["reference_latents"].shape == (3, 2 * REF_TOKENS, 16)
    assert cond["encoder_hidden_states"].shape == (3, TEXT, 32)
    assert teacher.layout["hidden_states"] == {"kind": "latent", "reference": "reference_latents"}
    assert teacher.layout["img_shapes"] == {"kind": "per_sample", "value": [[1, 8, 12], [1, 8, 8], [1, 8, 8]]}
    torch.testing.assert_close(cond["reference_latents"][0], cond["reference_latents"][1], rtol=0, atol=0)
    assert not torch.allclose(cond["reference_latents"][0], cond["reference_latents"][2])
    encoded = teacher.encode_prompts(prompts)
    assert sorted(encoded) == sorted(cond)
    for k in cond:
        torch.testing.assert_close(encoded[k].float(), cond[k], rtol=0, atol=1e-6)
    if guidance == 1.0:  # replaying the conditional call (reference tokens appended, then cut) IS u
        with torch.no_grad():
            for j in range(STEPS):
                replayed = teacher.conditional_velocity(x[:, j], sigmas[j].expand(3), cond)
                torch.testing.assert_close(replayed, u[:, j], rtol=0, atol=1e-5)
    else:  # CFG outside the pipeline's own sampler would need the negative prompt with each row's images
        with pytest.raises(ArcflowError, match="edit pipelines"):
            teacher.velocity(x[:, 0], sigmas[0].expand(3), cond, guidance)
        assert not torch.allclose(u, teacher.record(prompts, SEEDS, STEPS, 1.0)[1])
    torch.testing.assert_close(teacher.decode(x[:, -1]), _stock(teacher.pipe, prompts, SEEDS, guidance, "pt"),
                               rtol=0, atol=1e-5)


def test_one_prompt_per_call(teacher, prompts):
    """The pipeline refuses several prompts per call; the teacher calls it once per prompt, even for
    prompts sharing their images."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import QwenImageEditPlusPipeline

    assert [rows for rows, _, _ in teacher._groups(prompts)] == [[0], [1], [2]]
    with pytest.raises(ValueError, match="batch_size=1"):
        QwenImageEditPlusPipeline.__call__(teacher.pipe, image=[load_image(p) for p in teacher_images(prompts[0])],
                                           prompt=TEXTS[:2], height=HEIGHT, width=WIDTH, num_inference_steps=1)
    batches = []
    hook = teacher.transformer.register_forward_pre_hook(
        lambda m, a, kw: batches.append(kw["hidden_states"].shape[0]), with_kwargs=True)
    try:
        teacher.sample(prompts, SEEDS, 1, 1.0)
    finally:
        hook.remove()
    assert batches == [1, 1, 1]


def teacher_images(prompt):
    from arcflow.pipeline.edit_inputs import parse_prompt

    return parse_prompt(prompt)[1]


def test_reference_images_of_any_size_give_the_same_token_count(teacher, images):
    # Each image is resized to the output's aspect ratio at the pipeline's VAE area.
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions

    for area in (32 * 32, 1024 * 1024):
        for ratio in (1.0, 1.5, 2 / 3, 16 / 9, 0.3):
            assert area_dimensions(area, ratio) == calculate_dimensions(area, ratio)
    prepared = teacher.family.prepare_images([load_image(images[k]) for k in ("a", "d", "e")], HEIGHT, WIDTH)
    assert [im.size for im in prepared] == [(32, 32)] * 3
    with tiny_edit_plus_sizes(64 * 64):
        assert [im.size for im in teacher.family.prepare_images(prepared, HEIGHT, WIDTH)] == [(64, 64)] * 3
    odd = [edit_prompt("make the cat red", [images["d"], images["e"]])]
    other = teacher_from_pipeline(teacher.pipe, teacher_id="t", revision="r", **OPTS)
    other.encode_prompts([edit_prompt("a cat", [images["a"], images["b"]])])
    assert other.encode_prompts(odd)["reference_latents"].shape == (1, 2 * REF_TOKENS, 16)
    # One image per prompt is a dataset of its own (other reference and text shapes); mixing is one line.
    single = teacher_from_pipeline(teacher.pipe, teacher_id="t1", revision="r", **OPTS)
    assert single.encode_prompts([edit_prompt("a cat", [images["c"]])])["reference_latents"].shape == (1, REF_TOKENS, 16)
    raises_one_line(lambda: single.encode_prompts(odd), "changed shape")
    # Text length: the pipeline does not truncate; arcflow pads to 1024 by default, or to the
    # teacher's max_sequence_length and says so when the text is longer.
    default = teacher_from_pipeline(teacher.pipe, teacher_id="t", revision="r", height=HEIGHT, width=WIDTH)
    assert default.encode_prompts(odd)["encoder_hidden_states"].shape == (1, 1024, 32)
    short = teacher_from_pipeline(teacher.pipe, teacher_id="t", revision="r", height=HEIGHT, width=WIDTH,
                                  max_sequence_length=8)
    raises_one_line(lambda: short.encode_prompts(odd), "max_sequence_length 8")


def test_student_in_the_stock_pipeline_equals_arcflows_sampler(teacher, prompts, tmp_path):
    from arcflow.distill.interop import arcflow_pipeline

    student = trained_student(teacher, tmp_path / "run", {"teacher_options": dict(OPTS)})
    wrapped = sorted(n for n, m in student.transformer.named_modules() if hasattr(m, "lora_A"))
    assert len(wrapped) == 10 and all(re.fullmatch(QwenImageEditPlusFamily.lora_targets, n) for n in wrapped)
    assert not any(n.startswith(("proj_out", "norm_out")) for n in wrapped)
    cond, noise = teacher.encode_prompts(prompts), teacher.noise(SEEDS)
    expected = reference_sample(load_student(teacher, tmp_path / "run"), noise, cond, sigmas=teacher.sigmas(2))
    generator = arcflow_pipeline(edit_pipe(), tmp_path / "run")  # a fresh stock pipeline, edit prompts
    got = generator.latents(prompts, SEEDS)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (got - teacher.sample(prompts, SEEDS, 2, 1.0)).abs().max() > 1e-3
    # `arcflow sample --adapter`'s loop (distill/runs.py) cuts the reference tokens off too.
    assert_run_sampler_matches(teacher, tmp_path / "run", noise, cond, expected)


def test_undrivable_edit_pipelines_are_refused_in_one_line(teacher, images, tmp_path):
    from diffusers import FlowMatchHeunDiscreteScheduler, QwenImageTransformer2DModel

    pipe = edit_pipe()
    pipe.scheduler = FlowMatchHeunDiscreteScheduler()
    raises_one_line(lambda: teacher_from_pipeline(pipe, **OPTS), "QwenImageEditPlusPipeline",
                    "FlowMatchHeunDiscreteScheduler")
    # Family-specific: a guidance-distilled transformer (the pipeline would need guidance_scale).
    pipe = edit_pipe()
    cfg = {k: v for k, v in pipe.transformer.config.items() if not k.startswith("_")}
    pipe.transformer = QwenImageTransformer2DModel(**{**cfg, "guidance_embeds": True})
    raises_one_line(lambda: teacher_from_pipeline(pipe, **OPTS), "QwenImageEditPlusPipeline", "guidance_embeds")
    # The single-image QwenImageEditPipeline has no family yet.
    raises_one_line(lambda: family_for("QwenImageEditPipeline"), "QwenImageEditPipeline", "no arcflow family")
    # Prompts without images, and images that do not open.
    raises_one_line(lambda: teacher.encode_prompts(["a red cat"]), "QwenImageEditPlusPipeline", "every prompt needs")
    (tmp_path / "bad.png").write_text("not an image")
    raises_one_line(lambda: teacher.encode_prompts([edit_prompt("a cat", [str(tmp_path / "bad.png"), images["a"]])]),
              "cannot read image")
    raises_one_line(lambda: teacher.encode_prompts([edit_prompt("a cat", [str(tmp_path / "missing.png")])]),
              "image not found")


# ----- the CLI end to end on a saved pipeline directory ------------------------------------------
#: Put on PYTHONPATH of the CLI and its Ray workers: once diffusers imports the EditPlus module, its
#: VAE_IMAGE_SIZE becomes the tiny one (what tiny_edit_plus_sizes does in this process) and the
#: module of the tiny processor class the saved pipeline names is imported.
SITECUSTOMIZE = '''
import importlib.abc, sys

NAME = "diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus"


class _Patch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != NAME:
            return None
        sys.meta_path.remove(self)
        try:
            import importlib.util
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            module.VAE_IMAGE_SIZE = %d
            import tiny_qwen_family  # noqa: F401 - diffusers loads the saved processor class only once imported

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _Patch())
'''


@pytest.mark.slow  # ~2 minutes: local Ray clusters for generation and training
def test_cli_end_to_end_on_a_tiny_edit_plus_directory(tmp_path):
    import json
    from pathlib import Path

    from tiny_qwen_family import VAE_PIXELS, save_tiny_qwen_image_edit_plus_pipeline

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE % VAE_PIXELS)
    # The saved processor's class lives in tests/tiny_qwen_family.py (no torchvision here).
    path = [str(site), str(Path(__file__).parent)]
    directory = save_tiny_qwen_image_edit_plus_pipeline(tmp_path / "pipe")
    refs = tmp_path / "data" / "refs"
    refs.mkdir(parents=True)
    for i, size in enumerate([(32, 32), (40, 24), (64, 96)]):
        tiny_image(20 + i, size).save(refs / f"{i}.png")
    prompts = tmp_path / "data" / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(line) for line in [
        {"prompt": "make the cat red", "image": ["refs/0.png", "refs/1.png"]},
        {"prompt": "a big house on the river", "image": ["refs/2.png", "refs/0.png"]},
        {"prompt": "paint the sky blue", "image": ["refs/1.png", "refs/2.png"]},
    ]) + "\n")
    ds, run, _ = cli_end_to_end(tmp_path, directory, prompts, size=(HEIGHT, WIDTH), pythonpath=path,
                                sample=("--prompt", "make the cat red", "--image", str(refs / "0.png"),
                                        "--image", str(refs / "2.png")))
    spec = json.loads((ds / "dataset.json").read_text())
    assert "reference_latents" in json.dumps(spec["cond_spec"])
    assert (run / "pytorch_lora_weights.safetensors").is_file()
