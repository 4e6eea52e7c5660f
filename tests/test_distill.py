"""The offline distiller: training, resume, export/reload, Ray Train, and bad input."""

import json
from pathlib import Path

import pytest
import torch
from arcflow.distill.config import DistillConfig
from arcflow.distill.student.config import StudentConfig
from arcflow.distill.run_plan import plan_run
from arcflow.distill.worker import METRICS_FILE
from cli_helpers import assert_process_failed_one_line, run_subprocess
from dataset_factory import make_dataset, train_tiny_run
from safetensors.torch import load_file
from reference_sampling import reference_sample


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "ds", num_samples=48, steps=4, shard_size=16)


#: This module's runs: a little larger than the shared tiny run.
RUN = dict(iters=12, warmup=2, checkpoint_every=6, lora_rank=4, k=4)


def run_local(dataset, out, **overrides) -> DistillConfig:
    """``train_tiny_run`` at this module's sizes, in this process (no Ray)."""
    return train_tiny_run(dataset, out, **{**RUN, **overrides})


def metrics(run):
    return [json.loads(line) for line in (Path(run) / METRICS_FILE).read_text().splitlines()]


def test_loss_decreases(dataset, tmp_path):
    run = tmp_path / "run"
    run_local(dataset, run, iters=40, lr=3e-3, ema_decay=0.0, momentum=True)
    losses = [m["loss"] for m in metrics(run)]
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    assert {"loss_segment_0", "loss_segment_1", "lr", "grad_norm", "it_per_s"} <= set(metrics(run)[-1])


def test_resume_reaches_the_same_weights(dataset, tmp_path):
    """An interrupted run (stopped at a checkpoint, then resumed) ends bit-identical to an
    uninterrupted one on the same machine and thread count (tolerance: exact equality)."""
    full, parts = tmp_path / "full", tmp_path / "parts"
    run_local(dataset, full, iters=12)
    run_local(dataset, parts, iters=6)
    run_local(dataset, parts, iters=12, resume=True)
    a = load_file(str(full / "checkpoints/step-0000012/trainable.safetensors"))
    b = load_file(str(parts / "checkpoints/step-0000012/trainable.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [m["loss"] for m in metrics(full)] == [m["loss"] for m in metrics(parts)]
    # the same run gives the same bytes: the exported files and the last checkpoint's weights (its state.json
    # records the config, paths and --resume included)
    files = ["pytorch_lora_weights.safetensors", "momentum_head.safetensors", "scheduler_config.json",
             *(f"checkpoints/step-0000012/{p.name}" for p in (full / "checkpoints/step-0000012").glob("*.safetensors"))]
    for name in files:
        assert (full / name).read_bytes() == (parts / name).read_bytes(), name


def test_exported_student_reloads_identically(dataset, tmp_path):
    """The exported student samples exactly like one built afresh with the final checkpoint's EMA weights."""
    from arcflow.distill.student import StudentConfig, build_student, load_student
    from arcflow.pipeline.registry import load_teacher

    run = tmp_path / "run"
    run_local(dataset, run, iters=4, checkpoint_every=4)
    record = json.loads((run / "arcflow_config.json").read_text())
    assert record["nfe"] == 2 and record["student"]["k"] == 4
    assert record["dataset_fingerprint"].startswith("sha256:")
    teacher = load_teacher("digits")
    ema = load_file(str(run / "checkpoints/step-0000004/ema.safetensors"))
    reference = build_student(teacher, StudentConfig.from_dict(record["student"]))
    assert sorted(ema) == sorted(name for name, p in reference.named_parameters() if p.requires_grad)
    reference.load_state_dict(ema, strict=False)  # the trainable weights; the frozen ones are the teacher's
    cond = teacher.encode_prompts(["a handwritten digit 3"] * 4)
    noise = teacher.noise([1, 2, 3, 4])
    expected = reference_sample(reference.eval(), noise, cond)
    exported = load_student(teacher, run).eval()
    assert torch.equal(reference_sample(exported, noise, cond), expected)
    fresh = reference_sample(build_student(teacher, StudentConfig.from_dict(record["student"])).eval(), noise, cond)
    assert not torch.equal(fresh, expected), "training changed nothing the sampler sees"


def test_distill_never_calls_the_teacher_velocity(dataset, tmp_path, monkeypatch):
    from arcflow.pipeline import teacher as teacher_module
    from arcflow.pipeline.digits import DigitsTeacher

    calls = []

    def forbidden(self, *args, **kwargs):
        calls.append(type(self).__name__)
        raise AssertionError("the teacher's velocity was evaluated during distillation")

    for cls in (teacher_module.Teacher, DigitsTeacher):
        monkeypatch.setattr(cls, "velocity", forbidden, raising=False)
        monkeypatch.setattr(cls, "conditional_velocity", forbidden, raising=False)
    run_local(dataset, tmp_path / "run", iters=3, checkpoint_every=3)
    assert calls == []


@pytest.mark.parametrize(
    "extra,fragment",
    [
        (["--k", "0"], "--k must be >= 1"),
        (["--lora-rank", "0"], "--lora-rank must be >= 1"),
        (["--nfe", "0"], "--nfe must be >= 1"),
        (["--nfe", "1001"], "--nfe must be at most 1000"),
    ],
)
def test_bad_values(dataset, tmp_path, extra, fragment):
    assert_process_failed_one_line(run_subprocess("distill", str(dataset), "--out", str(tmp_path / "r"), *extra), fragment)
    assert not (tmp_path / "r").exists()


def test_missing_and_empty_datasets(tmp_path, dataset):
    assert_process_failed_one_line(run_subprocess("distill", str(tmp_path / "nope"), "--out", str(tmp_path / "r")), "does not exist")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "dataset.json").write_text((Path(dataset) / "dataset.json").read_text())
    assert_process_failed_one_line(run_subprocess("distill", str(empty), "--out", str(tmp_path / "r")), "no committed shards")


def test_out_holding_another_run_is_refused(dataset, tmp_path):
    run = tmp_path / "run"
    run_local(dataset, run, iters=2, checkpoint_every=2)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert_process_failed_one_line(run_subprocess("distill", str(dataset), "--out", str(run), "--iters", "2"), "--resume")
    assert_process_failed_one_line(
        run_subprocess("distill", str(dataset), "--out", str(run), "--iters", "2", "--k", "2", "--resume"), "differ"
    )
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert before == after


def test_two_worker_ray_train_trains_and_saves_once(dataset, tmp_path):
    run = tmp_path / "run"
    res = run_subprocess("distill", str(dataset), "--out", str(run), "--num-workers", "2", "--iters", "4",
                  "--batch-size", "4", "--checkpoint-every", "2", "--k", "2", "--lora-rank", "2", "--no-progress")
    assert res.returncode == 0, res.stderr[-3000:]
    steps = [m["step"] for m in metrics(run)]
    assert steps == sorted(set(steps)) and steps[-1] == 4, "rank 0 alone logs each step once"
    assert (run / "pytorch_lora_weights.safetensors").is_file() and (run / "momentum_head.safetensors").is_file()
    record = json.loads((run / "arcflow_config.json").read_text())
    assert record["student"] == {**StudentConfig(k=2, lora_rank=2).to_dict(), "init_seed": 0}, \
        "the CLI builds StudentConfig's own default student"
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir()) == ["step-0000002", "step-0000004"]
    state = json.loads((run / "checkpoints/step-0000004/state.json").read_text())
    assert len(state["data"]) == 2 and {s["rank"] for s in state["data"]} == {0, 1}

    # Moved elsewhere, the run resumes there from Ray Train's own record of its checkpoints.
    moved = tmp_path / "moved"
    run.rename(moved)
    plan = plan_run(DistillConfig.from_dict(dict(dataset=str(dataset), out=str(moved), num_workers=2, iters=6, batch_size=4,
                                    checkpoint_every=2, k=2, lora_rank=2, resume=True)))
    assert plan.resume_step == 4 and plan.resume_checkpoint == str(moved / "checkpoints/step-0000004")
    res = run_subprocess("distill", str(dataset), "--out", str(moved), "--num-workers", "2", "--iters", "6",
                         "--batch-size", "4", "--checkpoint-every", "2", "--k", "2", "--lora-rank", "2", "--no-progress",
                         "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    steps = [m["step"] for m in metrics(moved)]
    assert steps == sorted(set(steps)) and steps[-1] == 6, "no step logged twice"
    assert sorted(p.name for p in (moved / "checkpoints").iterdir() if p.is_dir()) == ["step-0000004", "step-0000006"]


def test_bf16_autocast_trains_with_float32_integral(dataset, tmp_path, monkeypatch):
    """With --bf16 the network runs in bfloat16 (its outputs are bf16, the first loss moves by bf16
    rounding only) while the momentum integral the loss is taken on stays float32."""
    from arcflow.distill import loss

    seen, average_velocities = [], loss.average_velocities

    def spy(params, s_src, sigmas):
        out = average_velocities(params, s_src, sigmas)
        seen.append((params.velocities.dtype, out.dtype))  # (network output, integral)
        return out

    monkeypatch.setattr(loss, "average_velocities", spy)
    run_local(dataset, tmp_path / "fp32", iters=1, checkpoint_every=1)
    assert seen == [(torch.float32, torch.float32)]
    seen.clear()
    run_local(dataset, tmp_path / "bf16", iters=3, checkpoint_every=3, bf16=True)
    assert seen == [(torch.bfloat16, torch.float32)] * 3
    fp32, bf16 = metrics(tmp_path / "fp32")[0]["loss"], [m["loss"] for m in metrics(tmp_path / "bf16")]
    assert len(bf16) == 3 and all(l == l and l < 1e3 for l in bf16)  # finite
    assert bf16[0] != fp32 and bf16[0] == pytest.approx(fp32, rel=0.05)  # same weights and batch at step 1


def test_the_ray_train_record_file_name_is_rays():
    """latest_checkpoint looks for Ray Train's run snapshot by name without importing Ray."""
    from arcflow.distill.checkpoint import RAY_SNAPSHOT
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    assert RAY_SNAPSHOT == CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
