"""The process around a job: its signals, its checks before any work, its error lines, its outputs.

One section per class of defect, several members each (as tests/test_hardening.py):
1. SIGTERM is handled like Ctrl-C: one line, exit 143, the same cleanup, no Ray stack dump;
2. errors from Ray workers and DataLoader worker processes: one line, the real error, no Ray noise;
3. what cannot work is refused before Ray starts (no GPU, a batch larger than the data, an
   unreachable cluster) and leaves nothing under --out;
4. error lines quote at most ~100 characters of any user input;
5. outputs of sample / evaluate / train-teacher are written whole or not at all (a full disk is
   named as one, with the path, and advises only what the command can do).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from arcflow.cli.errors import describe
from arcflow.core.errors import ArcflowError, quote
from arcflow.core.files import as_os_error, atomic_outputs
from arcflow.distill.config import DistillConfig
from arcflow.distill.run_plan import plan_run
from cli_helpers import CLI_ENV, assert_one_line_error
from cli_helpers import run_in_process as cli
from dataset_factory import make_dataset, train_tiny_run
from test_hardening import hashes, tmpfs

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a handwritten digit 3"
RESUME_ADVICE = "rerun the same command with --resume to continue"
#: What Ray's C++ signal handler and its driver-side error printer write.
RAY_NOISE = ("SIGTERM received", "***", "(raylet)", "logging.cc", "Traceback")
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A dataset of 32 samples in 2 shards (4 steps) and a finished tiny run on it."""
    root = tmp_path_factory.mktemp("process")
    make_dataset(root / "ds", num_samples=32, steps=4, shard_size=16)
    train_tiny_run(root / "ds", root / "run")
    return root


@pytest.fixture
def signal_handlers():
    """The CLI installs its SIGINT / SIGTERM handlers in this process: put pytest's back after."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs filled to the last block (skipped where mounting needs root we lack)."""
    with tmpfs(tmp_path / "disk", "size=64k") as disk:
        with contextlib.suppress(OSError), open(disk / "filler", "wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        yield disk


def lines_of(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


# -- 1. SIGTERM is handled like Ctrl-C ---------------------------------------------------------------
def _terminate_when(proc: subprocess.Popen, ready, timeout_s: float = 300) -> tuple[str, str]:
    """SIGTERM ``proc`` once ``ready()`` holds (as `kill`, `timeout` and Kubernetes do); its output."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None and not ready():
        time.sleep(0.3)
    assert proc.poll() is None, f"the job ended before it could be stopped: {proc.communicate()}"
    proc.send_signal(signal.SIGTERM)
    return proc.communicate(timeout=180)


def _popen(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "arcflow.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=CLI_ENV)


def _assert_terminated(proc: subprocess.Popen, out: str, err: str, advice: bool) -> None:
    expected = "arcflow: error: terminated" + (f"; {RESUME_ADVICE}" if advice else "")
    assert proc.returncode == 143, (out, err)
    assert lines_of(err) == [expected], err
    noise = [line for line in out.splitlines() if any(n in line for n in RAY_NOISE)]
    assert not noise, out


def test_sigterm_during_generation_is_one_line_and_keeps_committed_shards(tmp_path):
    out = tmp_path / "ds"
    proc = _popen("generate-trajectories", "--out", out, "-n", "4000", "--steps", "4", "--shard-size", "16",
                  "--batch-size", "16", "--dtype", "float32", "--no-progress")
    stdout, stderr = _terminate_when(proc, lambda: any((out / "index").glob("*.parquet")))
    _assert_terminated(proc, stdout, stderr, advice=True)
    assert any((out / "index").glob("*.parquet")), "a committed shard was lost"


@pytest.mark.slow
def test_sigterm_during_distill_before_a_checkpoint_frees_out(world, tmp_path):
    """The cleanup Ctrl-C runs runs for SIGTERM too: a run that never checkpointed is removed."""
    out = tmp_path / "run"
    metrics = out / "metrics.jsonl"
    proc = _popen("distill", world / "ds", "--out", out, "--iters", "100000", "--batch-size", "4", "--lora-rank", "2",
                  "--k", "2", "--checkpoint-every", "100000")
    stdout, stderr = _terminate_when(proc, lambda: metrics.is_file() and metrics.stat().st_size > 0)
    _assert_terminated(proc, stdout, stderr, advice=True)
    assert not out.exists()


def test_sigterm_during_sample_leaves_no_file_and_no_resume_advice(tmp_path, capfd, monkeypatch, signal_handlers):
    """A command without --resume does not advise it; the image being written is not left behind."""
    from PIL import Image

    save = Image.Image.save

    def save_then_terminated(self, fp, *args, **kwargs):
        save(self, fp, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises here, in the main thread

    monkeypatch.setattr(Image.Image, "save", save_then_terminated)
    code, out, err = cli(capfd, "sample", "--prompt", PROMPT, "--num", "1", "--steps", "2", "--out", tmp_path / "x.png")
    assert code == 143, err
    assert lines_of(err) == ["arcflow: error: terminated"], err
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_advice_follows_the_command(capfd, monkeypatch, signal_handlers):
    """Ctrl-C: the --resume advice only where the command has --resume."""
    from arcflow.cli import teacher_commands

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(teacher_commands, "refuse_overwrite", interrupted)
    code, _, err = cli(capfd, "train-teacher", "--out", "/nonexistent/t")
    assert (code, lines_of(err)) == (130, ["arcflow: error: interrupted"])


# -- 2. errors from Ray and DataLoader workers ------------------------------------------------------
class _Failing(torch.utils.data.IterableDataset):
    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def __iter__(self):
        raise self.exc


@pytest.mark.parametrize("exc, expected", [
    (ArcflowError("dataset d: shard 0 array 'u' is damaged; run `arcflow verify d --repair`"),
     "dataset d: shard 0 array 'u' is damaged; run `arcflow verify d --repair`"),
    (ValueError("bad value in the loader"), "unexpected ValueError: bad value in the loader"),
])
def test_dataloader_worker_errors_are_their_own_line(exc, expected):
    """torch re-raises a DataLoader worker's error with the whole traceback as its message."""
    loader = torch.utils.data.DataLoader(_Failing(exc), batch_size=1, num_workers=1)
    with pytest.raises(type(exc)) as info:
        next(iter(loader))
    assert "Original Traceback" in str(info.value)  # what torch does
    assert describe(info.value).startswith(expected)


def test_ray_worker_errors_reach_the_terminal_only_when_verbose(capsys, monkeypatch):
    """Ray's driver prints what its workers publish ("(raylet) ..." tracebacks) through this printer."""
    from ray._private import worker

    from arcflow.core.ray_runtime import _hide_worker_errors

    monkeypatch.setattr(worker, "print_to_stdstream", worker.print_to_stdstream)  # restored after
    _hide_worker_errors()
    message = {"lines": ["Traceback (most recent call last): worker 1 failed"], "pid": "raylet", "is_err": False}
    monkeypatch.delenv("ARCFLOW_TRACEBACK", raising=False)
    worker.print_to_stdstream(message, ignore_prefix=False)
    assert capsys.readouterr().out == ""
    monkeypatch.setenv("ARCFLOW_TRACEBACK", "1")
    worker.print_to_stdstream(dict(message, lines=["Traceback (most recent call last): worker 2 failed"]),
                              ignore_prefix=False)
    assert "worker 2 failed" in capsys.readouterr().out


# -- 3. checks before any work ---------------------------------------------------------------------
UNREACHABLE = {
    "closed port": "127.0.0.1:1",
    "unknown host": "no-such-host.invalid:6379",
    "not host:port": "localhost",
}


@pytest.mark.parametrize("case", sorted(UNREACHABLE))
def test_unreachable_ray_address_is_refused_at_once(case, world, tmp_path, capfd, own_ray):
    """Probed before ray.init (which retries for minutes); nothing is left under --out."""
    address = UNREACHABLE[case]
    before = hashes(world)
    for args in (["generate-trajectories", "-n", "4", "--steps", "2", "--out", tmp_path / "ds"],
                 ["distill", world / "ds", "--out", tmp_path / "run", "--iters", "2", "--batch-size", "4"]):
        code, out, err = cli(capfd, *args, "--ray-address", address)
        assert_one_line_error(code, err, "--ray-address", address)
        assert out == ""
    assert not (tmp_path / "ds").exists() and not (tmp_path / "run").exists()
    assert hashes(world) == before


NO_SUCH_DEVICE = {
    "distill --use-gpu": (["distill", "{w}/ds", "--out", "{t}/run", "--use-gpu"], "--use-gpu"),
    "distill --use-gpu, 2 workers": (["distill", "{w}/ds", "--out", "{t}/run", "--use-gpu", "--num-workers", "2"],
                                     "needs 2 GPU"),
    "generate --device cuda": (["generate-trajectories", "-n", "4", "--out", "{t}/ds", "--device", "cuda"], "--device"),
    "generate --device cuda:3": (["generate-trajectories", "-n", "4", "--out", "{t}/ds", "--device", "cuda:3"],
                                 "cuda:3"),
}


@NO_GPU
@pytest.mark.parametrize("case", sorted(NO_SUCH_DEVICE))
def test_missing_gpus_are_refused_before_ray_starts(case, world, tmp_path, capfd, monkeypatch):
    from arcflow.core import ray_runtime
    from arcflow.pipeline import generate

    for module in (ray_runtime, generate):
        monkeypatch.setattr(module, "start_ray", pytest.fail)
    args, fragment = NO_SUCH_DEVICE[case]
    code, _, err = cli(capfd, *[a.format(w=world, t=tmp_path) for a in args])
    assert_one_line_error(code, err, fragment, "GPU")
    assert list(tmp_path.iterdir()) == []


@NO_GPU
def test_gpus_a_cluster_lacks_are_refused_once_it_is_reached(world, tmp_path, capfd, local_ray):
    """With --ray-address the cluster's GPUs count (this test's cluster has none): one line, at once,
    and the run directory the job had started is removed."""
    code, _, err = cli(capfd, "distill", world / "ds", "--out", tmp_path / "run", "--iters", "2", "--batch-size", "4",
                       "--use-gpu", "--ray-address", local_ray)
    assert_one_line_error(code, err, "--use-gpu needs 1 GPU(s) but the Ray cluster has 0")
    code, _, err = cli(capfd, "generate-trajectories", "-n", "4", "--steps", "2", "--out", tmp_path / "ds",
                       "--device", "cuda", "--ray-address", local_ray)
    assert_one_line_error(code, err, "--device 'cuda': the Ray cluster has no GPU")
    assert list(tmp_path.iterdir()) == []


def test_unknown_device_is_one_line(tmp_path, capfd):
    code, _, err = cli(capfd, "generate-trajectories", "-n", "4", "--out", tmp_path / "ds", "--device", "gpu0")
    assert_one_line_error(code, err, "--device 'gpu0' is not a torch device")


@pytest.mark.parametrize("batch, workers, nfe", [(65, 1, 2), (33, 2, 2), (129, 1, 4)])
def test_a_batch_larger_than_the_data_is_refused(batch, workers, nfe, world, tmp_path):
    """32 samples x NFE segments: a batch beyond one pass over a worker's share could make no step
    of distinct pairs (and read the whole dataset several times per step)."""
    config = DistillConfig.from_dict(dict(dataset=str(world / "ds"), out=str(tmp_path / "run"), batch_size=batch,
                                          num_workers=workers, nfe=nfe))
    with pytest.raises(ArcflowError, match=f"--batch-size {batch} exceeds the {32 * nfe // workers} "):
        plan_run(config)
    config.batch_size = 32 * nfe // workers  # the largest that works
    plan_run(config)


# -- 4. user input is quoted, not echoed whole -----------------------------------------------------
def test_quote_cuts_long_input():
    assert quote("short") == "'short'"
    cut = quote("x" * 1_000_000)
    assert cut.startswith("'xxx") and cut.endswith("... (1000000 characters)") and len(cut) < 140


def test_megabyte_prompt_file_is_refused_before_ray(tmp_path, capfd, monkeypatch):
    from arcflow.pipeline import generate

    monkeypatch.setattr(generate, "start_ray", pytest.fail)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten digit 1\n" + "z" * 1_000_000 + "\n")
    code, _, err = cli(capfd, "generate-trajectories", "-n", "4", "--out", tmp_path / "ds", "--prompts", prompts)
    line = assert_one_line_error(code, err, "prompts.txt line 2", "(1000000 characters)", "at most 10000")
    assert len(line) < 400
    assert not (tmp_path / "ds").exists()


LONG_INPUTS = {
    "sample --prompt": ["sample", "--prompt", "p" * 120_000, "--num", "1", "--out", "{t}/x.png"],
    "sample --teacher": ["sample", "--teacher", "t" * 50_000, "--num", "1", "--out", "{t}/x.png"],
    "generate --teacher": ["generate-trajectories", "-n", "4", "--out", "{t}/ds", "--teacher", "t" * 50_000],
    "generate --dtype": ["generate-trajectories", "-n", "4", "--out", "{t}/ds", "--dtype", "d" * 50_000],
    "generate --ray-address": ["generate-trajectories", "-n", "4", "--out", "{t}/ds", "--ray-address", "h" * 50_000],
}


@pytest.mark.parametrize("case", sorted(LONG_INPUTS))
def test_long_inputs_are_quoted_not_echoed(case, tmp_path, capfd, request):
    if "--ray-address" in case:
        request.getfixturevalue("own_ray")  # the address is probed only when this job starts Ray
    code, _, err = cli(capfd, *[a.format(t=tmp_path) if len(a) < 1000 else a for a in LONG_INPUTS[case]])
    line = assert_one_line_error(code, err, "characters)")
    assert len(line) < 500, line[:600]


def test_the_cli_cuts_an_overlong_line_as_a_last_resort(capfd, monkeypatch):
    from arcflow.cli import teacher_commands

    def long_error(*args, **kwargs):
        raise ArcflowError("y" * 100_000)

    monkeypatch.setattr(teacher_commands, "refuse_overwrite", long_error)
    code, _, err = cli(capfd, "train-teacher", "--out", "/nonexistent/t")
    line = assert_one_line_error(code, err, "(100000 characters)")
    assert len(line) <= 1100


# -- 5. outputs whole or not at all ----------------------------------------------------------------
def _assert_disk_full(code, err, path: Path) -> None:
    line = assert_one_line_error(code, err, str(path), "no space left on the device", "rerun the command")
    assert "--resume" not in line


@pytest.mark.parametrize("name", ["x.png", "x.npy"])
def test_sample_on_a_full_disk_leaves_nothing(name, full_disk, capfd):
    code, _, err = cli(capfd, "sample", "--prompt", PROMPT, "--num", "64", "--steps", "2", "--out", full_disk / name)
    _assert_disk_full(code, err, full_disk / name)
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]
    (full_disk / "filler").unlink()  # space freed: the same command works
    code, out, err = cli(capfd, "sample", "--prompt", PROMPT, "--num", "64", "--steps", "2", "--out", full_disk / name)
    assert code == 0, err
    assert (full_disk / name).stat().st_size > 0


def test_evaluate_on_a_full_disk_leaves_nothing(world, full_disk, capfd):
    args = ["evaluate", "--adapter", world / "run", "--out", full_disk / "report", "-n", "20", "--teacher-steps", "2",
            "--speed-batch", "2", "--speed-repeats", "1", "--no-progress"]
    code, _, err = cli(capfd, *args)
    _assert_disk_full(code, err, full_disk / "report")
    assert list((full_disk / "report").iterdir()) == []
    (full_disk / "filler").unlink()
    code, _, err = cli(capfd, *args)  # not "already holds grid.png"
    assert code == 0, err
    assert json.loads((full_disk / "report" / "report.json").read_text())["rows"]


def test_train_teacher_on_a_full_disk_names_it(full_disk, capfd, monkeypatch):
    """safetensors reports ENOSPC as a SafetensorError: named as a full disk, nothing left."""
    from arcflow.pipeline import digits_training

    monkeypatch.setattr(digits_training, "train_teacher_weights",
                        lambda seed, iters, progress: ({"w": torch.zeros(100_000)}, {"training": {}}))
    monkeypatch.setattr(digits_training, "train_classifier_weights",
                        lambda seed, epochs: ({"c": torch.zeros(10)}, 1.0))
    code, _, err = cli(capfd, "train-teacher", "--out", full_disk / "t", "--iters", "1")
    _assert_disk_full(code, err, full_disk / "t")
    assert list((full_disk / "t").iterdir()) == []


def test_atomic_outputs_keep_the_old_files_on_failure(tmp_path):
    old = tmp_path / "report.json"
    old.write_text("old")
    with pytest.raises(RuntimeError), atomic_outputs([old, tmp_path / "grid.png"]) as (report, grid):
        report.write_text("new")
        raise RuntimeError("cut short")
    assert old.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
    with atomic_outputs([old, tmp_path / "grid.png"]) as (report, grid):
        report.write_text("new")
        grid.write_bytes(b"png")
    assert old.read_text() == "new" and (tmp_path / "grid.png").read_bytes() == b"png"


@pytest.mark.parametrize("exc, code", [
    (Exception("Error while serializing: I/O error: No space left on device (os error 28)"), errno.ENOSPC),
    (Exception('IoError(Os { code: 122, kind: QuotaExceeded, message: "Disk quota exceeded" })'), errno.EDQUOT),
    (OSError("1280000 requested and 16352 written"), errno.ENOSPC),
    (OSError(errno.ENOSPC, "No space left on device"), errno.ENOSPC),
])
def test_other_libraries_disk_errors_are_system_errors(exc, code, tmp_path):
    error = as_os_error(exc, tmp_path / "x.safetensors")
    assert (error.errno, error.filename) == (code, str(tmp_path / "x.safetensors"))
    assert as_os_error(ValueError("not a system error"), tmp_path) is None


def test_numpy_short_write_is_a_full_disk(full_disk):
    with pytest.raises(OSError) as info, atomic_outputs([full_disk / "a.npy"]) as (temp,):
        np.save(temp, np.zeros(100_000, np.float32))
    assert (info.value.errno, info.value.filename) == (errno.ENOSPC, str(full_disk / "a.npy"))
