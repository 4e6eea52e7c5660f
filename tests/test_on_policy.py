"""On-policy distillation (distill/on_policy.py), the official preset and one source of defaults."""

import json
from pathlib import Path

import pytest
import torch
from arcflow.distill.config import DistillConfig
from arcflow.distill.momentum import velocity_at
from arcflow.distill.on_policy import (
    RolloutSettings,
    TiedTeacher,
    draw_generator,
    parent_weights,
    rollout_loss,
    segment_sigmas,
    teacher_share,
)
from arcflow.distill.presets import PRESETS, build_config
from arcflow.pipeline.sigmas import shift_sigmas as warp
from arcflow.distill.student import build_student, load_student
from arcflow.distill.student.config import StudentConfig
from arcflow.distill.worker import METRICS_FILE
from arcflow.pipeline.registry import load_teacher
from cli_helpers import assert_one_line_error, run_in_process, run_subprocess
from dataset_factory import make_dataset, train_tiny_on_policy, train_tiny_run

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a handwritten digit 3", "a handwritten digit 7"]


def metrics(run):
    return [json.loads(line) for line in (Path(run) / METRICS_FILE).read_text().splitlines()]


def perturbed_student(config: StudentConfig):
    """A student built in place on a digits teacher, with every trained weight moved away from its
    start (LoRA B included, so the adapters change the output), and the tied teacher captured first."""
    teacher = load_teacher("digits")
    tied = TiedTeacher.capture(teacher, config)
    student = build_student(teacher, config, inplace=True)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in student.trainable_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return teacher, tied, student


def inputs(batch=4, sigma=0.7):
    teacher = load_teacher("digits")
    cond = teacher.encode_prompts([PROMPTS[i % 2] for i in range(batch)])
    return teacher.noise(list(range(batch))), torch.full((batch,), sigma), cond


def test_tied_teacher_velocity_is_the_untouched_teachers():
    """Adapters off, the original projection and norm_out swapped back: the plain teacher's velocity
    to float32 rounding (bit-for-bit here), and the student is itself again afterwards."""
    config = StudentConfig(k=3, momentum=True, lora_rank=4, lora_dropout=0.5, train_modules=["norm_out"])
    _, tied, student = perturbed_student(config)
    student.train()  # as in training: LoRA dropout active for the student, never for the teacher
    plain = load_teacher("digits")
    x, sigma, cond = inputs()
    student.eval()
    before = student(x, sigma, cond).velocities.detach()
    student.train()
    for guidance in (1.0, 1.5, 4.0):
        expected = plain.velocity(x, sigma, cond, guidance)
        got = tied.velocity(x, sigma, cond, guidance)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert student.training, "the student is back in training mode"
    student.eval()
    assert not torch.allclose(velocity_at(student(x, sigma, cond), sigma, sigma).transpose(1, 2),
                              plain.velocity(x, sigma, cond, 1.0), atol=1e-3), "the perturbed student differs"
    assert torch.equal(student(x, sigma, cond).velocities.detach(), before), "the student is restored"
    assert all(p.requires_grad for p in student.trainable_parameters()), "what trains still trains"


def test_rollout_with_teacher_share_one_is_the_teachers_euler_path():
    """Share 1: no student interval, so the visited states are the teacher's own Euler steps over the
    rollout's teacher intervals; checked against Euler steps of an independent, untied teacher."""
    config = StudentConfig(k=2, lora_rank=2)
    _, tied, student = perturbed_student(config)
    plain = load_teacher("digits")
    x, _, cond = inputs(batch=3)
    settings = RolloutSettings(nfe=2, shift=1.0, guidance=1.5, intermediate_states=4, total_substeps=128,
                               window_substeps=3, mixture_dropout=0.1, loss_scale=30.0)
    trace: list = []
    _, per_segment, evals = rollout_loss(student, tied, settings, x, cond, 1.0, draw_generator(0, 0, 0),
                                         backward=False, trace=trace)
    assert evals == 3 * 2 * 4 * 2, "batch x segments x states x 2 (true CFG)"
    first = [t for t in trace if t["segment"] == 0]
    torch.testing.assert_close(first[0]["x_a"], x, rtol=0, atol=0)
    torch.testing.assert_close(first[0]["s_a"], torch.ones(3))
    for a, b in zip(first, first[1:]):
        torch.testing.assert_close(a["s_b"], b["s_a"], rtol=0, atol=1e-7)  # no student interval between
        euler = a["x_a"] - (a["s_a"] - a["s_b"]).reshape(-1, 1, 1) * plain.velocity(a["x_a"], a["s_a"], cond, 1.5)
        torch.testing.assert_close(b["x_a"], euler, rtol=1e-5, atol=1e-5)
    # the teacher intervals fill the segment but the last window (3/128 of raw time)
    torch.testing.assert_close(first[-1]["s_b"], torch.full((3,), 0.5 + 3 / 128), rtol=0, atol=1e-6)
    # at s_a the loss compares the student's mean velocity over [s_a, s_end] with the teacher's
    assert torch.isfinite(per_segment).all() and (per_segment > 0).all()


def test_rollout_prediction_is_the_mean_velocity_or_the_instant_one():
    config = StudentConfig(k=3, lora_rank=2)
    _, tied, student = perturbed_student(config)
    x, _, cond = inputs(batch=2)
    settings = RolloutSettings(2, 1.0, 1.5, 3, 128, 3, 0.0, 1.0)
    trace: list = []
    rollout_loss(student, tied, settings, x, cond, 0.0, draw_generator(0, 0, 1), backward=False, trace=trace)
    state = trace[0]  # share 0: window only (3 sub-steps): the exact mean over [s_a, s_end]
    params = student(x, state["s_src"], cond)
    from arcflow.distill.momentum import displacement

    mean = displacement(params, state["s_src"], state["s_a"], state["s_end"]) / (state["s_a"] - state["s_end"]).reshape(-1, 1, 1)
    torch.testing.assert_close(state["pred"], mean.transpose(1, 2), rtol=1e-4, atol=1e-5)
    short = RolloutSettings(2, 1.0, 1.5, 3, 128, 1, 0.0, 1.0)  # a 1-sub-step window: the instantaneous velocity
    trace = []
    rollout_loss(student, tied, short, x, cond, 0.0, draw_generator(0, 0, 1), backward=False, trace=trace)
    state = trace[0]
    instant = velocity_at(student(x, state["s_src"], cond), state["s_src"], state["s_a"])
    torch.testing.assert_close(state["pred"], instant.transpose(1, 2), rtol=1e-5, atol=1e-6)


def test_schedule_helpers():
    assert teacher_share(0, 10) == 1.0 and teacher_share(5, 10) == 0.5 and teacher_share(20, 10) == 0.0
    assert teacher_share(3, 0) == 0.0
    assert segment_sigmas(2, 1.0) == [1.0, 0.5, 0.0]
    shifted = segment_sigmas(4, 3.0)
    teacher_like = [3.0 * r / (1 + 2.0 * r) for r in (1.0, 0.75, 0.5, 0.25, 0.0)]
    assert shifted == pytest.approx(teacher_like, abs=1e-12)
    assert float(warp(torch.tensor(0.5), 1.0)) == 0.5


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A tiny on-policy run from prompts alone (digits teacher)."""
    out = tmp_path_factory.mktemp("onpolicy") / "run"
    train_tiny_on_policy(out, iters=4, checkpoint_every=2)
    return out


def test_on_policy_run_counts_teacher_evals_and_samples_in_nfe_calls(scratch):
    rows = metrics(scratch)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    per_step = 4 * 2 * 4 * 2  # batch 4, NFE 2, 4 states, true CFG at guidance 1.5
    assert [r["teacher_evals"] for r in rows] == [per_step * s for s in (1, 2, 3, 4)]
    assert [r["teacher_share"] for r in rows] == [1.0, 0.5, 0.0, 0.0]
    record = json.loads((scratch / "arcflow_config.json").read_text())
    assert record["teacher_evals"] == record["teacher_evals_own"] == 4 * per_step
    assert record["guidance"] == 1.5 and record["segment_sigmas"] == [1.0, 0.5, 0.0]
    from arcflow.distill.runs import load_run

    loaded = load_run(scratch)
    calls = []
    loaded.student.transformer.register_forward_hook(lambda *a: calls.append(1))
    out = loaded.sample_latents(PROMPTS, [1, 2])
    assert len(calls) == 2 and out.shape == (2, 16, 4) and torch.isfinite(out).all()


def test_on_policy_resume_is_exact(scratch, tmp_path):
    parts = tmp_path / "parts"
    train_tiny_on_policy(parts, iters=2, checkpoint_every=2)
    train_tiny_on_policy(parts, iters=4, checkpoint_every=2, resume=True)
    from safetensors.torch import load_file

    a = load_file(str(scratch / "checkpoints/step-0000004/trainable.safetensors"))
    b = load_file(str(parts / "checkpoints/step-0000004/trainable.safetensors"))
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [r["loss"] for r in metrics(scratch)] == [r["loss"] for r in metrics(parts)]
    assert [r["teacher_evals"] for r in metrics(scratch)] == [r["teacher_evals"] for r in metrics(parts)]


def test_polish_starts_from_the_run_and_adds_its_evals(tmp_path):
    dataset = make_dataset(tmp_path / "ds", num_samples=16, steps=4, shard_size=16)
    offline = tmp_path / "offline"
    train_tiny_run(dataset, offline, k=3, weight_groups=2, lora_rank=2)
    record = json.loads((offline / "arcflow_config.json").read_text())
    assert record["teacher_evals"] == 16 * 4 * 2, "a dataset costs samples x steps x 2 (true CFG)"
    # the polish student starts as the exported one
    teacher = load_teacher("digits")
    config = StudentConfig.from_dict(record["student"])
    fresh = build_student(teacher, config)
    parent_weights(fresh, str(offline))
    exported = load_student(load_teacher("digits"), offline)
    theirs = dict(exported.named_parameters())
    for name, p in fresh.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, theirs[name]), name
    polish = tmp_path / "polish"
    train_tiny_on_policy(polish, from_run=str(offline), iters=2, k=8)  # k is the run's, not this 8
    done = json.loads((polish / "arcflow_config.json").read_text())
    assert done["student"]["k"] == 3 and done["student"]["weight_groups"] == 2
    assert done["teacher_evals_own"] == 2 * 4 * 2 * 4 * 2
    assert done["teacher_evals"] == record["teacher_evals"] + done["teacher_evals_own"]
    assert done["guidance"] == 1.5


def test_cli_and_python_build_the_same_default_student(monkeypatch, tmp_path, capsys):
    """No flags: the CLI's run is DistillConfig's own default (and StudentConfig's student)."""
    import arcflow.distill.trainer as trainer

    seen = []
    monkeypatch.setattr(trainer, "distill", lambda config: seen.append(config) or Path(config.out))
    code, _, err = run_in_process(capsys, "distill", "ds", "--out", tmp_path / "run")
    assert code == 0, err
    assert seen[0] == DistillConfig(dataset="ds", out=str(tmp_path / "run"))
    assert seen[0].student == StudentConfig() == DistillConfig(dataset="ds", out="x").student
    code, _, err = run_in_process(capsys, "distill", "ds", "--out", tmp_path / "run", "--k", "3", "--no-momentum")
    assert seen[1].student == StudentConfig(k=3, momentum=False)
    assert seen[1] == build_config({"dataset": "ds", "out": str(tmp_path / "run"), "k": 3, "momentum": False})
    code, _, err = run_in_process(capsys, "distill", "ds", "--out", tmp_path / "run", "--lora-targets", r"blocks\.\d+\.ff")
    assert code == 0, err
    assert seen[2].student == StudentConfig(lora_targets=r"blocks\.\d+\.ff")


def test_official_preset_and_explicit_flags_win(monkeypatch, tmp_path, capsys):
    import arcflow.distill.trainer as trainer

    seen = []
    monkeypatch.setattr(trainer, "distill", lambda config: seen.append(config) or Path(config.out))
    code, _, err = run_in_process(capsys, "distill", "--on-policy", "--teacher", "digits", "--preset", "official",
                                  "--out", tmp_path / "run", "--lr", "3e-4")
    assert code == 0, err
    config = seen[0]
    official = PRESETS["official"]["digits"]
    assert config.student.k == 16 and config.student.weight_groups == 4 and config.student.momentum
    assert config.student.lora_rank == official["lora_rank"] and config.student.train_modules == ["norm_out"]
    assert config.lr == 3e-4, "an explicit flag overrides the preset"
    assert (config.loss_scale, config.adam_beta2, config.ema_schedule, config.teacher_mix_iters) == (15.0, 0.95, "karras", 200)
    assert (config.warmup_start, config.grad_clip_from, config.plain_cfg) == (0.001, 10, True)
    assert (config.student.head_init, config.student.lora_init, config.student.log_gamma_bound) == ("official", "gaussian", 0.0)
    recorded = DistillConfig.from_dict(json.loads(json.dumps(config.to_dict())))  # the run's distill_config.json
    assert recorded == config
    assert config.preset == "official"
    offline = build_config({"dataset": "ds", "out": "x"}, "official-digits")
    assert not offline.plain_cfg and offline.grad_clip_from == 10, "offline: the dataset's targets, the rest of the recipe"
    default = DistillConfig(dataset="ds", out="x")
    assert (default.loss_scale, default.warmup_start, default.grad_clip_from, default.plain_cfg) == (1.0, 0.0, 0, False)
    assert (default.student.head_init, default.student.lora_init, default.student.log_gamma_bound) == ("relative", "kaiming", 6.0)
    flux = build_config({"on_policy": True, "teacher": "black-forest-labs/FLUX.1-dev", "out": "x"}, "official")
    assert (flux.student.lora_rank, flux.lr, flux.iters, flux.teacher_mix_iters, flux.guidance) == (256, 1e-4, 10_000, 2000, 3.5)
    qwen = build_config({"on_policy": True, "teacher": "Qwen/Qwen-Image", "out": "x"}, "official")
    assert (qwen.iters, qwen.teacher_mix_iters, qwen.guidance, qwen.plain_cfg, qwen.grad_clip_from) == (15_000, 1000, 4.0, True, 100)


@pytest.mark.parametrize("args, fragment", [
    (["ds", "--on-policy", "--teacher", "digits"], "drop DATASET"),
    (["ds", "--prompts", "p.txt"], "only apply with --on-policy"),
    (["ds", "--plain-cfg"], "--plain-cfg only apply with --on-policy"),
    (["ds", "--head-init", "zero"], "--head-init must be one of"),
    (["ds", "--lora-init", "zero"], "--lora-init must be one of"),
    (["--on-policy"], "exactly one of --teacher"),
    (["--on-policy", "--teacher", "digits", "--from", "x"], "exactly one of --teacher"),
    (["--on-policy", "--teacher", "digits", "--preset", "fastest"], "--preset must be one of"),
    (["--on-policy", "--teacher", "digits", "--weight-groups", "3"], "does not divide"),
    (["--on-policy", "--teacher", "digits", "--mixture-dropout", "1.0"], "--mixture-dropout"),
    (["--on-policy", "--from", "nowhere"], "no such run directory"),
])
def test_bad_on_policy_input_is_one_line(args, fragment, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_in_process(capsys, "distill", *args, "--out", tmp_path / "run")
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "run").exists()


def test_cli_on_policy_end_to_end(tmp_path, capsys):
    """`arcflow distill --on-policy` from prompts on Ray Train, then `arcflow sample` from the run."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten digit 1\n\na handwritten digit 2\n")
    run = tmp_path / "run"
    res = run_subprocess("distill", "--on-policy", "--teacher", "digits", "--prompts", prompts, "--out", run,
                         "--iters", "2", "--batch-size", "2", "--k", "2", "--lora-rank", "2", "--checkpoint-every", "2",
                         "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    rows = metrics(run)
    assert rows[-1]["step"] == 2 and rows[-1]["teacher_evals"] == 2 * 2 * 2 * 4 * 2
    saved = json.loads((run / "distill_config.json").read_text())
    assert saved["on_policy"] and saved["prompts"] == str(prompts) and saved["dataset"] is None
    code, _, err = run_in_process(capsys, "sample", "--adapter", run, "--prompt", "a handwritten digit 1", "--num", "2",
                                  "--out", tmp_path / "x.npy")
    assert code == 0, err
    code, _, err = run_in_process(capsys, "distill", "--on-policy", "--teacher", "digits", "--prompts", prompts, "--out", run)
    assert_one_line_error(code, err, "already holds a distill run")


def test_optimizer_groups_and_the_karras_ema():
    """The log-gamma head trains at lr x mult in its own group; the Karras decay is
    (1 - 1/(t - start))^(gamma + 1), a plain copy until ``start``."""
    from arcflow.distill.optim import karras_decay, make_ema, make_optimizer

    student = build_student(load_teacher("digits"), StudentConfig(k=3, lora_rank=2, momentum=True))
    params = {n: p for n, p in student.named_parameters() if p.requires_grad}
    config = DistillConfig(dataset="d", out="o", lr=1e-3, log_gamma_lr_mult=0.1, adam_beta2=0.95)
    optimizer = make_optimizer(params, config)
    (rest, gamma) = optimizer.param_groups
    assert gamma["lr"] == pytest.approx(1e-4) and rest["lr"] == 1e-3 and rest["betas"] == (0.9, 0.95)
    assert {id(p) for p in gamma["params"]} == {id(p) for n, p in params.items() if "proj_out.log_gamma." in n}
    assert karras_decay(5, 7.0, 10) == 0.0 and karras_decay(11, 7.0, 10) == 0.0
    assert karras_decay(110, 7.0, 10) == pytest.approx((1 - 1 / 100) ** 8)
    ema = make_ema(params.values(), DistillConfig(dataset="d", out="o", ema_schedule="karras", ema_start=0))
    assert ema.get_decay(100) == pytest.approx((1 - 1 / 100) ** 8)


def test_on_policy_on_a_flux_pipeline_samples_in_a_stock_pipeline(tmp_path):
    """A tiny FluxPipeline (guidance-distilled: one evaluation per state) distilled on-policy from a
    prompts file; the stock pipeline's own __call__ then samples the run in exactly 2 calls."""
    from arcflow.distill.interop import arcflow_pipeline
    from diffusers import FluxPipeline
    from tiny_pipelines import T5_LENGTH, save_tiny_flux_pipeline

    flux_dir = save_tiny_flux_pipeline(tmp_path / "pipe")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\na red car\n")
    options = dict(height=32, width=32, max_sequence_length=T5_LENGTH)
    run = tmp_path / "run"
    train_tiny_on_policy(run, teacher=str(flux_dir), prompts=str(prompts), teacher_options=options, iters=2,
                         batch_size=2, weight_groups=4, momentum=True)
    record = json.loads((run / "arcflow_config.json").read_text())
    assert record["teacher_evals"] == 2 * 2 * 2 * 4 * 1, "embedded guidance: one evaluation per state"
    assert record["guidance"] == 3.5 and record["teacher_options"]["height"] == 32
    teacher = load_teacher(str(flux_dir), **options)
    torch.testing.assert_close(torch.tensor(record["segment_sigmas"]), teacher.sigmas(2).float(), rtol=0, atol=1e-6)
    pipe = FluxPipeline.from_pretrained(str(flux_dir))
    arcflow_pipeline(pipe, run)
    calls = []
    pipe.transformer.register_forward_hook(lambda *_: calls.append(1))
    out = pipe(["a photo of a cat"], num_inference_steps=2, guidance_scale=3.5, max_sequence_length=T5_LENGTH,
               height=32, width=32, output_type="latent")
    assert len(calls) == 2 and torch.isfinite(out.images).all()
