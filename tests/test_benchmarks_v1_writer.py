"""benchmarks/v1_writer.py: the benchmark-only format v1 writer writes exactly what arcflow's v1
writer wrote (byte for byte, against the committed v1 fixture), and arcflow's reader reads it."""

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from safetensors.numpy import load_file
from v1_writer import V1Spec, V1WriteError, create_v1_dataset, write_v1_dataset

from arcflow.storage import open_dataset

FIXTURE = Path(__file__).parent / "fixtures" / "v1_digits"
EXPECTED = Path(__file__).parent / "fixtures" / "v1_digits_expected.safetensors"
STATS = ("x_rms", "u_rms", "u_cos_prev")


def _fixture_shards():
    arrays = load_file(str(EXPECTED))
    spec = json.loads((FIXTURE / "dataset.json").read_text())
    for shard in sorted({int(k.split("/")[0]) for k in arrays}):
        a = {k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith(f"{shard}/")}
        part = pq.read_table(FIXTURE / "index" / f"shard-{shard:06d}.parquet").to_pandas()
        prompts = part[part["step"] == 0].sort_values("row")["prompt"].tolist()
        yield dict(shard_id=shard, x=a["x"], u=a["u"], sigmas=a["sigmas"],
                   cond={k: a[k] for k in spec["cond_spec"]}, sample_ids=a["sample_id"], seeds=a["seed"],
                   prompts=prompts, guidance=a["guidance"])


def test_rewrites_the_v1_fixture_byte_for_byte(tmp_path):
    # The fixture's arrays decoded from float16 are exact in float32, so re-encoding them gives the same
    # chunks; only the index statistics differ (the fixture's came from the unrounded float32 data).
    out = tmp_path / "v1"
    spec = V1Spec.from_dict(json.loads((FIXTURE / "dataset.json").read_text()))
    write_v1_dataset(str(out), spec, _fixture_shards())
    assert (out / "dataset.json").read_bytes() == (FIXTURE / "dataset.json").read_bytes()
    want = sorted(p.relative_to(FIXTURE) for p in (FIXTURE / "shards").rglob("*") if p.is_file())
    got = sorted(p.relative_to(out) for p in (out / "shards").rglob("*") if p.is_file())
    assert got == want
    for rel in want:
        assert (out / rel).read_bytes() == (FIXTURE / rel).read_bytes(), rel
    for part in sorted((FIXTURE / "index").iterdir()):
        a, b = pq.read_table(part), pq.read_table(out / "index" / part.name)
        assert a.schema == b.schema
        for name in a.column_names:
            ca, cb = a.column(name).to_numpy(zero_copy_only=False), b.column(name).to_numpy(zero_copy_only=False)
            if name in STATS:
                np.testing.assert_allclose(cb, ca, rtol=2e-3, atol=1e-3)
            else:
                assert (ca == cb).all(), name


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_arcflow_reader_reads_what_it_writes(tmp_path, dtype):
    rng = np.random.default_rng(0)
    steps, lat, n = 6, (8, 4), 5
    sig = np.linspace(1, 0, steps + 1)
    x = rng.standard_normal((n, steps + 1, *lat)).astype(np.float32)
    u = rng.standard_normal((n, steps, *lat)).astype(np.float32)
    emb = rng.standard_normal((n, 3, 16)).astype(np.float32)
    cls = rng.integers(10, size=n)
    spec = V1Spec(teacher_id="t", teacher_revision="r", latent_shape=lat, sigmas=sig, shift=1.0, guidance=2.0,
                  num_samples=n, shard_size=3, seed=0, storage_dtype=dtype,
                  cond_spec={"emb": ((3, 16), "float32"), "cls": ((), "int64")})
    w = create_v1_dataset(str(tmp_path / "ds"), spec)
    for s, sl in enumerate((slice(0, 3), slice(3, 5))):
        ids = np.arange(n)[sl]
        w.write_shard(s, x[sl], u[sl], sig, {"emb": emb[sl], "cls": cls[sl]}, ids, ids + 100,
                      [f"p{i}" for i in ids], 2.0)
    r = open_dataset(str(tmp_path / "ds"))
    assert r.spec.format_version == 1 and r.spec.storage_dtype == dtype
    assert r.spec.samples_per_chunk == spec.samples_per_chunk
    tol = {"float32": 0, "float16": 1e-3, "bfloat16": 8e-3}[dtype]
    got = [r.read_shard(s) for s in (0, 1)]
    for name, ref in (("x", x), ("u", u), ("emb", emb)):
        np.testing.assert_allclose(np.concatenate([g[name] for g in got]), ref, rtol=tol, atol=tol)
    assert np.concatenate([g["cls"] for g in got]).tolist() == cls.tolist()
    assert np.concatenate([g["seed"] for g in got]).tolist() == list(range(100, 105))
    one = r.read_sample(4)
    assert one["prompt"] == "p4" and one["x"].shape == (steps + 1, *lat)
    idx = r.index()
    assert len(idx) == n * steps and set(idx["shard"]) == {0, 1}


def test_refuses_a_non_empty_target_and_bad_shapes(tmp_path):
    spec = V1Spec(teacher_id="t", teacher_revision="r", latent_shape=(4,), sigmas=[1.0, 0.0], shift=1.0, guidance=1.0,
                  num_samples=2, shard_size=2, seed=0)
    w = create_v1_dataset(str(tmp_path / "ds"), spec)
    with pytest.raises(V1WriteError):
        create_v1_dataset(str(tmp_path / "ds"), spec)
    with pytest.raises(V1WriteError):
        w.write_shard(0, np.zeros((2, 3, 4)), np.zeros((2, 1, 4)), [1.0, 0.0], {}, [0, 1], [0, 1], ["a", "b"], 1.0)
