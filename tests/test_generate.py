"""`arcflow generate-trajectories` on real Ray with real files (docs/architecture.md, Format and Generation).

Uses the GPU-latency simulator teacher (benchmarks/latency_sim.py, through the Python API: it is
no product teacher id): no model weights needed, and a latency per network call makes shards take
long enough to kill things mid-job. The CLI is exercised where it decides something (its one-line
errors) with the embedded teacher. The tests share the session's local Ray instance (conftest.py);
the two-node test puts a ``ray.cluster_utils.Cluster`` in its place for its duration.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

ray = pytest.importorskip("ray")

from arcflow.pipeline.generate import generate_trajectories  # noqa: E402
from arcflow.pipeline.generation_config import GenerationConfig  # noqa: E402
from arcflow.core.errors import ArcflowError  # noqa: E402
from arcflow.storage.reader import open_dataset  # noqa: E402
from cli_helpers import assert_one_line_error
from cli_helpers import run_in_process as run_cli
from latency_sim import LatencySimTeacher

pytestmark = pytest.mark.timeout(300)

ARCFLOW = [sys.executable, "-m", "arcflow.cli"]
SUBPROCESS_ENV = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}

#: The base job (the simulator's default 10 ms latency), and the same sizes on the CLI (which runs
#: the embedded digits teacher).
N, STEPS, SHARD, SEED, BATCH = 20, 4, 7, 3, 4
BASE_CLI = [
    "--num-samples", str(N), "--steps", str(STEPS), "--shard-size", str(SHARD),
    "--seed", str(SEED), "--batch-size", str(BATCH), "--dtype", "float32", "--no-progress",
]


def base_config(out, **overrides) -> GenerationConfig:
    kw = dict(
        out=str(out), teacher=LatencySimTeacher, num_samples=N, steps=STEPS, shard_size=SHARD, seed=SEED,
        batch_size=BATCH, dtype="float32", workers=2, cpus_per_worker=1.0,
    )
    kw.update(overrides)
    return GenerationConfig(**kw)


@pytest.fixture(scope="module")
def base_run(ray_session, tmp_path_factory):
    """The module's reference dataset (never modified by a test: copy it first)."""
    out = tmp_path_factory.mktemp("base") / "ds"
    summary = generate_trajectories(base_config(out), progress=False)
    return out, summary


def arrays_by_id(url) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    reader = open_dataset(str(url))
    out = {}
    for shard in sorted(reader.committed_shards()):
        a = reader.read_shard(shard)
        for k, sid in enumerate(a["sample_id"].tolist()):
            assert sid not in out, f"sample {sid} stored twice"
            out[sid] = (a["x"][k], a["u"][k])
    return out


def assert_same_arrays(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for sid in a:
        assert a[sid][0].dtype == b[sid][0].dtype
        assert np.array_equal(a[sid][0], b[sid][0]), f"x of sample {sid} differs"
        assert np.array_equal(a[sid][1], b[sid][1]), f"u of sample {sid} differs"


def direct_recording(n: int, steps: int, seed: int, batch: int = BATCH) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """What an uninterrupted run stores (float32), computed in this process with no Ray and no storage:
    the recording sampler over the same plan (prompts, seeds) and the same micro-batch size."""
    import torch
    from arcflow.pipeline.plan import plan_shards
    from arcflow.pipeline.recording import record_trajectories

    teacher = LatencySimTeacher(latency_s=0.0)
    (plan,) = plan_shards(n, n, teacher.prompt_set(), seed)
    with torch.inference_mode():
        cond = teacher.encode_prompts(list(plan.prompts))
        x, u, _ = record_trajectories(
            teacher, cond, teacher.noise(plan.seeds), steps=steps, guidance=teacher.default_guidance, micro_batch=batch
        )
    return {sid: (x[i].numpy(), u[i].numpy()) for i, sid in enumerate(plan.sample_ids)}


def tree_hash(root) -> str:
    h = hashlib.sha256()
    root = Path(root)
    for p in sorted(root.rglob("*")):
        h.update(str(p.relative_to(root)).encode())
        if p.is_file():
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


# -- a local run ------------------------------------------------------------------------------------


def test_local_run_float32_euler_identity_and_pandas(base_run, tmp_path):
    out, summary = base_run
    assert summary.shards_total == 3 and summary.shards_written == 3 and summary.shards_skipped == 0
    assert summary.samples_per_second > 0
    reader = open_dataset(str(out))
    assert reader.spec.storage_dtype == "float32"
    assert reader.committed_shards() == {0, 1, 2} and not reader.uncommitted_shards()
    sig = np.asarray(reader.spec.sigmas, dtype=np.float32)
    assert sig[0] == 1.0 and sig[-1] == 0.0
    ids = []
    for shard in sorted(reader.committed_shards()):
        raw = reader.read_shard(shard)  # v2: the states between keyframes rebuilt in float32
        x, u = raw["x"], raw["u"]
        assert x.dtype == np.float32 and u.dtype == np.float32
        assert x.shape[1:] == (STEPS + 1, 16, 4) and u.shape[1:] == (STEPS, 16, 4)
        for j in range(STEPS):
            step = np.float32(sig[j] - sig[j + 1])  # the sampler's float32 step
            expected = x[:, j] - step * u[:, j]
            np.testing.assert_allclose(x[:, j + 1], expected, rtol=1e-6, atol=1e-6)
        ids.extend(raw["sample_id"].tolist())
    assert sorted(ids) == list(range(N))
    assert_same_arrays(arrays_by_id(out), direct_recording(N, STEPS, SEED))

    # The index opens with pandas alone (no arcflow import in that process).
    code = (
        "import sys, pandas\n"
        "df = pandas.read_parquet(sys.argv[1])\n"
        "assert not any(m.startswith('arcflow') for m in sys.modules), 'arcflow was imported'\n"
        "print(len(df), df['sample_id'].nunique(), sorted(df['step'].unique().tolist()) == list(range(int(sys.argv[2]))))\n"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(out / "index"), str(STEPS)],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env=SUBPROCESS_ENV,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == [str(N * STEPS), str(N), "True"]


def test_per_sample_determinism_across_shard_size_and_workers(base_run, tmp_path):
    """Same (seed, sample index) -> bit-identical trajectory whatever --shard-size / --workers."""
    out, _ = base_run
    other = tmp_path / "ds4"
    summary = generate_trajectories(
        base_config(other, shard_size=4, workers=1, cpus_per_worker=None, teacher_options={"latency_s": 0.0}),
        progress=False,
    )
    assert summary.shards_total == 5
    a, b = arrays_by_id(out), arrays_by_id(other)
    assert len(a) == N
    assert_same_arrays(a, b)
    # and the index agrees too, apart from where each sample lives
    import pandas as pd

    cols = ["sample_id", "step", "sigma", "prompt", "seed", "guidance", "x_rms", "u_rms", "u_cos_prev"]
    ia = pd.read_parquet(out / "index").sort_values(["sample_id", "step"])[cols].reset_index(drop=True)
    ib = pd.read_parquet(other / "index").sort_values(["sample_id", "step"])[cols].reset_index(drop=True)
    pd.testing.assert_frame_equal(ia, ib)


# -- fault injection ----------------------------------------------------------------------------------


def test_actor_killed_mid_job_finishes_with_same_arrays(base_run, tmp_path):
    out, _ = base_run
    target = tmp_path / "killed"
    events = {"killed": None, "pids_before": set(), "pids_after": set()}

    def on_commit(result):
        if events["killed"] is None:
            events["pids_before"].add(result["pid"])
            events["killed"] = result["pid"]
            os.kill(result["pid"], signal.SIGKILL)  # a worker dies with a shard in flight
        else:
            events["pids_after"].add(result["pid"])

    # 4 steps x 50 ms per shard: the killed actor still holds an in-flight shard.
    config = base_config(target, shard_size=2, teacher_options={"latency_s": 0.05})
    summary = generate_trajectories(config, progress=False, on_shard_committed=on_commit)
    assert events["killed"] is not None
    assert events["pids_after"] - events["pids_before"], "no restarted worker took over"
    assert summary.shards_total == 10
    reader = open_dataset(str(target))
    assert reader.committed_shards() == set(range(10)) and not reader.uncommitted_shards()
    index = reader.index(columns=["sample_id"])
    assert len(index) == N * STEPS and index["sample_id"].nunique() == N
    assert_same_arrays(arrays_by_id(target), arrays_by_id(out))


def _wait_for_other_jobs_actors_to_exit(timeout=30.0) -> None:
    """After a driver is killed, Ray kills its actors; wait until their processes are gone, so a
    resumed run cannot race an orphaned actor still finishing its shard."""
    import psutil
    from ray._private import state

    mine = ray.get_runtime_context().get_job_id()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        table = state.actors()
        alive = [
            a for a in table.values()
            if a["JobID"] != mine and a["State"] != "DEAD"
        ]
        pids = [a["Pid"] for a in table.values() if a["JobID"] != mine and a.get("Pid")]
        if not alive and not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
            return
        time.sleep(0.1)
    raise AssertionError("the killed driver's actors are still alive")


#: A driver process running one job through the Python API (argv: the job as JSON).
DRIVER = """
import json, sys
sys.path.append({benchmarks!r})
from latency_sim import LatencySimTeacher
from arcflow.pipeline.generate import generate_trajectories
from arcflow.pipeline.generation_config import GenerationConfig
generate_trajectories(GenerationConfig(teacher=LatencySimTeacher, **json.loads(sys.argv[1])), progress=False)
"""


def test_driver_killed_then_resume_gives_same_arrays(local_ray, tmp_path):
    import json

    # 20 steps x 10 ms (the simulator's default): ~0.2 s per shard, 6 shards
    steps, n, shard, seed = 20, 24, 4, 11
    out = tmp_path / "ds"
    job = dict(out=str(out), num_samples=n, steps=steps, shard_size=shard, seed=seed, batch_size=BATCH,
               dtype="float32")
    driver = DRIVER.format(benchmarks=str(Path(__file__).resolve().parents[1] / "benchmarks"))
    proc = subprocess.Popen(
        [sys.executable, "-c", driver, json.dumps({**job, "workers": 1, "ray_address": local_ray})],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=SUBPROCESS_ENV,
    )
    try:
        deadline = time.monotonic() + 120
        committed = []
        while time.monotonic() < deadline and proc.poll() is None:
            committed = [p for p in (out / "index").glob("shard-*.parquet")] if (out / "index").is_dir() else []
            if committed:
                break
            time.sleep(0.02)
        assert committed, f"no shard committed; driver said: {proc.communicate(timeout=5)}"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    _wait_for_other_jobs_actors_to_exit()
    before = open_dataset(str(out)).committed_shards()
    assert 1 <= len(before) < 6, f"{len(before)} shards committed when the driver died"

    # workers is a runtime setting: a resume may use more workers than the killed run
    summary = generate_trajectories(
        GenerationConfig(teacher=LatencySimTeacher, **job, workers=2, cpus_per_worker=1.0, resume=True),
        progress=False,
    )
    assert summary.shards_written + summary.shards_skipped == 6 and summary.shards_skipped >= len(before)
    reader = open_dataset(str(out))
    assert reader.committed_shards() == set(range(6)) and not reader.uncommitted_shards()
    assert len(reader.index(columns=["sample_id"])) == n * steps
    assert_same_arrays(arrays_by_id(out), direct_recording(n, steps, seed))


def test_shard_without_parquet_part_is_invisible_and_rewritten_on_resume(base_run, tmp_path):
    import pandas as pd

    src, _ = base_run
    out = tmp_path / "ds"
    shutil.copytree(src, out)
    original = arrays_by_id(src)
    kept_parts = {p.name: p.read_bytes() for p in (out / "index").glob("*.parquet") if p.name != "shard-000001.parquet"}

    (out / "index" / "shard-000001.parquet").unlink()
    chunk = sorted(p for p in (out / "shards" / "shard-000001.zarr" / "x").rglob("*") if p.is_file() and p.name != "zarr.json")[0]
    chunk.write_bytes(chunk.read_bytes()[:7])  # a truncated chunk, as a crash mid-write leaves it

    reader = open_dataset(str(out))
    assert reader.committed_shards() == {0, 2} and reader.uncommitted_shards() == {1}
    shard1_ids = range(SHARD, 2 * SHARD)
    with pytest.raises(ArcflowError):
        reader.read_sample(shard1_ids[0])
    df = pd.read_parquet(out / "index")
    assert len(df) == (N - SHARD) * STEPS and not set(df["sample_id"]) & set(shard1_ids)

    summary = generate_trajectories(base_config(out, resume=True), progress=False)
    assert (summary.shards_written, summary.shards_skipped) == (1, 2)
    reader = open_dataset(str(out))
    assert reader.committed_shards() == {0, 1, 2} and not reader.uncommitted_shards()
    assert_same_arrays(arrays_by_id(out), original)
    for name, data in kept_parts.items():  # committed shards were not touched
        assert (out / "index" / name).read_bytes() == data


# -- bad input -------------------------------------------------------------------------------------------


@pytest.fixture
def no_ray_start(monkeypatch):
    """Fails a job that gets as far as (starting or joining) Ray, where its workers start."""
    from arcflow.pipeline import generate

    def refuse(*args, **kwargs):
        raise AssertionError("the job went on to start Ray and its workers")

    monkeypatch.setattr(generate, "start_ray", refuse)


@pytest.fixture
def prompts_files(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    return {"missing": tmp_path / "no-such-prompts.txt", "empty": empty}


BAD_INPUTS = {
    "missing prompts file": (["--prompts", "{missing}"], ["prompts file not found"]),
    "empty prompts file": (["--prompts", "{empty}"], ["prompts file is empty"]),
    "zero samples": (["--num-samples", "0"], ["--num-samples"]),
    "zero steps": (["--steps", "0"], ["--steps"]),
    "zero shard size": (["--shard-size", "0"], ["--shard-size"]),
    "negative guidance": (["--guidance", "-1.5"], ["--guidance"]),
    "unknown teacher": (["--teacher", "no-such-teacher"], ["unknown teacher"]),
    "unknown dtype": (["--dtype", "float64"], ["--dtype"]),
    "bad threads": (["--threads", "0"], ["--threads"]),
    "zero keyframe interval": (["--keyframe-every", "0"], ["--keyframe-every"]),
    "zero seeds per prompt": (["--seeds-per-prompt", "0"], ["--seeds-per-prompt"]),
    "different teacher": ([], ["different settings", "teacher: 'gpu-latency-sim' != 'digits'"]),
    "different config with resume": (["--steps", str(STEPS + 1), "--resume"], ["different settings", "steps"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_touches_nothing(case, base_run, prompts_files, capfd, no_ray_start):
    out, _ = base_run
    extra, fragments = BAD_INPUTS[case]
    extra = [a.format(**prompts_files) for a in extra]
    before = tree_hash(out)
    code, _, err = run_cli(capfd, "generate-trajectories", "--out", out, *BASE_CLI, *extra)
    assert_one_line_error(code, err, *fragments)
    assert tree_hash(out) == before


EXISTING = {
    "different config": (dict(steps=STEPS + 1), ["different settings", "steps"]),
    "different config with resume": (dict(seed=SEED + 1, resume=True), ["different settings", "seed"]),
    "same config without resume": ({}, ["already exists", "--resume"]),
}


@pytest.mark.parametrize("case", list(EXISTING))
def test_existing_dataset_is_refused_before_any_worker_starts(case, base_run, no_ray_start):
    """The simulator job itself (Python API): same rules, same one line, nothing touched."""
    out, _ = base_run
    overrides, fragments = EXISTING[case]
    before = tree_hash(out)
    with pytest.raises(ArcflowError) as info:
        generate_trajectories(base_config(out, **overrides), progress=False)
    assert "\n" not in str(info.value) and all(f in str(info.value) for f in fragments), info.value
    assert tree_hash(out) == before


def test_unknown_prompt_is_one_line(local_ray, tmp_path):
    """A prompt the teacher cannot condition on (checked by the driver before any shard runs): one line + exit 2."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten digit 7\nclass 1\n")
    out = tmp_path / "ds"
    res = subprocess.run(
        [*ARCFLOW, "generate-trajectories", "--out", str(out), *BASE_CLI, "--prompts", str(prompts),
         "--ray-address", local_ray],
        capture_output=True, text=True, timeout=120, env=SUBPROCESS_ENV,
    )
    assert_one_line_error(res.returncode, res.stderr, "does not understand the prompt", "class 1")
    assert not out.exists() or not any(out.iterdir())


def test_teacher_load_error_in_a_worker_is_an_arcflow_error(local_ray, tmp_path):
    """An error while an actor loads its teacher reaches the caller as ArcflowError, not ActorDiedError."""
    config = base_config(tmp_path / "ds", workers=1, cpus_per_worker=None, teacher_options={"no_such_option": 1})
    with pytest.raises(ArcflowError, match="no_such_option"):
        generate_trajectories(config, progress=False)


# -- two nodes -------------------------------------------------------------------------------------------


def test_two_node_cluster_uses_both_nodes(base_run, two_node_ray, tmp_path):
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    out = tmp_path / "ds"
    summary = generate_trajectories(
        base_config(out, shard_size=2, workers=2, cpus_per_worker=1.0, teacher_options={"latency_s": 0.02}),
        progress=False,
    )
    assert len(summary.nodes) == 2, summary.nodes
    assert sum(summary.nodes.values()) == summary.shards_written == 10
    assert_same_arrays(arrays_by_id(out), arrays_by_id(base_run[0]))
