"""Diffusers teachers (FLUX / Qwen-Image), their students and stock-diffusers interop, offline.

Everything runs on tiny pipelines built from configs (tests/tiny_pipelines.py). Here the Qwen-Image
pipeline has no text encoder: its teacher passes seeded random ``prompt_embeds`` / masks to the
pipeline's own ``__call__`` (tests/test_family_qwen_image.py drives one with a real tiny text encoder).
"""

from __future__ import annotations

import json
import math

import pytest
import safetensors.torch
import torch
from arcflow.pipeline.sigmas import shifted_schedule
from arcflow.distill.student import (
    StudentConfig,
    build_student,
    load_student,
    save_student,
)
from arcflow.pipeline.recording import record_trajectories, sample_teacher
from arcflow.pipeline.registry import check_teacher_id, load_teacher
from arcflow.core.errors import ArcflowError
from arcflow.pipeline.diffusers_teachers import DiffusersTeacher
from tiny_pipelines import T5_LENGTH, save_tiny_flux_pipeline, tiny_qwen_image_pipeline
from reference_sampling import reference_sample
from cli_helpers import raises_one_line, run_arcflow

OPTS = dict(height=32, width=32, max_sequence_length=T5_LENGTH)
PROMPTS = ["a photo of a cat", "a red car"]


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    return save_tiny_flux_pipeline(tmp_path_factory.mktemp("tiny-flux") / "pipe")


@pytest.fixture(scope="module")
def flux(flux_dir):
    return load_teacher(str(flux_dir), **OPTS)


class EmbeddingQwenTeacher(DiffusersTeacher):
    """Qwen-Image without a text encoder: a prompt of n words is n+1 seeded random embeddings,
    handed to the pipeline's ``__call__`` as ``prompt_embeds`` (padded, with a mask)."""

    def has_text_encoders(self):
        return True

    @staticmethod
    def embed(texts):
        rows = [torch.randn(len(t.split()) + 1, 32, generator=torch.Generator().manual_seed(len(t) * 31 + sum(map(ord, t))))
                for t in texts]
        length = max(r.shape[0] for r in rows)
        embeds = torch.stack([torch.cat([r, r.new_zeros(length - r.shape[0], 32)]) for r in rows])
        mask = torch.stack([(torch.arange(length) < r.shape[0]).long() for r in rows])
        return embeds, mask

    def prompt_kwargs(self, texts):
        embeds, mask = self.embed(texts)
        neg, neg_mask = self.embed([self.negative_prompt or "-"] * len(texts))
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask,
                "negative_prompt_embeds": neg, "negative_prompt_embeds_mask": neg_mask}


@pytest.fixture(scope="module")
def qwen():
    return EmbeddingQwenTeacher(tiny_qwen_image_pipeline(), teacher_id="tiny-qwen", revision="r0", **OPTS)


def _generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


# ----- FLUX teacher --------------------------------------------------------------------------------
def test_flux_teacher_reproduces_the_pipeline(flux):
    assert flux.latent_shape == (64, 16) and not flux.true_cfg and flux.default_guidance == 3.5
    cond = flux.encode_prompts(PROMPTS)
    assert cond["encoder_hidden_states"].shape == (2, T5_LENGTH, 32) and cond["pooled_projections"].shape == (2, 32)
    # The embedded guidance is stored per row under a name that is not the dataset's own "guidance".
    assert flux.layout["guidance"] == {"kind": "batched", "dtype": "model", "key": "arg_guidance"}
    assert cond["arg_guidance"].tolist() == [3.5, 3.5]
    latents = sample_teacher(flux, PROMPTS, [0, 1], steps=4, guidance=3.5)
    out = flux.pipe(PROMPTS, height=32, width=32, num_inference_steps=4, guidance_scale=3.5,
                    max_sequence_length=T5_LENGTH, generator=_generators([0, 1]), output_type="latent")
    torch.testing.assert_close(latents, out.images, rtol=0, atol=1e-5)
    images = flux.decode(latents)
    ref = flux.pipe(PROMPTS, height=32, width=32, num_inference_steps=4, guidance_scale=3.5,
                    max_sequence_length=T5_LENGTH, generator=_generators([0, 1]), output_type="pt").images
    assert images.shape == (2, 3, 32, 32) and 0 <= float(images.min()) and float(images.max()) <= 1
    torch.testing.assert_close(images, ref, rtol=0, atol=1e-5)


def test_flux_sigmas_shift_and_scheduler_step(flux):
    steps = 4
    sched = flux.scheduler(steps)
    sigmas = flux.sigmas(steps)
    assert sigmas.shape == (steps + 1,) and float(sigmas[0]) == 1.0 and float(sigmas[-1]) == 0.0
    torch.testing.assert_close(sigmas, sched.sigmas.double(), rtol=0, atol=0)
    # FLUX's resolution-dependent exponential shift is the static shift exp(mu).
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (64 - 256)
    assert flux.mu == pytest.approx(mu) and flux.shift == pytest.approx(math.exp(mu))
    torch.testing.assert_close(shifted_schedule(steps, flux.shift), sigmas, rtol=0, atol=1e-6)
    # The recorded velocity is exactly what the pipeline's scheduler steps with.
    cond = flux.encode_prompts(PROMPTS)
    x, u, rec_sigmas = record_trajectories(flux, cond, flux.noise([3, 4]), steps=steps)
    assert torch.equal(rec_sigmas.double(), sigmas)
    for j, t in enumerate(sched.timesteps):
        stepped = sched.step(u[:, j], t, x[:, j], return_dict=False)[0]
        torch.testing.assert_close(stepped, x[:, j + 1], rtol=0, atol=1e-6)


def test_flux_embedded_guidance_is_one_evaluation(flux):
    cond = flux.encode_prompts(PROMPTS)
    x = flux.noise([0, 1])
    calls = []
    hook = flux.transformer.register_forward_pre_hook(
        lambda m, a, kw: calls.append((kw["hidden_states"].shape[0], float(kw["guidance"][0]))), with_kwargs=True
    )
    try:
        with torch.no_grad():
            u35 = flux.velocity(x, torch.ones(2), cond, 3.5)
            u7 = flux.velocity(x, torch.ones(2), cond, 7.0)
    finally:
        hook.remove()
    assert calls == [(2, 3.5), (2, 7.0)]
    assert not torch.allclose(u35, u7)


def test_text_encoders_can_be_dropped(flux_dir):
    teacher = load_teacher(str(flux_dir), text_encoders=False, **OPTS)
    assert teacher.pipe.text_encoder is None and teacher.pipe.text_encoder_2 is None
    with pytest.raises(ArcflowError, match="without text encoders"):
        teacher.encode_prompts(["a cat"])
    full = load_teacher(str(flux_dir), **OPTS)
    cond = full.encode_prompts(["a cat"])
    full.release_text_encoders()
    assert full.pipe.text_encoder is None
    with torch.no_grad():  # the transformer still runs on stored conditioning
        assert full.velocity(full.noise([0]), torch.ones(1), cond, 3.5).shape == (1, 64, 16)


def test_bad_teacher_input_is_one_line(tmp_path, flux_dir):
    assert "model_index.json" in raises_one_line(lambda: check_teacher_id(str(tmp_path)))
    other = tmp_path / "sd"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    raises_one_line(lambda: check_teacher_id(str(other)), "StableDiffusionPipeline: it is not a flow-matching pipeline")
    assert "unknown teacher" in raises_one_line(lambda: check_teacher_id("not a model"))
    check_teacher_id("black-forest-labs/FLUX.1-dev")  # hub ids are accepted without a network call
    check_teacher_id(str(flux_dir))
    assert "hub" in raises_one_line(lambda: load_teacher("nobody-arcflow/no-such-model", local_files_only=True))
    assert "multiples of 4" in raises_one_line(lambda: load_teacher(str(flux_dir), height=30, width=32))
    assert "torch dtype" in raises_one_line(lambda: load_teacher(str(flux_dir), torch_dtype="float8", **OPTS))
    from arcflow.pipeline.edit_inputs import edit_prompt

    flux = load_teacher(str(flux_dir), **OPTS)
    raises_one_line(lambda: flux.encode_prompts([edit_prompt("x", [str(tmp_path)])]), "takes no reference images")
    # A pipeline whose scheduler is not flow-matching Euler cannot be driven: one line naming it.
    from diffusers import DDIMScheduler

    flux.pipe.scheduler, euler = DDIMScheduler(), flux.pipe.scheduler
    try:
        message = raises_one_line(lambda: DiffusersTeacher(flux.pipe, teacher_id="x", revision="r", **OPTS))
    finally:
        flux.pipe.scheduler = euler
    assert "FluxPipeline" in message and "DDIMScheduler" in message


def test_flux_teacher_loads_in_bfloat16(flux_dir):
    teacher = load_teacher(str(flux_dir), torch_dtype="bfloat16", **OPTS)
    assert teacher.dtype == torch.bfloat16
    x, u, _, cond = teacher.record(["a cat"], [0], 2)
    assert x.dtype == torch.float32 and torch.isfinite(x).all()
    assert cond["encoder_hidden_states"].dtype == torch.float32 and teacher.layout["guidance"]["dtype"] == "float32"


# ----- Qwen-Image teacher -------------------------------------------------------------------------
def test_qwen_image_teacher_reproduces_the_pipeline(qwen):
    assert qwen.latent_shape == (64, 16) and qwen.true_cfg and qwen.default_guidance == 4.0
    x, u, sigmas, cond = qwen.record(PROMPTS, [0, 1], 4, 4.0)
    # Text padded to max_sequence_length with an explicit mask, whatever the batch's longest prompt.
    assert cond["encoder_hidden_states"].shape == (2, T5_LENGTH, 32)
    assert cond["encoder_hidden_states_mask"][:, :6].long().tolist() == [[1] * 6, [1, 1, 1, 1, 0, 0]]
    assert qwen.layout["encoder_hidden_states_mask"] == {"kind": "batched", "dtype": "int64"}
    assert cond["encoder_hidden_states_mask"][:, 6:].sum() == 0
    embeds, mask = qwen.embed(PROMPTS)
    neg, neg_mask = qwen.embed(["-"] * 2)
    out = qwen.pipe(
        prompt_embeds=embeds, prompt_embeds_mask=mask, negative_prompt_embeds=neg,
        negative_prompt_embeds_mask=neg_mask, true_cfg_scale=4.0, height=32,
        width=32, num_inference_steps=4, generator=_generators([0, 1]), output_type="latent",
    )
    torch.testing.assert_close(x[:, -1], out.images, rtol=0, atol=1e-5)
    assert qwen.decode(x[:, -1]).shape == (2, 3, 32, 32)
    # The stored conditioning replays the conditional call: at guidance 1 it IS the recorded velocity.
    x1, u1, s1, cond1 = qwen.record(PROMPTS, [0, 1], 4, 1.0)
    with torch.no_grad():
        torch.testing.assert_close(qwen.conditional_velocity(x1[:, 1], s1[1].expand(2), cond1), u1[:, 1], rtol=0, atol=1e-5)


def test_qwen_image_cfg_is_one_batched_forward_with_norm_rescale(qwen):
    cond = qwen.encode_prompts(PROMPTS)
    x, s = qwen.noise([0, 1]), torch.full((2,), 0.7)
    qwen.negative_conditioning()  # prepared by the pipeline (a stub call), then kept
    batches = []
    hook = qwen.transformer.register_forward_pre_hook(
        lambda m, a, kw: batches.append(kw["hidden_states"].shape[0]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            u = qwen.velocity(x, s, cond, 4.0)
            u_c = qwen.conditional_velocity(x, s, cond)
            u_n = qwen.conditional_velocity(x, s, qwen.unconditional(cond))
    finally:
        hook.remove()
    assert batches[0] == 4  # cond + negative halves in one forward
    comb = u_n + 4.0 * (u_c - u_n)
    torch.testing.assert_close(u, comb * u_c.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(u.norm(dim=-1), u_c.norm(dim=-1), rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # plain CFG (the official on-policy target, --plain-cfg): no rescale
        plain = qwen.velocity(x, s, cond, 4.0, plain_cfg=True)
    torch.testing.assert_close(plain, comb, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(plain, u, atol=1e-3)


# ----- students -----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["flux", "qwen"])
def test_students_build_on_both_transformers(family, flux, qwen):
    teacher = flux if family == "flux" else qwen
    cond = teacher.encode_prompts(PROMPTS)
    student = build_student(teacher, StudentConfig(momentum=True, k=4, lora_rank=2))
    wrapped = [n for n, m in student.transformer.named_modules() if hasattr(m, "lora_A")]
    assert wrapped and "proj_out" not in wrapped
    assert type(student.transformer.proj_out).__name__ == "MomentumHead"
    out = reference_sample(student, teacher.noise([0, 1]), cond, sigmas=teacher.sigmas(2))
    assert out.shape == (2, 64, 16) and torch.isfinite(out).all()
    # K=1 at init is the teacher's Euler step over the scheduler's 1-step schedule (guidance 1 for Qwen).
    k1 = build_student(teacher, StudentConfig(momentum=True, k=1, lora_rank=2))
    noise = teacher.noise([5, 6])
    with torch.no_grad():
        g = teacher.default_guidance if family == "flux" else 1.0
        euler = noise - teacher.velocity(noise, torch.ones(2), cond, g)
    torch.testing.assert_close(reference_sample(k1, noise, cond, nfe=1), euler, rtol=0, atol=1e-5)


def test_qwen_image_real_config_trains_under_five_percent():
    from diffusers import QwenImageTransformer2DModel

    real = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56))
    import inspect

    signature = inspect.signature(QwenImageTransformer2DModel.__init__).parameters
    for key, value in real.items():  # diffusers' defaults ARE the Qwen-Image config
        assert tuple(signature[key].default) == value if isinstance(value, tuple) else signature[key].default == value

    class Meta:
        teacher_id, revision, shift = "Qwen/Qwen-Image", "meta", 1.0

    with torch.device("meta"):
        Meta.transformer = QwenImageTransformer2DModel(**real)
        student = build_student(Meta(), StudentConfig(momentum=True, k=8, lora_rank=16), inplace=True)
    total = sum(p.numel() for p in student.transformer.parameters())
    assert 19e9 < total < 22e9  # ~20B parameters
    assert 0 < student.trainable_share() < 0.05
    import re

    from arcflow.pipeline.families import lora_targets_for

    targets = lora_targets_for("QwenImageTransformer2DModel")  # the family's default, looked up by class
    wrapped = [n for n, m in student.transformer.named_modules() if hasattr(m, "lora_A")]
    assert targets and wrapped and all(re.fullmatch(targets, n) for n in wrapped)


# ----- stock diffusers interop --------------------------------------------------------------------
def _trained_run(teacher, out, **extra):
    student = build_student(teacher, StudentConfig(momentum=True, k=4, lora_rank=4, lora_alpha=8.0))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in student.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    save_student(student, out, {"teacher_options": dict(OPTS), **extra})
    return student


def _style_lora(transformer, path, seed=7):
    """A random diffusers-format LoRA on the attention query/key projections (a style LoRA stand-in)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in transformer.named_modules():
        if name.endswith(("attn.to_q", "attn.to_k")) and isinstance(module, torch.nn.Linear):
            state[f"transformer.{name}.lora_A.weight"] = 0.3 * torch.randn(2, module.in_features, generator=gen)
            state[f"transformer.{name}.lora_B.weight"] = 0.3 * torch.randn(module.out_features, 2, generator=gen)
    path.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(state, str(path / "pytorch_lora_weights.safetensors"))
    return path


def test_exported_lora_loads_in_a_stock_flux_pipeline(flux_dir, tmp_path):
    from arcflow.distill.interop import arcflow_pipeline
    from diffusers import FluxPipeline

    teacher = load_teacher(str(flux_dir), **OPTS)
    _trained_run(teacher, tmp_path / "run", segment_sigmas=teacher.sigmas(2).tolist())
    # Plain diffusers (the model-level LoRA format of save_lora_adapter): alpha/rank from the
    # metadata give the scaling 8/4.
    pipe = FluxPipeline.from_pretrained(str(flux_dir))
    pipe.transformer.load_lora_adapter(str(tmp_path / "run"), weight_name="pytorch_lora_weights.safetensors",
                                       prefix=None, adapter_name="arcflow")
    scalings = {m.scaling["arcflow"] for m in pipe.transformer.modules() if hasattr(m, "scaling") and "arcflow" in m.scaling}
    assert scalings == {2.0}
    # The 2-NFE generator on a stock pipeline == the student loaded by arcflow itself.
    reference = load_student(load_teacher(str(flux_dir), **OPTS), tmp_path / "run")
    generator = arcflow_pipeline(FluxPipeline.from_pretrained(str(flux_dir)), tmp_path / "run")
    cond, noise = teacher.encode_prompts(PROMPTS), teacher.noise([0, 1])
    expected = reference_sample(reference, noise, cond, sigmas=teacher.sigmas(2))
    torch.testing.assert_close(generator.latents(PROMPTS, [0, 1]), expected, rtol=0, atol=1e-5)
    images = generator(PROMPTS, output_type="pt").images  # the stock __call__ with the run's defaults
    assert images.shape == (2, 3, 32, 32) and 0 <= float(images.min()) and float(images.max()) <= 1
    restored = generator.remove()
    assert isinstance(restored.transformer.proj_out, torch.nn.Linear)
    assert type(restored.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    # From the run directory alone (what `arcflow sample --adapter RUN` needs): same samples.
    from arcflow.distill.interop import load_arcflow_generator

    again = load_arcflow_generator(tmp_path / "run")
    torch.testing.assert_close(again.latents(PROMPTS, [0, 1]), expected, rtol=0, atol=1e-5)


def test_a_style_lora_stacks_with_the_arcflow_lora(flux_dir, tmp_path):
    from arcflow.distill.interop import arcflow_pipeline
    from diffusers import FluxPipeline

    teacher = load_teacher(str(flux_dir), **OPTS)
    _trained_run(teacher, tmp_path / "run")
    pipe = FluxPipeline.from_pretrained(str(flux_dir))
    generator = arcflow_pipeline(pipe, tmp_path / "run")
    pipe.load_lora_weights(str(_style_lora(pipe.transformer, tmp_path / "style")), adapter_name="style")
    outputs = {}
    for name, adapters in {"arcflow": {"arcflow": 1.0}, "style": {"style": 1.0}, "both": {"arcflow": 1.0, "style": 1.0}}.items():
        pipe.set_adapters(list(adapters), list(adapters.values()))
        outputs[name] = generator.latents(PROMPTS, [0, 1])
    generator.set_adapters({"style": 1.0})
    torch.testing.assert_close(generator.latents(PROMPTS, [0, 1]), outputs["both"], rtol=0, atol=0)
    for a, b in (("arcflow", "style"), ("arcflow", "both"), ("style", "both")):
        assert (outputs[a] - outputs[b]).abs().max() > 1e-3, (a, b)


def test_qwen_image_run_loads_in_a_stock_pipeline(qwen, tmp_path):
    from arcflow.distill.interop import arcflow_pipeline

    _trained_run(qwen, tmp_path / "run")
    cond = qwen.encode_prompts(PROMPTS)
    noise = qwen.noise([0, 1])
    reference = reference_sample(load_student(qwen, tmp_path / "run"), noise, cond, sigmas=qwen.sigmas(2))
    generator = arcflow_pipeline(tiny_qwen_image_pipeline(), tmp_path / "run")
    # The stock QwenImagePipeline.__call__ (no text encoder here: the same embeddings passed in).
    got = generator(prompt_embeds=cond["encoder_hidden_states"], prompt_embeds_mask=cond["encoder_hidden_states_mask"],
                    latents=noise, output_type="latent").images
    torch.testing.assert_close(got, reference, rtol=0, atol=1e-5)


# ----- the CLI end to end on a saved pipeline directory ------------------------------------------
@pytest.mark.slow  # ~2 minutes: a local Ray cluster for generation and one for Ray Train
def test_cli_end_to_end_on_a_tiny_flux_directory(flux_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\na red car\na small house\n")
    ds, run, png = tmp_path / "ds", tmp_path / "run", tmp_path / "x.png"
    run_arcflow("generate-trajectories", "--teacher", str(flux_dir), "--height", "32", "--width", "32",
             "--num-samples", "4", "--steps", "4", "--shard-size", "2", "--prompts", str(prompts),
             "--out", str(ds), "--no-progress", cwd=tmp_path, timeout=300)
    spec = json.loads((ds / "dataset.json").read_text())
    assert spec["latent_shape"] == [64, 16] if "latent_shape" in spec else True
    assert (ds / "index").is_dir()
    run_arcflow("distill", str(ds), "--out", str(run), "--iters", "3", "--batch-size", "2", "--checkpoint-every", "3",
             "--no-progress", cwd=tmp_path, timeout=300)
    record = json.loads((run / "arcflow_config.json").read_text())
    assert record["teacher_options"]["height"] == 32 and len(record["segment_sigmas"]) == 3
    assert (run / "pytorch_lora_weights.safetensors").is_file()
    run_arcflow("sample", "--adapter", str(run), "--prompt", "a red car", "--num", "2", "--out", str(png), cwd=tmp_path,
                timeout=300)
    assert png.is_file()


# ----- datasets and runs written before conditioning layouts ---------------------------------------
def test_older_flux_and_qwen_conditioning_still_replays(flux_dir, flux, qwen):
    """Datasets of earlier versions stored FLUX's ``prompt_embeds`` / ``pooled_prompt_embeds`` and
    Qwen-Image's padded ``prompt_embeds`` / float ``prompt_embeds_mask``, with no layout: a teacher
    loaded for them (no text encoders, no layout) replays them exactly as the recorded call."""
    new = flux.encode_prompts(PROMPTS)
    old = {"prompt_embeds": new["encoder_hidden_states"], "pooled_prompt_embeds": new["pooled_projections"]}
    bare = load_teacher(str(flux_dir), text_encoders=False, **OPTS)
    x, s = flux.noise([3, 4]), torch.full((2,), 0.6)
    with torch.no_grad():
        torch.testing.assert_close(bare.velocity(x, s, old, 5.0), flux.velocity(x, s, new, 5.0), rtol=0, atol=0)
    new_q = qwen.encode_prompts(PROMPTS)
    old_q = {"prompt_embeds": new_q["encoder_hidden_states"], "prompt_embeds_mask": new_q["encoder_hidden_states_mask"].float()}
    bare_q = DiffusersTeacher(qwen.pipe, teacher_id="tiny-qwen", revision="r0", **OPTS)
    with torch.no_grad():
        torch.testing.assert_close(bare_q.conditional_velocity(x, s, old_q), qwen.conditional_velocity(x, s, new_q),
                                   rtol=0, atol=0)
    with pytest.raises(ArcflowError, match="no conditioning layout"):
        bare.conditional_velocity(x, s, {"something": torch.zeros(2, 3)})
