"""A stopped on-policy run (Ctrl-C, SIGTERM) stops at its next step and exports nothing, as offline."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from arcflow.distill.run_plan import DISTILL_CONFIG_FILE
from arcflow.distill.worker import STOP_FILE, Stopped
from cli_helpers import CLI_ENV
from dataset_factory import train_tiny_on_policy


def test_workers_stop_before_their_next_step_when_the_driver_was_stopped(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / DISTILL_CONFIG_FILE).write_text("{}")  # a run its driver started, then stopped
    (run / STOP_FILE).touch()
    with pytest.raises(Stopped):
        train_tiny_on_policy(run, iters=2, checkpoint_every=1)
    assert not (run / "arcflow_config.json").exists() and not (run / "checkpoints").exists()
    assert not (run / "metrics.jsonl").read_text(), "no step ran"


@pytest.mark.slow
def test_sigterm_stops_an_on_policy_run_promptly_and_exports_nothing(tmp_path):
    run, iters = tmp_path / "run", 1_000_000  # far more than it could train before the timeout
    proc = subprocess.Popen([sys.executable, "-m", "arcflow.cli", "distill", "--on-policy", "--teacher", "digits",
                             "--out", str(run), "--iters", str(iters), "--batch-size", "2", "--k", "2", "--lora-rank", "2",
                             "--intermediate-states", "1", "--checkpoint-every", "10"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=CLI_ENV)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline and not (metrics.is_file() and metrics.read_text()):
        time.sleep(0.3)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=180)  # stopping may wait on a busy machine's Ray shutdown
    assert proc.returncode == 143, err
    assert err.strip().splitlines() == ["arcflow: error: terminated; rerun the same command with --resume to continue"], err
    assert not (run / "arcflow_config.json").exists(), "a stopped run exported"
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    assert not steps or max(steps) < iters
