"""The offline distiller: training, resume, export/reload, Ray Train, and bad input."""

import json
from pathlib import Path

import pytest
import torch
from arcflow.distill.config import DistillConfig
from arcflow.distill.run_plan import DISTILL_CONFIG_FILE, plan_run
from arcflow.distill.worker import METRICS_FILE, train_worker
from cli_helpers import assert_process_failed_one_line, run_subprocess
from dataset_factory import make_dataset
from safetensors.torch import load_file
from reference_sampling import reference_sample


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "ds", num_samples=48, steps=4, shard_size=16)


def config_for(dataset, out, **overrides):
    base = dict(dataset=str(dataset), out=str(out), iters=12, batch_size=8, lr=1e-3, warmup=2,
                checkpoint_every=6, log_every=1, lora_rank=4, k=4, progress=False)
    base.update(overrides)
    return DistillConfig.from_dict(base)


def run_local(config):
    """The trainer's own loop in this process (what each Ray Train worker runs)."""
    plan = plan_run(config)
    Path(config.out).mkdir(parents=True, exist_ok=True)
    (Path(config.out) / DISTILL_CONFIG_FILE).write_text(json.dumps(config.to_dict()))
    return train_worker(config, plan)


def metrics(run):
    return [json.loads(line) for line in (Path(run) / METRICS_FILE).read_text().splitlines()]


def test_loss_decreases(dataset, tmp_path):
    run = tmp_path / "run"
    run_local(config_for(dataset, run, iters=40, lr=3e-3, ema_decay=0.0, momentum=True))
    losses = [m["loss"] for m in metrics(run)]
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    assert {"loss_segment_0", "loss_segment_1", "lr", "grad_norm", "it_per_s"} <= set(metrics(run)[-1])


def test_resume_reaches_the_same_weights(dataset, tmp_path):
    """An interrupted run (stopped at a checkpoint, then resumed) ends bit-identical to an
    uninterrupted one on the same machine and thread count (tolerance: exact equality)."""
    full, parts = tmp_path / "full", tmp_path / "parts"
    run_local(config_for(dataset, full, iters=12))
    run_local(config_for(dataset, parts, iters=6))
    run_local(config_for(dataset, parts, iters=12, resume=True))
    a = load_file(str(full / "checkpoints/step-0000012/trainable.safetensors"))
    b = load_file(str(parts / "checkpoints/step-0000012/trainable.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert [m["loss"] for m in metrics(full)] == [m["loss"] for m in metrics(parts)]


def test_exported_student_reloads_identically(dataset, tmp_path):
    from arcflow.distill.student import load_student
    from arcflow.pipeline.registry import load_teacher

    run = tmp_path / "run"
    run_local(config_for(dataset, run, iters=4, checkpoint_every=4))
    record = json.loads((run / "arcflow_config.json").read_text())
    assert record["nfe"] == 2 and record["student"]["k"] == 4
    assert record["dataset_fingerprint"].startswith("sha256:")
    teacher = load_teacher("digits")
    cond = teacher.encode_prompts(["a handwritten digit 3"] * 4)
    noise = teacher.noise([1, 2, 3, 4])
    first = reference_sample(load_student(teacher, run).eval(), noise, cond)
    second = reference_sample(load_student(teacher, run).eval(), noise, cond)
    assert torch.equal(first, second)
    # The export holds the EMA weights of the final checkpoint.
    ema = load_file(str(run / "checkpoints/step-0000004/ema.safetensors"))
    student = load_student(teacher, run)
    params = dict(student.named_parameters())
    for key, value in ema.items():
        torch.testing.assert_close(params[key].detach().float(), value, rtol=0, atol=0)


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
    run_local(config_for(dataset, tmp_path / "run", iters=3, checkpoint_every=3))
    assert calls == []


@pytest.mark.parametrize(
    "extra,fragment",
    [
        (["--k", "0"], "--k must be >= 1"),
        (["--lora-rank", "0"], "--lora-rank must be >= 1"),
        (["--nfe", "0"], "--nfe must be >= 1"),
        (["--nfe", "3"], "not representable"),
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
    run_local(config_for(dataset, run, iters=2, checkpoint_every=2))
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
    assert record["student"]["momentum"] is False, "the CLI default is the ablation's pick: no momentum"
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


def test_bf16_autocast_trains_with_float32_integral(dataset, tmp_path):
    run = tmp_path / "run"
    run_local(config_for(dataset, run, iters=3, checkpoint_every=3, bf16=True))
    losses = [m["loss"] for m in metrics(run)]
    assert len(losses) == 3 and all(l == l and l < 1e3 for l in losses)  # finite
    head = load_file(str(run / "momentum_head.safetensors"))
    assert all(v.dtype == torch.float32 for v in head.values())


def test_the_ray_train_record_file_name_is_rays():
    """latest_checkpoint looks for Ray Train's run snapshot by name without importing Ray."""
    from arcflow.distill.checkpoint import RAY_SNAPSHOT
    from ray.train.v2._internal.constants import CHECKPOINT_MANAGER_SNAPSHOT_FILENAME

    assert RAY_SNAPSHOT == CHECKPOINT_MANAGER_SNAPSHOT_FILENAME
