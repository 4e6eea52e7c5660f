"""`arcflow inspect DATASET` (text, --json, --sample ID --png) on a dataset generated through Ray
with the embedded digits teacher (which also decodes the --png strip)."""

from __future__ import annotations

import json
import os
import shutil

import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

ray = pytest.importorskip("ray")

from arcflow.pipeline.generate import generate_trajectories  # noqa: E402
from arcflow.pipeline.generation_config import GenerationConfig  # noqa: E402
from cli_helpers import run_in_process as run_cli

pytestmark = pytest.mark.timeout(300)

N, STEPS, SHARD = 12, 5, 4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    import logging

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    try:
        out = tmp_path_factory.mktemp("inspect") / "ds"
        generate_trajectories(
            GenerationConfig(
                out=str(out), teacher="digits", num_samples=N, steps=STEPS, shard_size=SHARD,
                batch_size=SHARD, dtype="float16", workers=1, threads=1,
            ),
            progress=False,
        )
    finally:
        ray.shutdown()  # inspect itself needs no Ray
    return out


def test_inspect_text(dataset, capfd):
    code, out, err = run_cli(capfd, "inspect", dataset)
    assert code == 0, err
    assert f"samples        {N} of {N} planned" in out
    assert "3 committed / 0 uncommitted / 3 planned" in out
    assert "digits" in out and "float16" in out
    table = out.split("mean x_rms", 1)[1].strip().splitlines()
    assert [int(line.split()[0]) for line in table] == list(range(STEPS))


def test_inspect_json_numbers(dataset, capfd):
    code, out, err = run_cli(capfd, "inspect", dataset, "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["samples"] == summary["samples_planned"] == N
    assert summary["shards_planned"] == summary["shards_committed"] == 3
    assert summary["shards_uncommitted"] == 0 and summary["uncommitted_shard_ids"] == []
    assert summary["steps"] == STEPS and summary["dtype"] == "float16"
    assert summary["bytes_on_disk"] > 0 and summary["bytes_per_trajectory"] > 0
    assert summary["bytes_by_array"]["x"] > 0 and summary["bytes_by_array"]["u"] > 0
    per_step = summary["per_step"]
    assert [row["step"] for row in per_step] == list(range(STEPS))
    assert per_step[0]["sigma"] == 1.0
    assert per_step[0]["u_cos_prev"] is None or per_step[0]["u_cos_prev"] != per_step[0]["u_cos_prev"]  # NaN at step 0
    assert all(-1.0 <= row["u_cos_prev"] <= 1.0 for row in per_step[1:])
    assert all(row["u_rms"] > 0 and row["x_rms"] > 0 for row in per_step)


def test_inspect_counts_an_uncommitted_shard(dataset, tmp_path, capfd):
    ds = tmp_path / "ds"
    shutil.copytree(dataset, ds)
    (ds / "index" / "shard-000001.parquet").unlink()
    code, out, err = run_cli(capfd, "inspect", ds, "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["samples"] == N - SHARD
    assert summary["shards_committed"] == 2 and summary["shards_uncommitted"] == 1
    assert summary["uncommitted_shard_ids"] == [1]
    assert len(summary["per_step"]) == STEPS
    code, out, err = run_cli(capfd, "inspect", ds)
    assert code == 0, err
    assert "2 committed / 1 uncommitted / 3 planned" in out


def test_inspect_sample_png(dataset, tmp_path, capfd):
    png = tmp_path / "strip.png"
    code, out, err = run_cli(capfd, "inspect", dataset, "--sample", "5", "--png", png)
    assert code == 0, err
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(png) as img:
        assert img.width > img.height > 0  # a strip of states, noise -> sample


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["{missing}"], "does not exist"),
        (["{missing}", "--json"], "does not exist"),
        (["{dataset}", "--sample", "999", "--png", "{png}"], "no committed sample"),
        (["{dataset}", "--sample", "1"], "--png"),
    ],
)
def test_inspect_errors_are_one_line(dataset, tmp_path, capfd, args, fragment):
    fill = {"missing": tmp_path / "nope", "dataset": dataset, "png": tmp_path / "x.png"}
    code, out, err = run_cli(capfd, "inspect", *[a.format(**fill) for a in args])
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("arcflow: error: "), err
    assert fragment in lines[0]
