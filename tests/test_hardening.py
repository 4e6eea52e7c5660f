"""Every failure is one clear line, exit 2, and leaves what was already written untouched.

One parametrized test per class of defect (system errors, bad numbers, errors inside Ray workers,
resume edge cases, tampered run directories, overwrites, damaged Parquet parts). Each case asserts
exit status 2, exactly one stderr line starting ``arcflow: error:``, no traceback, and that the
hashes of every file under the test's directory are unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from arcflow.distill.config import DistillConfig
from arcflow.distill.run_plan import DISTILL_CONFIG_FILE, plan_run
from arcflow.distill.worker import METRICS_FILE, train_worker
from cli_helpers import CLI_ENV, assert_one_line_error, assert_process_failed_one_line
from cli_helpers import run_in_process as cli
from cli_helpers import run_subprocess
from dataset_factory import make_dataset, train_tiny_run

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a handwritten digit 3"


def hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (relative path -> digest)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A directory holding a dataset (2 shards), a finished student run, a file and a binary file."""
    root = tmp_path_factory.mktemp("hardening")
    make_dataset(root / "ds", num_samples=32, steps=4, shard_size=16)
    train_tiny_run(root / "ds", root / "run")
    (root / "file").write_text("not a directory\n")
    (root / "binary.txt").write_bytes(b"\xff\xfe\x00bad\x80")
    return root


@pytest.fixture
def scratch(world, tmp_path):
    """A private copy of the world (tests may damage it)."""
    shutil.copytree(world, tmp_path / "w")
    return tmp_path / "w"


def check_failed_cleanly(code, err, root: Path, before: dict[str, str], *fragments) -> None:
    assert_one_line_error(code, err, *fragments)
    assert hashes(root) == before, "files changed or appeared"


# -- 1. system errors become one line that names the path ----------------------------------------
SYSTEM_ERRORS = {
    "out under a file": (["generate-trajectories", "-n", "4", "--out", "{w}/file/sub"], "file/sub"),
    "binary prompts file": (["generate-trajectories", "-n", "4", "--out", "{w}/new", "--prompts", "{w}/binary.txt"],
                            "not UTF-8"),
    "inspect a file": (["inspect", "{w}/file"], "is a file"),
    "png into a missing dir": (["inspect", "{w}/ds", "--sample", "0", "--png", "{w}/nope/x.png"], "does not exist"),
    "png under a file": (["inspect", "{w}/ds", "--sample", "0", "--png", "{w}/file/x.png"], "x.png"),
    "sample into a missing dir": (["sample", "--num", "1", "--steps", "2", "--out", "{w}/nope/x.png"], "does not exist"),
    "evaluate out is a file": (["evaluate", "--adapter", "{w}/run", "--out", "{w}/file"], "not a directory"),
    "distill out under a file": (["distill", "{w}/ds", "--out", "{w}/file/run"], "not a directory"),
}


@pytest.mark.parametrize("case", sorted(SYSTEM_ERRORS))
def test_system_errors_are_one_line(case, world, capfd):
    args, fragment = SYSTEM_ERRORS[case]
    before = hashes(world)
    code, _, err = cli(capfd, *[a.format(w=world) for a in args])
    check_failed_cleanly(code, err, world, before, fragment)


@contextlib.contextmanager
def tmpfs(where: Path, options: str):
    """A tiny tmpfs mounted at ``where`` for the test (skipped where mounting needs root we lack)."""
    where.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({res.stderr.decode().strip()}): needs root")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)])


@pytest.fixture
def small_disk(tmp_path):
    """A 48 KiB filesystem: dataset.json fits, a shard of 16 float32 trajectories (70 KB) does not."""
    with tmpfs(tmp_path / "disk", "size=48k") as disk:
        yield disk


@pytest.fixture
def read_only_disk(tmp_path):
    with tmpfs(tmp_path / "ro", "size=64k,ro") as disk:
        yield disk


def test_full_disk_during_generation_is_one_line_and_frees_out(small_disk):
    """ENOSPC inside a Ray worker: one line naming the problem; the half-made dataset (no shard
    committed) is removed, so the corrected command can use the same --out."""
    res = run_subprocess("generate-trajectories", "--out", small_disk / "ds", "-n", "64", "--shard-size", "16",
                         "--batch-size", "16", "--dtype", "float32", "--no-compress", "--steps", "8")
    assert_process_failed_one_line(res, "no space left")
    assert not (small_disk / "ds").exists()


def test_read_only_out_is_one_line(read_only_disk):
    res = run_subprocess("generate-trajectories", "--out", read_only_disk / "ds", "-n", "4", "--steps", "2")
    assert_process_failed_one_line(res, "read-only")


def test_verbose_shows_the_traceback(world):
    res = run_subprocess("--verbose", "inspect", world / "file")
    assert res.returncode == 2
    assert "Traceback (most recent call last):" in res.stderr and "ArcflowError" in res.stderr, res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("arcflow: error: ")  # the one line still ends it
    assert res.stderr.strip().endswith("is a file, not a dataset directory")


# -- 2. every number is checked before anything starts -------------------------------------------
BAD_NUMBERS = {
    "generate guidance nan": (["generate-trajectories", "-n", "4", "--out", "{w}/new", "--guidance", "nan"], "--guidance"),
    "generate guidance inf": (["generate-trajectories", "-n", "4", "--out", "{w}/new", "--guidance", "inf"], "--guidance"),
    "generate negative seed": (["generate-trajectories", "-n", "4", "--out", "{w}/new", "--seed", "-1"], "--seed"),
    "generate huge seed": (["generate-trajectories", "-n", "4", "--out", "{w}/new", "--seed", str(2**70)], "--seed"),
    "generate absurd n": (["generate-trajectories", "-n", "1000000000000", "--out", "{w}/new"], "--num-samples"),
    "generate absurd shard": (["generate-trajectories", "-n", "4", "--out", "{w}/new", "--shard-size",
                               "1000000000000", "--batch-size", "1000000000000"], "--shard-size"),
    "generate too many shards": (["generate-trajectories", "-n", "100000000", "--shard-size", "1", "--out",
                                  "{w}/new"], "shards"),
    "generate height 0": (["generate-trajectories", "-n", "4", "--out", "{w}/new", "--teacher", "{w}/file",
                           "--height", "0"], "--height"),
    "distill lr nan": (["distill", "{w}/ds", "--out", "{w}/new", "--lr", "nan"], "--lr"),
    "distill ema nan": (["distill", "{w}/ds", "--out", "{w}/new", "--ema-decay", "nan"], "--ema-decay"),
    "distill grad clip inf": (["distill", "{w}/ds", "--out", "{w}/new", "--grad-clip", "inf"], "--grad-clip"),
    "distill alpha nan": (["distill", "{w}/ds", "--out", "{w}/new", "--lora-alpha", "nan"], "--lora-alpha"),
    "distill weight groups 0": (["distill", "{w}/ds", "--out", "{w}/new", "--weight-groups", "0"], "--weight-groups"),
    "distill weight groups 3": (["distill", "{w}/ds", "--out", "{w}/new", "--weight-groups", "3"], "divide"),
    "distill negative seed": (["distill", "{w}/ds", "--out", "{w}/new", "--seed", "-5"], "--seed"),
    "distill more workers than shards": (["distill", "{w}/ds", "--out", "{w}/new", "--num-workers", "3"],
                                         "--num-workers 3"),
    "distill absurd batch": (["distill", "{w}/ds", "--out", "{w}/new", "--batch-size", "10000000000"], "--batch-size"),
    "sample guidance nan": (["sample", "--out", "{w}/x.png", "--guidance", "nan"], "--guidance"),
    "sample negative seed": (["sample", "--out", "{w}/x.png", "--seed", "-1"], "--seed"),
    "sample absurd num": (["sample", "--out", "{w}/x.png", "--num", "1000000000"], "--num"),
    "evaluate guidance nan": (["evaluate", "--adapter", "{w}/run", "--out", "{w}/rep", "--guidance", "nan"],
                              "--guidance"),
    "train-teacher negative seed": (["train-teacher", "--out", "{w}/t", "--seed", "-1"], "--seed"),
}


@pytest.mark.parametrize("case", sorted(BAD_NUMBERS))
def test_bad_numbers_are_refused_before_anything_starts(case, world, capfd):
    args, fragment = BAD_NUMBERS[case]
    before = hashes(world)
    code, _, err = cli(capfd, *[a.format(w=world) for a in args])
    check_failed_cleanly(code, err, world, before, fragment)
    assert not (world / "new").exists()


# -- 3. errors inside Ray workers: unwrapped to their line, --out not claimed ---------------------
def test_worker_error_is_unwrapped_and_out_is_not_claimed(world, tmp_path, own_ray):
    """A failure only the Ray Train worker sees (LoRA targets matching nothing) comes back as its own
    one line, and the run directory it had started is removed so the corrected command works."""
    from arcflow.cli.errors import describe
    from arcflow.distill.trainer import distill

    out = tmp_path / "run"
    config = DistillConfig.from_dict(dict(dataset=str(world / "ds"), out=str(out), iters=2, batch_size=4, lora_rank=2, k=2,
                           lora_targets=["no_such_module"], progress=False))
    with pytest.raises(Exception) as info:
        distill(config)
    assert "match no module" in describe(info.value)
    assert not out.exists()


def test_describe_unwraps_nested_causes():
    from arcflow.cli.errors import describe
    from arcflow.core.errors import ArcflowError

    class Wrapper(Exception):
        def __init__(self, cause):
            super().__init__("Traceback (most recent call last):\n  lots of lines")
            self.cause = cause

    assert describe(Wrapper(ArcflowError("the real reason"))) == "the real reason"
    disk_full = OSError(28, "No space left on device", "/data/x.zarr")
    assert describe(Wrapper(disk_full)).startswith("/data/x.zarr: no space left")
    group = Wrapper(None)
    group.worker_failures = {0: RuntimeError("rank zero broke\nsecond line")}
    message = describe(group)
    assert "rank zero broke" in message and "\n" not in message


# -- 4. resume edge cases -------------------------------------------------------------------------
def saved_config(root: Path) -> DistillConfig:
    """The saved config of ``root/run``, pointed at ``root``'s own copies of the run and dataset."""
    config = DistillConfig.from_dict(json.loads((root / "run" / DISTILL_CONFIG_FILE).read_text()))
    config.dataset, config.out, config.resume = str(root / "ds"), str(root / "run"), True
    return config


def test_resume_of_a_finished_run_is_a_noop(scratch, capfd):
    before = hashes(scratch / "run")
    code, out, err = cli(capfd, "distill", scratch / "ds", "--out", scratch / "run", "--iters", "4", "--lora-rank",
                         "2", "--k", "2", "--batch-size", "8", "--warmup", "1", "--checkpoint-every", "4", "--resume")
    assert code == 0, err
    assert "student written to" in out
    assert hashes(scratch / "run") == before


def test_resume_at_the_last_checkpoint_without_export_exports(scratch):
    """The driver was killed after the last checkpoint and before the export: resume just exports."""
    (scratch / "run" / "arcflow_config.json").unlink()
    config = saved_config(scratch)
    result = train_worker(config, plan_run(config))
    assert result == {"step": 4, "loss": None}
    assert (scratch / "run" / "arcflow_config.json").is_file()


def test_resumed_metrics_never_repeat_a_step(scratch):
    """Rows logged past the last checkpoint by a killed run are dropped before the resume appends."""
    metrics = scratch / "run" / METRICS_FILE
    with metrics.open("a") as f:
        for step in (5, 6):
            f.write(json.dumps({"step": step, "loss": 0.0}) + "\n")
        f.write('{"step": 7, "lo')  # cut short by the kill
    config = saved_config(scratch)
    config.iters = 6
    train_worker(config, plan_run(config))
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, 7))


def test_moved_run_and_dataset_resume(scratch, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.move(scratch, moved)
    config = saved_config(moved)  # the saved paths name the old place
    config.iters = 6
    assert plan_run(config).resume_step == 4


def test_resume_refuses_other_data(scratch, tmp_path):
    other = make_dataset(tmp_path / "other", num_samples=32, steps=4, shard_size=16, seed=1)
    config = saved_config(scratch)
    config.dataset = str(other)
    (scratch / "run" / DISTILL_CONFIG_FILE).write_text(json.dumps({**config.to_dict(), "dataset_fingerprint": "sha256:0"}))
    with pytest.raises(Exception, match="data the run started on"):
        plan_run(config)


def test_ctrl_c_is_one_line_exit_130(world, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "arcflow.cli", "distill", str(world / "ds"), "--out", str(out), "--iters", "100000",
         "--batch-size", "4", "--lora-rank", "2", "--k", "2", "--checkpoint-every", "5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=CLI_ENV,
    )
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "checkpoints").is_dir():
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == ["arcflow: error: interrupted; rerun the same command with --resume to continue"], err


def test_workers_stop_when_the_driver_dies(tmp_path):
    """The watchdog every Ray worker runs: its process ends soon after the driver's is gone."""
    driver = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    code = ("import sys, time, socket\n"
            "from arcflow.core.driver_watch import watch_driver\n"
            f"watch_driver({{'host': socket.gethostname(), 'pid': {driver.pid}}}, interval_s=0.1)\n"
            "time.sleep(60)\n")
    worker = subprocess.Popen([sys.executable, "-c", code])
    time.sleep(2)
    assert worker.poll() is None  # alive while the driver is
    driver.kill()
    driver.wait()
    assert worker.wait(timeout=20) == 1


# -- 5. tampered or mismatched run directories -----------------------------------------------------
def _tamper(run: Path, case: str) -> None:
    config_path = run / "arcflow_config.json"
    record = json.loads(config_path.read_text())
    if case == "config is a list":
        config_path.write_text("[]")
        return
    if case == "K=99":
        record["student"]["k"] = 99
    elif case == "head from another run":
        head = safetensors.torch.load_file(str(run / "momentum_head.safetensors"))
        safetensors.torch.save_file({k: torch.zeros(v.shape[0] + 3, *v.shape[1:]) for k, v in head.items()},
                                    str(run / "momentum_head.safetensors"))
    elif case == "head file outside the run":
        record["files"]["head"] = "../ds/dataset.json"
    elif case == "absolute head path":
        record["files"]["head"] = "/etc/hostname"
    elif case == "garbage head file":
        (run / "momentum_head.safetensors").write_bytes(b"\x00garbage" * 10)
    elif case == "student config missing":
        record.pop("student")
    elif case == "student field of the wrong type":
        record["student"]["k"] = "eight"
    elif case == "unknown teacher option":
        record["teacher_options"] = {"no_such_option": 1}
    config_path.write_text(json.dumps(record))


TAMPERED = ["K=99", "head from another run", "head file outside the run", "absolute head path", "garbage head file",
            "config is a list", "student config missing", "student field of the wrong type", "unknown teacher option"]


@pytest.mark.parametrize("case", TAMPERED)
def test_tampered_run_directories_are_one_line(case, scratch, capfd):
    _tamper(scratch / "run", case)
    before = hashes(scratch)
    code, _, err = cli(capfd, "sample", "--adapter", scratch / "run", "--prompt", PROMPT, "--num", "1",
                       "--out", scratch / "x.png")
    check_failed_cleanly(code, err, scratch, before)


# -- 6. earlier results are not overwritten without asking ----------------------------------------
def test_evaluate_and_train_teacher_refuse_to_overwrite(scratch, capfd):
    (scratch / "report").mkdir()
    (scratch / "report" / "report.json").write_text("{}")
    (scratch / "teacher").mkdir()
    (scratch / "teacher" / "digits_teacher.safetensors").write_bytes(b"weights")
    before = hashes(scratch)
    code, _, err = cli(capfd, "evaluate", "--adapter", scratch / "run", "--out", scratch / "report")
    check_failed_cleanly(code, err, scratch, before, "--overwrite")
    code, _, err = cli(capfd, "train-teacher", "--out", scratch / "teacher", "--iters", "1")
    check_failed_cleanly(code, err, scratch, before, "--overwrite")


# -- 7. damaged Parquet parts ----------------------------------------------------------------------
DAMAGE = {
    "zero bytes": lambda b: b"",
    "truncated": lambda b: b[: len(b) // 2],
    "garbage": lambda b: os.urandom(len(b)),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_parquet_part_is_named_and_uncommitted(kind, scratch, capfd):
    from arcflow.storage.reader import open_dataset
    from arcflow.storage.writer import create_or_open_dataset

    part = scratch / "ds" / "index" / "shard-000001.parquet"
    part.write_bytes(DAMAGE[kind](part.read_bytes()))
    before = hashes(scratch)
    for args in (["inspect", scratch / "ds"], ["distill", scratch / "ds", "--out", scratch / "new"]):
        code, _, err = cli(capfd, *args)
        check_failed_cleanly(code, err, scratch, before, "index/shard-000001.parquet")
    spec = open_dataset(str(scratch / "ds")).spec
    assert create_or_open_dataset(str(scratch / "ds"), spec, resume=True).pending_shards() == [1]


def test_resume_regenerates_a_damaged_part(scratch):
    """generate-trajectories --resume rewrites exactly the damaged shard, identical to the original."""
    import pandas as pd

    part = scratch / "ds" / "index" / "shard-000001.parquet"
    original = pd.read_parquet(part)
    part.write_bytes(b"")
    res = run_subprocess("generate-trajectories", "--out", scratch / "ds", "-n", "32", "--steps", "4",
                         "--shard-size", "16", "--batch-size", "16", "--dtype", "float32", "--resume")
    assert res.returncode == 0, res.stderr
    assert "1 written, 1 already committed" in res.stdout
    pd.testing.assert_frame_equal(pd.read_parquet(part), original)


# -- JSON files that parse but are not the object expected say what they hold (issue 28) ----------
NOT_OBJECTS = {"[]": "holds a JSON array, not a JSON object", '"FluxPipeline"': "holds a JSON string",
               "3": "holds a JSON number", "null": "holds JSON null", "{garbage": "is not valid JSON"}


@pytest.mark.parametrize("text", sorted(NOT_OBJECTS))
def test_a_model_index_that_is_no_object_says_what_it_holds(text, tmp_path, capfd):
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "model_index.json").write_text(text)
    code, _, err = cli(capfd, "generate-trajectories", "--teacher", teacher, "--out", tmp_path / "ds",
                       "--num-samples", "1")
    line = assert_one_line_error(code, err, "model_index.json", NOT_OBJECTS[text])
    assert ("not valid JSON" in line) == (text == "{garbage")
    assert not (tmp_path / "ds").exists()


@pytest.mark.parametrize("text", ["[]", "null", "{garbage"])
def test_a_run_record_or_dataset_header_that_is_no_object_says_what_it_holds(text, scratch, capfd):
    (scratch / "run" / "arcflow_config.json").write_text(text)
    code, _, err = cli(capfd, "sample", "--adapter", scratch / "run", "--out", scratch / "x.png")
    assert_one_line_error(code, err, "arcflow_config.json", NOT_OBJECTS[text])
    (scratch / "ds" / "dataset.json").write_text(text)
    code, _, err = cli(capfd, "inspect", scratch / "ds")
    assert_one_line_error(code, err, "dataset.json", NOT_OBJECTS[text])
