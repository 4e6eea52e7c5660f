"""A run directory is untrusted input, and checkpoints survive faults (issue 18: Reliability II).

Classes: torn or damaged checkpoints (the newest intact one is used, a full disk is named), a job
that ended before its first checkpoint (nothing blocks the corrected command), paths that lead
outside the run (relative, absolute, through links: never followed, read or deleted), divergence
(a non-finite loss stops training, loaders refuse non-finite weights and sigmas), and two jobs on
one run directory. Runs are trained in this process (``train_tiny_run``); one test drives Ray Train.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
from arcflow.cli.errors import describe
from arcflow.core.errors import ArcflowError
from arcflow.distill import checkpoint as ckpt
from arcflow.distill.config import DistillConfig
from arcflow.distill.run_plan import DISTILL_CONFIG_FILE, plan_run
from arcflow.distill.worker import METRICS_FILE
from cli_helpers import assert_one_line_error
from cli_helpers import run_in_process as cli
from dataset_factory import TINY_RUN, make_dataset, train_tiny_run

pytestmark = pytest.mark.usefixtures("one_thread")

#: Two checkpoints (steps 2 and 4) and an exported student.
RUN = dict(iters=4, checkpoint_every=2)


def hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("runtrust")
    make_dataset(root / "ds", num_samples=32, steps=4, shard_size=16)
    train_tiny_run(root / "ds", root / "run", **RUN)
    return root


@pytest.fixture
def scratch(world, tmp_path):
    shutil.copytree(world, tmp_path / "w", symlinks=True)
    return tmp_path / "w"


def config_for(root: Path, **overrides) -> DistillConfig:
    return DistillConfig.from_dict({"dataset": str(root / "ds"), "out": str(root / "run"), **TINY_RUN, **RUN,
                                    "resume": True, **overrides})


def step_dir(root: Path, step: int) -> Path:
    return root / "run" / "checkpoints" / f"step-{step:07d}"


def victim(root: Path, name: str = "victim") -> Path:
    """A directory outside the run that nothing may touch."""
    path = root.parent / name
    path.mkdir()
    (path / "precious.txt").write_text("keep me\n")
    return path


# -- 1. torn or damaged checkpoints: the newest intact one is used, the damage named ---------------
DAMAGE = {
    "truncated weights": ("trainable.safetensors", lambda b: b[: len(b) // 2]),
    "torn optimizer": ("optimizer.safetensors", lambda b: b[:4096]),
    "garbage state.json": ("state.json", lambda b: b"{not json"),
    "zero-byte manifest": ("manifest.json", lambda b: b""),
    "flipped byte": ("ema.safetensors", lambda b: b[:-1] + bytes([b[-1] ^ 1])),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_is_skipped_and_named(case, scratch, caplog):
    name, damage = DAMAGE[case]
    path = step_dir(scratch, 4) / name
    path.write_bytes(damage(path.read_bytes()))
    found = ckpt.find_checkpoint(scratch / "run")
    assert found.step == 2 and found.path == step_dir(scratch, 2)
    assert len(found.damaged) == 1 and str(path) in found.damaged[0], found.damaged
    # training continues from step 2 and rewrites step 4 whole
    with caplog.at_level(logging.WARNING, logger="arcflow.distill.checkpoint"):
        train_tiny_run(scratch / "ds", scratch / "run", **{**RUN, **dict(iters=6, resume=True)})
    assert any(f"resuming from step 2; step 4 is damaged: {path}" in r.getMessage() for r in caplog.records)
    assert ckpt.find_checkpoint(scratch / "run").step == 6
    ckpt.verify_checkpoint(step_dir(scratch, 4))
    steps = [json.loads(line)["step"] for line in (scratch / "run" / METRICS_FILE).read_text().splitlines()]
    assert steps == list(range(1, 7))


def test_a_checkpoint_without_its_manifest_is_checked_by_reading_it(scratch):
    """Checkpoints of earlier arcflow versions have no manifest: intact when every file reads."""
    (step_dir(scratch, 4) / ckpt.MANIFEST_FILE).unlink()
    assert ckpt.find_checkpoint(scratch / "run").step == 4
    part = step_dir(scratch, 4) / "optimizer.safetensors"
    part.write_bytes(part.read_bytes()[:57344 // 1000])
    found = ckpt.find_checkpoint(scratch / "run")
    assert found.step == 2 and "optimizer.safetensors" in found.damaged[0]


def test_full_disk_during_a_checkpoint_names_the_disk_and_keeps_the_last_one(scratch, monkeypatch):
    """ENOSPC in the middle of a checkpoint: an OSError naming the file (worded as a full disk), no
    step-6 directory is visible, step 4 stays the newest; with space again, --resume finishes."""
    real_fsync, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 3:  # the third file of the checkpoint
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(ckpt.os, "fsync", fsync)
    with pytest.raises(OSError) as info:
        train_tiny_run(scratch / "ds", scratch / "run", **{**RUN, **dict(iters=6, checkpoint_every=6, resume=True)})
    line = describe(info.value)
    assert "no space left on the device" in line and str(scratch / "run" / "checkpoints") in line, line
    assert sorted(p.name for p in (scratch / "run" / "checkpoints").iterdir() if not p.name.startswith(".")) == [
        "step-0000002", "step-0000004"]
    assert ckpt.find_checkpoint(scratch / "run").step == 4
    monkeypatch.setattr(ckpt.os, "fsync", real_fsync)  # space freed
    train_tiny_run(scratch / "ds", scratch / "run", **{**RUN, **dict(iters=6, checkpoint_every=6, resume=True)})
    assert ckpt.find_checkpoint(scratch / "run").step == 6
    assert not any(p.name.startswith(".tmp-") for p in (scratch / "run" / "checkpoints").iterdir())


def test_a_full_disk_in_safetensors_is_an_os_error():
    """safetensors reports a full disk as its own error: the export words it as the OSError it is."""
    from arcflow.distill.student.saving import _as_os_error

    rust = Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space" })')
    converted = _as_os_error(rust, Path("/runs/x/.export-tmp"))
    assert describe(converted, resumable=True) == (
        "/runs/x/.export-tmp: no space left on the device; free some space, then rerun with --resume"
    )
    other = ValueError("something else")
    assert _as_os_error(other, Path("/x")) is other


# -- 2. a job that ended before its first checkpoint blocks nothing --------------------------------
def leave_a_dead_job(root: Path) -> None:
    """What a job killed before its first checkpoint leaves: its settings, empty metrics, a torn
    checkpoint (no manifest, cut short), a hidden partial one and a 0-byte Ray record."""
    run = root / "dead"
    train_tiny_run(root / "ds", run, **RUN)
    for name in ("arcflow_config.json", "pytorch_lora_weights.safetensors", "momentum_head.safetensors",
                 "scheduler_config.json"):
        (run / name).unlink()
    saved = json.loads((run / DISTILL_CONFIG_FILE).read_text())
    (run / DISTILL_CONFIG_FILE).write_text(json.dumps({**saved, "batch_size": 999}))
    (run / METRICS_FILE).write_text("")
    shutil.rmtree(run / "checkpoints" / "step-0000004")
    torn = run / "checkpoints" / "step-0000002"
    (torn / ckpt.MANIFEST_FILE).unlink()
    (torn / "optimizer.safetensors").write_bytes((torn / "optimizer.safetensors").read_bytes()[:100])
    (run / "checkpoints" / ".tmp-step-0000004").mkdir()
    (run / "checkpoints" / ckpt.RAY_SNAPSHOT).write_bytes(b"")


@pytest.mark.parametrize("resume", [False, True])
def test_the_corrected_command_proceeds_after_a_job_died_before_its_first_checkpoint(scratch, resume):
    leave_a_dead_job(scratch)
    config = config_for(scratch, out=str(scratch / "dead"), resume=resume)  # batch size corrected to 8
    plan = plan_run(config)
    assert plan.resume_step == 0 and plan.resume_checkpoint is None


def test_an_exported_student_without_checkpoints_is_not_retrained_over(scratch):
    shutil.rmtree(scratch / "run" / "checkpoints")
    before = hashes(scratch / "run")
    with pytest.raises(ArcflowError, match="no intact checkpoint to continue from"):
        plan_run(config_for(scratch, iters=6))
    with pytest.raises(ArcflowError, match="already holds a distill run"):
        plan_run(config_for(scratch, resume=False))
    assert hashes(scratch / "run") == before


# -- 3. nothing outside the run is followed, read or deleted -------------------------------------
def test_a_linked_step_directory_is_never_followed(scratch):
    """Newer "checkpoints" that are links to another run's (relative and absolute targets) are not
    read, and pruning after new checkpoints leaves them and their targets alone."""
    other = scratch.parent / "other-run"
    shutil.copytree(step_dir(scratch, 4), other / "checkpoints" / "step-0000060")
    state = other / "checkpoints" / "step-0000060" / "state.json"
    state.write_text(state.read_text().replace('"step": 4', '"step": 60'))
    (other / "checkpoints" / "step-0000060" / ckpt.MANIFEST_FILE).unlink()
    root = scratch / "run" / "checkpoints"
    (root / "step-0000060").symlink_to(os.path.relpath(other / "checkpoints" / "step-0000060", root))
    (root / "step-0000070").symlink_to(other / "checkpoints" / "step-0000060")
    before = hashes(other)
    assert ckpt.find_checkpoint(scratch / "run").step == 4
    train_tiny_run(scratch / "ds", scratch / "run", **{**RUN, "iters": 10, "resume": True})  # prunes twice
    assert ckpt.find_checkpoint(scratch / "run").step == 10
    assert hashes(other) == before
    assert (root / "step-0000060").is_symlink() and (root / "step-0000070").is_symlink()


LINKED_MEMBERS = {
    "state.json linked outside": lambda d, out: _link(d / "state.json", out),
    "weights linked outside": lambda d, out: _link(d / "trainable.safetensors", out),
    "manifest names ../../": lambda d, out: _manifest_names(d, os.path.relpath(out, d)),
    "manifest names an absolute path": lambda d, out: _manifest_names(d, str(out)),
}


def _link(path: Path, outside: Path) -> None:
    shutil.copy(path, outside)
    path.unlink()
    path.symlink_to(outside)


def _manifest_names(directory: Path, name: str) -> None:
    manifest = json.loads((directory / ckpt.MANIFEST_FILE).read_text())
    manifest["files"][name] = manifest["files"].pop("state.json")
    (directory / ckpt.MANIFEST_FILE).write_text(json.dumps(manifest))


@pytest.mark.parametrize("case", sorted(LINKED_MEMBERS))
def test_checkpoint_files_outside_the_run_are_never_read(case, scratch, monkeypatch):
    outside = scratch.parent / "outside.bin"
    shutil.copy(step_dir(scratch, 4) / "state.json", outside)
    LINKED_MEMBERS[case](step_dir(scratch, 4), outside)
    real_read = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda p: pytest.fail(f"read {p}") if p.resolve() == outside
                        else real_read(p))
    found = ckpt.find_checkpoint(scratch / "run")
    assert found.step == 2 and "step 4 is damaged" in found.damaged[0]


def test_a_linked_checkpoints_directory_is_refused(scratch, capfd):
    elsewhere = victim(scratch)
    shutil.move(scratch / "run" / "checkpoints", elsewhere / "checkpoints")
    (scratch / "run" / "checkpoints").symlink_to(elsewhere / "checkpoints")
    before = hashes(elsewhere)
    code, _, err = cli(capfd, "distill", scratch / "ds", "--out", scratch / "run", "--iters", "6", "--batch-size", "8",
                       "--lora-rank", "2", "--k", "2", "--warmup", "1", "--checkpoint-every", "2", "--resume")
    assert_one_line_error(code, err, "checkpoints is not a directory of this run")
    assert hashes(elsewhere) == before


def test_run_files_linked_outside_are_not_followed(scratch):
    """metrics.jsonl and Ray's record as links to files elsewhere: replaced or removed, targets kept."""
    outside = victim(scratch)
    target = outside / "precious.txt"
    (scratch / "run" / METRICS_FILE).unlink()
    (scratch / "run" / METRICS_FILE).symlink_to(target)
    snapshot = scratch / "run" / "checkpoints" / ckpt.RAY_SNAPSHOT
    snapshot.symlink_to(os.path.relpath(target, snapshot.parent))
    train_tiny_run(scratch / "ds", scratch / "run", **{**RUN, **dict(iters=6, resume=True)})
    ckpt.forget_ray_record(scratch / "run")
    assert target.read_text() == "keep me\n"
    assert not os.path.lexists(snapshot)
    assert not (scratch / "run" / METRICS_FILE).is_symlink()


def test_a_linked_saved_config_is_refused(scratch):
    outside = scratch.parent / "distill_config.json"
    shutil.move(scratch / "run" / DISTILL_CONFIG_FILE, outside)
    (scratch / "run" / DISTILL_CONFIG_FILE).symlink_to(outside)
    with pytest.raises(ArcflowError, match="is a link"):
        plan_run(config_for(scratch, iters=6))


def ray_snapshot(entries: list[str]) -> str:
    """A Ray Train record, made by Ray's own model, listing ``entries`` as its checkpoints."""
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import (
        _CheckpointManagerState,
        _TrainingResultState,
    )

    results = [_TrainingResultState(checkpoint_dir_name=e, metrics={"step": 1}) for e in entries]
    return _CheckpointManagerState(
        checkpoint_results=results, checkpoint_report_indices=list(range(len(results))),
        latest_checkpoint_result=results[-1], pending_training_results=[], pending_validation_specs=[],
        current_report_index=len(results), validated_checkpoint_dir_names=[],
        timed_out_validation_checkpoint_dir_names=[], failed_validation_checkpoint_dir_names=[],
    ).json()


def test_ray_train_restores_and_deletes_nothing_a_crafted_record_names(scratch, ray_session):
    """Ray Train's record naming ../../victim, an absolute path and another run's checkpoint as this
    run's: `distill --resume` (through Ray Train) trains from the run's own newest intact checkpoint
    (step 4 is torn, so step 2), deletes nothing outside the run, and rewrites step 4 whole."""
    from arcflow.distill.trainer import distill

    relative, absolute = victim(scratch), victim(scratch, "victim2")
    other = scratch.parent / "other-run" / "checkpoints" / "step-0000060"
    shutil.copytree(step_dir(scratch, 4), other)
    before = {p: hashes(p) for p in (relative, absolute, other.parent.parent)}
    torn = step_dir(scratch, 4) / "trainable.safetensors"
    torn.write_bytes(torn.read_bytes()[:1000])
    (scratch / "run" / "checkpoints" / ckpt.RAY_SNAPSHOT).write_text(
        ray_snapshot(["../../victim", str(absolute), "../../other-run/checkpoints/step-0000060"]))
    (scratch / "run" / "arcflow_config.json").unlink()
    distill(config_for(scratch, iters=6))
    assert {p: hashes(p) for p in before} == before
    assert sorted(p.name for p in (scratch / "run" / "checkpoints").iterdir() if p.is_dir()) == [
        "step-0000004", "step-0000006"]
    ckpt.verify_checkpoint(step_dir(scratch, 4))
    state = json.loads((step_dir(scratch, 6) / "state.json").read_text())
    assert state["step"] == 6
    steps = [json.loads(line)["step"] for line in (scratch / "run" / METRICS_FILE).read_text().splitlines()]
    assert steps == list(range(1, 7))
    assert (scratch / "run" / "arcflow_config.json").is_file()


# -- 4. divergence ---------------------------------------------------------------------------------
def test_a_non_finite_loss_stops_training_and_exports_nothing(scratch, monkeypatch):
    from arcflow.distill import loss

    real, calls = loss.segment_loss, []

    def diverging(*args, **kwargs):
        value, per_segment = real(*args, **kwargs)
        calls.append(1)
        return (value * float("nan") if len(calls) == 5 else value), per_segment

    monkeypatch.setattr(loss, "segment_loss", diverging)
    out = scratch / "diverged"
    with pytest.raises(ArcflowError) as info:
        train_tiny_run(scratch / "ds", out, **{**RUN, **dict(iters=8)})
    assert "the loss is not finite at step 5" in str(info.value) and "--lr" in str(info.value)
    assert "the last good checkpoint (step 4) is kept" in str(info.value)
    assert ckpt.find_checkpoint(out).step == 4
    assert not (out / "arcflow_config.json").exists() and not (out / "momentum_head.safetensors").exists()


def test_a_huge_learning_rate_stops_at_the_first_non_finite_step(scratch):
    out = scratch / "huge-lr"
    with pytest.raises(ArcflowError, match="the loss is not finite at step") as info:
        train_tiny_run(scratch / "ds", out, iters=20, checkpoint_every=100, lr=1e30, warmup=0)
    assert "before its first checkpoint, so none was written" in str(info.value)
    assert "checkpoint is kept" not in str(info.value) and ckpt.find_checkpoint(out).path is None
    assert not (out / "arcflow_config.json").exists()


def test_a_resumed_run_that_diverges_names_the_checkpoint_it_resumed_from(scratch, monkeypatch):
    """The run resumes at step 4 and diverges at once: step 4 is the last good checkpoint."""
    from arcflow.distill import loss

    real = loss.segment_loss
    monkeypatch.setattr(loss, "segment_loss", lambda *a, **k: (real(*a, **k)[0] * float("nan"), real(*a, **k)[1]))
    with pytest.raises(ArcflowError) as info:
        train_tiny_run(scratch / "ds", scratch / "run", **{**RUN, **dict(iters=8, resume=True)})
    assert "at step 5" in str(info.value) and "the last good checkpoint (step 4) is kept" in str(info.value)
    assert ckpt.find_checkpoint(scratch / "run").step == 4


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    with pytest.raises(ArcflowError, match="not finite"):
        ckpt.write_checkpoint(tmp_path, {"w": torch.tensor([1.0, float("inf")])}, None,
                              {"state": {}, "param_groups": []}, {"step": 3, "data": []})


def _nan_in(path: Path) -> None:
    weights = safetensors.torch.load_file(str(path))
    name = sorted(weights)[0]
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] = float("nan")
    safetensors.torch.save_file(weights, str(path))


def _edit_scheduler(run: Path, change) -> None:
    path = run / "scheduler_config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def _edit_record_sigmas(run: Path) -> None:
    record = json.loads((run / "arcflow_config.json").read_text())
    record["segment_sigmas"][1] = float("nan")
    (run / "arcflow_config.json").write_text(json.dumps(record))


REFUSED_RUNS = {
    "NaN head weight": (lambda r: _nan_in(r / "momentum_head.safetensors"), "momentum_head.safetensors"),
    "NaN LoRA weight": (lambda r: _nan_in(r / "pytorch_lora_weights.safetensors"), "pytorch_lora_weights"),
    "NaN scheduler sigma": (lambda r: _edit_scheduler(r, lambda c: c["segment_sigmas"].__setitem__(1, float("nan"))),
                            "scheduler_config.json"),
    "edited scheduler sigma": (lambda r: _edit_scheduler(r, lambda c: c["segment_sigmas"].__setitem__(1, 0.123)),
                               "scheduler_config.json"),
    "NaN recorded sigma": (_edit_record_sigmas, "arcflow_config.json"),
}


@pytest.mark.parametrize("case", sorted(REFUSED_RUNS))
def test_loaders_refuse_non_finite_or_edited_runs(case, scratch):
    from arcflow.distill.runs import load_run

    damage, fragment = REFUSED_RUNS[case]
    damage(scratch / "run")
    with pytest.raises(ArcflowError, match=fragment):
        load_run(scratch / "run")


def test_sample_refuses_a_nan_head_in_one_line(scratch, capfd):
    _nan_in(scratch / "run" / "momentum_head.safetensors")
    code, _, err = cli(capfd, "sample", "--adapter", scratch / "run", "--prompt", "a handwritten digit 3",
                       "--num", "1", "--out", scratch / "x.png")
    assert_one_line_error(code, err, "momentum_head.safetensors", "not finite")
    assert not (scratch / "x.png").exists()


def test_the_scheduler_api_refuses_non_finite_sigmas(tmp_path):
    from arcflow.distill.arcflow_scheduler import ArcFlowScheduler

    for sigmas in ([1.0, float("nan"), 0.0], [float("inf"), 0.5, 0.0]):
        with pytest.raises(ValueError, match="strictly decreasing"):
            ArcFlowScheduler(k=2, channels=4, segment_sigmas=sigmas)


# -- 5. one job per run directory ------------------------------------------------------------------
def test_a_second_job_on_one_run_is_refused_in_one_line(scratch, capfd):
    from arcflow.distill.trainer import hold_run

    before = hashes(scratch)
    with hold_run(scratch / "run"):  # the first job, still running
        code, _, err = cli(capfd, "distill", scratch / "ds", "--out", scratch / "run", "--iters", "6",
                           "--batch-size", "8", "--lora-rank", "2", "--k", "2", "--warmup", "1",
                           "--checkpoint-every", "2", "--resume")
        assert_one_line_error(code, err, "another arcflow distill job is using")
        with pytest.raises(ArcflowError, match="another arcflow distill job"):
            with hold_run(scratch / "run"):
                pass
    assert hashes(scratch) == before
    with hold_run(scratch / "run"):  # released with the first job
        pass


# -- 6. a run's record is checked before it is trusted (issue 28) ------------------------------------
@pytest.fixture
def no_teacher_load(monkeypatch):
    """Any teacher or pipeline load is a failure: the refusal must come first."""
    from arcflow.pipeline import diffusers_teachers, registry

    def refuse(*args, **kwargs):
        raise AssertionError("a teacher was loaded")

    monkeypatch.setattr(registry, "load_teacher", refuse)
    monkeypatch.setattr(diffusers_teachers, "load_diffusers_teacher", refuse)


def _edit_record(run: Path, change) -> None:
    path = run / "arcflow_config.json"
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))


def _another_pipeline(run: Path) -> None:
    from tiny_pipelines import save_tiny_flux_pipeline

    other = save_tiny_flux_pipeline(run.parent / "other-teacher")
    _edit_record(run, lambda r: r["teacher"].update(id=str(other)))


FOREIGN_TEACHERS = {
    "another pipeline directory": _another_pipeline,
    "an edited revision": lambda run: _edit_record(run, lambda r: r["teacher"].update(revision="0123456789abcdef")),
}


@pytest.mark.parametrize("case", sorted(FOREIGN_TEACHERS))
def test_a_run_naming_another_teacher_is_refused_before_loading_it(case, scratch, capfd, no_teacher_load):
    FOREIGN_TEACHERS[case](scratch / "run")
    code, _, err = cli(capfd, "sample", "--adapter", scratch / "run", "--prompt", "a handwritten digit 3",
                       "--num", "1", "--out", scratch / "x.png")
    assert_one_line_error(code, err, "arcflow_config.json names teacher", "the teacher was not loaded")
    assert not (scratch / "x.png").exists()
    code, _, err = cli(capfd, "distill", "--on-policy", "--from", scratch / "run", "--out", scratch / "polish")
    assert_one_line_error(code, err, "arcflow_config.json names teacher", "the teacher was not loaded")
    assert not (scratch / "polish").exists()


def test_a_pipeline_generator_for_a_run_compares_the_revision_first(scratch, no_teacher_load):
    from arcflow.distill.interop import load_arcflow_generator

    _another_pipeline(scratch / "run")
    with pytest.raises(ArcflowError, match="the teacher was not loaded"):
        load_arcflow_generator(scratch / "run")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


DAMAGED_PARENTS = {
    "NaN head weight": (lambda r: _nan_in(r / "momentum_head.safetensors"), "momentum_head.safetensors", "not finite"),
    "NaN LoRA weight": (lambda r: _nan_in(r / "pytorch_lora_weights.safetensors"), "pytorch_lora_weights", "not finite"),
    "truncated head": (lambda r: _truncate(r / "momentum_head.safetensors"), "momentum_head.safetensors", "is damaged"),
    "truncated LoRA": (lambda r: _truncate(r / "pytorch_lora_weights.safetensors"), "pytorch_lora_weights", "is damaged"),
}


@pytest.mark.parametrize("case", sorted(DAMAGED_PARENTS))
def test_a_polish_of_a_damaged_run_is_refused_up_front(case, scratch, capfd, no_teacher_load):
    damage, *fragments = DAMAGED_PARENTS[case]
    damage(scratch / "run")
    code, _, err = cli(capfd, "distill", "--on-policy", "--from", scratch / "run", "--out", scratch / "polish")
    assert_one_line_error(code, err, *fragments)
    assert not (scratch / "polish").exists()


def test_the_polish_start_reads_weights_through_the_run_loader(scratch):
    """``parent_weights`` itself refuses a NaN weight (the worker's own read, not only the driver's)."""
    from arcflow.distill.on_policy import parent_weights
    from arcflow.distill.student import build_student, read_student_config
    from arcflow.distill.student.config import StudentConfig
    from arcflow.pipeline.registry import load_teacher

    record = read_student_config(scratch / "run")
    student = build_student(load_teacher("digits"), StudentConfig.from_dict(record["student"]))
    _nan_in(scratch / "run" / "momentum_head.safetensors")
    with pytest.raises(ArcflowError, match="not finite"):
        parent_weights(student, str(scratch / "run"))
