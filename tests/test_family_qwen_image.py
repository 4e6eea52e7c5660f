"""QwenImagePipeline WITH its (tiny, real) Qwen2.5-VL text encoder on the generic recorder: text
prompts go through the pipeline's own ``__call__`` (tests/tiny_qwen_family.py).

Fidelity (guidance on and off), the per-seed noise, the Euler relation, replay of the stored
conditioning (the conditional call, and true CFG from the negative prompt's conditioning), text
padded by ``normalize_call`` so prompts of different lengths and batch sizes store one shape, decode;
a student in the stock pipeline with the ArcFlowScheduler equal to arcflow's sampler; refusals; the
CLI end to end on a saved directory (slow).

The scheduler is Qwen/Qwen-Image's published config (``shift_terminal=0.02``, unlike
tests/tiny_pipelines.py's), so the pipeline's terminal stretch is exercised too.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from arcflow.distill.student import load_student
from arcflow.pipeline.diffusers_teachers import teacher_from_pipeline
from arcflow.pipeline.edit_inputs import edit_prompt
from arcflow.pipeline.families import QwenImageFamily
from arcflow.pipeline.recording import sample_teacher
from cli_helpers import raises_one_line
from family_checks import cli_end_to_end, trained_student
from reference_sampling import reference_sample
from tiny_qwen_family import save_tiny_qwen_image_te_pipeline, tiny_image, tiny_qwen_image_te_pipeline

HEIGHT, WIDTH, TEXT = 32, 48, 24
OPTS = dict(height=HEIGHT, width=WIDTH, max_sequence_length=TEXT)
#: Different token counts: the pipeline trims to the longest and masks the shorter.
PROMPTS = ["a red cat", "a big house on the river with a small green car"]
SEEDS = [0, 1]
STEPS = 4
#: Qwen/Qwen-Image's scheduler_config.json.
QWEN_IMAGE_SCHEDULER = dict(
    base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, num_train_timesteps=1000,
    shift=1.0, shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True, invert_sigmas=False,
    stochastic_sampling=False, use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def qwen_pipe(seed: int = 0):
    """A stock QwenImagePipeline (tiny, real text encoder) with Qwen-Image's scheduler config."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = tiny_qwen_image_te_pipeline(seed)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def teacher():
    return teacher_from_pipeline(qwen_pipe(), teacher_id="tiny-qwen-te", revision="r0", **OPTS)


def _generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _stock(pipe, guidance, output_type="latent", prompts=PROMPTS, seeds=SEEDS):
    return pipe(prompt=prompts, negative_prompt="", true_cfg_scale=guidance, height=HEIGHT, width=WIDTH,
                num_inference_steps=STEPS, max_sequence_length=TEXT, generator=_generators(seeds),
                output_type=output_type).images


def test_noise_is_the_pipelines_own_draw(teacher):
    assert teacher.family.name == "qwen-image" and teacher.latent_shape == (96, 16) and teacher.grid == (8, 12)
    drawn = teacher.pipe.prepare_latents(2, 4, HEIGHT, WIDTH, torch.float32, torch.device("cpu"), _generators([3, 5]))
    assert torch.equal(teacher.noise([3, 5]), drawn)
    # Per seed: a sample's noise does not depend on its batch.
    assert torch.equal(teacher.noise([5]), drawn[1:])


@pytest.mark.parametrize("guidance", [1.0, 4.0], ids=["cfg-off", "cfg-on"])
def test_recording_reproduces_the_pipeline(teacher, guidance):
    x, u, sigmas, cond = teacher.record(PROMPTS, SEEDS, STEPS, guidance)
    stock = _stock(teacher.pipe, guidance)
    assert x.shape == (2, STEPS + 1, 96, 16) and u.shape == (2, STEPS, 96, 16)
    torch.testing.assert_close(x[:, -1], stock, rtol=0, atol=1e-5)
    torch.testing.assert_close(sample_teacher(teacher, PROMPTS, SEEDS, steps=STEPS, guidance=guidance), stock,
                               rtol=0, atol=1e-5)
    assert torch.equal(x[:, 0], teacher.noise(SEEDS))
    # The pipeline's schedule (exponential shift at 96 tokens, stretched to shift_terminal) ...
    assert torch.equal(sigmas.double(), teacher.sigmas(STEPS)) and math_isnan(teacher.shift)
    # ... and the format's Euler relation, exactly in float32.
    for j in range(STEPS):
        assert torch.equal(x[:, j + 1], x[:, j] - (sigmas[j] - sigmas[j + 1]) * u[:, j]), j
    # encode_prompts (a stub call) gives the recorded conditioning.
    encoded = teacher.encode_prompts(PROMPTS)
    assert sorted(encoded) == sorted(cond) == ["encoder_hidden_states", "encoder_hidden_states_mask"]
    for k in cond:
        torch.testing.assert_close(encoded[k].float(), cond[k], rtol=0, atol=1e-6)
    # Replaying the stored conditioning: at guidance 1 the conditional call IS the recorded
    # velocity; with CFG the negative prompt's conditioning, combined with the norm rescale.
    with torch.no_grad():
        for j in range(STEPS):
            s = sigmas[j].expand(2)
            replayed = (teacher.conditional_velocity(x[:, j], s, cond) if guidance == 1.0
                        else teacher.velocity(x[:, j], s, cond, guidance))
            torch.testing.assert_close(replayed, u[:, j], rtol=0, atol=1e-5)
    # Decode is the pipeline's output_type="pt".
    torch.testing.assert_close(teacher.decode(x[:, -1]), _stock(teacher.pipe, guidance, "pt"), rtol=0, atol=1e-5)


def math_isnan(value: float) -> bool:
    return value != value


def test_text_is_padded_so_prompts_of_any_length_and_batch_store_one_shape(teacher):
    cond = teacher.encode_prompts(PROMPTS)
    embeds, mask = cond["encoder_hidden_states"], cond["encoder_hidden_states_mask"]
    assert embeds.shape == (2, TEXT, 32) and mask.shape == (2, TEXT) and mask.dtype == torch.int64
    lengths = mask.sum(1).tolist()
    assert lengths[0] < lengths[1] < TEXT
    for row, n in enumerate(lengths):  # a valid prefix, zeros after it
        assert mask[row, :n].eq(1).all() and mask[row, n:].eq(0).all()
        assert embeds[row, n:].eq(0).all() and embeds[row, :n].abs().sum(-1).gt(0).all()
    layout = dict(teacher.layout)
    assert layout["encoder_hidden_states_mask"] == {"kind": "batched", "dtype": "int64"}
    assert layout["img_shapes"] == {"kind": "per_sample", "value": [[1, 8, 12]]}
    assert layout["guidance"] == {"kind": "constant", "value": None}
    # One prompt alone: the pipeline passes mask=None (every token valid) and trims to its own
    # length; normalize_call makes it the same row as in the batch.
    alone = teacher.encode_prompts(PROMPTS[:1])
    assert teacher.layout == layout
    assert torch.equal(alone["encoder_hidden_states_mask"], mask[:1])
    torch.testing.assert_close(alone["encoder_hidden_states"], embeds[:1], rtol=0, atol=1e-5)
    # So recording in micro-batches of one gives the same trajectories as one batch of two.
    x2 = teacher.record(PROMPTS, SEEDS, 2, 1.0)[0]
    x1, _, _, c1 = teacher.record(PROMPTS, SEEDS, 2, 1.0, micro_batch=1)
    torch.testing.assert_close(x1, x2, rtol=0, atol=1e-5)
    torch.testing.assert_close(c1["encoder_hidden_states"], embeds, rtol=0, atol=1e-5)
    # The default text length is the pipeline's (512).
    default = teacher_from_pipeline(teacher.pipe, teacher_id="tiny-qwen-te", revision="r0", height=HEIGHT, width=WIDTH)
    assert default.encode_prompts(PROMPTS[:1])["encoder_hidden_states"].shape == (1, 512, 32)


def test_student_in_the_stock_pipeline_equals_arcflows_sampler(teacher, tmp_path):
    from arcflow.distill.interop import arcflow_pipeline

    student = trained_student(teacher, tmp_path / "run", {"teacher_options": dict(OPTS)})
    # The family's default LoRA targets: the MLPs of every block and the timestep embedder, never the head.
    wrapped = sorted(n for n, m in student.transformer.named_modules() if hasattr(m, "lora_A"))
    assert student.config.lora_targets in (None, QwenImageFamily.lora_targets)
    assert len(wrapped) == 10 and all(re.fullmatch(QwenImageFamily.lora_targets, n) for n in wrapped)
    assert not any(n.startswith(("proj_out", "norm_out")) for n in wrapped)
    assert type(student.transformer.proj_out).__name__ == "MomentumHead"
    cond, noise = teacher.encode_prompts(PROMPTS), teacher.noise(SEEDS)
    expected = reference_sample(load_student(teacher, tmp_path / "run"), noise, cond, sigmas=teacher.sigmas(2))
    generator = arcflow_pipeline(qwen_pipe(), tmp_path / "run")  # a fresh stock pipeline, text prompts
    got = generator.latents(PROMPTS, SEEDS)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (got - teacher.sample(PROMPTS, SEEDS, 2, 1.0)).abs().max() > 1e-3  # the student is not the teacher
    images = generator(PROMPTS, output_type="pt").images
    assert images.shape == (2, 3, HEIGHT, WIDTH)


def test_undrivable_qwen_image_pipelines_are_refused_in_one_line(teacher, tmp_path):
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

    def wrap(pipe):
        return lambda: teacher_from_pipeline(pipe, teacher_id="x", revision="r", **OPTS)

    pipe = qwen_pipe()
    pipe.scheduler = FlowMatchHeunDiscreteScheduler()
    raises_one_line(wrap(pipe), "QwenImagePipeline", "FlowMatchHeunDiscreteScheduler")
    pipe.scheduler = DPMSolverMultistepScheduler()
    raises_one_line(wrap(pipe), "QwenImagePipeline", "DPMSolverMultistepScheduler")
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(**{**QWEN_IMAGE_SCHEDULER, "stochastic_sampling": True})
    raises_one_line(wrap(pipe), "QwenImagePipeline", "stochastic")
    pipe = qwen_pipe()
    pipe.transformer.proj_out = torch.nn.Sequential(pipe.transformer.proj_out)
    raises_one_line(wrap(pipe), "QwenImagePipeline", "proj_out")
    raises_one_line(lambda: teacher_from_pipeline(qwen_pipe(), height=30, width=48), "multiples of 4")
    # A text-to-image pipeline takes no reference images.
    tiny_image(0).save(tmp_path / "ref.png")
    raises_one_line(lambda: teacher.encode_prompts([edit_prompt("a cat", [str(tmp_path / "ref.png")])]),
              "QwenImagePipeline", "no reference images")


@pytest.mark.slow  # ~2 minutes: local Ray clusters for generation and training
def test_cli_end_to_end_on_a_tiny_qwen_image_directory(tmp_path):
    directory = save_tiny_qwen_image_te_pipeline(tmp_path / "pipe")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join([*PROMPTS, "a small house"]) + "\n")
    ds, run, verified = cli_end_to_end(tmp_path, directory, prompts, size=(HEIGHT, WIDTH),
                                       generate=("--guidance", "4.0"))
    spec = json.loads((ds / "dataset.json").read_text())
    # Text padded to the pipeline's default max_sequence_length (512), with its mask.
    assert spec["cond_spec"]["encoder_hidden_states"]["shape"][-2:] == [512, 32], spec["cond_spec"]
    assert "encoder_hidden_states_mask" in spec["cond_spec"]
    assert "damaged" not in verified.stdout.lower() or " 0 " in verified.stdout
    record = json.loads((run / "arcflow_config.json").read_text())
    assert record["teacher_options"]["height"] == HEIGHT and record["teacher_options"]["width"] == WIDTH
    assert (run / "pytorch_lora_weights.safetensors").is_file()
