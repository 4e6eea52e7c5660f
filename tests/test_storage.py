"""Trajectory dataset writer, reader, commit protocol (real Zarr + Parquet files); format v2 specifics
are in test_format_v2.py."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from arcflow.storage import DatasetSpec, create_or_open_dataset, open_dataset
from arcflow.core.errors import ArcflowError
from arcflow.storage.format import FORMAT_VERSION, index_part_name, shard_zarr_name

S = 6
LAT = (16, 4)
COND = {"prompt_embeds": ((3, 8), "float32"), "pooled_prompt_embeds": ((5,), "float32"), "label": ((), "int64")}


def make_spec(**kw) -> DatasetSpec:
    args = dict(
        teacher_id="digits",
        teacher_revision="sha256:abc",
        latent_shape=LAT,
        sigmas=np.linspace(1.0, 0.0, S + 1),
        shift=1.0,
        guidance=3.0,
        num_samples=10,
        shard_size=4,
        seed=7,
        cond_spec=COND,
        prompts_source="builtin",
    )
    args.update(kw)
    return DatasetSpec(**args)


def make_shard(spec: DatasetSpec, shard: int, rng_seed: int = 0):
    ids = np.array(list(spec.shard_samples(shard)), dtype=np.int64)
    n = len(ids)
    rng = np.random.default_rng(rng_seed + shard)
    u = rng.standard_normal((n, S, *LAT)).astype(np.float32)
    x = euler_states(rng.standard_normal((n, *LAT)).astype(np.float32), u, spec.sigmas)
    cond = {
        "prompt_embeds": rng.standard_normal((n, 3, 8)).astype(np.float32),
        "pooled_prompt_embeds": rng.standard_normal((n, 5)).astype(np.float32),
        "label": ids % 10,
    }
    return dict(
        shard_id=shard, x=x, u=u, sigmas=np.asarray(spec.sigmas), cond=cond, sample_ids=ids,
        seeds=ids * 1000 + 1, prompts=[f"a handwritten digit {i % 10}" for i in ids], guidance=spec.guidance,
    )


def euler_states(noise: np.ndarray, u: np.ndarray, sigmas) -> np.ndarray:
    """States x_0..x_S of Euler steps through ``u`` from ``noise``, in float32 as the teacher steps."""
    sig = np.asarray(sigmas, dtype=np.float32)
    x = np.empty((u.shape[0], u.shape[1] + 1, *u.shape[2:]), np.float32)
    x[:, 0] = noise
    for j in range(u.shape[1]):
        x[:, j + 1] = x[:, j] - (sig[j] - sig[j + 1]) * u[:, j]
    return x


def write_all(url, spec, shards=None):
    w = create_or_open_dataset(url, spec)
    data = {}
    for s in range(spec.num_shards) if shards is None else shards:
        data[s] = make_shard(spec, s)
        w.write_shard(**data[s])
    return w, data


def mem_url() -> str:
    return f"memory://arcflow-test-{uuid.uuid4().hex[:8]}/ds"


def tree_bytes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16"])
def test_round_trip_each_dtype(tmp_path, dtype):
    spec = make_spec(storage_dtype=dtype, keyframe_every=1)  # every state stored: exact rounding
    _, data = write_all(str(tmp_path / "ds"), spec)
    r = open_dataset(str(tmp_path / "ds"))
    assert r.spec == spec and r.committed_shards() == {0, 1, 2}
    for s, d in data.items():
        got = r.read_shard(s)
        for name, ref in [("x", d["x"]), ("u", d["u"]), ("prompt_embeds", d["cond"]["prompt_embeds"])]:
            assert got[name].dtype == np.float32
            if dtype == "float32":
                expect = ref
            elif dtype == "float16":
                expect = ref.astype(np.float16).astype(np.float32)
            else:  # torch's bf16 rounding of the input
                expect = torch.from_numpy(ref).to(torch.bfloat16).float().numpy()
            np.testing.assert_array_equal(got[name], expect)
        np.testing.assert_array_equal(got["label"], d["cond"]["label"])
        assert got["label"].dtype == np.int64
        np.testing.assert_array_equal(got["sample_id"], d["sample_ids"])
        np.testing.assert_array_equal(got["seed"], d["seeds"])
        assert got["sigmas"].dtype == np.float64 and np.array_equal(got["sigmas"], np.asarray(spec.sigmas))
        np.testing.assert_array_equal(got["guidance"], np.full(len(d["sample_ids"]), 3.0, np.float32))
    one = r.read_sample(5)  # shard 1, row 1
    assert one["shard"] == 1 and one["row"] == 1 and one["prompt"] == "a handwritten digit 5"
    assert one["x"].shape == (S + 1, *LAT) and one["u"].shape == (S, *LAT)
    np.testing.assert_array_equal(one["x"], r.read_shard(1)["x"][1])


def test_bf16_storage_is_uint16_with_attribute_and_torch_input(tmp_path):
    import zarr

    spec = make_spec(storage_dtype="bfloat16")
    w = create_or_open_dataset(str(tmp_path / "ds"), spec)
    d = make_shard(spec, 0)
    ub = torch.from_numpy(d["u"]).to(torch.bfloat16)  # torch inputs, states stepped with the bf16 u
    d["x"], d["u"] = torch.from_numpy(euler_states(d["x"][:, 0], ub.float().numpy(), spec.sigmas)), ub
    w.write_shard(**d)
    g = zarr.open_group(str(tmp_path / "ds" / "shards" / shard_zarr_name(0)), mode="r")
    assert g["x"].dtype == np.uint16 and g["x"].attrs["arcflow_dtype"] == "bfloat16"
    bits = torch.from_numpy(g["u"][...].view(np.int16)).view(torch.bfloat16)
    assert torch.equal(bits, d["u"])
    assert g["x"].chunks[0] == spec.samples_per_chunk and g["x"].chunks[1:] == (len(spec.keyframe_steps), *LAT)


def test_index_columns_stats_and_row_counts(tmp_path):
    spec = make_spec()
    _, data = write_all(str(tmp_path / "ds"), spec)
    df = open_dataset(str(tmp_path / "ds")).index()
    assert list(df.columns) == [
        "sample_id", "shard", "row", "step", "sigma", "prompt", "seed", "guidance", "x_rms", "u_rms", "u_cos_prev",
    ]
    assert len(df) == spec.num_samples * S
    assert str(df["sample_id"].dtype) == "int64" and str(df["shard"].dtype) == "int32"
    assert str(df["step"].dtype) == "int32" and str(df["sigma"].dtype) == "float64"
    assert sorted(df["sample_id"].unique()) == list(range(10))
    d = data[1]
    rows = df[(df["shard"] == 1) & (df["row"] == 2)].sort_values("step")
    x, u = d["x"][2].astype(np.float64), d["u"][2].astype(np.float64)
    np.testing.assert_allclose(rows["x_rms"], np.sqrt((x[:S] ** 2).mean(axis=(1, 2))), rtol=1e-6)
    np.testing.assert_allclose(rows["u_rms"], np.sqrt((u ** 2).mean(axis=(1, 2))), rtol=1e-6)
    uf = u.reshape(S, -1)
    cos = (uf[1:] * uf[:-1]).sum(1) / np.linalg.norm(uf[1:], axis=1) / np.linalg.norm(uf[:-1], axis=1)
    assert np.isnan(rows["u_cos_prev"].iloc[0])
    np.testing.assert_allclose(rows["u_cos_prev"].iloc[1:], cos, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rows["sigma"], np.asarray(spec.sigmas)[:S])
    assert (rows["seed"] == d["seeds"][2]).all() and (rows["prompt"] == d["prompts"][2]).all()


def test_pandas_reads_index_without_arcflow(tmp_path):
    spec = make_spec()
    root = tmp_path / "ds"
    write_all(str(root), spec)
    # debris a crashed atomic write could leave, and an uncommitted shard: both must be invisible
    (root / "index" / f".{index_part_name(5)}.tmp-123-abcd").write_bytes(b"garbage, not parquet")
    (root / "shards" / shard_zarr_name(2)).rename(root / "shards" / "keep")
    code = (
        "import sys, pandas as pd\n"
        f"df = pd.read_parquet({str(root / 'index')!r})\n"
        "assert not any(m.startswith('arcflow') for m in sys.modules), 'arcflow imported'\n"
        "print(len(df), sorted(df['shard'].unique().tolist()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, check=True)
    assert out.stdout.split("\n")[0] == f"{10 * S} [0, 1, 2]"


def test_uncommitted_shard_invisible_and_rewritten(tmp_path):
    spec = make_spec()
    url = str(tmp_path / "ds")
    w, data = write_all(url, spec, shards=[0, 1])
    # a crash after the Zarr group but before the Parquet part: simulate with a half-written group
    w.write_shard(**make_shard(spec, 2, rng_seed=99))
    os.remove(tmp_path / "ds" / "index" / index_part_name(2))
    stale = tmp_path / "ds" / "shards" / shard_zarr_name(2) / "stale-file"
    stale.write_bytes(b"x")
    r = open_dataset(url)
    assert r.committed_shards() == {0, 1} and r.uncommitted_shards() == {2}
    assert set(r.index()["shard"]) == {0, 1}
    with pytest.raises(ArcflowError, match="not committed"):
        r.read_shard(2)
    assert r.require_committed_shards() == [0, 1] and r.require_committed_shards([1, 0, 1]) == [0, 1]
    with pytest.raises(ArcflowError, match=r"shards \[2\] are not committed"):
        r.require_committed_shards([0, 2])
    w2 = create_or_open_dataset(url, spec, resume=True)
    assert w2.pending_shards() == [2]
    d2 = make_shard(spec, 2)
    w2.write_shard(**d2)
    assert not stale.exists()
    assert r.committed_shards() == {0, 1, 2} and r.uncommitted_shards() == set()
    np.testing.assert_array_equal(r.read_shard(2)["u"], d2["u"].astype(np.float16).astype(np.float32))


def test_unknown_format_version_and_missing_dataset(tmp_path):
    spec = make_spec()
    url = str(tmp_path / "ds")
    write_all(url, spec, shards=[0])
    p = tmp_path / "ds" / "dataset.json"
    p.write_text(p.read_text().replace(f'"format_version": {FORMAT_VERSION}', '"format_version": 99'))
    for fn in (lambda: open_dataset(url), lambda: create_or_open_dataset(url, spec, resume=True)):
        with pytest.raises(ArcflowError) as e:
            fn()
        msg = str(e.value)
        assert "format_version 99" in msg and "\n" not in msg
    with pytest.raises(ArcflowError, match="does not exist"):
        open_dataset(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArcflowError, match="no dataset.json"):
        open_dataset(str(tmp_path / "empty"))
    # a dataset with no committed shards opens, but the distiller's check refuses it
    url2 = str(tmp_path / "fresh")
    create_or_open_dataset(url2, spec)
    r = open_dataset(url2)
    assert r.committed_shards() == set()
    with pytest.raises(ArcflowError, match="no committed shards") as e:
        r.require_committed_shards()
    assert "\n" not in str(e.value)
    assert len(r.index()) == 0


def test_spec_mismatch_refused_without_touching_data(tmp_path):
    spec = make_spec()
    url = str(tmp_path / "ds")
    write_all(url, spec, shards=[0, 2])
    before = tree_bytes(tmp_path / "ds")
    for other in (make_spec(seed=8), make_spec(storage_dtype="bfloat16"), make_spec(sigmas=np.linspace(1, 0, S + 1) ** 2)):
        for resume in (False, True):
            with pytest.raises(ArcflowError, match="different settings") as e:
                create_or_open_dataset(url, other, resume=resume)
            assert "\n" not in str(e.value)
    with pytest.raises(ArcflowError, match="already exists"):
        create_or_open_dataset(url, spec, resume=False)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file.txt").write_text("hi")
    with pytest.raises(ArcflowError, match="not an arcflow dataset"):
        create_or_open_dataset(str(tmp_path / "junk"), spec)
    assert tree_bytes(tmp_path / "ds") == before
    w = create_or_open_dataset(url, make_spec(), resume=True)  # same spec: allowed
    assert w.readable_shards() == {0, 2} and w.pending_shards() == [1]
    assert tree_bytes(tmp_path / "ds") == before


def test_write_validation_errors(tmp_path):
    spec = make_spec()
    w = create_or_open_dataset(str(tmp_path / "ds"), spec)
    d = make_shard(spec, 0)
    bad = dict(d, x=d["x"][:, :S])
    with pytest.raises(ArcflowError, match="x has shape"):
        w.write_shard(**bad)
    with pytest.raises(ArcflowError, match="conditioning fields"):
        w.write_shard(**dict(d, cond={"prompt_embeds": d["cond"]["prompt_embeds"]}))
    with pytest.raises(ArcflowError, match="overflow float16"):
        w.write_shard(**dict(d, u=d["u"] * 1e5))
    with pytest.raises(ArcflowError, match="NaN"):
        w.write_shard(**dict(d, x=np.full_like(d["x"], np.nan)))
    with pytest.raises(ArcflowError, match="out of range"):
        w.write_shard(**dict(d, shard_id=3))
    assert w.readable_shards() == set()


@pytest.mark.parametrize("kind", ["memory", "file"])
def test_fsspec_urls(tmp_path, kind):
    url = mem_url() if kind == "memory" else (tmp_path / "ds").as_uri()
    assert url.startswith(kind + "://")
    spec = make_spec(storage_dtype="bfloat16", compression="blosc-zstd")
    _, data = write_all(url, spec)
    r = open_dataset(url)
    assert r.committed_shards() == {0, 1, 2}
    np.testing.assert_array_equal(r.read_shard(1)["sample_id"], data[1]["sample_ids"])
    assert len(r.index()) == 10 * S
    b = r.bytes_on_disk()
    assert b["samples"] == 10 and b["total"] == b["dataset_json"] + b["index"] + b["shards"] > 0
    assert b["x"] > 0 and b["u"] > 0 and b["prompt_embeds"] > 0
    if kind == "file":
        assert (tmp_path / "ds" / "index" / index_part_name(0)).exists()
    with pytest.raises(ArcflowError, match="already exists"):
        create_or_open_dataset(url, spec)


def test_fingerprint_stable_and_sensitive(tmp_path):
    spec = make_spec()
    a, b = str(tmp_path / "a"), mem_url()
    write_all(a, spec, shards=[0, 1])
    write_all(b, spec, shards=[0, 1])
    fa = open_dataset(a).fingerprint()
    assert fa.startswith("sha256:") and fa == open_dataset(a).fingerprint() == open_dataset(b).fingerprint()
    w = create_or_open_dataset(a, spec, resume=True)
    w.write_shard(**make_shard(spec, 1))  # bit-identical rewrite: same fingerprint
    assert open_dataset(a).fingerprint() == fa
    w.write_shard(**make_shard(spec, 2))
    assert open_dataset(a).fingerprint() != fa


def test_spec_json_round_trip_and_chunking():
    spec = make_spec(extra={"true_cfg": True})
    again = DatasetSpec.from_json(spec.to_json())
    assert again == spec and again.steps == S and spec.num_shards == 3
    assert 1 <= spec.samples_per_chunk <= spec.shard_size
    big = make_spec(latent_shape=(4096, 64), sigmas=np.linspace(1, 0, 51), shard_size=64)
    assert big.samples_per_chunk == 1  # one trajectory per chunk for FLUX-sized latents
    # equal chunks (zarr stores a padded edge chunk at full size): 128 samples of 13 KB -> 2 x 64
    digits = make_spec(sigmas=np.linspace(1, 0, 51), shard_size=128, storage_dtype="float32")
    assert digits.samples_per_chunk == 64
    with pytest.raises(ArcflowError, match="storage dtype"):
        make_spec(storage_dtype="int8")
