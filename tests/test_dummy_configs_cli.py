"""Pipelines built from diffusers' OWN test configurations (tests/diffusers_dummy_pipelines.py), not arcflow's.

Fast (default suite): per pipeline class, arcflow's teacher around the dummy pipeline samples exactly what
the stock ``__call__`` returns with per-seed generators (2 steps, arcflow's default guidance).

Slow (``-m slow``, local Ray): per class, the pipeline saved with ``save_pretrained`` goes through the
CLI end to end: generate-trajectories -> verify -> distill -> sample.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

from arcflow.pipeline.diffusers_teachers import teacher_from_pipeline
from arcflow.pipeline.edit_inputs import edit_prompt, load_image
from arcflow.pipeline.recording import sample_teacher
from cli_helpers import run_arcflow
from diffusers_dummy_pipelines import DUMMY_CASES, save_dummy_pipeline
from tiny_qwen_family import VAE_PIXELS, tiny_edit_plus_sizes, tiny_image

TEXTS = ["a photo of a cat", "a red car on the river"]
SEEDS = [3, 11]
STEPS = 2
TESTS_DIR = str(Path(__file__).parent)


def _cases():
    return [pytest.param(name, id=name) for name in DUMMY_CASES]


def _sizes(name: str):
    """EditPlus VAE-encodes references at ~1 MP in stock diffusers: tiny_qwen_family's patch of that constant."""
    return tiny_edit_plus_sizes() if name == "QwenImageEditPlusPipeline" else contextlib.nullcontext()


def _references(case, directory: Path) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(case.images):  # already the size every family hands the pipeline: no resampling differs
        tiny_image(40 + i, (case.size, case.size)).save(directory / f"r{i}.png")
        paths.append(str(directory / f"r{i}.png"))
    return paths


def _stock(case, pipe, refs: list[str]) -> torch.Tensor:
    """The stock ``__call__`` with per-seed generators, ``output_type="latent"``."""
    def call(texts, seeds):
        kw = dict(case.call)
        if case.negative_per_prompt:
            kw["negative_prompt"] = [kw["negative_prompt"]] * len(texts)
        if refs:
            images = [load_image(p) for p in refs]
            kw["image"] = images[0] if case.images == 1 else images
        return pipe(prompt=list(texts), generator=[torch.Generator().manual_seed(s) for s in seeds],
                    height=case.size, width=case.size, num_inference_steps=STEPS, output_type="latent", **kw).images

    if case.one_prompt_per_call:
        return torch.cat([call([t], [s]) for t, s in zip(TEXTS, SEEDS)])
    return call(TEXTS, SEEDS)


@pytest.mark.parametrize("name", _cases())
def test_teacher_reproduces_the_dummy_pipeline(name, tmp_path, one_thread):
    case = DUMMY_CASES[name]
    with _sizes(name):
        pipe = case.build()
        pipe.set_progress_bar_config(disable=True)
        teacher = teacher_from_pipeline(pipe, teacher_id=f"dummy-{name}", revision="r", height=case.size,
                                        width=case.size, call_options=case.call_options)
        refs = _references(case, tmp_path / "refs")
        prompts = [edit_prompt(t, refs) for t in TEXTS]
        got = sample_teacher(teacher, prompts, SEEDS, STEPS)
        expected = _stock(case, pipe, refs)
    got = teacher.family.to_pipeline_latents(got, teacher.grid, teacher.pipe)
    torch.testing.assert_close(got, expected.float(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", list(DUMMY_CASES))
def test_a_momentum_student_runs_on_the_dummy_transformer(name, tmp_path, one_thread):
    """The student's transformer (LoRA + momentum head) runs on each dummy config: e.g. SD3's patch size 1,
    where the transformer un-patchifies with its out_channels although the head covers one position."""
    from arcflow.distill.student import StudentConfig, build_student

    case = DUMMY_CASES[name]
    with _sizes(name):
        teacher = teacher_from_pipeline(case.build(), teacher_id=f"dummy-{name}", revision="r", height=case.size,
                                        width=case.size, call_options=case.call_options)
        prompts = [edit_prompt(t, _references(case, tmp_path / "refs")) for t in TEXTS]
        cond = teacher.encode_prompts(prompts)
    student = build_student(teacher, StudentConfig(momentum=True, k=4, lora_rank=2))
    with torch.no_grad():
        params = student(teacher.noise(SEEDS), torch.ones(2), cond)
    tokens, channels = teacher.latent_shape
    assert params.velocities.shape[:3] == (2, 4, channels) and params.velocities.shape[-1] == tokens
    assert torch.isfinite(params.velocities).all()


# ----- the CLI end to end on the saved dummy pipelines -------------------------------------------
def _site(tmp_path: Path) -> list[str]:
    """PYTHONPATH for the CLI and its Ray workers: the EditPlus size patch (tests/test_family_qwen_edit.py's
    sitecustomize) and tests/ (the saved EditPlus processor's class is tests/tiny_qwen_family's)."""
    from test_family_qwen_edit import SITECUSTOMIZE

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE % VAE_PIXELS)
    return [str(site), TESTS_DIR]


@pytest.mark.slow  # local Ray clusters for generation and training, per class
@pytest.mark.parametrize("name", _cases())
def test_cli_end_to_end_on_a_saved_dummy_pipeline(name, tmp_path):
    case = DUMMY_CASES[name]
    path = _site(tmp_path)
    with _sizes(name):
        pipe_dir = save_dummy_pipeline(name, tmp_path / "pipe")
    refs = [str(Path(p).relative_to(tmp_path)) for p in _references(case, tmp_path / "refs")]
    if refs:
        prompts = tmp_path / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": t, "image": refs if case.images > 1 else refs[0]}) + "\n"
                                   for t in TEXTS))
    else:
        prompts = tmp_path / "prompts.txt"
        prompts.write_text("\n".join(TEXTS) + "\n")
    ds, run, png = tmp_path / "ds", tmp_path / "run", tmp_path / "x.png"
    size = str(case.size)

    def arcflow(*args):
        return run_arcflow(*args, cwd=tmp_path, pythonpath=path)

    options = [a for k, v in case.call_options.items() for a in ("--call-option", f"{k}={json.dumps(v)}")]
    arcflow("generate-trajectories", "--teacher", str(pipe_dir), "--height", size, "--width", size,
            "--num-samples", "4", "--steps", "4", "--shard-size", "2", "--prompts", str(prompts), "--out", str(ds),
            "--no-progress", *options)
    arcflow("verify", str(ds))
    arcflow("distill", str(ds), "--out", str(run), "--iters", "2", "--batch-size", "2", "--checkpoint-every", "2",
            "--no-progress")
    images = [a for r in refs for a in ("--image", str(tmp_path / r))]
    arcflow("sample", "--adapter", str(run), "--prompt", TEXTS[0], *images, "--num", "1", "--out", str(png))
    assert png.is_file()
    spec = json.loads((ds / "dataset.json").read_text())
    assert ("reference_latents" in json.dumps(spec["cond_spec"])) == bool(refs)


def test_a_klein_text_encoder_too_shallow_for_the_layers_is_refused_in_one_line():
    """diffusers' klein dummy (2 Qwen3 layers) cannot run with __call__'s default text_encoder_out_layers
    (9, 18, 27), nor with layers it lacks: arcflow says so in one line (naming --call-option) instead of an
    IndexError from inside the pipeline; call options the pipeline does not take, or that arcflow sets
    itself, are one line too."""
    from cli_helpers import raises_one_line

    pipe = DUMMY_CASES["Flux2KleinPipeline"].build()
    load = lambda **options: teacher_from_pipeline(pipe, teacher_id="dummy-klein", revision="r", height=16, width=16,  # noqa: E731
                                                   **options)
    raises_one_line(load, "Flux2KleinPipeline", "2 layers", "(9, 18, 27)", "--call-option")
    raises_one_line(lambda: load(call_options={"text_encoder_out_layers": [5]}), "2 layers", "(5,)")
    raises_one_line(lambda: load(call_options={"no_such_argument": 1}), "no_such_argument", "takes no such argument")
    raises_one_line(lambda: load(call_options={"latents": 1}), "latents", "arcflow sets this argument itself")
    assert load(call_options={"text_encoder_out_layers": [1]}).call_options == {"text_encoder_out_layers": [1]}


@pytest.mark.parametrize("args, fragment", [
    (["--teacher", "digits", "--call-option", "text_encoder_out_layers=[1]"], "--call-option apply to diffusers teachers only"),
    (["--call-option", "no-equals-sign"], "--call-option expects KEY=VALUE"),
])
def test_bad_call_options_are_one_line(args, fragment, tmp_path, capsys):
    from cli_helpers import assert_one_line_error, run_in_process

    code, _, err = run_in_process(capsys, "generate-trajectories", "--out", str(tmp_path / "ds"), "-n", "2", *args)
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "ds").exists()
