"""Format v2: keyframed states rebuilt within the dtype's rounding, float8 velocities, conditioning once
per prompt, checksummed chunks (damage is one line naming shard and array), windowed segment reads,
`arcflow verify --repair` + `--resume`, and v1 datasets still read."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from arcflow.storage import DatasetSpec, TrajectoryStream, create_or_open_dataset, open_dataset
from arcflow.storage.chunk_store import StrictStore
from arcflow.core.errors import ArcflowError
from arcflow.storage.verify import verify_dataset
from cli_helpers import assert_process_failed_one_line, run_subprocess
from test_storage import euler_states

S, K = 12, 5
LAT = (16, 4)
FIXTURE = Path(__file__).parent / "fixtures" / "v1_digits"

#: Relative rounding (half an ulp) of each stored dtype, and float8's absolute subnormal step (times
#: the per-step scale): float8 e4m3fn keeps 3 mantissa bits, its smallest normal is 2^-6.
REL = {"float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8, "float8_e4m3": 2.0**-4}
FLOAT8_SUBNORMAL_HALF_STEP = 2.0**-10


def make_spec(**kw) -> DatasetSpec:
    args = dict(teacher_id="t", teacher_revision="r", latent_shape=LAT, sigmas=np.linspace(1, 0, S + 1) ** 1.5,
                shift=1.0, guidance=2.0, num_samples=8, shard_size=8, seed=0,
                cond_spec={"emb": ((3, 5), "float32"), "label": ((), "int64")})
    args.update(kw)
    return DatasetSpec(**args)


def shard_data(spec: DatasetSpec, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    n = spec.shard_size
    u = (rng.standard_normal((n, S, *LAT)) * rng.uniform(0.1, 3, (n, S, 1, 1))).astype(np.float32)
    x = euler_states(rng.standard_normal((n, *LAT)).astype(np.float32), u, spec.sigmas)
    prompts = [f"prompt {i % 3}" for i in range(n)]  # 3 prompts, several seeds each
    emb = {p: rng.standard_normal((3, 5)).astype(np.float32) for p in set(prompts)}
    cond = {"emb": np.stack([emb[p] for p in prompts]), "label": np.array([i % 3 for i in range(n)])}
    return dict(shard_id=0, x=x, u=u, sigmas=np.asarray(spec.sigmas), cond=cond, sample_ids=np.arange(n),
                seeds=np.arange(n) + 10, prompts=prompts, guidance=2.0)


def write(url, spec, data) -> None:
    create_or_open_dataset(str(url), spec).write_shard(**data)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float8_e4m3"])
def test_rebuilt_states_are_within_the_dtypes_rounding(tmp_path, dtype):
    """Bound, per element, for a state j rebuilt from keyframe k (k < j < next keyframe):
    |x_j' - x_j| <= r_x |x_k| + sum_{i=k}^{j-1} d_i (r_u |u_i| + a_i) + float32 accumulation,
    with r_x, r_u the states' and velocities' relative rounding, d_i = s_i - s_{i+1}, and a_i the
    float8 subnormal half-step times the step's scale (0 for the 16/32-bit dtypes)."""
    spec = make_spec(storage_dtype=dtype, keyframe_every=K)
    data = shard_data(spec)
    write(tmp_path / "ds", spec, data)
    got = open_dataset(str(tmp_path / "ds")).read_shard(0)
    x, u = data["x"].astype(np.float64), data["u"].astype(np.float64)
    r_x, r_u = REL[spec.state_dtype], REL[dtype]
    scale = np.abs(u).reshape(*u.shape[:2], -1).max(axis=2)[..., None, None] / 448.0
    a = FLOAT8_SUBNORMAL_HALF_STEP * scale if dtype == "float8_e4m3" else np.zeros_like(scale)
    assert np.all(np.abs(got["u"] - u) <= r_u * np.abs(u) + a + 1e-30)
    sig = np.asarray(spec.sigmas, dtype=np.float32).astype(np.float64)
    keys = spec.keyframe_steps
    assert keys == (0, 5, 10, 12)
    for k in keys:  # keyframes: just the state dtype's rounding
        assert np.all(np.abs(got["x"][:, k] - x[:, k]) <= r_x * np.abs(x[:, k]) + 1e-7)
    worst = 0.0
    for j in range(S + 1):
        k = max(key for key in keys if key <= j)
        if j == k:
            continue
        d = (sig[k:j] - sig[k + 1 : j + 1])[None, :, None, None]
        magnitude = np.abs(x[:, k]) + (d * np.abs(u[:, k:j])).sum(axis=1)
        bound = r_x * np.abs(x[:, k]) + (d * (r_u * np.abs(u[:, k:j]) + a[:, k:j])).sum(axis=1)
        bound += 4 * (j - k + 1) * 2.0**-24 * magnitude  # float32 rounding of the rebuild itself
        err = np.abs(got["x"][:, j] - x[:, j])
        assert np.all(err <= bound), (j, float((err - bound).max()))
        worst = max(worst, float((err / np.maximum(bound, 1e-30)).max()))
    assert worst > 0 or dtype == "float32"  # the bound is not vacuous: rounding does show up


def test_float8_velocities_are_bits_with_a_scale_per_sample_and_step(tmp_path):
    import zarr

    spec = make_spec(storage_dtype="float8_e4m3")
    data = shard_data(spec)
    write(tmp_path / "ds", spec, data)
    g = zarr.open_group(str(tmp_path / "ds" / "shards" / "shard-000000.zarr"), mode="r")
    assert g["u"].dtype == np.uint8 and g["u"].attrs["arcflow_dtype"] == "float8_e4m3"
    assert g["x"].dtype == np.float16  # keyframes stay 16-bit
    peak = np.abs(data["u"]).reshape(8, S, -1).max(axis=2)
    np.testing.assert_allclose(g["u_scale"][...], peak / 448.0, rtol=1e-6)
    ref = torch.from_numpy(data["u"] / (peak / 448.0)[..., None, None]).to(torch.float8_e4m3fn)
    assert np.array_equal(g["u"][...], ref.view(torch.uint8).numpy())  # torch's own rounding


def test_conditioning_is_stored_once_per_prompt(tmp_path):
    import zarr

    spec = make_spec()
    data = shard_data(spec)
    write(tmp_path / "ds", spec, data)
    g = zarr.open_group(str(tmp_path / "ds" / "shards" / "shard-000000.zarr"), mode="r")
    assert g["emb"].shape == (3, 3, 5) and g["label"].shape == (3,)  # 8 samples, 3 prompts
    got = open_dataset(str(tmp_path / "ds")).read_shard(0, rows=[7, 0, 4])
    np.testing.assert_array_equal(got["emb"], data["cond"]["emb"][[7, 0, 4]].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(got["label"], data["cond"]["label"][[7, 0, 4]])
    np.testing.assert_array_equal(got["sample_id"], [7, 0, 4])


def _chunk_files(shard: Path, name: str) -> list[Path]:
    return sorted(p for p in (shard / name).rglob("*") if p.is_file() and p.name != "zarr.json")


def _damage(path: Path, kind: str) -> None:
    raw = path.read_bytes()
    if kind == "flip":
        path.write_bytes(raw[:3] + bytes([raw[3] ^ 0x10]) + raw[4:])
    elif kind == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    else:
        path.unlink()


@pytest.mark.parametrize("kind", ["flip", "truncate", "delete"])
def test_damaged_chunk_in_every_array_is_one_line_naming_shard_and_array(tmp_path, kind):
    spec = make_spec(storage_dtype="float8_e4m3")
    clean = tmp_path / "clean"
    write(clean, spec, shard_data(spec))
    names = sorted(p.name for p in (clean / "shards" / "shard-000000.zarr").iterdir() if p.is_dir())
    assert set(names) == {"x", "u", "u_scale", "emb", "label", "cond_row", "sigmas", "sample_id", "seed", "guidance"}
    for name in names:
        ds = tmp_path / f"{kind}-{name}"
        shutil.copytree(clean, ds)
        _damage(_chunk_files(ds / "shards" / "shard-000000.zarr", name)[0], kind)
        with pytest.raises(ArcflowError) as info:
            open_dataset(str(ds)).read_shard(0)
        line = str(info.value)
        assert "\n" not in line and f"shard 0 array '{name}'" in line and "verify" in line, line
        report = verify_dataset(str(ds))
        assert list(report.problems) == [0] and f"array '{name}'" in report.problems[0]
        if name in ("x", "u", "emb"):  # the stream reports the same line
            with pytest.raises(ArcflowError, match=f"shard 0 array '{name}'"):
                list(TrajectoryStream(str(ds), epochs=1, cache_bytes=0))
    assert not verify_dataset(str(clean)).problems


def test_segment_read_touches_only_its_chunks(tmp_path, monkeypatch):
    spec = make_spec(latent_shape=(256, 64), sigmas=np.linspace(1, 0, 21), shard_size=3, num_samples=3,
                     cond_spec={}, steps_per_chunk=5, samples_per_chunk=1)
    assert spec.keyframes_per_chunk == 1 and spec.keyframe_steps == (0, 5, 10, 15, 20)
    rng = np.random.default_rng(0)
    u = rng.standard_normal((3, 20, 256, 64)).astype(np.float32)
    x = euler_states(rng.standard_normal((3, 256, 64)).astype(np.float32), u, spec.sigmas)
    create_or_open_dataset(str(tmp_path / "ds"), spec).write_shard(0, x, u, spec.sigmas, {}, [0, 1, 2], [0, 1, 2],
                                                                   ["p"] * 3, 2.0)
    shard = open_dataset(str(tmp_path / "ds")).shard(0)
    monkeypatch.setattr(StrictStore, "keys_read", [])

    def chunks_read():
        keys = sorted(k for k in StrictStore.keys_read if not k.endswith("zarr.json"))
        StrictStore.keys_read.clear()
        return keys

    state, vel = shard.segment(1, 10, 20)  # NFE=2's second segment: keyframe 10, blocks 2 and 3
    assert chunks_read() == ["u/c/1/2/0/0", "u/c/1/3/0/0", "x/c/1/2/0/0"]
    np.testing.assert_allclose(state, x[1, 10], atol=2e-3)
    shard.segment(2, 7, 14)  # NFE=3-like segment: keyframe 5 plus the velocities from there
    assert chunks_read() == ["u/c/2/1/0/0", "u/c/2/2/0/0", "x/c/2/1/0/0"]
    stream = TrajectoryStream(str(tmp_path / "ds"), segment_bounds=[0, 10, 20], epochs=1, cache_bytes=0, shuffle=False)
    items = list(stream)
    per_item = [k for k in chunks_read() if k.startswith(("x/", "u/"))]
    assert len(items) == 6 and len(per_item) == 6 * 3  # one keyframe and two velocity blocks per item


def test_v1_fixture_still_reads_streams_and_verifies(tmp_path):
    from safetensors.numpy import load_file

    reader = open_dataset(str(FIXTURE))
    assert reader.spec.format_version == 1 and reader.spec.keyframe_every == 1
    expected = load_file(str(FIXTURE.parent / "v1_digits_expected.safetensors"))
    for shard in (0, 1):
        for name, value in reader.read_shard(shard).items():
            np.testing.assert_array_equal(value, expected[f"{shard}/{name}"], err_msg=name)
    items = list(TrajectoryStream(str(FIXTURE), segment_bounds=[0, 5, 10], epochs=1, shuffle=False))
    assert len(items) == 12
    np.testing.assert_array_equal(items[1]["x"].numpy(), expected["0/x"][0, 5])
    np.testing.assert_array_equal(items[1]["u"].numpy(), expected["0/u"][0, 5:])
    assert not verify_dataset(str(FIXTURE)).problems
    copy = tmp_path / "v1"
    shutil.copytree(FIXTURE, copy)
    with pytest.raises(ArcflowError, match="format v1; this arcflow writes v2 only"):
        create_or_open_dataset(str(copy), make_spec(), resume=True)


# ~65 s of CLI runs; by default its parts run in test_dataset_trust (verify finds each damage, repair
# uncommits exactly that shard), test_hardening (resume rewrites a damaged shard identically) and
# test_format_v2's reader checks (a damaged chunk is one line).
@pytest.mark.slow
def test_verify_repair_and_resume_equal_an_undamaged_run(tmp_path):
    args = ["--num-samples", "6", "--steps", "6", "--shard-size", "3", "--batch-size", "3", "--no-progress"]
    clean, ds = tmp_path / "clean", tmp_path / "ds"
    res = run_subprocess("generate-trajectories", "--out", clean, *args)
    assert res.returncode == 0, res.stderr
    shutil.copytree(clean, ds)
    _damage(_chunk_files(ds / "shards" / "shard-000001.zarr", "u")[0], "flip")

    res = run_subprocess("verify", ds, "--no-progress")
    assert res.returncode == 1 and "shard 1 array 'u'" in res.stdout and "1 damaged" in res.stdout, res.stdout
    res = run_subprocess("inspect", ds, "--sample", "3", "--png", tmp_path / "strip.png")  # sample 3 is in shard 1
    assert_process_failed_one_line(res, "shard 1 array 'u'")
    res = run_subprocess("distill", ds, "--out", tmp_path / "run", "--iters", "4", "--batch-size", "4",
                         "--no-progress")
    assert_process_failed_one_line(res, "shard 1 array 'u'")
    res = run_subprocess("verify", ds, "--repair", "--no-progress")
    assert res.returncode == 0 and "uncommitted 1 (1)" in res.stdout, res.stdout
    assert open_dataset(str(ds)).committed_shards() == {0}
    res = run_subprocess("generate-trajectories", "--out", ds, *args, "--resume")
    assert res.returncode == 0 and "1 written, 1 already committed" in res.stdout, res.stdout + res.stderr
    a, b = open_dataset(str(clean)), open_dataset(str(ds))
    for shard in (0, 1):
        for name, value in a.read_shard(shard).items():
            np.testing.assert_array_equal(b.read_shard(shard)[name], value, err_msg=name)
    assert a.fingerprint() == b.fingerprint()
    assert run_subprocess("verify", ds, "--no-progress").returncode == 0


def test_seeds_per_prompt_groups_a_prompts_seeds_into_one_shard():
    from arcflow.pipeline.plan import plan_shard

    prompts = ["a", "b", "c"]
    plain = plan_shard(1, 20, 8, prompts, 0)
    grouped = plan_shard(1, 20, 8, prompts, 0, seeds_per_prompt=4)
    assert plain.prompts == ("c", "a", "b", "c", "a", "b", "c", "a")  # cycled: every prompt spread over shards
    assert grouped.prompts == ("c",) * 4 + ("a",) * 4  # samples 8..15: 4 seeds each of prompts 2 and 0
    assert grouped.seeds == plain.seeds and grouped.sample_ids == plain.sample_ids  # noise does not move
