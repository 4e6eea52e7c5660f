"""Datasets are checked, not trusted: the index against the arrays, the arrays' metadata against
dataset.json, every chunk against the shard's manifest; resume compares what determines the data;
one writing job per dataset; no in-memory output for a job whose shards are written by Ray workers.

Each class is tested on several members: the damage is found by ``verify`` (and uncommitted by
``--repair``, exactly the damaged shard), and every reader (``read_sample``, ``inspect``, the stream
that ``distill`` trains from) refuses it with one line instead of reading the wrong data.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from arcflow.core.errors import ArcflowError
from arcflow.pipeline.generation_config import GenerationConfig
from arcflow.storage.format import LOCK_FILE, MANIFEST_KEY
from arcflow.storage.reader import open_dataset
from arcflow.storage.streaming import TrajectoryStream
from arcflow.storage.verify import verify_dataset
from arcflow.storage.writer import check_dataset_target, dataset_lock
from cli_helpers import CLI_ENV, assert_one_line_error
from cli_helpers import run_in_process as cli
from dataset_factory import make_dataset, train_tiny_run

pytestmark = pytest.mark.usefixtures("one_thread")

SHARD0 = "shards/shard-000000.zarr"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A committed dataset of 2 shards (16 samples of 4 steps each)."""
    return make_dataset(tmp_path_factory.mktemp("trust") / "ds", num_samples=32, steps=4, shard_size=16)


@pytest.fixture
def ds(base, tmp_path) -> Path:
    """A private copy of the base dataset (tests damage it)."""
    shutil.copytree(base, tmp_path / "ds")
    return tmp_path / "ds"


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def edit_index(ds: Path, column: str, edit) -> None:
    """Rewrite shard 0's index part with ``column`` changed by ``edit`` (a numpy array in place);
    its manifest stays, as a careless edit with pyarrow would keep it."""
    path = ds / "index/shard-000000.parquet"
    table = pq.read_table(path)
    values = table.column(column).to_numpy().copy()
    edit(values)
    i = table.schema.get_field_index(column)
    pq.write_table(table.set_column(i, table.schema.field(i), pa.array(values, table.schema.field(i).type)), path)


def copy_chunk(array: str):
    def damage(ds: Path) -> None:
        chunk = "c/0/0/0/0" if array in ("u", "x") else "c/0"
        shutil.copy(ds / f"shards/shard-000001.zarr/{array}/{chunk}", ds / f"{SHARD0}/{array}/{chunk}")
    return damage


# Damage of one shard (shard 0): name -> (how, a fragment of the line naming it).
SHARD_DAMAGE = {
    "u chunk copied from another shard": (copy_chunk("u"), "u/c/0/0/0/0 differs from the shard's manifest"),
    "x chunk copied from another shard": (copy_chunk("x"), "x/c/0/0/0/0 differs from the shard's manifest"),
    "seed chunk copied from another shard": (copy_chunk("seed"), "seed/c/0 differs"),
    "garbled array zarr.json": (lambda ds: (ds / SHARD0 / "u/zarr.json").write_text("{garbage"), "array 'u'"),
    "array zarr.json with another shape": (
        lambda ds: edit_json(ds / SHARD0 / "x/zarr.json", lambda d: d.update(shape=[15, *d["shape"][1:]])), "array 'x'"),
    "garbled group zarr.json": (lambda ds: (ds / SHARD0 / "zarr.json").write_text("{garbage"), "zarr.json"),
    "damaged sigmas chunk": (lambda ds: flip_byte(ds / SHARD0 / "sigmas/c/0"), "array 'sigmas'"),
    "deleted array": (lambda ds: shutil.rmtree(ds / SHARD0 / "guidance"), "guidance"),
    "index row past the shard": (lambda ds: edit_index(ds, "row", lambda v: v.__setitem__(slice(0, 4), 16)),
                                 "index row 0 has row 16"),
    "negative index row": (lambda ds: edit_index(ds, "row", lambda v: v.__setitem__(slice(0, 4), -1)),
                           "index row 0 has row -1"),
    "wrong shard column": (lambda ds: edit_index(ds, "shard", lambda v: v.__setitem__(slice(None), 1)),
                           "rows are shard 1's"),
    "one row of another shard": (lambda ds: edit_index(ds, "shard", lambda v: v.__setitem__(5, 1)),
                                 "rows are shard 1's"),
    "swapped sample ids": (lambda ds: edit_index(ds, "sample_id", lambda v: v.__setitem__(slice(None), v[::-1])),
                           "sample_id"),
}


def without_manifest(ds: Path) -> None:
    """Strip the manifests: a dataset as arcflow wrote it before manifests existed."""
    for part in (ds / "index").glob("*.parquet"):
        table = pq.read_table(part)
        pq.write_table(table.replace_schema_metadata({}), part)


@pytest.mark.parametrize("case", list(SHARD_DAMAGE))
def test_verify_finds_each_damage_and_repair_uncommits_exactly_that_shard(case, ds):
    damage, fragment = SHARD_DAMAGE[case]
    damage(ds)
    report = verify_dataset(str(ds))
    assert list(report.problems) == [0], report.problems
    line = report.problems[0]
    assert fragment in line and "\n" not in line and "shard 0" in line, line
    verify_dataset(str(ds), repair=True)
    assert not (ds / "index/shard-000000.parquet").exists()
    assert (ds / "index/shard-000001.parquet").exists()
    assert verify_dataset(str(ds)).problems == {}


@pytest.mark.parametrize("case", ["u chunk copied from another shard", "damaged sigmas chunk", "negative index row",
                                  "swapped sample ids", "garbled array zarr.json"])
def test_the_stream_distill_reads_refuses_the_damage(case, ds):
    SHARD_DAMAGE[case][0](ds)
    stream = TrajectoryStream(str(ds), segment_bounds=[0, 2, 4], epochs=1, shuffle=False, shards=[0])
    with pytest.raises(ArcflowError, match="shard 0") as info:
        list(stream)
    assert "\n" not in str(info.value) and "verify" in str(info.value)


@pytest.mark.parametrize("case", ["index row past the shard", "negative index row", "swapped sample ids",
                                  "x chunk copied from another shard"])
def test_read_sample_and_inspect_sample_refuse_instead_of_reading_another_row(case, ds, tmp_path, capfd):
    SHARD_DAMAGE[case][0](ds)
    reader = open_dataset(str(ds))
    with pytest.raises(ArcflowError, match="shard 0"):
        reader.read_sample(0)
    code, _, err = cli(capfd, "inspect", ds, "--sample", "1", "--png", tmp_path / "s.png")
    assert_one_line_error(code, err, "shard 0", "verify")
    assert not (tmp_path / "s.png").exists()
    assert open_dataset(str(ds)).read_sample(16)["sample_id"] == 16  # the other shard still reads


@pytest.mark.parametrize("source, target", [(1, 0), (0, 1)])
def test_an_index_part_copied_from_another_shard_is_named_not_its_zarr_json(source, target, ds, capfd):
    part = f"index/shard-{target:06d}.parquet"
    shutil.copy(ds / f"index/shard-{source:06d}.parquet", ds / part)
    code, out, err = cli(capfd, "inspect", ds)  # plain inspect, no --sample
    assert_one_line_error(code, err, f"index part {part} of shard {target} is damaged", f"rows are shard {source}'s")
    assert "zarr.json" not in err and out == ""
    report = verify_dataset(str(ds), repair=True)
    assert list(report.problems) == [target] and part in report.problems[target]
    assert not (ds / part).exists() and (ds / f"index/shard-{source:06d}.parquet").exists()


def test_a_damaged_sigmas_chunk_stops_distill(ds, tmp_path):
    SHARD_DAMAGE["damaged sigmas chunk"][0](ds)
    with pytest.raises(ArcflowError, match="array 'sigmas'"):
        train_tiny_run(ds, tmp_path / "run", iters=2, checkpoint_every=2)


# -- dataset.json against the arrays: an edited header is the damaged object, never the shards ---------------
def drop_cond_field(d: dict) -> None:
    d["cond_spec"].pop("pooled_prompt_embeds")


# An edit of dataset.json: name -> (how, the field the line names, a fragment inspect's line names).
HEADER_DAMAGE = {
    "edited latent_shape": (lambda d: d.update(latent_shape=[8, 8]), "latent_shape", "array 'x' has shape"),
    "edited sigmas": (lambda d: d.update(sigmas=[1.0, 0.6, 0.3, 0.1, 0.0]), "sigmas", "sigmas"),
    "one more step": (lambda d: d.update(sigmas=[1.0, 0.8, 0.6, 0.4, 0.2, 0.0], steps=5), "sigmas", None),
    "edited storage dtype": (lambda d: d.update(storage_dtype="float16"), "storage_dtype", "stored as float32"),
    "edited keyframe interval": (lambda d: d.update(keyframe_every=1), "keyframe_every", "array 'x' has shape"),
    "edited cond shape": (lambda d: d["cond_spec"]["prompt_embeds"].update(shape=[4, 32]),
                          "cond_spec.prompt_embeds", "prompt_embeds"),
    "edited cond dtype": (lambda d: d["cond_spec"]["prompt_embeds"].update(dtype="int32"),
                          "cond_spec.prompt_embeds", "prompt_embeds"),
    "dropped cond field": (drop_cond_field, "cond_spec.pooled_prompt_embeds", None),
    "edited format version": (lambda d: d.update(format_version=1), "format_version", "array 'x' has shape"),
}


@pytest.mark.parametrize("case", list(HEADER_DAMAGE))
def test_an_edited_header_is_named_by_verify_and_repair_keeps_every_shard(case, ds, capfd):
    edit, field, _ = HEADER_DAMAGE[case]
    original = (ds / "dataset.json").read_text()
    edit_json(ds / "dataset.json", edit)
    report = verify_dataset(str(ds))
    assert report.problems == {} and report.header is not None, report
    assert "dataset.json is damaged" in report.header and f"{field}: dataset.json has" in report.header, report.header
    code, out, _ = cli(capfd, "verify", ds, "--no-progress")
    assert code == 1 and f"{field}: dataset.json has" in out and "shard 0" not in out, out
    code, _, err = cli(capfd, "verify", ds, "--repair", "--no-progress")
    assert_one_line_error(code, err, "dataset.json is damaged", field, "none was uncommitted")
    assert sorted(p.name for p in (ds / "index").iterdir()) == ["shard-000000.parquet", "shard-000001.parquet"]
    (ds / "dataset.json").write_text(original)  # what the line asks: the header restored, every sample is back
    assert verify_dataset(str(ds)).problems == {}
    assert open_dataset(str(ds)).read_sample(20)["sample_id"] == 20


@pytest.mark.parametrize("case", [c for c, (_, _, fragment) in HEADER_DAMAGE.items() if fragment])
def test_an_edited_header_is_refused_by_inspect(case, ds, capfd):
    edit, _, fragment = HEADER_DAMAGE[case]
    edit_json(ds / "dataset.json", edit)
    code, out, err = cli(capfd, "inspect", ds)
    assert_one_line_error(code, err, fragment)
    assert out == ""


def test_a_header_edit_beside_one_shards_own_damage_still_uncommits_nothing(ds):
    SHARD_DAMAGE["garbled group zarr.json"][0](ds)
    edit_json(ds / "dataset.json", HEADER_DAMAGE["edited latent_shape"][0])
    with pytest.raises(ArcflowError, match="latent_shape: dataset.json has"):
        verify_dataset(str(ds), repair=True)
    assert len(list((ds / "index").iterdir())) == 2


def test_shards_that_disagree_with_each_other_are_judged_one_by_one(ds):
    """Only a disagreement shared by every shard blames the header: one shard's altered metadata is its own."""
    without_manifest(ds)  # nothing binds the array metadata to the shard any more
    edit_json(ds / SHARD0 / "u/zarr.json", lambda d: d.update(shape=[16, 4, 8, 8]))
    report = verify_dataset(str(ds), repair=True)
    assert report.header is None and list(report.problems) == [0] and report.repaired == [0]
    assert (ds / "index/shard-000001.parquet").exists()


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_a_non_finite_sigma_in_dataset_json_is_refused_by_verify_and_readers(value, ds, capfd):
    text = (ds / "dataset.json").read_text()
    (ds / "dataset.json").write_text(text.replace('"sigmas": [\n    1.0,\n    0.75', f'"sigmas": [\n    1.0,\n    {value}'))
    code, _, err = cli(capfd, "verify", ds, "--no-progress")
    assert_one_line_error(code, err, "sigmas hold NaN or infinite values")
    with pytest.raises(ArcflowError, match="NaN or infinite"):
        TrajectoryStream(str(ds))


def test_a_dataset_without_manifests_still_reads_and_verifies(ds):
    """Datasets written before manifests: presence and checksums are still checked, placement is not."""
    without_manifest(ds)
    assert verify_dataset(str(ds)).problems == {}
    assert len(list(TrajectoryStream(str(ds), epochs=1))) == 32
    flip_byte(ds / SHARD0 / "u/c/0/0/0/0")
    assert list(verify_dataset(str(ds)).problems) == [0]


def test_the_manifest_covers_every_object_of_the_shard(base):
    manifest = json.loads(pq.read_schema(base / "index/shard-000000.parquet").metadata[MANIFEST_KEY.encode()])
    on_disk = {str(p.relative_to(base / SHARD0)) for p in (base / SHARD0).rglob("*") if p.is_file()}
    assert set(manifest) == on_disk


# -- resume compares what determines the data ----------------------------------------------------------------
@pytest.fixture
def prompted(tmp_path, monkeypatch) -> tuple[Path, Path]:
    """(a dataset header made from a prompts file with the default guidance, that prompts file);
    the working directory is tmp_path."""
    from arcflow.pipeline.generate import dataset_spec
    from arcflow.pipeline.registry import load_teacher
    from arcflow.pipeline.shard_worker import describe_teacher
    from arcflow.storage.writer import create_or_open_dataset

    monkeypatch.chdir(tmp_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a handwritten digit 3\na handwritten digit 7\n")
    config = GenerationConfig(out="ds", num_samples=8, steps=4, shard_size=4, prompts_file="prompts.txt")
    teacher = load_teacher("digits")
    info = describe_teacher(teacher, ["a handwritten digit 3", "a handwritten digit 7"], 4)
    create_or_open_dataset("ds", dataset_spec(config, info, teacher.default_guidance))
    return tmp_path / "ds", prompts


def resume_config(out, **overrides) -> GenerationConfig:
    settings = dict(out=str(out), num_samples=8, steps=4, shard_size=4, prompts_file="prompts.txt", resume=True)
    return GenerationConfig(**{**settings, **overrides})


def check_resume(config: GenerationConfig):
    return check_dataset_target(config.out, True, generation=config.content_config())


def test_the_prompts_file_is_compared_by_content_under_any_name(prompted, tmp_path):
    ds, prompts = prompted
    (tmp_path / "link.txt").symlink_to(prompts)
    (tmp_path / "other").mkdir()
    shutil.copy(prompts, tmp_path / "other/copy.txt")
    for name in ("prompts.txt", str(prompts), "link.txt", "./other/../prompts.txt", str(tmp_path / "other/copy.txt")):
        for out in ("ds", str(ds)):
            assert check_resume(resume_config(out, prompts_file=name)) is not None, name
    (tmp_path / "other/copy.txt").write_text("a handwritten digit 4\n")
    with pytest.raises(ArcflowError, match="prompts_sha256") as info:
        check_resume(resume_config("ds", prompts_file=str(tmp_path / "other/copy.txt")))
    assert len(str(info.value)) < 400


@pytest.mark.parametrize("recorded_default", [True, False], ids=["recorded resolved", "recorded None (older)"])
def test_an_explicit_guidance_equal_to_the_effective_one_resumes(prompted, recorded_default):
    ds, _ = prompted
    if not recorded_default:  # as datasets written before effective values were recorded
        def older(d):
            d["extra"]["generation"].update(guidance=None, prompts_file="prompts.txt")
            del d["extra"]["generation"]["prompts_sha256"]
        edit_json(ds / "dataset.json", older)
    assert check_resume(resume_config(ds, guidance=1.5)) is not None
    assert check_resume(resume_config(ds, guidance=None)) is not None
    with pytest.raises(ArcflowError) as info:
        check_resume(resume_config(ds, guidance=2.0))
    assert "guidance: 1.5 != 2.0" in str(info.value)


def test_a_refused_resume_names_only_the_fields_that_differ_briefly(prompted, capfd):
    ds, _ = prompted
    code, _, err = cli(capfd, "generate-trajectories", "--out", ds, "-n", "8", "--steps", "4", "--shard-size", "4",
                       "--prompts", "prompts.txt", "--seed", "5", "--resume")
    line = assert_one_line_error(code, err, "different settings", "seed: 0 != 5")
    assert "batch_size" not in line and "teacher" not in line and len(line) < 300, line


# -- one writing job per dataset ------------------------------------------------------------------------------
#: Holds a dataset's lock until a line arrives on its stdin.
HOLDER = ("import sys\nfrom arcflow.storage.writer import dataset_lock\n"
          "with dataset_lock(sys.argv[1]):\n    print('held', flush=True)\n    sys.stdin.readline()\n")


def hold_lock(path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=CLI_ENV)
    assert proc.stdout.readline().strip() == "held"
    return proc


def release(proc: subprocess.Popen) -> None:
    proc.communicate("done\n", timeout=60)


@pytest.fixture
def no_ray_start(monkeypatch):
    from arcflow.pipeline import generate

    def refuse(*args, **kwargs):
        raise AssertionError("the job went on to start Ray")

    monkeypatch.setattr(generate, "start_ray", refuse)


def test_a_second_writer_of_one_dataset_is_refused_under_any_name(ds, tmp_path, monkeypatch, no_ray_start):
    (tmp_path / "link").symlink_to(ds)
    monkeypatch.chdir(tmp_path)
    from arcflow.pipeline.generate import generate_trajectories

    holder = hold_lock(ds)
    try:
        for name in ("ds", str(ds), "link", "./link/"):
            config = GenerationConfig(out=name, num_samples=32, steps=4, shard_size=16, dtype="float32", batch_size=16,
                                      resume=True)
            with pytest.raises(ArcflowError, match=f"being written by another job \\(pid {holder.pid}\\)"):
                generate_trajectories(config, progress=False)
    finally:
        holder.send_signal(signal.SIGKILL)  # a holder that dies any way releases the lock
        holder.wait()
    with dataset_lock(str(ds)):  # the stale lock file left by the killed holder does not block
        pass
    assert not (ds / LOCK_FILE).exists()


def test_two_jobs_on_one_new_path_and_the_lock_leaves_nothing_behind(tmp_path):
    new = tmp_path / "new"
    holder = hold_lock(new)
    try:
        with pytest.raises(ArcflowError, match="being written by another job"):
            with dataset_lock(str(new)):
                pass
        # while a job holds a fresh path, its lock file does not make it "not an arcflow dataset"
        assert check_dataset_target(str(new)) is None
    finally:
        release(holder)
    with dataset_lock(str(new)):
        assert (new / LOCK_FILE).exists()
    assert not new.exists()  # created for the lock only, removed with it


# -- memory:// is refused where Ray workers write -------------------------------------------------------------
@pytest.mark.parametrize("url", ["memory://ds", "memory:///abs/ds", "memory://bucket/deep/ds"])
def test_an_in_memory_output_is_refused_before_anything_runs(url, capfd, no_ray_start):
    code, _, err = cli(capfd, "generate-trajectories", "--out", url, "-n", "4", "--steps", "2")
    assert_one_line_error(code, err, "in-memory filesystem", "object store")


def test_help_no_longer_offers_memory(capfd):
    code, out, _ = cli(capfd, "generate-trajectories", "--help")
    text = " ".join(out.replace("│", " ").split())
    assert code == 0 and text.count("memory://") == 1 and "not memory://" in text


def test_the_python_storage_api_still_takes_memory_urls(base):
    """In one process memory:// is fine (tests and notebooks use it): only Ray jobs refuse it."""
    from arcflow.storage.writer import create_or_open_dataset

    reader = open_dataset(str(base))
    url = f"memory://trust-{os.getpid()}/ds"
    writer = create_or_open_dataset(url, reader.spec)
    arrays = reader.read_shard(0)
    ids = arrays["sample_id"]
    writer.write_shard(0, arrays["x"], arrays["u"], arrays["sigmas"], {k: arrays[k] for k in reader.spec.cond_spec},
                       ids, arrays["seed"], ["p"] * len(ids), arrays["guidance"])
    assert verify_dataset(url).problems == {}
    np.testing.assert_array_equal(open_dataset(url).read_shard(0)["u"], arrays["u"])


def test_a_resume_by_another_prompts_path_and_explicit_default_guidance_finishes_the_same_data(
        ray_session, tmp_path, monkeypatch):
    """Through Ray, as a user: the job made with a relative --out (the Ray workers have another
    working directory) and prompts path and the default guidance, one shard uncommitted, then resumed
    naming both absolutely (the prompts via a symlink) and the guidance explicitly: only that shard
    is rewritten, and identically."""
    from arcflow.pipeline.generate import generate_trajectories

    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.txt").write_text("a handwritten digit 3\na handwritten digit 7\n")
    (tmp_path / "link.txt").symlink_to(tmp_path / "prompts.txt")
    job = dict(out="ds", num_samples=8, steps=3, shard_size=4, batch_size=4, dtype="float32", workers=1,
               cpus_per_worker=1.0)
    generate_trajectories(GenerationConfig(**job, prompts_file="prompts.txt"), progress=False)
    before = open_dataset("ds").read_shard(1)
    (tmp_path / "ds/index/shard-000001.parquet").unlink()
    summary = generate_trajectories(
        GenerationConfig(**{**job, "out": str(tmp_path / "ds")}, prompts_file=str(tmp_path / "link.txt"), guidance=1.5,
                         resume=True), progress=False)
    assert (summary.shards_written, summary.shards_skipped) == (1, 1)
    after = open_dataset("ds").read_shard(1)
    for name in ("x", "u", "sample_id", "seed"):
        np.testing.assert_array_equal(after[name], before[name])
    assert verify_dataset("ds").problems == {} and not (tmp_path / "ds" / LOCK_FILE).exists()
